"""store.column builds the arrays pa.array would, without pyarrow's pandas shim."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from featx.store.schema import column


@pytest.mark.parametrize(
    "values,type",
    [
        (["a/1.jpg", "ü/ß.png", "", "a much longer relative path/with spaces.jpeg"], pa.string()),
        (["x", None, "y", None], pa.string()),
        ([None, None], pa.string()),
        ([], pa.string()),
        ([3, -1, 2**31 - 1], pa.int32()),
        ([2**40, 0], pa.int64()),
        (np.arange(6, dtype=np.float64).reshape(2, 3)[:, 1], pa.float32()),  # strided, another dtype
        (np.zeros(0, np.float32), pa.float32()),
    ],
)
def test_column_equals_pa_array(values, type):
    got = column(values, type)
    got.validate(full=True)
    assert got.equals(pa.array(values, type))
