"""A torchvision convnet lowered in place for inference on one device and dtype.

Each BatchNorm that directly follows a conv is folded into it (in fp32, rounded once to the
dtype), and the conv, with the ReLU after it, becomes one lowered step (plan.lower_conv, as
VGG's plan runs them): on a CPU with oneDNN's packed ops its weights are packed for each input
shape and the ReLU runs inside the conv; elsewhere F.conv2d and an in-place ReLU. A ResNet block's
last conv also takes the residual sum and its ReLU into the same oneDNN call. What was three or
four passes over each map (conv, BatchNorm, ReLU, the sum) is one. A ConvNeXt block's MLP runs
as two packed GEMMs, GELU inside the first, the layer scale folded into the second.

"Directly follows" is read from the modules, not traced: neighbours in a Sequential that runs
its children in order (torchvision's Conv2dNormActivation, its stems and downsamples), and the
convK/bnK pairs of ResNet's blocks; ResNet's blocks and ConvNeXt's CNBlock are the classes whose
forwards are known (torchvision's, and featx's own builds of them). Anything else runs as the
module it is. Lowering a lowered net again finds nothing left to lower. The numbers are the
module's up to rounding (tests: every family against torchvision to 1e-5 in fp32, padded mixed
batches included: the lowered convs are Conv2d to the padding hooks, with their kernel, stride
and padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featx.net.plan.plan import lower_conv
from featx.net.plan.steps import Conv, Linear

# The nominal input a conv's weights are first packed for (packed again per input shape).
NOMINAL_HW = (64, 64)
# A ConvNeXt block's MLP runs over row chunks whose hidden (4x wide) map is at most this many
# bytes, so it never reaches glibc's 32 MB mmap threshold (fresh pages, faulted in at every call:
# a stage-1 GEMM whose 72 MB output ran at 192 GFLOP/s instead of 346) and stays in cache for the
# second GEMM. ConvNeXt-T on Caltech-sized batches (4 images of 256-512 x 340-768): bf16 -9%
# (1.86 -> 1.69 s), fp32 under AVX2 -12% (4.27 -> 3.76 s); 256 KB chunks are slower than none,
# 8-24 MB within 2% of each other.
MLP_CHUNK_BYTES = 8 << 20


class LoweredConv2d(nn.Conv2d):
    """A conv with its BatchNorm folded and its ReLU fused, run as one lowered step.

    Still a Conv2d (kernel, stride, padding, groups) to featx.net.padding's hooks and to readers;
    its weight and bias are the folded ones. `forward(x, residual)`: relu?(conv(x) + residual),
    written into `residual` on oneDNN's packed path (a residual block's end). An input the step
    was not made for (another device or dtype) runs F.conv2d on the module's own weights.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, step: Conv):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=True,
            device="meta",
        )
        self.relu, self.step, self.folded = relu, step, bn is not None
        w = step.plain if step.plain is not None else step.weight  # the folded weight, not a packing
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(step.bias, requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if _made_for(self.step, x):
            return self.step(x) if residual is None else self.step.add_into(x, residual)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        fused = ["BatchNorm folded"] * self.folded + ["ReLU fused"] * self.relu
        packed = "oneDNN packed" if self.step.packed else "plain"
        return f"{super().extra_repr()}, {packed}" + "".join(f", {f}" for f in fused)


class LoweredResidual(nn.Module):
    """torchvision's ResNet BasicBlock or Bottleneck lowered: relu(convs(x) + shortcut(x)), the
    sum and its ReLU inside the last conv's call (written into the shortcut's map, which nothing
    else reads: the block's input when there is no downsample)."""

    def __init__(self, convs: list[LoweredConv2d], downsample: nn.Module | None):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = x
        for conv in self.convs[:-1]:
            out = conv(out)
        return self.convs[-1](out, shortcut)


class LoweredCNBlock(nn.Module):
    """torchvision's ConvNeXt block lowered: its MLP as two packed GEMMs over positions, GELU in
    the first, the layer scale folded into the second (x + scale * fc2(gelu(fc1(norm(dw(x)))))),
    the depthwise conv and LayerNorm as they are (stochastic depth is the identity in eval); on
    oneDNN's packed path the LayerNorm and MLP run over chunks of rows (MLP_CHUNK_BYTES).
    fc1, fc2 keep the folded weights as modules: an input the steps were not made for (another
    device or dtype) runs F.linear on them."""

    def __init__(self, block: nn.Module, device: torch.device, dtype: torch.dtype, packed: bool):
        super().__init__()
        seq = block.block  # dwconv, Permute to NHWC, LayerNorm, Linear, GELU, Linear, Permute back
        self.dwconv, self.norm = seq[0], seq[2]
        self.fc1 = _folded_linear(seq[3], None, device, dtype)
        self.fc2 = _folded_linear(seq[5], block.layer_scale.detach().reshape(-1), device, dtype)
        self.steps = [_gemm(fc, activation, packed) for fc, activation in ((self.fc1, "gelu"), (self.fc2, "none"))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dwconv(x)
        step1, step2 = self.steps
        made_for = _made_for(step1, d)
        if not (made_for and step1.packed):
            y = self.norm(d.permute(0, 2, 3, 1))
            y = step2(step1(y)) if made_for else self.fc2(F.gelu(self.fc1(y)))
            return y.permute(0, 3, 1, 2).add_(x)
        # Row chunks (MLP_CHUNK_BYTES), each summed into the block's input in place: x is a map
        # this trunk made, read by nothing after this block.
        c = d.shape[1]
        rows = d.permute(0, 2, 3, 1).reshape(-1, c)  # a view where d is channels-last
        out = x.contiguous(memory_format=torch.channels_last)
        sums = out.permute(0, 2, 3, 1).view(-1, c)
        n = max(64, MLP_CHUNK_BYTES // (4 * c * d.element_size()))
        for i in range(0, rows.shape[0], n):
            sums[i : i + n] += step2(step1(self.norm(rows[i : i + n])))
        return out


def _made_for(step: Conv | Linear, x: torch.Tensor) -> bool:
    """Whether `step` was lowered for x's device and dtype (its bias is on them)."""
    return x.device == step.bias.device and x.dtype == step.bias.dtype


def _folded_linear(linear: nn.Linear, scale, device, dtype) -> nn.Linear:
    """nn.Linear [x scale per output], folded in fp32 and rounded once to `dtype` on `device`."""
    w, b = linear.weight.detach().float(), linear.bias.detach().float()
    if scale is not None:
        w, b = w * scale.float()[:, None], b * scale.float()
    folded = nn.Linear(linear.in_features, linear.out_features, device="meta")
    folded.weight = nn.Parameter(w.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
    folded.bias = nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=False)
    return folded


def _gemm(linear: nn.Linear, activation: str, packed: bool) -> Linear:
    """The GEMM step of a (folded) Linear and its activation, its weights packed for oneDNN where `packed`."""
    w = linear.weight.detach()
    if packed:
        w = torch.ops.mkldnn._reorder_linear_weight(w, None)
    return Linear(w, linear.bias.detach(), activation, packed, linear.out_features)


def lower_convnet(trunk: nn.Module, device: torch.device, dtype: torch.dtype, packed: bool) -> None:
    """Lower `trunk` in place (see the module doc). Run it on the net as built (fp32, eval):
    each BatchNorm is folded from its own statistics."""
    with torch.no_grad():  # not inference mode: the folded weights become the modules' parameters
        _lower(trunk, torch.device(device), dtype, packed)


def _lower(module: nn.Module, device: torch.device, dtype: torch.dtype, packed: bool) -> None:
    for name, child in list(module.named_children()):
        if _is_torchvision(child, "convnext", "CNBlock"):
            setattr(module, name, LoweredCNBlock(child, device, dtype, packed))
        elif _is_resnet_block(child):
            setattr(module, name, _lower_block(child, device, dtype, packed))
            if child.downsample is not None:
                _lower(child.downsample, device, dtype, packed)
        else:
            _lower(child, device, dtype, packed)
    if _runs_in_order(module):
        _lower_sequence(module, device, dtype, packed)


def _lower_sequence(seq: nn.Sequential, device, dtype, packed: bool) -> None:
    """Conv [BatchNorm] [ReLU] neighbours of `seq` made one LoweredConv2d (the others Identity)."""
    names = list(seq._modules)
    children = [seq._modules[n] for n in names]
    i = 0
    while i < len(names):
        conv = children[i]
        if type(conv) is not nn.Conv2d or isinstance(conv.padding, str):
            i += 1
            continue
        j = i + 1
        bn = children[j] if j < len(names) and _foldable(children[j], conv) else None
        j += bn is not None
        relu = j < len(names) and type(children[j]) is nn.ReLU
        setattr(seq, names[i], _lowered(conv, bn, relu, device, dtype, packed))
        for k in range(i + 1, j + relu):
            setattr(seq, names[k], nn.Identity())
        i = j + relu


def _lower_block(block: nn.Module, device, dtype, packed: bool) -> LoweredResidual:
    pairs = _conv_bn_pairs(block)
    convs = [_lowered(conv, bn, True, device, dtype, packed) for conv, bn in pairs]
    return LoweredResidual(convs, block.downsample)


def _lowered(conv: nn.Conv2d, bn, relu: bool, device, dtype, packed: bool) -> LoweredConv2d:
    # Packed per input shape in every dtype: with ResNet-50's weights packed for one shape, bf16
    # convs on 224x224-288 images ran 3x slower (oneDNN chose kernels wanting another layout and
    # reordered the weights at every call); packing again at each new shape costs a few percent.
    step = lower_conv(conv, bn, relu, device, dtype, packed, (2, conv.in_channels, *NOMINAL_HW), per_shape=True)
    return LoweredConv2d(conv, bn, relu, step)


def _foldable(bn: nn.Module, conv: nn.Conv2d) -> bool:
    """An eval-mode BatchNorm2d with running statistics and an affine map over conv's outputs."""
    return (
        type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.weight is not None
        and bn.num_features == conv.out_channels
    )


def _runs_in_order(module: nn.Module) -> bool:
    """A Sequential whose forward is Sequential's own (its children, one after another)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_torchvision(module: nn.Module, family: str, *names: str) -> bool:
    """Whether `module` is one of the classes `names` of torchvision's models/`family`.py, or of
    featx's own build of them (featx.net.backbones.`family`): modules whose forward is known."""
    where = (f"torchvision.models.{family}", f"featx.net.backbones.{family}")
    return type(module).__module__ in where and type(module).__name__ in names


def _is_resnet_block(module: nn.Module) -> bool:
    """torchvision's BasicBlock or Bottleneck (their forward: conv-bn-relu pairs, then the sum
    with the shortcut and a ReLU), every BatchNorm foldable."""
    if not _is_torchvision(module, "resnet", "BasicBlock", "Bottleneck"):
        return False
    return all(type(conv) is nn.Conv2d and _foldable(bn, conv) for conv, bn in _conv_bn_pairs(module))


def _conv_bn_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """A ResNet block's (convK, bnK) in order: two in a BasicBlock, three in a Bottleneck."""
    return [(getattr(block, f"conv{k}"), getattr(block, f"bn{k}")) for k in (1, 2, 3) if hasattr(block, f"conv{k}")]
