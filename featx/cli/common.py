"""What every `featx` command shares: the app, the one error path, the choices and options.

The CLI only parses options into the one settings shape (an ExtractConfig, through
`extract_config`), calls the library and prints. Every command runs inside `one_error_path`:
featx's own errors, and the OS errors of the user's files, become one line and exit 2; any
other exception is a bug and shows its traceback, then asks for a report (exit 1).
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import sys
import traceback
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from enum import Enum
from typing import Annotated

import typer

from featx.errors import FeatxError, cli_words
from featx.net.device import PRECISIONS

BUG_LINE = (
    "featx: error: this is a bug in featx, not a mistake in what you gave it; please report it with the traceback above"
)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit: how every user error ends."""
    typer.echo(f"featx: error: {message}", err=True)
    raise typer.Exit(code)


# What to do about an OS error, by its errno: the file is named by the error itself.
_OS_FIXES = {
    errno.ENOSPC: "free some space on that disk, or write elsewhere",
    errno.EDQUOT: "free some of your disk quota, or write elsewhere",
    errno.EROFS: "that file system is read-only; write elsewhere",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a file stands where a folder should be; check the path",
}


def os_error_line(e: OSError) -> str:
    """An OS error in words: the file, what the OS said, what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e)
    fix = _OS_FIXES.get(e.errno)
    return (f"{where}: {what}" if where else what) + (f"; {fix}" if fix else "")


# The options given before the command (`featx -v CMD`), set by the app's callback for the command.
_FLAGS: ContextVar[dict | None] = ContextVar("featx_cli_flags", default=None)


def _flags() -> dict:
    return _FLAGS.get() or {}


@contextmanager
def one_error_path():
    """featx errors and the OS errors of the user's files: one line, exit 2 (with -v, their
    traceback first). Anything else: its traceback and a request for a bug report, exit 1."""
    try:
        with cli_words():
            yield
    except (typer.Exit, typer.Abort):
        raise  # how commands end on purpose (`fail`)
    except FeatxError as e:
        if _flags().get("verbose"):
            traceback.print_exc()
        fail(str(e), e.exit_code)
    except OSError as e:
        if e.errno is None:  # a library's own OSError("..."), not the OS speaking about a file
            _bug()
        if _flags().get("verbose"):
            traceback.print_exc()
        fail(os_error_line(e))
    except Exception:
        _bug()


def _bug() -> None:
    traceback.print_exc()
    typer.echo(BUG_LINE, err=True)
    raise typer.Exit(1)


def call(fn, *args, **kwargs):
    """Run a library call on the one error path (every command runs on it as a whole, too)."""
    with one_error_path():
        return fn(*args, **kwargs)


def warn_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"featx: warning: {message}", file=sys.stderr)


def guarded(command):
    """`command` on the one error path, with Python warnings as one line each (restored after),
    and -q given before the command (`featx -q CMD`) meaning its own --quiet."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        if "quiet" in kwargs:
            kwargs["quiet"] = bool(kwargs["quiet"] or _flags().get("quiet"))
            if kwargs["quiet"] and not _flags().get("verbose"):
                logging.getLogger("featx").setLevel(logging.WARNING)
        with warnings.catch_warnings(), one_error_path():
            warnings.showwarning = warn_one_line
            return command(*args, **kwargs)

    return run


class App(typer.Typer):
    """A Typer app whose every command runs `guarded`: nothing a user does ends in a traceback."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(fn):
            register(guarded(fn))
            return fn

        return decorator


app = App(
    help="The very deep features of Simonyan & Zisserman (arXiv 1409.1556, Appendix B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Choices from the one list of each: precisions (featx.net.device). Models and layers are open
# sets (timm:NAME, each net's taps): ExtractConfig refuses what does not fit, in one line that
# lists the choices, before torch loads (featx.net.backbones).
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)


class Aggregate(str, Enum):
    mean = "mean"
    stack = "stack"


class HeadName(str, Enum):
    svm = "svm"
    logreg = "logreg"


# Options that `featx extract` and `featx probe` share, word for word.
MODEL_HELP = (
    "The backbone: vgg16 (the paper's Net-D), vgg19 (Net-E) or another VGG; a torchvision ResNet, ResNeXt, "
    "Wide-ResNet, ConvNeXt, EfficientNet(V2), RegNet, DenseNet or MobileNetV3 (resnet50, convnext_tiny, ...); "
    "or timm:NAME, any timm model (pip install 'featx[timm]')."
)
LAYER_HELP = (
    "The tap: default = fc7 for VGG (the paper's; fc6, pool5 also), pre_logits for the others (what the model "
    "runs before its last Linear); `featx model NAME` lists a net's taps."
)
ModelOption = Annotated[str, typer.Option(help=MODEL_HELP)]
LayerOption = Annotated[str, typer.Option(help=LAYER_HELP)]
ScalesOption = Annotated[str, typer.Option(help="Smaller-side sizes Q, comma-separated.")]
FlipOption = Annotated[bool, typer.Option("--flip/--no-flip", help="Average with the horizontally flipped image.")]
AggregateOption = Annotated[Aggregate, typer.Option(help="Combine scales by mean (VOC) or stack (Caltech).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, or cuda[:N].")]
BatchSizeOption = Annotated[
    int, typer.Option(help="At most this many images per batch (mixed sizes share a batch exactly).")
]
WeightsSeedOption = Annotated[int, typer.Option(help="Seed of --weights random.")]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress and no notes: only warnings, errors and results.")
]


def extract_config(**settings):
    """The one settings shape every command hands the library: an ExtractConfig, checked before
    torch loads (a bad value is one line). Enum options are taken by their values."""
    from featx.extract.config import ExtractConfig

    return call(ExtractConfig, **{k: v.value if isinstance(v, Enum) else v for k, v in settings.items()})


def parse_scales(text: str) -> tuple[int, ...]:
    """--scales as integers, separated by commas and/or spaces ("256,384,512", "256 384 512")."""
    try:
        return tuple(int(q) for q in re.split(r"[,\s]+", text.strip()) if q)
    except ValueError:
        fail(f"--scales {text!r} is not a list of integers; write e.g. --scales 256,384,512")


def _show_version(value: bool) -> None:
    if value:
        from featx import __version__

        typer.echo(f"featx {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also print debugging detail, and the traceback of an error.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors (and the results).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print featx's version and exit.")
    ] = False,
) -> None:
    """The very deep features of Simonyan & Zisserman (arXiv 1409.1556, Appendix B)."""
    _FLAGS.set({"verbose": verbose, "quiet": quiet})
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("featx")
    logger.setLevel(level)
    for old in [h for h in logger.handlers if getattr(h, "featx_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)  # this invocation's stderr (CliRunner swaps it)
    handler.setFormatter(logging.Formatter("featx: %(message)s"))
    handler.featx_cli = True
    logger.addHandler(handler)
    logger.propagate = False
