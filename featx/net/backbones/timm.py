"""Any timm model by `timm:NAME` (the optional extra: `pip install 'featx[timm]'`): convnets and ViTs.

The paper's protocol (arXiv 1409.1556, Sec. 3.2 and Appendix B) on a timm model: a convnet's
`forward_features` map is averaged over each image's valid positions, then `forward_head(...,
pre_logits=True)` runs on that mean (the global pool of a 1x1 map is the map), so at one scale
without flip the descriptor is timm's pre-logits. A ViT (timm's VisionTransformer family, DINOv2,
CLIP and DeiT weights included) is built with `dynamic_img_size=True`, so its position embeddings
are interpolated to each scale's token grid by timm; its descriptor is the mean of the patch
tokens after the final norm (`forward_features` without the prefix tokens), or the class token
(tap `cls`). A side that is not a multiple of the patch is centre-cropped to one (timm's patch
embedding refuses it otherwise). A ViT batches images of one token grid only; a convnet shares
padded mixed-size batches when featx.net.padding's hooks follow it and a probe on random images
confirms it (`exact_batches`), same-shape batches otherwise.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn

from featx.errors import BadInput, Unreachable
from featx.net.backbones import TIMM_PREFIX, LayerRow, Tap, get_backbone, layer_summary
from featx.net.backbones.convnet import DenseConvNet, kernels, layer_table, lines_of
from featx.net.backbones.convnet import table_lines as summary_lines
from featx.net.padding import Inexact, probe, randomize_
from featx.net.weights import Weights, instantiate, on_meta_device, reason

__all__ = ["build", "kernels", "mixes_sizes", "model_summary", "summary_lines", "tap", "torchvision_model"]

INSTALL = "pip install 'featx[timm]'"


def _timm():
    try:
        import timm
    except ImportError:
        raise BadInput(f"timm models need timm, which is not installed; {INSTALL}") from None
    return timm


def arch(model: str) -> str:
    """timm's name of `timm:NAME` (NAME may carry a pretrained tag: vit_small_patch14_dinov2.lvd142m)."""
    return model[len(TIMM_PREFIX) :]


def create(model: str, **kwargs) -> nn.Module:
    """timm's model (no pretrained weights unless asked), ViTs with dynamic_img_size=True; eval mode."""
    timm = _timm()
    name = arch(model)
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise BadInput(f"unknown timm model {name!r}; see timm.list_models('*{base.split('_')[0]}*') for the names")
    try:
        try:
            return timm.create_model(name, dynamic_img_size=True, **kwargs).eval()
        except TypeError as e:  # not a ViT: its class takes no dynamic_img_size
            if "dynamic_img_size" not in str(e):
                raise
            return timm.create_model(name, **kwargs).eval()
    except RuntimeError as e:
        if "pretrained tag" not in str(e):
            raise
        raise BadInput(f"unknown pretrained tag in timm model {name!r}; see timm.list_pretrained('{base}*')") from None


@cache
def _meta(model: str) -> nn.Module:
    """The model on the meta device: shapes, parameter counts and the pretrained config, no weights."""
    return on_meta_device(lambda: create(model))


def pretrained_cfg(model: str) -> dict:
    """timm's pretrained config of the model (mean, std, input size, hub id, ...)."""
    cfg = _meta(model).pretrained_cfg
    return dict(cfg) if not hasattr(cfg, "to_dict") else cfg.to_dict()


def is_vit(model: str) -> bool:
    """Whether the model gives tokens [B, N, C] (a ViT) rather than a map [B, C, H, W]."""
    h, w = pretrained_cfg(model).get("input_size", (3, 224, 224))[1:]
    with torch.inference_mode():
        return _meta(model).forward_features(torch.empty(1, 3, h, w, device="meta")).dim() == 3


def weights_identity(model: str, name: str) -> dict:
    """The identity of timm's pretrained weights of `model` ('default': those its name or tag names)."""
    if name != "default":
        raise BadInput(
            f"--weights {name!r} for {model}: a timm model takes 'default' (its pretrained weights; a tag in "
            f"timm:NAME.TAG picks which), a state-dict FILE, or 'random'"
        )
    cfg = pretrained_cfg(model)
    tag = cfg.get("tag")
    identity = {"kind": "timm", "name": f"{cfg.get('architecture', arch(model))}" + (f".{tag}" if tag else "")}
    for key in ("hf_hub_id", "url"):
        if cfg.get(key):
            identity[key] = cfg[key]
    return identity


