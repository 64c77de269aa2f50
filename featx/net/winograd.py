"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray, CVPR 2016).

A 3x3 conv (stride 1, padding 1) computes each 2x2 block of outputs from a 4x4 tile of its
input. Winograd's F(2x2, 3x3) does that with 16 products per (input, output) channel pair
instead of 36: transform the tile (V = B' d B), transform the kernel once (U = G g G'), take
16 GEMMs over channels (M[a] = V[a] U[a]: tiles x C times C x K), and transform back
(y = A' M A). 2.25x fewer multiplications; the transforms are additions only (B and A hold
0 and +-1, G halves), so in fp32 it agrees with direct convolution to a few 1e-6 relative.

Lavin & Gray benchmarked it on VGG: on a CPU the GEMMs dominate where channels are many
(conv3-conv5 of VGG: 256-512 channels); with few channels (conv1, conv2) the transforms'
memory traffic costs more than the saved products, so the plan keeps direct convolution there.

Tiles are processed in bands of tile rows holding at most BAND_BYTES of transformed input
and GEMM output, in a workspace reused across layers and calls: memory stays bounded (about
100 MB in fp32) and the scratch is not page-faulted in afresh on every call (fresh buffers
of this size cost 7-8% of a forward pass here). Cache-sized bands (8 MB) were slower: the
GEMMs want many rows.
"""

from __future__ import annotations

import torch

# G of F(2x2, 3x3): U = G g G' per (out, in) kernel.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Bytes of transformed input + GEMM output per band (16 x tiles x channels each): 64 MB ran
# as fast as whole layers at once (benchmarks/layers.py), 8 MB 10-20% slower.
BAND_BYTES = 64 << 20
# Fewest tiles per band: below this a GEMM's rows are too few to run at speed.
MIN_BAND_TILES = 256


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """[K, C, 3, 3] kernel -> U [16, C, K] (computed in fp32, returned in the weight's dtype)."""
    g = torch.tensor(_G, dtype=torch.float32, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.float(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _rows(d0, d1, d2, d3, out: torch.Tensor) -> None:
    """B' applied along one axis: out[0..3] = d0-d2, d1+d2, d2-d1, d1-d3."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


class Workspace:
    """Reusable scratch buffers, one per role, grown to the largest size asked for."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._buffers[role] = buf
        return buf[:n].view(shape)


def pack(u: torch.Tensor) -> list[torch.Tensor]:
    """U [16, C, K] as 16 oneDNN-packed linear weights (5-20% faster GEMMs than torch.mm here)."""
    return [torch.ops.mkldnn._reorder_linear_weight(u[a].t().contiguous(), None) for a in range(16)]


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, relu: bool, workspace: Workspace,
            packed: list[torch.Tensor] | None = None) -> torch.Tensor:
    """3x3 conv, stride 1, padding 1, of a channels-last batch `x` [N, C, H, W] with U from
    transform_weight ([16, C, K]): -> channels-last [N, K, H, W] (+ bias, ReLU if asked).
    `packed`: U as pack() gives it, for oneDNN's GEMMs (CPU); else torch.mm (any device)."""
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2  # tiles down and across (the last may hang over)
    xn = x.permute(0, 2, 3, 1)  # NHWC view of channels-last memory
    y = x.new_empty(n, h, w, k)
    itemsize = x.element_size()
    band = max(1, min(th, BAND_BYTES // max(1, 16 * n * tw * (c + k) * itemsize)))
    band = max(band, min(th, -(-MIN_BAND_TILES // (n * tw))))
    for t0 in range(0, th, band):
        t1 = min(th, t0 + band)
        rows = t1 - t0
        p = n * rows * tw
        # Zero-padded input slab: input rows 2*t0-1 .. 2*t1, columns -1 .. 2*tw.
        slab = workspace.get("slab", (n, 2 * rows + 2, 2 * tw + 2, c), x)
        top, bottom = 2 * t0 - 1, 2 * t1 + 1  # input rows the slab spans, [top, bottom)
        r0, r1 = max(0, top), min(h, bottom)
        slab[:, : r0 - top].zero_()
        slab[:, r1 - top :].zero_()
        slab[:, :, 0].zero_()
        slab[:, :, w + 1 :].zero_()
        slab[:, r0 - top : r1 - top, 1 : w + 1].copy_(xn[:, r0:r1])
        # V = B' d B: along rows, then along columns, into [4, 4, n, rows, tw, c].
        half = workspace.get("half", (4, n, rows, 2 * tw + 2, c), x)
        _rows(*(slab[:, i : i + 2 * rows : 2] for i in range(4)), half)
        v = workspace.get("v", (4, 4, n, rows, tw, c), x)
        for a in range(4):
            _rows(*(half[a][:, :, j : j + 2 * tw : 2] for j in range(4)), v[a])
        # 16 GEMMs over channels.
        vv = v.view(16, p, c)
        if packed is not None:
            m = [torch.ops.mkldnn._linear_pointwise(vv[a], packed[a], None, "none", [], "") for a in range(16)]
        else:
            mm = workspace.get("m", (16, p, k), x)
            for a in range(16):
                torch.mm(vv[a], u[a], out=mm[a])
            m = list(mm)
        # y = A' M A, A' = [[1, 1, 1, 0], [0, 1, -1, -1]]: along rows (M[a] = m[4a:4a+4]), then columns.
        o = workspace.get("o", (2, 4, p, k), x)
        for b in range(4):
            torch.add(m[b], m[4 + b], out=o[0, b]).add_(m[8 + b])
            torch.sub(m[4 + b], m[8 + b], out=o[1, b]).sub_(m[12 + b])
        part = workspace.get("part", (n, rows, tw, k), x)
        for i in range(2):
            q = o[i].view(4, n, rows, tw, k)
            nr = min(t1, (h - i + 1) // 2) - t0  # output rows 2t+i of this band inside the image
            for j in range(2):
                nc = (w - j + 1) // 2
                if j == 0:
                    torch.add(q[0], q[1], out=part).add_(q[2])
                else:
                    torch.sub(q[1], q[2], out=part).sub_(q[3])
                part.add_(bias)
                if relu:
                    part.relu_()
                y[:, 2 * t0 + i : 2 * (t0 + nr) + i - 1 : 2, j : 2 * nc + j - 1 : 2].copy_(part[:, :nr, :nc])
    return y.permute(0, 3, 1, 2)
