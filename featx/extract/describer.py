"""The describer: a dense net on a device that turns batches of images into pooled maps, and
the one factory that builds it from an ExtractConfig.

Every engine uses the factory (featx extract, --engine ray, featx.sklearn): weights are resolved
(featx.net.weights), the backbone's dense net built (featx.net.backbones), device and precision
resolved (featx.net.device), and the net lowered to its fast form (featx.net.plan). What a
feature file records about all this is featx.extract.provenance.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from featx.errors import BadInput
from featx.extract.config import ExtractConfig
from featx.extract.provenance import forget_file_hashes, weights_identity
from featx.net.backbones import DenseNet, get_backbone
from featx.net.device import resolve_device, resolve_precision, torch_dtype
from featx.net.plan.heap import HeapTrimmer
from featx.net.weights import Weights, resolve

# cuDNN autotuning: every new batch shape tries each conv's algorithms once and keeps the
# fastest (featx.extract.batching.bucket_batches keeps CUDA's shapes a bounded set). False:
# cuDNN's heuristics choose without trying; benchmarks/gpu.py measures both.
CUDNN_AUTOTUNE = True


def new_tf32_api() -> bool:
    """Whether this torch has the fp32_precision settings (2.9+), which replace allow_tf32."""
    return hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _read_cuda_flags() -> tuple:
    """(cuDNN autotuning, cuDNN convs' fp32 precision, cuBLAS matmuls' fp32 precision)."""
    if new_tf32_api():
        # Only the new API: once anything set it, the legacy allow_tf32 getters may raise ("a mix
        # of the legacy and new APIs").
        return (
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cuda.matmul.fp32_precision,
        )
    return torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def _write_cuda_flags(flags: tuple) -> None:
    benchmark, conv, matmul = flags
    torch.backends.cudnn.benchmark = benchmark
    if new_tf32_api():
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul
    else:
        torch.backends.cudnn.allow_tf32 = conv
        torch.backends.cuda.matmul.allow_tf32 = matmul


class _CudaFlags:
    """The process-wide CUDA flags featx runs under: cuDNN autotuning (CUDNN_AUTOTUNE) and no
    TF32 (its 10-bit mantissa would make fp32 inexact; bf16 and fp16 do not use it).

    The flags belong to the process, and device threads start and finish in any order: the
    first to enter saves the caller's flags and sets featx's, the last to leave restores them.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple | None = None

    @contextmanager
    def __call__(self):
        with self._lock:
            if self._users == 0:
                saved = _read_cuda_flags()
                no_tf32 = "ieee" if new_tf32_api() else False
                _write_cuda_flags((CUDNN_AUTOTUNE, no_tf32, no_tf32))
                self._saved = saved
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    _write_cuda_flags(self._saved)
                    self._saved = None


cuda_flags = _CudaFlags()


