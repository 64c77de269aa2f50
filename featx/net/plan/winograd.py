"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray 2016).

A 3x3 conv (stride 1, padding 1) computes each m x m block of outputs from a t x t tile of its
input (t = m + 2). Winograd's F(m x m, 3 x 3) does that with t^2 products per (input, output)
channel pair instead of 9 m^2: transform the tile (V = B' d B), the kernel once (U = G g G'),
take t^2 GEMMs over channels (M[a] = V[a] U[a]: tiles x C times C x K), transform back
(y = A' M A). F(2x2): 16 products for 4 outputs, 2.25x fewer multiplications, transforms of
0/+-1 (fp32: a few 1e-6 relative to direct convolution; bf16: ~3x direct's rounding error).
F(4x4): 36 for 16, 4x fewer, but coefficients up to 8 (fp32: 1-2e-5 relative per layer;
bf16: 3% relative L2 error per layer against F(2x2)'s 0.6% and direct bf16's 0.3%, with a
larger max error; so the plan runs it in fp32 only). F(3x3, 3x3) in bf16 was 6-14% faster than
F(2x2) per layer at 1.8% error: not used.

In bf16 one of F(2x2)'s 16 products carries most of its error: B's row (0, 1, 1, 0) sums the
two middle inputs, so on non-negative, smooth maps (what follows a ReLU) the tile's middle
component V[1,1] is ~4x the others, and the rounding of V[1,1], U[1,1] and M[1,1] to bf16 made
~80% of the layer's error (relative L2 on VGG16's activations: 0.0017 each, the other 15
components 0.0001-0.0004 each). That component (Algorithm.wide) is kept in fp32 throughout:
its input transform written in fp32, its GEMM in fp32 (1 of 16 at half bf16's rate: ~6% more
GEMM time), its bias exact. Per layer a bf16 F(2x2) then errs less than oneDNN's direct bf16
conv (benchmarks/layers.py --errors), and the descriptor is closer to fp32 than direct bf16's.

Lavin & Gray benchmarked it on VGG: on a CPU the GEMMs dominate where channels are many. With
the transforms as torch ops their memory traffic costs more than the saved products below 128
input channels; with featx.net.plan.winograd_kernels' one-pass transforms Winograd pays from 64 (VGG's
conv1_2 on); featx.net.plan.plan picks per layer (WINOGRAD_MIN_CHANNELS).

Tiles are processed in bands of tile rows holding at most BAND_BYTES of transformed input
and GEMM output, in a workspace reused across layers and calls: memory stays bounded (about
100 MB in fp32) and the scratch is not page-faulted in afresh on every call (fresh buffers
of this size cost 7-8% of a forward pass here). Cache-sized bands (8 MB) were slower: the
GEMMs want many rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from featx.net.plan import winograd_kernels


@dataclass(frozen=True)
class Algorithm:
    """Winograd F(m x m, 3 x 3): tiles of t = m + 2 inputs give m x m outputs (Lavin & Gray's
    matrices: B' [t, t] transforms input tiles, G [t, 3] kernels, A' [m, t] the products back)."""

    name: str
    bt: tuple[tuple[float, ...], ...]
    g: tuple[tuple[float, ...], ...]
    at: tuple[tuple[float, ...], ...]
    # Components a*t + b computed in fp32 when the layer runs in a narrower dtype (bf16): where
    # the transformed values are largest on non-negative maps (see the module docstring).
    wide: tuple[int, ...] = ()

    @property
    def m(self) -> int:
        return len(self.at)

    @property
    def t(self) -> int:
        return len(self.bt)

    @property
    def bias_at(self) -> int:
        """A column a of A' that is all ones: a bias added to M[a, a] reaches every output."""
        return next(a for a in range(self.t) if all(row[a] == 1 for row in self.at))


F2 = Algorithm(
    "F(2x2, 3x3)",
    bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    g=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    at=((1, 1, 1, 0), (0, 1, -1, -1)),
    wide=(1 * 4 + 1,),  # V[1,1] = (d11 + d12 + d21 + d22) - ...: the sum of the tile's middle
)
F4 = Algorithm(
    "F(4x4, 3x3)",
    bt=(
        (4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1),
    ),
    g=(
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1),
    ),
    at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
)
# Bytes of transformed input + GEMM output per band (t^2 x tiles x channels each): 64 MB ran
# as fast as whole layers at once (benchmarks/layers.py), 8 MB 10-20% slower.
BAND_BYTES = 64 << 20
# Fewest tiles per band: below this a GEMM's rows are too few to run at speed.
MIN_BAND_TILES = 256


