"""The `featx` command: parses options into one settings shape, calls the library, prints.

One module per group of commands (extract, evaluate, downstream); featx's own errors become
one line and exit code 2 (featx.cli.common). Importing this package loads no torch, so
`featx --help` and argument errors are instant.
"""

# Each module registers its commands on `app`; `featx --help` lists them in this order.
# isort: off
from featx.cli import extract  # noqa: F401
from featx.cli import evaluate  # noqa: F401
from featx.cli import downstream  # noqa: F401

# isort: on
from featx.cli.common import Precision, app

__all__ = ["Precision", "app"]