@dataclass
class Staged:
    """A batch on its way to the device: uint8 canvas [slots, 3, H, W] (the images, then any
    spare slots), the images' valid sizes, the copy's event, and (batched assembly) the layout."""

    pixels: torch.Tensor
    sizes: list[tuple[int, int]]
    ready: object = None  # a torch.cuda.Event on CUDA
    # Batched assembly: padding rows [slots, H] and columns [slots, W] (True = padding) and each
    # image's flip as column indices [slots, W].
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class DenseDescriber:
    """Runs a dense net on a batch of uint8 images of any sizes; returns flip-averaged means.

    One code path for CPU and GPU: images are padded (uint8, top-left) into one canvas in
    host memory (pinned on CUDA, copied non-blocking on a side stream so the copy of batch
    n+1 overlaps the compute of batch n), normalised on the device in fp32, the padding set
    to zero after normalising, flipped per image (each flip anchored top-left too), then run
    channels-last in the model's precision through the net's forward_pooled, lowered to its
    fast form (VGG: a featx.net.plan.Plan; other convnets: their own forward with
    featx.net.padding's hooks), which keeps the padding out of every image's numbers; a net
    that cannot (a ViT) is given same-shape batches only (`mixes_sizes`). On a CPU with oneDNN
    the Plan packs every weight once and fuses ReLU (`prepack=False` runs the plain
    F.conv2d/F.linear kernels CUDA uses); `lower=False` runs the net's own forward_pooled (the
    reference the lowering is tested against).

    A batch may hold spare slots (empty images that round its count up to a bucket, so cuDNN
    sees few shapes: featx.extract.batching); they run and are dropped. On CUDA the batch is
    assembled with a few whole-batch ops (`batched`: launches matter there), on a CPU image by
    image (fewer bytes touched); both give the same numbers.
    """

    def __init__(
        self,
        net: DenseNet,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        precision: str = "fp32",
        flip: bool = True,
        *,
        prepack: bool = True,
        pass_pixels: int | None = None,
        head_rows: int | None = None,
        lower: bool = True,
    ):
        device = torch.device(device)
        self.device, self.flip = device, flip
        self.precision = resolve_precision(precision, device)
        self.dtype = torch_dtype(self.precision)
        options = {"prepack": prepack, "pass_pixels": pass_pixels, "head_rows": head_rows}
        # What runs a batch: (B, 3, H, W) channels-last, valid sizes -> fp32 [B, C]. Lowered, the
        # plan holds its own weights on the device, each rounded once from the net's own numbers
        # (in bf16 a Winograd kernel is transformed, a BatchNorm folded, before rounding), and the
        # net is left as it is, so every plan made from it is the same (a net run by torch's own
        # kernels, any other than VGG, is moved to the device and precision by its lower()). Not lowered, the net
        # itself runs: it is moved to the device and precision in place.
        if lower:
            self.net = net.eval()
            self.plan = net.lower(device, self.dtype, **options)
        else:
            self.net = net.eval().to(device=device, dtype=self.dtype, memory_format=torch.channels_last)
            self.plan = self.net.forward_pooled
        # False for a net that takes same-shape batches only (a ViT): featx.extract.descriptor plans so.
        self.mixes_sizes = bool(getattr(net, "mixes_sizes", True))
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.cuda = device.type == "cuda"
        self.batched = self.cuda
        self.copies = torch.cuda.Stream(device) if self.cuda else None
        # CUDA's caching allocator keeps its memory; on a CPU glibc's heap is trimmed now and then.
        self.heap = None if self.cuda else HeapTrimmer()

    @property
    def prepacked(self) -> bool:
        """Whether the convolutions run oneDNN's pre-packed kernels."""
        return bool(getattr(self.plan, "packed", False))

    @property
    def channels(self) -> int:
        return self.net.channels

    def release_freed_memory(self) -> None:
        """After a batch: give freed heap pages back to the OS once they add up (CPU; see HeapTrimmer)."""
        if self.heap is not None:
            self.heap()

    def settings(self):
        """A context the describer's work runs in: on CUDA the process flags (cuda_flags), else nothing."""
        return cuda_flags() if self.cuda else nullcontext()

    def device_works(self) -> bool:
        """Whether the device still runs work. Some CUDA errors (an illegal memory access, a
        device-side assert) leave its context unusable for the rest of the process."""
        if not self.cuda:
            return True
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).add_(1).cpu()
        except Exception:  # whatever the probe raises, the device cannot run the next batch
            return False
        return True

    def stage(
        self,
        images: torch.Tensor | list[torch.Tensor],
        canvas: tuple[int, int] | None = None,
        slots: int | None = None,
    ) -> Staged:
        """Pad uint8 [3, h, w] images top-left into one canvas (default: the largest h and w),
        with `slots` images in all (default: as many as given; the rest spare), and start its
        copy to the device."""
        if isinstance(images, torch.Tensor) and images.dim() == 4 and (slots or 0) <= images.shape[0]:
            host, sizes = images, [tuple(images.shape[2:])] * images.shape[0]
        else:
            sizes = [(int(t.shape[1]), int(t.shape[2])) for t in images]
            h, w = canvas or (max(h for h, _ in sizes), max(w for _, w in sizes))
            if any(hi > h or wi > w for hi, wi in sizes):
                raise ValueError(f"canvas {h}x{w} is smaller than an image of the batch ({sizes})")
            host = torch.zeros(max(len(sizes), slots or 0), 3, h, w, dtype=torch.uint8, pin_memory=self.cuda)
            for i, t in enumerate(images):
                host[i, :, : sizes[i][0], : sizes[i][1]] = t
        layout = self._layout(sizes, host.shape) if self.batched else None
        if not self.cuda:
            return Staged(host, sizes, layout=layout)
        host = host if host.is_pinned() else host.pin_memory()
        with torch.cuda.stream(self.copies):
            pixels = host.to(self.device, non_blocking=True)
            if layout is not None:
                layout = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in layout)
            ready = torch.cuda.Event()
            ready.record(self.copies)
        return Staged(pixels, sizes, ready, layout)

    @staticmethod
    def _layout(sizes: list[tuple[int, int]], shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the host: padding rows and columns of each slot (a spare slot is all padding), and
        the column each flipped position reads (its image's width mirrored; padding stays put)."""
        slots, _, height, width = shape
        spare = [(0, 0)] * (slots - len(sizes))
        heights = torch.tensor([h for h, _ in sizes + spare]).view(-1, 1)
        widths = torch.tensor([w for _, w in sizes + spare]).view(-1, 1)
        rows, cols = torch.arange(height).view(1, -1), torch.arange(width).view(1, -1)
        flip = torch.where(cols < widths, widths - 1 - cols, cols)
        return rows >= heights, cols >= widths, flip

    def run(self, staged: Staged, rezero: bool = True) -> torch.Tensor:
        """The batch's [n, C] fp32 descriptors, left on the device (asynchronous on CUDA)."""
        with torch.inference_mode(), self.settings():
            return self._run(staged, rezero)

    def _run(self, staged: Staged, rezero: bool) -> torch.Tensor:
        if staged.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.ready)
            for t in (staged.pixels, *(staged.layout or ())):
                t.record_stream(torch.cuda.current_stream(self.device))
        u8, sizes = staged.pixels, staged.sizes
        n, slots, (height, width) = len(sizes), u8.shape[0], u8.shape[2:]
        x = (u8.to(self.device, torch.float32) - self.mean) / self.std
        batch = torch.empty(
            slots * (2 if self.flip else 1),
            3,
            height,
            width,
            device=self.device,
            dtype=self.dtype,
            memory_format=torch.channels_last,
        )
        # Padding after normalising (raw zeros would be -mean/std); each flip flips the image
        # itself, so it is anchored top-left like the image. Flips follow all slots.
        if staged.layout is not None:
            rows, cols, flip = staged.layout
            x.masked_fill_(rows[:, None, :, None] | cols[:, None, None, :], 0)
            batch[:slots] = x
            if self.flip:
                batch[slots:] = x.gather(3, flip[:, None, None, :].expand(slots, 3, height, width))
        else:
            batch.zero_()
            for i, (h, w) in enumerate(sizes):
                batch[i, :, :h, :w] = x[i, :, :h, :w]
                if self.flip:
                    batch[slots + i, :, :h, :w] = x[i, :, :h, :w].flip(-1)
        # A spare slot is described as a whole canvas of zeros (no padding to keep out), then dropped.
        every = sizes + [(height, width)] * (slots - n)
        pooled = self.plan(batch, every * (2 if self.flip else 1), rezero)
        if self.flip:
            return (pooled[:n] + pooled[slots : slots + n]) / 2
        return pooled[:n]

    def __call__(
        self, images: torch.Tensor | list[torch.Tensor], canvas: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """uint8 [B, 3, h, w] (or a list of [3, h_i, w_i]) -> float32 [B, C] on the CPU:
        position-averaged map, flip-averaged, each image exactly as if it ran alone."""
        pooled = self.run(self.stage(images, canvas)).cpu()
        self.release_freed_memory()
        return pooled


# -- the factory ---------------------------------------------------------------------------
# Nets kept alive between calls with cache=True, so that clone() and GridSearchCV reuse one
# instead of loading VGG (0.5 GB for vgg16) per candidate and fold. Each entry also keeps its
# DenseDescribers (one per `flip`): making one packs the weights for the CPU kernels, which
# costs as much as a forward pass.
NET_CACHE_SIZE = 2
_NETS: OrderedDict[tuple, tuple[DenseNet, tuple, tuple, dict[bool, DenseDescriber]]] = OrderedDict()
_NETS_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the cached nets and weights-file hashes."""
    with _NETS_LOCK:
        _NETS.clear()
        forget_file_hashes()


def build_net(config: ExtractConfig, weights: Weights) -> DenseNet:
    """The dense net of `config.model` up to `config.layer` with `weights` (on the CPU, fp32).

    A timm model's least scale is known only now: smaller scales are refused here, in one line.
    """
    backbone = get_backbone(config.model)
    tap = backbone.tap(config.layer)
    if min(config.scales) < tap.min_scale:
        raise BadInput(
            f"--scales {min(config.scales)} is below {tap.min_scale} for {config.model}: {tap.why}; use larger scales"
        )
    return backbone.build(weights, config.layer)


def make_describer(
    config: ExtractConfig,
    device: torch.device | str | None = None,
    *,
    weights: Weights | None = None,
    cache: bool = False,
) -> DenseDescriber:
    """A DenseDescriber for `config` on `device` (default: config.device, resolved).

    `weights` skips resolving them (the Ray driver ships them to its actors once). With
    `cache`, the net is kept per process keyed by what defines its parameters on the device
    (model, weights identity, layer, precision, device): scales, aggregate and batch size only
    change how it is called, so a grid over them shares one net.
    """
    device = resolve_device(config.device) if device is None else torch.device(device)
    precision = resolve_precision(config.precision, device)
    # The identity first: a weights file's remembered hash spares reading it twice.
    identity = weights.identity if weights is not None else weights_identity(config)
    if not cache:
        weights = weights or resolve(config.model, config.weights, config.seed, config.layer, identity)
        net = build_net(config, weights)
        return DenseDescriber(net, weights.mean, weights.std, device, precision, config.flip)
    key = (config.model, json.dumps(identity, sort_keys=True), config.layer, precision, str(device))
    with _NETS_LOCK:
        if key not in _NETS:
            weights = weights or resolve(config.model, config.weights, config.seed, config.layer, identity)
            _NETS[key] = (build_net(config, weights), weights.mean, weights.std, {})
            while len(_NETS) > NET_CACHE_SIZE:
                _NETS.popitem(last=False)
        _NETS.move_to_end(key)
        net, mean, std, describers = _NETS[key]
        if config.flip not in describers:
            # Each describer lowers the net to its own plan; the net itself stays as built.
            describers[config.flip] = DenseDescriber(net, mean, std, device, precision, config.flip)
        return describers[config.flip]
