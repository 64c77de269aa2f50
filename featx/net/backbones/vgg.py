"""VGG applied densely: the conv trunk, then fc6 as a 7x7 conv and fc7 as a 1x1 conv.

Paper, Sec. 3.2 and Appendix B: at test time the fully connected layers become convolutions
so the net runs on the whole rescaled image and yields a class-score (here: fc7) map.
The family's declaration (names, taps) is in featx.net.backbones; its lowering is
featx.net.plan's Plan.
"""

from __future__ import annotations

import torch
from torch import nn

from featx.errors import BadInput, option
from featx.net.backbones import VGG_NAMES, VGG_TAPS, LayerRow, layer_summary
from featx.net.shapes import layer_out_size, spoils_padding, zero_outside
from featx.net.weights import Weights, instantiate

LAYERS = tuple(t.name for t in VGG_TAPS)  # pool5, fc6, fc7: in order from the input

# torchvision's VGG configurations (torchvision.models.vgg.cfgs): a conv's channels, or "M" a max pool.
CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """torchvision's VGG, module for module: the same names (a torchvision state dict loads as
    is), built in the same order and initialised the same way (a seeded random init gives
    torchvision's numbers; tests hold it to that), without importing torchvision: its import
    loads torch._dynamo, about 1.2 s of a short run's start-up. Only its parts are used
    (features, classifier), so it has no forward."""

    def __init__(self, model: str):
        super().__init__()
        batch_norm, layers, channels = model.endswith("_bn"), [], 3
        for v in CONFIGS[model.removesuffix("_bn")]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            conv = nn.Conv2d(channels, v, kernel_size=3, padding=1)
            layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
            channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 1000),
        )
        if self.classifier[0].weight.is_meta:
            # Built to take a state dict's tensors (or to count): nothing to draw, and drawing on the
            # meta device goes through torch._refs, whose first call imports torch._dynamo (~1 s).
            return
        for m in self.modules():  # torchvision's init_weights, in its order
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


