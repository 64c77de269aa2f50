"""VGG applied densely: the conv trunk, then fc6 as a 7x7 conv and fc7 as a 1x1 conv.

Paper, Sec. 3.2 and Appendix B: at test time the fully connected layers become convolutions
so the net runs on the whole rescaled image and yields a class-score (here: fc7) map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from featx.errors import BadInput
from featx.net.weights import Weights

LAYERS = ("pool5", "fc6", "fc7")


class DenseVGG(nn.Module):
    """VGG as timm writes it, made dense: `forward_features` is the conv trunk to pool5,
    `forward_head` fc6 (a 7x7 conv) + ReLU [+ fc7 (a 1x1 conv) + ReLU] and the spatial mean.

    `trunk` ends with pool5; `head` holds the fc layers up to the chosen layer (empty for
    pool5); `up_to(layer)` gives the same net, sharing its weights, ending at another layer.
    """

    def __init__(self, trunk: nn.Sequential, head: nn.Sequential):
        super().__init__()
        self.trunk = trunk
        self.head = head

    @property
    def layer(self) -> str:
        """The layer the net ends at: pool5, fc6 or fc7."""
        return LAYERS[sum(isinstance(m, nn.Conv2d) for m in self.head)]

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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch [B, 3, H, W] -> pool5 map [B, 512, H/32, W/32] (floor at each pool)."""
        return self.trunk(x)

    def forward_head(self, x: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """pool5 map -> the layer's map (`pool=False`) or its mean over positions [B, C].

        Paper, Sec. 3.2: the dense map is averaged spatially (here before any class scores).
        """
        x = self.head(x)
        return x.mean(dim=(2, 3)) if pool else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense map of the layer (no spatial mean): [B, C, H', W']."""
        return self.forward_head(self.forward_features(x), pool=False)

    def flops(self, height: int, width: int) -> int:
        """FLOPs of one forward pass on a height x width image (featx.net.model.layer_table)."""
        return sum(row.flops for row in layer_table(self, height, width))


@dataclass(frozen=True)
class LayerRow:
    """One line of the architecture summary: a layer, its output shape, parameters and FLOPs."""

    name: str
    kind: str
    shape: tuple[int, int, int]  # C, H, W of the output
    params: int
    flops: int


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
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
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
            k, s, p, d = (
                v[0] if isinstance(v, tuple) else v
                for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation)
            )
            span_h, span_w = h + 2 * p - d * (k - 1) - 1, w + 2 * p - d * (k - 1) - 1
            h = (-(-span_h // s) if m.ceil_mode else span_h // s) + 1
            w = (-(-span_w // s) if m.ceil_mode else span_w // s) + 1
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
        vgg = getattr(torchvision.models, model)(weights=None)
    dense = dense_from_torchvision(vgg, layer)
    rows = layer_table(dense, height, width)
    if min(min(r.shape[1:]) for r in rows) < 1:
        pool5 = next(r for r in rows if r.name == "pool5").shape
        raise BadInput(
            f"--size {height}x{width} gives a {pool5[1]}x{pool5[2]} pool5 map, smaller than fc6's "
            f"7x7 window; use at least 224x224, or --layer pool5"
        )
    return {
        "model": model,
        "layer": layer,
        "input": (3, height, width),
        "rows": rows,
        "params": sum(r.params for r in rows),
        "flops": sum(r.flops for r in rows),
        "torchvision_params": sum(p.numel() for p in vgg.parameters()),
        "classifier_params": sum(p.numel() for p in vgg.classifier[6].parameters()),
    }


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


def dense_from_torchvision(vgg: torchvision.models.VGG, layer: str = "fc7") -> DenseVGG:
    """Reshape torchvision's classifier into the paper's fully convolutional net, up to `layer`."""
    fc6, fc7 = vgg.classifier[0], vgg.classifier[3]
    head = [
        linear_as_conv(fc6, 512, 7),
        nn.ReLU(inplace=True),
        linear_as_conv(fc7, fc6.out_features, 1),
        nn.ReLU(inplace=True),
    ]
    return DenseVGG(vgg.features, nn.Sequential(*head)).eval().up_to(layer)


def torchvision_vgg(model: str, weights: Weights) -> torchvision.models.VGG:
    """torchvision's own VGG with the given weights (a seeded random init for 'random')."""
    builder = getattr(torchvision.models, model)
    if weights.state_dict is None:
        # Seeded without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.identity["seed"])
            return builder(weights=None).eval()
    with torch.device("meta"):  # no random init of 138M parameters that the state dict replaces
        vgg = builder(weights=None)
    try:
        vgg.load_state_dict(weights.state_dict, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise BadInput(
            f"--weights {weights.identity.get('file', weights.identity)} does not fit {model} "
            f"({first[:160]}); pass the --model it was saved from"
        ) from None
    return vgg.eval()


def build(model: str, weights: Weights, layer: str = "fc7") -> DenseVGG:
    return dense_from_torchvision(torchvision_vgg(model, weights), layer)
