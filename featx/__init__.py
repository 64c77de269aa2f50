"""featx: the very deep features of Simonyan & Zisserman (arXiv 1409.1556, Appendix B).

Dense multi-scale VGG descriptors, from an image folder to Parquet, and the paper's transfer
experiments on Caltech-101/256 and PASCAL VOC 2007/2012.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featx")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from featx.config import ExtractConfig  # noqa: E402
from featx.extract import ExtractResult, descriptor_hash, extract  # noqa: E402
from featx.store import load_xy, read_features, read_provenance  # noqa: E402

__all__ = [
    "ExtractConfig",
    "ExtractResult",
    "descriptor_hash",
    "extract",
    "load_xy",
    "read_features",
    "read_provenance",
    "__version__",
]