class DenseVGG(nn.Module):
    """VGG as timm writes it, made dense: `forward_features` is the conv trunk to pool5,
    `forward_head` fc6 (a 7x7 conv) + ReLU [+ fc7 (a 1x1 conv) + ReLU] and the spatial mean.

    `trunk` ends with pool5; `head` holds the fc layers up to the chosen layer (empty for
    pool5); `up_to(layer)` gives the same net, sharing its weights, ending at another layer.
    `forward_pooled` is what the describer calls (featx.net.backbones.DenseNet); `lower` makes
    it fast (featx.net.plan.Plan).
    """

    mixes_sizes = True  # images of different sizes share a padded batch exactly

    def __init__(self, trunk: nn.Sequential, head: nn.Sequential):
        super().__init__()
        self.trunk = trunk
        self.head = head

    @property
    def layer(self) -> str:
        """The layer the net ends at: pool5, fc6 or fc7."""
        return LAYERS[sum(isinstance(m, nn.Conv2d) for m in self.head)]

    @property
    def channels(self) -> int:
        """Channels of the layer's map: the descriptor's dimension per scale."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)][-1].out_channels

    def up_to(self, layer: str) -> DenseVGG:
        """The net ending at `layer` (pool5, fc6, fc7 no later than this net's), sharing weights."""
        if layer not in LAYERS or LAYERS.index(layer) > LAYERS.index(self.layer):
            raise BadInput(
                f"--layer {layer!r}: this net ends at {self.layer}; choose one of "
                f"{', '.join(LAYERS[: LAYERS.index(self.layer) + 1])}"
            )
        keep, convs = [], 0
        for m in self.head:
            convs += isinstance(m, nn.Conv2d)
            if convs > LAYERS.index(layer):
                break
            keep.append(m)
        return DenseVGG(self.trunk, nn.Sequential(*keep)).train(self.training)

    def forward_features(
        self, x: torch.Tensor, sizes: list[tuple[int, int]] | None = None, rezero: bool = True
    ) -> torch.Tensor:
        """Image batch [B, 3, H, W] -> pool5 map [B, 512, H/32, W/32] (floor at each pool).

        `sizes`: each image's valid (h, w) at the top-left of a zero-padded batch; the padding is
        zeroed again after every layer that spoils it, so each image's valid region is its map
        computed alone (`rezero=False`, for tests, skips that).
        """
        if sizes is None:
            return self.trunk(x)
        full = (x.shape[2], x.shape[3])
        for m in self.trunk:
            x = m(x)
            moved = layer_out_size(m, *full)
            if moved is not None:  # convs and pools move the valid region
                sizes, full = [layer_out_size(m, h, w) for h, w in sizes], moved
            if rezero and spoils_padding(m) and any(s != full for s in sizes):
                zero_outside(x, sizes)
        return x

    def forward_head(
        self, x: torch.Tensor, pool: bool = True, sizes: list[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """pool5 map -> the layer's map (`pool=False`) or its mean over positions [B, C].

        Paper, Sec. 3.2: the dense map is averaged spatially (here before any class scores).
        `sizes`: each image's valid pool5 (h, w), top-left; the mean is then over the positions
        whose fc6 window lies inside it, in fp32.
        """
        x = self.head(x)
        if not pool:
            return x
        if sizes is None:
            return x.mean(dim=(2, 3))
        valid = [self.head_size(h, w) for h, w in sizes]
        return torch.stack([x[i, :, :h, :w].float().mean(dim=(1, 2)) for i, (h, w) in enumerate(valid)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense map of the layer (no spatial mean): [B, C, H', W']."""
        return self.forward_head(self.forward_features(x), pool=False)

    def forward_pooled(
        self, x: torch.Tensor, sizes: list[tuple[int, int]] | None = None, rezero: bool = True
    ) -> torch.Tensor:
        """Batch [B, 3, H, W] -> fp32 [B, C]: the layer's map averaged over each image's valid
        positions, each image (valid (h, w) top-left, default: all of it) as if it ran alone."""
        sizes = list(sizes) if sizes is not None else [(x.shape[2], x.shape[3])] * x.shape[0]
        pool5 = [self.trunk_size(h, w) for h, w in sizes]
        return self.forward_head(self.forward_features(x, sizes, rezero), sizes=pool5)

    def trunk_size(self, height: int, width: int) -> tuple[int, int]:
        """The pool5 map's (h, w) for a height x width image."""
        return _through(self.trunk, height, width)

    def head_size(self, height: int, width: int) -> tuple[int, int]:
        """The layer's map (h, w) for an h x w pool5 map; refuses a map smaller than fc6's window."""
        h, w = _through(self.head, height, width)
        if self.head and (h < 1 or w < 1):
            k = self.head[0].kernel_size[0]
            raise BadInput(f"pool5 map {height}x{width} is smaller than fc6's {k}x{k} window; use larger scales")
        return h, w

    def lower(self, device: torch.device, dtype: torch.dtype, **options):
        """forward_pooled as a featx.net.plan.Plan on `device` in `dtype` (options: Plan's)."""
        from featx.net.plan import Plan

        return Plan(self, device, dtype, **options)

    def flops(self, height: int, width: int) -> int:
        """FLOPs of one forward pass on a height x width image (featx.net.backbones.vgg.layer_table)."""
        return sum(row.flops for row in layer_table(self, height, width))


def _through(modules: nn.Sequential, height: int, width: int) -> tuple[int, int]:
    for m in modules:
        height, width = layer_out_size(m, height, width) or (height, width)
    return height, width


def layer_table(net: DenseVGG, height: int, width: int) -> list[LayerRow]:
    """Each layer of `net` on a height x width image: output shape, parameters, FLOPs.

    FLOPs are 2 x the convolutions' multiply-adds; bias, ReLU, BN and pooling are left out
    (well under 0.1% for VGG), as is usual. Names follow the paper (conv3_2, pool4, fc6, ...).
    The one place featx counts FLOPs: the benchmarks and `featx model` use it. Shapes are
    computed, not run, so the net may live on the meta device (no weights loaded).
    """
    rows: list[LayerRow] = []
    c, h, w = 3, height, width
    block, index = 1, 0
    fc = 6
    modules = [("trunk", m) for m in net.trunk] + [("head", m) for m in net.head]
    for part, m in modules:
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, nn.Conv2d):
            (kh, kw) = m.kernel_size
            h, w = layer_out_size(m, h, w)
            c = m.out_channels
            flops = 2 * (m.in_channels // m.groups) * kh * kw * c * h * w
            if part == "trunk":
                index += 1
                name, kind = f"conv{block}_{index}", f"conv {kh}x{kw}"
            else:
                name, kind = f"fc{fc}", f"fc as conv {kh}x{kw}"
                fc += 1
            rows.append(LayerRow(name, kind, (c, h, w), params, flops))
        elif isinstance(m, nn.MaxPool2d):
            h, w = layer_out_size(m, h, w)
            k, s = (v[0] if isinstance(v, tuple) else v for v in (m.kernel_size, m.stride or m.kernel_size))
            rows.append(LayerRow(f"pool{block}", f"max {k}x{k}/{s}", (c, h, w), 0, 0))
            block, index = block + 1, 0
        elif isinstance(m, nn.BatchNorm2d) and rows:  # folded into its conv's line
            last = rows[-1]
            rows[-1] = LayerRow(last.name, last.kind + " + BN", last.shape, last.params + params, last.flops)
        elif isinstance(m, nn.ReLU) and rows and "ReLU" not in rows[-1].kind:
            last = rows[-1]
            rows[-1] = LayerRow(last.name, last.kind + " + ReLU", last.shape, last.params, last.flops)
    return rows


def model_summary(model: str, height: int = 224, width: int = 224, layer: str = "fc7") -> dict:
    """The dense `model`'s layer table at height x width, with totals; built on the meta device.

    `classifier_params` is fc8 (1000 ImageNet classes), which the descriptor does not use:
    torchvision counts it (VGG16: 138,357,544 parameters), the dense net to fc7 does not.
    """
    with torch.device("meta"):
        vgg = VGG(model)
    dense = dense_from_torchvision(vgg, layer)
    rows = layer_table(dense, height, width)
    if min(min(r.shape[1:]) for r in rows) < 1:
        pool5 = next(r for r in rows if r.name == "pool5").shape
        raise BadInput(
            f"--size {height}x{width} gives a {pool5[1]}x{pool5[2]} pool5 map, smaller than fc6's "
            f"7x7 window; use at least 224x224, or --layer pool5"
        )
    total = sum(p.numel() for p in vgg.parameters())
    classifier = sum(p.numel() for p in vgg.classifier[6].parameters())
    return layer_summary(model, layer, height, width, rows, "torchvision", total, classifier)


def summary_lines(s: dict) -> list[str]:
    """model_summary as `featx model` prints it: a header, one line per layer, the mean, totals."""
    _, height, width = s["input"]
    lines = [
        f"{s['model']} made dense (arXiv 1409.1556, Sec. 3.2), input 3x{height}x{width}, up to {s['layer']}",
        f"{'layer':<9}{'kind':<24}{'output':>16}{'parameters':>14}{'GFLOPs':>9}",
    ]
    for r in s["rows"]:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<9}{r.kind:<24}{shape:>16}{r.params:>14,}{r.flops / 1e9:>9.2f}")
    c, h, w = s["rows"][-1].shape
    lines.append(f"{'mean':<9}{'over ' + str(h * w) + ' positions':<24}{c:>16}{0:>14,}{0:>9.2f}")
    lines.append(f"total: {s['params']:,} parameters, {s['flops'] / 1e9:.2f} GFLOPs per image")
    lines.append(
        f"{s['counted_by']} counts {s['reference_params']:,} parameters: these plus the classifier's "
        f"fc8 ({s['classifier_params']:,}), which the descriptor does not use"
        + ("" if s["layer"] == "fc7" else f", and the fc layers after {s['layer']}")
    )
    return lines


def linear_as_conv(linear: nn.Linear, in_channels: int, kernel: int) -> nn.Conv2d:
    """The same weights as a conv: (out, in*k*k) -> (out, in, k, k), in torchvision's C,H,W order.

    The conv shares the Linear's storage: no random init and no copy of fc6's 411 MB.
    """
    conv = nn.utils.skip_init(
        nn.Conv2d,
        in_channels,
        linear.out_features,
        kernel_size=kernel,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    shape = (linear.out_features, in_channels, kernel, kernel)
    conv.weight = nn.Parameter(linear.weight.detach().view(shape), requires_grad=linear.weight.requires_grad)
    conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    return conv


def dense_from_torchvision(vgg: nn.Module, layer: str = "fc7") -> DenseVGG:
    """Reshape a torchvision VGG's classifier (or VGG's here) into the paper's fully
    convolutional net, up to `layer`."""
    fc6, fc7 = vgg.classifier[0], vgg.classifier[3]
    head = [
        linear_as_conv(fc6, 512, 7),
        nn.ReLU(inplace=True),
        linear_as_conv(fc7, fc6.out_features, 1),
        nn.ReLU(inplace=True),
    ]
    return DenseVGG(vgg.features, nn.Sequential(*head)).eval().up_to(layer)


def torchvision_model(model: str, weights: Weights) -> nn.Module:
    """torchvision's own VGG with the given weights (a seeded random init for 'random'): the
    reference the tests hold the dense net to (featx builds VGG itself: `vgg_module`)."""
    import torchvision

    return instantiate(
        lambda: torchvision.models.get_model(model, weights=None),
        weights,
        model,
        misfit=lambda g, e: _misfit(g, model, e),
    )


def vgg_module(model: str, weights: Weights) -> VGG:
    """featx's VGG (torchvision's, module for module) with the given weights."""
    return instantiate(lambda: VGG(model), weights, model, misfit=lambda g, e: _misfit(g, model, e))


def _shape_of(state: dict) -> tuple[int, bool]:
    """(conv layers, batch norm?) of a VGG state dict."""
    convs = sum(1 for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4)
    return convs, any(k.startswith("features.") and k.endswith("running_mean") for k in state)


def _misfit(given: dict, model: str, expected: dict) -> str:
    """Why a state dict does not load into torchvision's `model`, and what to do, in full words."""
    if not any(k.startswith("features.") for k in given):
        first = ", ".join(list(given)[:3]) or "none"
        return (
            f"it is not the state dict of a torchvision VGG (its first keys are {first}); give the weights of "
            "a torchvision VGG, saved with torch.save(model.state_dict(), FILE)"
        )
    convs, bn = _shape_of(given)
    if (convs, bn) != _shape_of(expected):
        fits = [n for n in VGG_NAMES if _shape_of(_meta_state(n)) == (convs, bn)]
        held = f"a VGG with {convs} conv layers" + (" and batch norm" if bn else "")
        return f"it holds {held}; " + (f"pass {option('model', fits[0])}" if fits else "no VGG of featx has that shape")
    differ = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    absent = [k for k in expected if k not in given]
    if differ:
        k = differ[0]
        what = f"{k} is {'x'.join(map(str, given[k].shape))}, {model} needs {'x'.join(map(str, expected[k].shape))}"
    else:
        what = f"{absent[0]} is missing" if absent else "its tensors are not the ones torchvision's VGG has"
    return f"{len(differ) + len(absent) or 1} tensor(s) differ ({what}); give the weights of torchvision's {model}"


def _meta_state(model: str) -> dict:
    """torchvision's `model` state dict, shapes only (on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return VGG(model).state_dict()


def build(model: str, weights: Weights, layer: str = "fc7") -> DenseVGG:
    """The dense `model` up to `layer` with `weights`, in eval mode on the CPU."""
    return dense_from_torchvision(vgg_module(model, weights), layer)


def kernels(device: torch.device, dtype: torch.dtype) -> str:
    """How the Plan runs VGG on `device` in `dtype`, in words (provenance)."""
    from featx.net.plan import conv_kernels

    return conv_kernels(device, dtype)


def mixes_sizes(model: str) -> bool:
    """VGG keeps a padded batch's padding out of every image (DenseVGG.forward_features, the Plan)."""
    return True
