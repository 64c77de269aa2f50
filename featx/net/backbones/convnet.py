"""A convnet made dense the one way every family shares: trunk, mean over valid positions, head.

Paper, Sec. 3.2 and Appendix B: the net runs on the whole rescaled image and its last map is
averaged over all positions. For a modern convnet that map is the trunk's (everything before the
global pool), the average IS the global pool, and the head is what torchvision runs between that
pool and the final Linear (ResNet, RegNet, EfficientNet: nothing; ConvNeXt: its LayerNorm;
MobileNetV3: the classifier up to its last Linear), so at one scale without flip the descriptor is
the model's pre-logits. Padded mixed-size batches stay exact through featx.net.padding's hooks.
Each torchvision family's module (resnet, convnext, efficientnet, regnet, densenet, mobilenet)
says how its model splits into trunk and head (and what lowering does to it, its CPU fp32
layout, its own builder where it has one); timm's convnets use DenseConvNet too, unlowered.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from featx.errors import BadInput
from featx.net.backbones import LayerRow, get_backbone, layer_summary
from featx.net.padding import ExactPadding, valid_mean
from featx.net.plan import onednn_prepack_works
from featx.net.plan.lowered import lower_convnet
from featx.net.weights import Weights, instantiate, on_meta_device


class Pooled2d(nn.Module):
    """A layer written for [B, C, 1, 1] maps (ConvNeXt's LayerNorm2d) applied to [B, C] means."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x[:, :, None, None]).flatten(1)


class DenseConvNet(nn.Module):
    """trunk -> each image's map averaged over its valid positions -> head: fp32 [B, C].

    Hooks keep a padded batch's padding out of every image (featx.net.padding), so images of
    different sizes share batches (`mixes_sizes`); a trunk they cannot follow raises Inexact here.
    """

    mixes_sizes = True

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Module,
        *,
        name: str,
        tap: str,
        channels: int,
        nchw_on_cpu_fp32: bool = False,
        lowers: bool = False,
    ):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.name, self.tap, self.channels = name, tap, channels
        self.nchw_on_cpu_fp32 = nchw_on_cpu_fp32  # the family's declaration (TorchvisionFamily)
        self.lowers = lowers  # torchvision's modules, which featx.net.plan.lowered knows
        self.padding = ExactPadding(trunk)

    def forward_pooled(
        self, x: torch.Tensor, sizes: list[tuple[int, int]] | None = None, rezero: bool = True
    ) -> torch.Tensor:
        """Batch [B, 3, H, W] -> fp32 [B, C], each image (valid (h, w) top-left) as if it ran alone.

        `rezero=False` (tests) follows the valid sizes but leaves the padding as the layers make it.
        """
        canvas = (x.shape[2], x.shape[3])
        sizes = [tuple(s) for s in sizes] if sizes is not None else [canvas] * x.shape[0]
        y, valid = self.padding.run(x, sizes, fill=rezero)
        pooled = valid_mean(y, valid)
        weight = next(self.head.parameters(), None)
        if weight is None:  # nothing, or layers without parameters: in fp32
            return self.head(pooled)
        return self.head(pooled.to(weight.dtype)).float()

    def lower(self, device: torch.device, dtype: torch.dtype, prepack: bool = True, **options) -> Callable:
        """forward_pooled on the net moved to `device` and `dtype` in place, channels-last (NCHW
        where the family says so). A torchvision net is lowered first (featx.net.plan.lowered:
        BatchNorm folded, ReLU and residual sums fused, oneDNN's packed kernels on a CPU where
        `prepack`); on CUDA the padding is filled by one masked write per layer (few launches).
        The other Plan options (pass_pixels, ...) are VGG's."""
        device = torch.device(device)
        nchw = runs_nchw(device, dtype, self.nchw_on_cpu_fp32)
        self.eval()
        if self.lowers:
            self.padding.close()
            lower_convnet(self.trunk, device, dtype, packs(device, dtype, prepack))
            self.padding = ExactPadding(self.trunk)  # on the lowered modules
        self.padding.masks = device.type == "cuda"
        layout = torch.contiguous_format if nchw else torch.channels_last
        self.to(device=device, dtype=dtype, memory_format=layout)  # in place: torch runs it
        if not nchw:
            return self.forward_pooled
        return lambda x, sizes=None, rezero=True: self.forward_pooled(x.contiguous(), sizes, rezero)

    def flops(self, height: int, width: int) -> int:
        """FLOPs of one forward pass on a height x width image (from the layer table, on the meta device)."""
        return get_backbone(self.name).summary(height, width, self.tap)["flops"]


def runs_nchw(device: torch.device, dtype: torch.dtype, nchw_on_cpu_fp32: bool) -> bool:
    """Whether a net runs NCHW rather than channels-last on `device` in `dtype`."""
    return nchw_on_cpu_fp32 and torch.device(device).type == "cpu" and dtype == torch.float32


def packs(device: torch.device, dtype: torch.dtype, prepack: bool = True) -> bool:
    """Whether a lowered net's convs run oneDNN's packed kernels on `device` in `dtype`."""
    return prepack and torch.device(device).type == "cpu" and onednn_prepack_works(dtype)


