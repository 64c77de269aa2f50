"""featx: the very deep features of Simonyan & Zisserman (arXiv 1409.1556, Appendix B).

Dense multi-scale VGG descriptors, from an image folder to Parquet, and the paper's transfer
experiments on Caltech-101/256 and PASCAL VOC. Names are handed on lazily (PEP 562), so
`import featx` stays light: torch, sklearn and ray load only when a name that needs them is used.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

from featx.errors import BadInput, FeatxError, Locked, MissingData, SettingsMismatch

try:
    __version__ = version("featx")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it
_LAZY = {
    "ExtractConfig": "featx.extract.config",
    "ExtractResult": "featx.extract.job",
    "descriptor_hash": "featx.extract.provenance",
    "extract_features": "featx.extract.run",
    "load_xy": "featx.store.read",
    "read_features": "featx.store.read",
    "read_provenance": "featx.store.read",
    "VGGFeatures": "featx.sklearn",
    "probe": "featx.downstream.probe",
    "Index": "featx.downstream.search",
}

__all__ = [
    "BadInput",
    "FeatxError",
    "Locked",
    "MissingData",
    "SettingsMismatch",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
