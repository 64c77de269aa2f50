"""Whether this torch build runs oneDNN's pre-packed convolution and linear ops (probed once per dtype).

The packed ops are torch's internal `torch.ops.mkldnn` entry points: where a build lacks them or
the CPU lacks the dtype, the plan runs the plain F.conv2d / F.linear kernels instead.
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def onednn_prepack_works(dtype: torch.dtype) -> bool:
    """Whether this torch build runs oneDNN's pre-packed conv/linear ops in `dtype` (probed)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return False
    try:
        with torch.inference_mode():
            x = torch.ones(1, 8, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.ones(4, 8, 3, 3, dtype=dtype)
            pw = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, [1, 8, 5, 5])
            y = torch.ops.mkldnn._convolution_pointwise(x, pw, None, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            lw = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8, dtype=dtype), None)
            z = torch.ops.mkldnn._linear_pointwise(torch.ones(3, 8, dtype=dtype), lw, None, "none", [], "")
        return y.shape == (1, 4, 5, 5) and float(y[0, 0, 2, 2]) == 72.0 and float(z[0, 0]) == 8.0
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