def transform_weight(weight: torch.Tensor, algorithm: Algorithm = F2) -> torch.Tensor:
    """[K, C, 3, 3] kernel -> U [t*t, C, K] (computed in fp32, returned in the weight's dtype;
    fp64 differs by < 1e-7 relative and took 3x longer: VGG16's F(4x4) kernels 0.8 s vs 0.3 s)."""
    g = torch.tensor(algorithm.g, dtype=torch.float32, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.float(), g)
    return u.reshape(algorithm.t**2, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _combine(row: tuple[float, ...], terms: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out = sum_s row[s] * terms[s] in (nonzeros - 1) ops, starting from a +-1 coefficient."""
    nz = [(c, x) for c, x in zip(row, terms) if c != 0]
    base = next((i for i, (c, _) in enumerate(nz) if c == 1), None)
    if base is None:
        base = next((i for i, (c, _) in enumerate(nz) if c == -1), None)
    if base is None:  # no +-1 coefficient: scale the first term
        torch.mul(nz[0][1], nz[0][0], out=out)
        rest = nz[1:]
    else:
        c0, x0 = nz.pop(base)
        if not nz:
            return out.copy_(x0) if c0 == 1 else torch.neg(x0, out=out)
        c1, x1 = nz.pop(0)
        if c0 == 1:
            torch.add(x0, x1, alpha=c1, out=out)
        elif c1 == 1:  # -x0 + x1
            torch.sub(x1, x0, out=out)
        else:  # -x0 + c1 x1
            torch.mul(x1, c1, out=out).sub_(x0)
        rest = nz
    for c, x in rest:
        out.add_(x, alpha=c)
    return out


class Workspace:
    """Reusable scratch buffers, one per role, grown to the largest size asked for."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, role: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A buffer of `shape` on `like`'s device, in `dtype` (default: `like`'s)."""
        n = math.prod(shape)
        dtype = dtype or like.dtype
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=dtype, device=like.device)
            self._buffers[role] = buf
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held in all roles' buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def wide_components(algorithm: Algorithm, dtype: torch.dtype) -> tuple[int, ...]:
    """The components a layer in `dtype` computes in fp32: the algorithm's wide ones below fp32."""
    return algorithm.wide if dtype in (torch.bfloat16, torch.float16) else ()


def gemm_weights(u: torch.Tensor, dtype: torch.dtype, algorithm: Algorithm, packed: bool) -> list[torch.Tensor]:
    """U [t*t, C, K] (fp32, from transform_weight) as conv3x3's t*t GEMM weights: each rounded
    once to `dtype`, the wide components (wide_components) kept in fp32; oneDNN-packed linear
    weights (5-20% faster GEMMs than torch.mm here) or plain [C, K] for torch.mm."""
    wide = wide_components(algorithm, dtype)
    out = []
    for a in range(u.shape[0]):
        ua = u[a].to(torch.float32 if a in wide else dtype)
        out.append(torch.ops.mkldnn._reorder_linear_weight(ua.t().contiguous(), None) if packed else ua.contiguous())
    return out


def conv3x3(
    x: torch.Tensor,
    weights: torch.Tensor | list[torch.Tensor],
    bias: torch.Tensor,
    relu: bool,
    workspace: Workspace,
    algorithm: Algorithm = F2,
    out: torch.Tensor | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """3x3 conv, stride 1, padding 1, of a channels-last batch `x` [N, C, H, W] -> channels-last
    [N, K, H, W] (+ bias, ReLU if asked), written into `out` if given. `weights`: the t*t GEMM
    weights from gemm_weights (oneDNN-packed on the CPU, or plain for torch.mm on any device; a
    component whose weight is fp32 while `x` is narrower runs in fp32 throughout), or U from
    transform_weight in `x`'s dtype (one torch.bmm). `compiled`: run the transforms by
    featx.net.plan.winograd_kernels where they can be built (CPU, fp32/bf16; per layer
    1.11-1.31x in bf16 F(2x2), 1.07-1.11x in fp32 F(4x4) over the torch ops on a 2-core Zen);
    False, or where they cannot, by torch ops."""
    n, c, h, w = x.shape
    k = bias.shape[0]
    m, t = algorithm.m, algorithm.t
    th, tw = -(-h // m), -(-w // m)  # tiles down and across (the last may hang over)
    xn = x.permute(0, 2, 3, 1)  # NHWC view of channels-last memory
    y = x.new_empty(n, h, w, k) if out is None else out.permute(0, 2, 3, 1)  # NHWC view
    per_component = isinstance(weights, list)
    wide = tuple(a for a in range(t * t) if per_component and weights[a].dtype != x.dtype)
    native = None
    if compiled and x.device.type == "cpu" and xn.is_contiguous() and y.is_contiguous():
        native = winograd_kernels.kernels(algorithm, x.dtype, wide)
    # Bytes per tile: t*t transformed inputs and products, the wide ones in fp32.
    per_tile = (t * t - len(wide)) * (c + k) * x.element_size() + len(wide) * (c + k) * 4
    band = max(1, min(th, BAND_BYTES // max(1, n * tw * per_tile)))
    band = max(band, min(th, -(-MIN_BAND_TILES // (n * tw))))
    at_bias = algorithm.bias_at * (t + 1)  # the bias rides on the one product every output sums once
    for t0 in range(0, th, band):
        rows = min(th, t0 + band) - t0
        p = n * rows * tw
        vw = workspace.get("v wide", (len(wide), p, c), x, torch.float32) if wide else None
        if native is not None:  # one pass: tiles read (zero outside the image), transformed, written
            vv = workspace.get("v", (t * t, p, c), x)
            native.input(xn, vv, t0, rows, tw, vw)
        else:
            vv = _input_transform(xn, workspace, algorithm, t0, rows, tw, wide, vw)
        if per_component:  # t*t GEMMs over channels
            mats = [
                _gemm(vw[wide.index(a)] if a in wide else vv[a], weights[a], bias if a == at_bias else None)
                for a in range(t * t)
            ]
        else:
            mm = torch.bmm(vv, weights, out=workspace.get("m", (t * t, p, k), x))
            mm[at_bias] += bias
            mats = list(mm)
        if native is not None:  # one pass: products combined, ReLU, written into y
            native.output(mats, y, t0, rows, tw, relu)
        else:
            _output_transform(mats, y, workspace, algorithm, t0, rows, tw, relu)
    return y.permute(0, 3, 1, 2)


def _gemm(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """v [tiles, C] times one component's weight (packed [K, C] or plain [C, K]) [+ bias], in v's dtype."""
    if bias is not None:
        bias = bias.to(v.dtype)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(v, weight, bias, "none", [], "")
    return torch.mm(v, weight) if bias is None else torch.addmm(bias, v, weight)


def _input_transform(
    xn: torch.Tensor,
    workspace: Workspace,
    algorithm: Algorithm,
    t0: int,
    rows: int,
    tw: int,
    wide: tuple[int, ...] = (),
    vw: torch.Tensor | None = None,
) -> torch.Tensor:
    """V = B' d B for the tiles of tile rows t0 .. t0 + rows by torch ops -> [t*t, tiles, C];
    the `wide` components are also written in fp32 into `vw` [len(wide), tiles, C]."""
    n, h, w, c = xn.shape
    m, t, bt = algorithm.m, algorithm.t, algorithm.bt
    # Zero-padded input slab: input rows m*t0 - 1 .. m*t1, columns -1 .. m*tw.
    slab = workspace.get("slab", (n, m * rows + 2, m * tw + 2, c), xn)
    top = m * t0 - 1
    r0, r1 = max(0, top), min(h, top + m * rows + 2)
    slab[:, : r0 - top].zero_()
    slab[:, r1 - top :].zero_()
    slab[:, :, 0].zero_()
    slab[:, :, w + 1 :].zero_()
    slab[:, r0 - top : r1 - top, 1 : w + 1].copy_(xn[:, r0:r1])
    # Along rows, then along columns, into [t, t, n, rows, tw, c].
    half = workspace.get("half", (t, n, rows, m * tw + 2, c), xn)
    row_views = [slab[:, i : i + m * rows : m] for i in range(t)]
    for a in range(t):
        _combine(bt[a], row_views, half[a])
    v = workspace.get("v", (t, t, n, rows, tw, c), xn)
    for a in range(t):
        col_views = [half[a][:, :, j : j + m * tw : m] for j in range(t)]
        for b in range(t):
            _combine(bt[b], col_views, v[a, b])
    for j, ab in enumerate(wide):  # from the exact inputs, every sum in fp32
        a, b = divmod(ab, t)
        half32 = _combine(bt[a], [r.float() for r in row_views], torch.empty_like(half[a], dtype=torch.float32))
        _combine(bt[b], [half32[:, :, i : i + m * tw : m] for i in range(t)], vw[j].view(n, rows, tw, c))
    return v.view(t * t, n * rows * tw, c)


def _output_transform(
    mats: list[torch.Tensor],
    y: torch.Tensor,
    workspace: Workspace,
    algorithm: Algorithm,
    t0: int,
    rows: int,
    tw: int,
    relu: bool,
) -> None:
    """y = A' M A for tile rows t0 .. t0 + rows by torch ops, into NHWC `y` (+ ReLU). Where a
    product is fp32 (a wide component of a bf16 layer) the sums are too, and `y` is rounded once."""
    n, h, w, k = y.shape
    m, t, at = algorithm.m, algorithm.t, algorithm.at
    t1 = t0 + rows
    wide = any(mat.dtype != y.dtype for mat in mats)
    # Along rows (o[i, b] = sum_a A'[i, a] M[a, b]), then columns into y.
    o = workspace.get("o", (m, t, n * rows * tw, k), y, torch.float32 if wide else None)
    for i in range(m):
        for b in range(t):
            _combine(at[i], [mats[a * t + b].to(o.dtype) for a in range(t)], o[i, b])
    for i in range(m):
        nr = min(t1, (h - i + m - 1) // m) - t0  # output rows m*r + i of this band inside the image
        if nr <= 0:
            continue
        q = [o[i, b].view(n, rows, tw, k)[:, :nr] for b in range(t)]
        for j in range(m):
            nc = (w - j + m - 1) // m
            dest = y[:, m * t0 + i : m * (t0 + nr - 1) + i + 1 : m, j : m * (nc - 1) + j + 1 : m]
            exact = dest if dest.dtype == o.dtype else torch.empty(dest.shape, dtype=o.dtype, device=dest.device)
            _combine(at[j], [qb[:, :, :nc] for qb in q], exact)
            if relu:
                exact.relu_()
            if exact is not dest:
                dest.copy_(exact)
