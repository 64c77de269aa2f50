"""Winograd's tile transforms as C kernels: one pass each, generated from an Algorithm's matrices.

featx.net.plan.winograd runs the input transform (V = B' d B) and the output transform
(y = A' M A) as strided torch adds: for F(2x2, 3x3) that is ~20 passes over a layer's input
and output, memory-bound, 12-35% of a VGG conv layer on a 2-core CPU. Here each transform is
one loop nest: a tile's t x t inputs are read once (zero outside the image), combined in
registers with the matrices' coefficients as compile-time constants (zeros and +-1 fold
away), and written once; the inner loop runs over channels, which channels-last memory keeps
contiguous, so the compiler vectorises it. Values are combined in fp32 and rounded once to
the dtype (bf16: round to nearest even), one rounding fewer than the torch path per op. A bf16
layer's wide components (featx.net.plan.winograd.Algorithm.wide) are written to, and read
from, fp32 buffers of their own, unrounded.

The source is generated per algorithm and compiled on first use with the system's C compiler
(`cc -O3 -march=native -fopenmp`) into featx's cache folder, keyed by the source and this CPU,
and called through ctypes. The loops run on OpenMP threads: libgomp is loaded once per
process, so they are torch's own intra-op threads (Python threads beside torch's spinning
OpenMP workers were ~5% slower); built without OpenMP, featx splits each call over
torch.get_num_threads() Python threads instead (ctypes releases the GIL). Without a compiler,
or if the build fails, `kernels()` returns None and featx.net.plan.winograd keeps its torch path
(the same numbers to rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from featx.userdirs import cache_dir

# C types of the dtypes the kernels handle, with load/store expressions (x: an element).
_TYPES = {
    torch.float32: ("float", "{x}", "{x}"),
    torch.bfloat16: ("uint16_t", "bf16_load({x})", "bf16_store({x})"),
}

_PRELUDE = r"""
#include <stdint.h>
#include <string.h>
/* 1 when built with OpenMP: the kernels then split their loops over the process's OpenMP
   threads (torch's own pool, libgomp being loaded once per process); else the caller splits. */