def kernels(device: torch.device, dtype: torch.dtype, nchw_on_cpu_fp32: bool = False, lowering: str = "") -> str:
    """How a convnet runs, in words (provenance): lowered as `lowering` says (DenseConvNet.lower), or torch's own."""
    precision = str(dtype).removeprefix("torch.")
    layout = "NCHW" if runs_nchw(device, dtype, nchw_on_cpu_fp32) else "channels-last"
    cuda = torch.device(device).type == "cuda"
    if not lowering:
        return f"torch's own kernels ({'cuDNN' if cuda else 'oneDNN/ATen'}), {layout}, {precision}"
    where = "oneDNN's packed kernels" if packs(device, dtype) else "cuDNN" if cuda else "oneDNN/ATen"
    return f"{where}, {lowering}, {layout}, {precision}"


# -- the layer table -------------------------------------------------------------------------

# Containers whose children get a line each; any other module is one line (a block, a layer).
_EXPANDED = (nn.Sequential, nn.ModuleList)
# Per-position layers folded into the line above them (their FLOPs are not counted, as usual).
_FOLDED = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Dropout, nn.Identity)


def lines_of(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs a layer table reports: `module`'s children, containers opened."""
    out = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if type(child) in _EXPANDED:
            out += lines_of(child, path + ".")
        else:
            out.append((path, child))
    return out


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        (kh, kw), (sh, _) = m.kernel_size, m.stride
        groups = " depthwise" if m.groups > 1 and m.groups == m.in_channels else ""
        return f"conv {kh}x{kw}" + (f"/{sh}" if sh > 1 else "") + groups
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride or m.kernel_size))
        return f"{'max' if isinstance(m, nn.MaxPool2d) else 'avg'} {k}x{k}/{s}"
    if isinstance(m, nn.Linear):
        return f"linear {m.in_features}->{m.out_features}"
    if isinstance(m, Pooled2d):
        return _kind(m.layer)
    if isinstance(m, nn.BatchNorm2d):
        return "BN"
    return type(m).__name__.lstrip("_")


def layer_table(
    trunk: nn.Module,
    head: nn.Module,
    height: int,
    width: int,
    *,
    lines: list[tuple[str, nn.Module]] | None = None,
    pool: Callable | None = None,
    pooled: str = "over positions",
) -> list[LayerRow]:
    """Each block of trunk and head on a height x width image: output shape, parameters, FLOPs.

    FLOPs are torch's FlopCounterMode's (2 x multiply-adds of convs, linear layers and attention;
    norms, activations and pooling left out, as is usual); run on the meta device (no weights).
    `lines`: the (name, module) pairs to report (default: trunk's and head's blocks); only those
    that run are listed. Per-position layers are folded into the line above. `pool` turns the
    trunk's output into [B, C] (default: the mean over positions), a line of its own.
    """
    if lines is None:
        head_lines = (
            [] if isinstance(head, nn.Identity) else lines_of(head) if type(head) in _EXPANDED else [("head", head)]
        )
        lines = lines_of(trunk) + head_lines
    # Imported here, not with the module: it imports triton where installed (75 ms of every run).
    from torch.utils.flop_counter import FlopCounterMode

    rows: list[LayerRow] = []
    counter = FlopCounterMode(display=False)
    starts: dict[str, int] = {}

    def before(name):
        return lambda m, args: starts.__setitem__(name, counter.get_total_flops())

    def after(name):
        def hook(m, args, out):
            if not isinstance(out, torch.Tensor):
                return
            shape = tuple(out.shape[1:])
            # Only the parameters of the layers that ran (timm's head runs without its classifier).
            params = sum(own[id(sub)] for sub in m.modules() if id(sub) in ran)
            flops = counter.get_total_flops() - starts[name]
            if rows and isinstance(m, _FOLDED) and shape == rows[-1].shape:
                last = rows[-1]
                rows[-1] = LayerRow(
                    last.name, f"{last.kind} + {_kind(m)}", last.shape, last.params + params, last.flops
                )
            else:
                rows.append(LayerRow(name, _kind(m), shape, params, flops))

        return hook

    handles = []
    own, ran = {}, set()
    for _, m in lines:
        for sub in m.modules():
            own[id(sub)] = sum(p.numel() for p in sub.parameters(recurse=False))
            if own[id(sub)]:
                handles.append(sub.register_forward_pre_hook(lambda sub, args: ran.add(id(sub))))
    for name, m in lines:
        handles += [m.register_forward_pre_hook(before(name)), m.register_forward_hook(after(name))]
    try:
        with torch.inference_mode(), counter:
            y = trunk(torch.empty(1, 3, height, width, device="meta"))
            if y.dim() == 4 and min(y.shape[2:]) < 1:
                raise BadInput(f"--size {height}x{width} leaves the map no position; use a larger size")
            means = pool(y) if pool is not None else y.mean(dim=(2, 3))
            rows.append(LayerRow("mean", pooled, tuple(means.shape[1:]), 0, 0))
            head(means)
    except RuntimeError as e:
        if "too small" not in str(e) and "can't be greater than actual input size" not in str(e):
            raise
        raise BadInput(
            f"--size {height}x{width} is too small for this net ({str(e).splitlines()[0]}); use a larger size"
        ) from None
    finally:
        for h in handles:
            h.remove()
    return rows