def pretrained_state_dict(model: str) -> dict:
    """timm's pretrained weights of `model`, downloaded through timm (Hugging Face Hub) once."""
    try:
        return create(model, pretrained=True).state_dict()
    except (OSError, ConnectionError, TimeoutError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "download" not in str(e).lower() and "hub" not in str(e).lower():
            raise
        hub = pretrained_cfg(model).get("hf_hub_id") or arch(model)
        raise Unreachable(
            f"cannot download the timm weights of {arch(model)} from Hugging Face Hub ({hub}: {reason(e)}); "
            "timm keeps them in the Hugging Face cache (HF_HOME, default ~/.cache/huggingface): fetch them there "
            "where the hub is reachable, or pass --weights FILE (a state dict of this model), or --weights random "
            "for a smoke test"
        ) from None


def torchvision_model(model: str, weights: Weights) -> nn.Module:
    """timm's own model with `weights` (what the dense net is checked against), eval, on the CPU."""
    # timm's state dicts leave out non-persistent buffers (e.g. relative position indices): copy
    # into a built net rather than assign onto the meta device.
    return instantiate(lambda: create(model), weights, model, on_meta=False)


# -- the dense nets ----------------------------------------------------------------------------


class Features(nn.Module):
    """A timm model's forward_features as a module: the trunk featx.net.padding's hooks follow."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class PreLogits(nn.Module):
    """A timm convnet's forward_head(pre_logits=True) on [B, C] means (its global pool of a 1x1 map is the map)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x[:, :, None, None], pre_logits=True).flatten(1)


class SameShape(nn.Module):
    """A timm model on same-shape batches only (`mixes_sizes` False), its own forward on the
    whole canvas: a convnet whose padding featx cannot keep out, through timm's forward_features
    and forward_head(pre_logits=True) (its global pool). fp32 [B, C]."""

    mixes_sizes = False

    def __init__(self, model: nn.Module, *, name: str, tap: str, channels: int):
        super().__init__()
        self.model, self.name, self.tap, self.channels = model, name, tap, channels

    def forward_pooled(
        self, x: torch.Tensor, sizes: list[tuple[int, int]] | None = None, rezero: bool = True
    ) -> torch.Tensor:
        canvas = (x.shape[2], x.shape[3])
        if sizes is not None and any(tuple(s) != canvas for s in sizes):
            raise Inexact(f"{self.name} batches same-shape images only; got sizes {list(sizes)} in a {canvas} canvas")
        return self.pooled(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True).flatten(1).float()

    def lower(self, device: torch.device, dtype: torch.dtype, **options):
        """forward_pooled itself (torch's kernels), the net moved to `device` and `dtype` in place."""
        self.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        return self.forward_pooled

    def flops(self, height: int, width: int) -> int:
        """FLOPs of one forward pass on a height x width image (the layer table's, on the meta device)."""
        return get_backbone(self.name).summary(height, width, self.tap)["flops"]


class DenseViT(SameShape):
    """A timm ViT on the whole image: position embeddings interpolated to the grid (timm's
    dynamic_img_size), patch tokens after the final norm averaged (or the class token): fp32 [B, C].

    Same-shape batches only: padding would be tokens the attention reads. Sides are
    centre-cropped to multiples of the patch.
    """

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (H, W) = self.model.patch_embed.patch_size, (x.shape[2], x.shape[3])
        top, left = (H % ph) // 2, (W % pw) // 2
        tokens = self.model.forward_features(x[:, :, top : top + H - H % ph, left : left + W - W % pw])
        if self.tap == "cls":
            return tokens[:, 0].float()
        return tokens[:, self.model.num_prefix_tokens :].mean(dim=1, dtype=torch.float32)


def _convnet(model: nn.Module, name: str, tap: str, channels: int, exact: bool) -> nn.Module:
    if exact:
        return DenseConvNet(Features(model), PreLogits(model), name=name, tap=tap, channels=channels)
    return SameShape(model, name=name, tap=tap, channels=channels)


def _pre_logits(model: nn.Module, height: int, width: int) -> torch.Tensor:
    """timm's pre-logits of a meta-device input: its forward_features, then forward_head(pre_logits=True)."""
    x = torch.empty(1, 3, height, width, device="meta")
    return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)


def _least_scale(model: str) -> int:
    """The least square side a convnet's forward_features gives a position (binary search on the meta device)."""

    def works(q: int, r: int | None = None) -> bool:
        try:
            with torch.inference_mode():
                _pre_logits(_meta(model), q, r or q)
        except (RuntimeError, ValueError, AssertionError):
            return False
        return True

    lo, hi = 1, 1024
    if not (works(hi) and works(hi - 7, hi + 9)):
        h, w = pretrained_cfg(model).get("input_size", (3, 224, 224))[1:]
        raise BadInput(
            f"{model} takes only its own input size ({h}x{w}); featx needs a model that takes any size "
            "(timm's convnets, ViTs with dynamic_img_size)"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid + 1, hi)
    return lo