int featx_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
static inline float bf16_load(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t bf16_store(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  /* round to nearest even */
}
"""


def _linear(coefficients, terms: list[str]) -> str:
    """sum(c * term) as C, zeros dropped and +-1 without a multiply."""
    parts = []
    for c, term in zip(coefficients, terms):
        if c == 0:
            continue
        c = float(c)
        if c == 1:
            parts.append(f"+{term}")
        elif c == -1:
            parts.append(f"-{term}")
        else:
            parts.append(f"{'+' if c > 0 else '-'}{abs(c)!r}f*{term}")
    return "".join(parts).lstrip("+") or "0.0f"


def _source(algorithm, dtype: torch.dtype, name: str, wide: tuple[int, ...] = ()) -> str:
    """C for the input and output transforms of `algorithm` in `dtype`; the `wide` components
    (a*t + b) go to and come from fp32 buffers instead (vw: [len(wide), tiles, c]; ms[a]: float*)."""
    ctype, load, store = _TYPES[dtype]
    m, t, bt, at = algorithm.m, algorithm.t, algorithm.bt, algorithm.at
    # Input: d[i][j] loaded, rows combined (s[a][j] = sum_i B'[a][i] d[i][j]), then columns.
    loads = "\n".join(
        f"            float d{i}_{j} = {load.format(x=f'p{i}_{j}[ch]')};" for i in range(t) for j in range(t)
    )
    rows = "\n".join(
        f"            float s{a}_{j} = {_linear(bt[a], [f'd{i}_{j}' for i in range(t)])};"
        for a in range(t)
        for j in range(t)
    )

    def v_store(a: int, b: int) -> str:
        value = _linear(bt[b], [f"s{a}_{j}" for j in range(t)])
        if a * t + b in wide:
            return f"            vw[((long){wide.index(a * t + b)} * tiles + p) * c + ch] = {value};"
        return f"            v[((long){a * t + b} * tiles + p) * c + ch] = {store.format(x=value)};"

    cols = "\n".join(v_store(a, b) for a in range(t) for b in range(t))
    pointers = "\n".join(
        f"            const {ctype}* p{i}_{j} = (y0 + {i} >= 0 && y0 + {i} < h && x0 + {j} >= 0 && x0 + {j} < w)"
        f" ? x + ((img * h + y0 + {i}) * w + x0 + {j}) * c : zeros;"
        for i in range(t)
        for j in range(t)
    )
    # Output: q[a][j] = sum_b M[a][b] A'[j][b] (columns), then o[i][j] = sum_a A'[i][a] q[a][j].
    mloads = "\n".join(
        f"            float g{a}_{b} = "
        + (
            f"((const float*)ms[{a * t + b}])[p * k + ch];"
            if a * t + b in wide
            else f"{load.format(x=f'((const {ctype}*)ms[{a * t + b}])[p * k + ch]')};"
        )
        for a in range(t)
        for b in range(t)
    )
    qcols = "\n".join(
        f"            float q{a}_{j} = {_linear(at[j], [f'g{a}_{b}' for b in range(t)])};"
        for a in range(t)
        for j in range(m)
    )
    outs = []
    for i in range(m):
        for j in range(m):
            value = _linear([at[i][a] for a in range(t)], [f"q{a}_{j}" for a in range(t)])
            outs.append(
                f"            {{ float o = {value}; o = (relu && o < 0.0f) ? 0.0f : o;"
                f" out{i}_{j}[ch] = {store.format(x='o')}; }}"
            )
    # Outputs past the image's edge (the last tiles may hang over) go to a per-thread sink.
    out_pointers = "\n".join(
        f"            {ctype}* out{i}_{j} = (m_y + {i} < h && m_x + {j} < w)"
        f" ? y + ((img * h + m_y + {i}) * w + m_x + {j}) * k : sink;"
        for i in range(m)
        for j in range(m)
    )
    return f"""
/* Input transform, {algorithm.name}, {dtype}: tile rows u0..u1 of a band (u = image * rows + row);
   components {list(wide)} to vw in fp32. */
void {name}_in(const {ctype}* x, {ctype}* __restrict v, float* __restrict vw, const {ctype}* zeros,
               long n, long h, long w, long c, long t0, long rows, long tw, long u0, long u1) {{
    const long tiles = n * rows * tw;
    #pragma omp parallel for schedule(static) if (u1 - u0 > 1)
    for (long u = u0; u < u1; u++) {{
        const long img = u / rows, ty = t0 + u % rows;
        for (long tx = 0; tx < tw; tx++) {{
            const long p = u * tw + tx, y0 = {m} * ty - 1, x0 = {m} * tx - 1;
{pointers}
            /* No two streams overlap (distinct tiles and outputs): let the compiler vectorise. */
            #pragma GCC ivdep
            for (long ch = 0; ch < c; ch++) {{
{loads}
{rows}
{cols}
            }}
        }}
    }}
}}

/* Output transform, {algorithm.name}, {dtype}: GEMM outputs ms[t*t] ([tiles, k] each, bias
   included; fp32 for components {list(wide)}) to y (NHWC, image size h x w), ReLU if asked,
   for tile rows u0..u1 of the band. */
void {name}_out(const void* const* ms, {ctype}* y, long n, long h, long w, long k,
                long t0, long rows, long tw, long relu, long u0, long u1) {{
    #pragma omp parallel for schedule(static) if (u1 - u0 > 1)
    for (long u = u0; u < u1; u++) {{
        const long img = u / rows, ty = t0 + u % rows;
        {ctype} sink[k];  /* outputs past the image's edge land here: each thread its own */
        for (long tx = 0; tx < tw; tx++) {{
            const long p = u * tw + tx, m_y = {m} * ty, m_x = {m} * tx;
{out_pointers}
            #pragma GCC ivdep
            for (long ch = 0; ch < k; ch++) {{
{mloads}
{qcols}
{chr(10).join(outs)}
            }}
        }}
    }}
}}
"""


def _cpu_key() -> str:
    """This CPU's identity for the cache key (-march=native code runs only where it was built)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _march() -> str:
    """This CPU's own instructions; AVX2 only under oneDNN's AVX2 cap (ONEDNN_MAX_CPU_ISA=AVX2,
    which benchmarks use to emulate an AVX2-only CPU), so the emulation covers these kernels too."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return (
        "-march=x86-64-v3" if cap.startswith("AVX2") and platform.machine() in ("x86_64", "AMD64") else "-march=native"
    )


def _compile(source: str) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    march = _march()
    key = hashlib.sha256((source + _cpu_key() + compiler + march).encode()).hexdigest()[:20]
    target = cache_dir() / "kernels" / f"winograd-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "winograd.c", Path(tmp) / "winograd.so"
        src.write_text(source)
        flags = ["-O3", march, "-fno-math-errno", "-shared", "-fPIC"]
        for openmp in (["-fopenmp"], []):  # without OpenMP (no libgomp to link), Python threads split
            proc = subprocess.run(
                [compiler, *flags, *openmp, str(src), "-o", str(lib)],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            if proc.returncode == 0 and lib.exists():
                break
        else:
            return None
        os.replace(lib, target)  # atomic: concurrent builders (Ray workers) agree on one file
    return target


class Kernels:
    """The compiled transforms of one algorithm in one dtype, split over threads."""

    def __init__(self, lib: ctypes.CDLL, name: str, dtype: torch.dtype, wide: tuple[int, ...] = ()):
        self.dtype, self.wide = dtype, wide
        self._in, self._out = getattr(lib, f"{name}_in"), getattr(lib, f"{name}_out")
        for f in (self._in, self._out):
            f.restype = None
        self.openmp = bool(lib.featx_openmp())
        self._zeros = torch.zeros(0, dtype=dtype)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def _zeros_for(self, c: int) -> torch.Tensor:
        if self._zeros.numel() < c:
            self._zeros = torch.zeros(c, dtype=self.dtype)
        return self._zeros

    def _split(self, call, units: int) -> None:
        """call(u0, u1) over [0, units): at once where OpenMP splits it, else in
        torch.get_num_threads() Python threads (ctypes drops the GIL)."""
        parts = 1 if self.openmp else max(1, min(torch.get_num_threads(), units))
        if parts == 1:
            call(0, units)
            return
        with self._lock:
            if self._pool is None or self._pool_size != parts:
                self._pool, self._pool_size = ThreadPoolExecutor(parts, thread_name_prefix="featx-winograd"), parts
            pool = self._pool
        bounds = [units * i // parts for i in range(parts + 1)]
        for f in [pool.submit(call, a, b) for a, b in itertools.pairwise(bounds) if b > a]:
            f.result()

    def input(
        self, x: torch.Tensor, v: torch.Tensor, t0: int, rows: int, tw: int, vw: torch.Tensor | None = None
    ) -> None:
        """x: NHWC contiguous [n, h, w, c]; v: [t*t, n*rows*tw, c] contiguous (written; the wide
        components' slots are not); vw: [len(wide), n*rows*tw, c] fp32 contiguous (written)."""
        n, h, w, c = x.shape
        if self.wide and (vw is None or vw.dtype != torch.float32 or vw.shape[0] != len(self.wide)):
            raise ValueError(f"these kernels write components {self.wide} to an fp32 vw of as many rows")
        zeros = self._zeros_for(c)
        L = ctypes.c_long

        def call(u0: int, u1: int) -> None:
            self._in(
                ctypes.c_void_p(x.data_ptr()),
                ctypes.c_void_p(v.data_ptr()),
                ctypes.c_void_p(vw.data_ptr() if vw is not None else 0),
                ctypes.c_void_p(zeros.data_ptr()),
                L(n),
                L(h),
                L(w),
                L(c),
                L(t0),
                L(rows),
                L(tw),
                L(u0),
                L(u1),
            )

        self._split(call, n * rows)

    def output(self, mats: list[torch.Tensor], y: torch.Tensor, t0: int, rows: int, tw: int, relu: bool) -> None:
        """mats: t*t GEMM outputs [n*rows*tw, k], contiguous (fp32 for the wide components, else
        the kernels' dtype); y: NHWC contiguous [n, h, w, k] (written)."""
        n, h, w, k = y.shape
        want = [torch.float32 if a in self.wide else self.dtype for a in range(len(mats))]
        if [m.dtype for m in mats] != want or not all(m.is_contiguous() for m in mats):
            raise ValueError(f"the GEMM outputs must be contiguous, in {want}")
        pointers = (ctypes.c_void_p * len(mats))(*[m.data_ptr() for m in mats])
        L = ctypes.c_long

        def call(u0: int, u1: int) -> None:
            self._out(
                pointers,
                ctypes.c_void_p(y.data_ptr()),
                L(n),
                L(h),
                L(w),
                L(k),
                L(t0),
                L(rows),
                L(tw),
                L(int(relu)),
                L(u0),
                L(u1),
            )

        self._split(call, n * rows)


@cache
def kernels(algorithm, dtype: torch.dtype, wide: tuple[int, ...] = ()) -> Kernels | None:
    """Compiled transforms for `algorithm` in `dtype` (fp32 or bf16) on this CPU, the `wide`
    components (a*t + b) in fp32, or None where they cannot be built (no C compiler, a failed
    build, another dtype)."""
    if dtype not in _TYPES or (wide and dtype == torch.float32):
        return None
    name = (
        "wg_"
        + hashlib.sha256(algorithm.name.encode()).hexdigest()[:8]
        + ("_bf16" if dtype == torch.bfloat16 else "_f32")
        + "".join(f"_w{a}" for a in wide)
    )
    source = _PRELUDE + _source(algorithm, dtype, name, wide)
    try:
        path = _compile(source)
        return Kernels(ctypes.CDLL(str(path)), name, dtype, wide) if path is not None else None
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None