def table_lines(s: dict) -> list[str]:
    """A summary as `featx model` prints it: a header, one line per block, totals."""
    _, height, width = s["input"]
    lines = [
        f"{s['model']} made dense (the paper's protocol, arXiv 1409.1556, Sec. 3.2), input 3x{height}x{width}, "
        f"up to {s['layer']}",
        f"{'layer':<26}{'kind':<30}{'output':>16}{'parameters':>14}{'GFLOPs':>9}",
    ]
    for r in s["rows"]:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<26}{r.kind[:29]:<30}{shape:>16}{r.params:>14,}{r.flops / 1e9:>9.2f}")
    lines.append(f"total: {s['params']:,} parameters, {s['flops'] / 1e9:.2f} GFLOPs per image")
    rest = s["reference_params"] - s["params"] - s["classifier_params"]
    lines.append(
        f"{s['counted_by']} counts {s['reference_params']:,} parameters: these plus the classifier's last "
        f"Linear ({s['classifier_params']:,}), which the descriptor does not use"
        + (f", and the layers after {s['layer']} ({rest:,})" if rest else "")
    )
    return lines


# -- torchvision's families ------------------------------------------------------------------


def named(model: nn.Module, name: str) -> nn.Sequential:
    """A trunk holding `model.<name>` under its own name, so that its layers keep torchvision's paths."""
    return nn.Sequential(OrderedDict([(name, getattr(model, name))]))


def up_to(trunk: nn.Sequential, tap: str) -> nn.Sequential:
    """`trunk` cut after the module at path `tap` (layer3, features.5, trunk_output.block2, ...), sharing it."""
    first, _, rest = tap.partition(".")
    children = list(trunk.named_children())
    k = [n for n, _ in children].index(first)
    last = up_to(children[k][1], rest) if rest else children[k][1]
    return nn.Sequential(OrderedDict([*children[:k], (first, last)]))


def _torchvision_builds(name: str) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None)


@dataclass(frozen=True)
class TorchvisionFamily:
    """A torchvision convnet family: how its model splits into trunk and head at a tap, and its last Linear."""

    title: str  # the family in words (messages)
    split: Callable[[nn.Module, str], tuple[nn.Module, nn.Module]]
    classifier: Callable[[nn.Module], nn.Module]  # the final Linear, which the descriptor leaves out
    # NCHW rather than channels-last in fp32 on a CPU, where the family's layers run faster so
    # under oneDNN (measured per family: benchmarks/README.md).
    nchw_on_cpu_fp32: bool = False
    # What featx.net.plan.lowered does to the family's modules, in words (provenance).
    lowering: str = "BatchNorm folded, ReLU fused"
    # The family's own builder of torchvision's model (same modules, names and seeded init,
    # tested against torchvision), where it has one: no torchvision import, whose cost (1.1-1.6 s,
    # most of it torch._dynamo) a short run pays. None: torchvision builds it.
    make: Callable[[str], nn.Module] | None = None

    def torchvision_model(self, name: str, weights: Weights) -> nn.Module:
        """torchvision's own model with `weights` (a seeded random init for 'random'), eval, CPU."""
        return instantiate(lambda: _torchvision_builds(name), weights, name)

    def model(self, name: str) -> nn.Module:
        """A new torchvision model `name` (random init, train mode): the family's builder, else torchvision's."""
        return self.make(name) if self.make is not None else _torchvision_builds(name)

    def build(self, name: str, weights: Weights, tap: str) -> DenseConvNet:
        """The dense net up to `tap` with `weights`, in eval mode on the CPU."""
        trunk, head = self.split(instantiate(lambda: self.model(name), weights, name), tap)
        channels = get_backbone(name).tap(tap).channels
        nchw = self.nchw_on_cpu_fp32
        dense = DenseConvNet(trunk, head, name=name, tap=tap, channels=channels, nchw_on_cpu_fp32=nchw, lowers=True)
        return dense.eval()

    def model_summary(self, name: str, height: int, width: int, tap: str) -> dict:
        """The dense net's layer table at height x width, with totals; built on the meta device."""
        model = on_meta_device(lambda: self.model(name)).eval()
        total = sum(p.numel() for p in model.parameters())
        classifier = sum(p.numel() for p in self.classifier(model).parameters())
        rows = layer_table(*self.split(model, tap), height, width)
        return layer_summary(name, tap, height, width, rows, "torchvision", total, classifier)

    def summary_lines(self, s: dict) -> list[str]:
        """model_summary as `featx model` prints it."""
        return table_lines(s)

    def kernels(self, device: torch.device, dtype: torch.dtype) -> str:
        """How the family runs, in words (provenance)."""
        return kernels(device, dtype, self.nchw_on_cpu_fp32, self.lowering)

    def mixes_sizes(self, name: str) -> bool:
        """torchvision's convnets keep a padded batch exact (featx.net.padding; tests check each family)."""
        return True
