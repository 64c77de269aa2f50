"""What every `featx` command shares: the app, the one-line error path, the choices and options.

The CLI only parses options into the one settings shape (an ExtractConfig, through
`extract_config`), calls the library and prints; featx's own errors become one line and exit 2.
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from typing import Annotated

import typer

from featx.errors import FeatxError
from featx.net.device import PRECISIONS

app = typer.Typer(
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


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit: how every user error ends."""
    typer.echo(f"featx: error: {message}", err=True)
    raise typer.Exit(code)


def call(fn, *args, **kwargs):
    """Run a library call; user errors become one line and exit code 2, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except FeatxError as e:
        fail(str(e), e.exit_code)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as e:
        # Builtin errors raised for the user's input by the libraries featx calls (pyarrow,
        # Pillow, the OS): still one line, with the library's own words.
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def extract_config(**settings):
    """The one settings shape every command hands the library: an ExtractConfig, checked before
    torch loads (a bad value is one line). Enum options are taken by their values."""
    from featx.extract.config import ExtractConfig

    return call(ExtractConfig, **{k: v.value if isinstance(v, Enum) else v for k, v in settings.items()})


def parse_scales(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(q) for q in text.replace(" ", "").split(",") if q)
    except ValueError:
        fail(f"--scales {text!r} is not a list of integers; write e.g. --scales 256,384,512")


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print debugging detail.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors (and the results).")] = False,
) -> None:
    """The very deep features of Simonyan & Zisserman (arXiv 1409.1556, Appendix B)."""
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


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"featx: warning: {message}", file=sys.stderr)