@cache
def tap(model: str, name: str) -> Tap:
    """The tap `name` of a timm model: its channels, stride and least scale, from the model."""
    meta = _meta(model)
    if is_vit(model):
        if name == "cls" and getattr(meta, "cls_token", None) is None:
            raise BadInput(f"--layer cls: {model} has no class token; use --layer pre_logits (the patch tokens' mean)")
        (ph, pw), (h, w) = meta.patch_embed.patch_size, pretrained_cfg(model).get("input_size", (3, 224, 224))[1:]
        try:
            with torch.inference_mode():
                meta.forward_features(torch.empty(1, 3, h + ph, w + 2 * pw, device="meta"))
        except (RuntimeError, ValueError, AssertionError):
            raise BadInput(
                f"{model} takes only its own input size ({h}x{w}); featx needs a ViT that interpolates its "
                "position embeddings (timm's dynamic_img_size)"
            ) from None
        p = max(ph, pw)
        return Tap(name, meta.num_features, p, p, f"a side under the patch ({p}) gives no token")
    if name == "cls":
        raise BadInput(f"--layer cls: {model} is a convnet (no class token); use --layer pre_logits")
    q = _least_scale(model)
    with torch.inference_mode():
        channels = _pre_logits(meta, max(q, 64), max(q, 64)).shape[1]
    stride = (meta.feature_info[-1].get("reduction", 0) if getattr(meta, "feature_info", None) else 0) or 0
    return Tap(name, channels, stride, q, f"a smaller side under {q} leaves {model}'s map no position")


@cache
def exact_batches(model: str) -> bool:
    """Whether a padded mixed-size batch of the convnet equals its images alone (1e-4, fp32).

    featx.net.padding's hooks must follow every layer (else Inexact), and a probe on two random
    images must agree, run on a randomly initialised copy whose biases and norm statistics are
    randomised too (at init they keep the padding at zero and would hide a leak). ViTs: False.
    """
    if is_vit(model):
        return False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = randomize_(create(model))
    q = tap(model, "pre_logits").min_scale
    try:
        dense = _convnet(net, model, "pre_logits", 0, exact=True)
        return probe(dense.forward_pooled, scale=max(1, math.ceil(q / 48))) <= 1e-4
    except (Inexact, RuntimeError, ValueError):  # a layer the hooks cannot follow, or one that changes layouts
        return False


def mixes_sizes(model: str) -> bool:
    """Whether the model shares padded mixed-size batches (exact_batches)."""
    return exact_batches(model)


def build(model: str, weights: Weights, tap_name: str) -> nn.Module:
    """The dense timm model at `tap_name` with `weights`, in eval mode on the CPU."""
    net = torchvision_model(model, weights)
    t = tap(model, tap_name)
    if is_vit(model):
        return DenseViT(net, name=model, tap=tap_name, channels=t.channels).eval()
    return _convnet(net, model, tap_name, t.channels, exact=exact_batches(model)).eval()


def model_summary(model: str, height: int, width: int, tap_name: str) -> dict:
    """The model's layer table at height x width with totals, on the meta device (no weights loaded)."""
    meta = _meta(model)
    t = tap(model, tap_name)
    if is_vit(model):
        (ph, pw), prefix = meta.patch_embed.patch_size, meta.num_prefix_tokens
        height, width = height - height % ph, width - width % pw
        if height < ph or width < pw:
            raise BadInput(f"--size smaller than {model}'s {ph}x{pw} patch; use a larger size")
        pool = (lambda y: y[:, 0]) if tap_name == "cls" else (lambda y: y[:, prefix:].mean(dim=1))
        label = "class token" if tap_name == "cls" else "patch tokens' mean"
        rows = layer_table(Features(meta), nn.Identity(), height, width, lines=lines_of(meta), pool=pool, pooled=label)
    else:
        rows = layer_table(Features(meta), PreLogits(meta), height, width, lines=lines_of(meta))
    own = sum(p.numel() for p in meta.parameters(recurse=False))  # position embeddings, class/register tokens
    if own:
        rows.insert(0, LayerRow("embeddings", "position embeddings, tokens", (own,), own, 0))
    classifier = meta.get_classifier()
    total = sum(p.numel() for p in meta.parameters())
    head = sum(p.numel() for p in classifier.parameters()) if classifier is not None else 0
    return layer_summary(model, t.name, height, width, rows, "timm", total, head)
