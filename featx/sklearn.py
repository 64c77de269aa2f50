"""`Features` (and its VGG name `VGGFeatures`): the paper's descriptor as a scikit-learn transformer.

Paper: Simonyan & Zisserman, arXiv 1409.1556, Appendix B, for any backbone (VGG, the paper's
reference; torchvision's ResNet, ConvNeXt, EfficientNet, ...; timm:NAME). Images in, [n, D] out;
the numbers are `featx extract`'s for the same settings: the same decoding
(featx.extract.decode), the same dense net (featx.net.backbones, featx.net.weights) and the same
pooling, flip and aggregation (featx.extract.descriptor).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx.errors import BadInput, MissingData
from featx.extract import describer as factory
from featx.extract import provenance
from featx.extract.config import DEFAULT_MAX_PIXELS, DEFAULT_SCALES, ExtractConfig
from featx.extract.decode import Decoded, ImageError, crop_box, decode_image, open_upright, upright_rgb
from featx.extract.describer import DenseDescriber
from featx.extract.descriptor import combine, pooled_per_scale
from featx.extract.regions import as_pixel
from featx.net.device import resolve_device

__all__ = ["Features", "VGGFeatures", "clear_net_cache", "describe_decoded"]

# Images decoded at a time: bounds memory (a 512-scale image is ~1 MB of uint8 per scale)
# and, as `featx extract`'s row groups, is the window within which same-shape images batch.
CHUNK = 64


def clear_net_cache() -> None:
    """Forget the cached nets (fitted transformers keep theirs until they are dropped)."""
    factory.clear_cache()


def describe_decoded(
    describer: DenseDescriber, decoded: list[Decoded], scales: tuple[int, ...], aggregate: str, batch_size: int
) -> np.ndarray:
    """float32 [n, D] for decoded images, through the same batching code as `featx extract`."""
    return combine(pooled_per_scale(describer, [d.scaled for d in decoded], scales, batch_size), aggregate).numpy()


def _upright(x, i: int) -> Image.Image:
    """One image of X (path, PIL image, HxWx3 uint8 array) upright as 8-bit RGB, as files enter featx."""
    if isinstance(x, (str, os.PathLike)):
        file = Path(x).expanduser()
        if not file.is_file():
            raise MissingData(f"X[{i}] = {str(x)!r}: no such image file; pass paths of existing images")
        try:
            return open_upright(file, DEFAULT_MAX_PIXELS)
        except ImageError as e:
            raise BadInput(f"X[{i}] = {str(x)!r}: {e.message}") from None
    if isinstance(x, Image.Image):
        return upright_rgb(x)  # as for a file: EXIF orientation, then 8-bit RGB
    if isinstance(x, np.ndarray):
        if x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8:
            raise BadInput(
                f"X[{i}] is a {x.dtype} array of shape {x.shape}; arrays must be HxWx3 uint8 RGB "
                f"(for gray or RGBA pass PIL.Image.fromarray(a), which is converted as files are)"
            )
        return Image.fromarray(x)  # HxWx3 uint8 is RGB
    raise BadInput(
        f"X[{i}] is a {type(x).__name__}; Features takes image paths, PIL images, HxWx3 uint8 "
        f"arrays, or (image, (x1, y1, x2, y2)) pairs"
    )


def _is_pair(x) -> bool:
    """(image, box): a box is four numbers, never an image."""
    if not (isinstance(x, tuple) and len(x) == 2):
        return False
    box = x[1]
    return not isinstance(box, (str, os.PathLike, Image.Image)) and hasattr(box, "__len__") and len(box) == 4


def _decode_one(x, i: int, scales: tuple[int, ...]) -> Decoded:
    """One sample of X -> upright RGB (or the crop of an (image, box) pair) rescaled to every Q.

    A box is (x1, y1, x2, y2) in upright pixels, 0-based, x2/y2 exclusive, as `featx extract
    --regions`: the crop is taken before rescaling, so its smaller side becomes Q.
    """
    if not _is_pair(x):
        return decode_image(_upright(x, i), scales)
    image, box = x
    coords = tuple(as_pixel(v) for v in box)
    if None in coords:
        raise BadInput(f"X[{i}] box {tuple(box)} is not four integer pixel coordinates (x1, y1, x2, y2)")
    try:
        return decode_image(crop_box(_upright(image, i), coords), scales)
    except ImageError as e:
        raise BadInput(f"X[{i}]: {e.message}") from None


def _samples(X) -> list:
    """X as a list of samples; refuses the inputs whose iteration would not give images."""
    if isinstance(X, (str, os.PathLike, Image.Image)):
        raise BadInput(f"X is one image ({type(X).__name__}); pass a list of images, e.g. [x]")
    if isinstance(X, np.ndarray):
        if X.ndim == 3 and X.shape[-1] == 3 and X.dtype == np.uint8:
            raise BadInput(f"X is one HxWx3 image of shape {X.shape}; pass [x] or an [n, H, W, 3] array")
        if X.ndim == 2 and X.shape[1] == 1 and X.dtype == object:
            return list(X[:, 0])  # a one-column selection, as ColumnTransformer passes it
    columns = getattr(X, "columns", None)
    if columns is not None:  # a DataFrame: its single column of paths or images
        if len(columns) != 1:
            raise BadInput(
                f"X is a table with columns {list(columns)}; pass one column of image paths, "
                f"e.g. df['path'] or ColumnTransformer([('features', Features(), ['path'])])"
            )
        return list(X.iloc[:, 0])
    if not isinstance(X, Iterable):
        raise BadInput(f"X is a {type(X).__name__}; pass a list of image paths, PIL images or HxWx3 uint8 arrays")
    return list(X)


class Features(TransformerMixin, BaseEstimator):
    """The paper's descriptor of images: paths, PIL images or HxWx3 uint8 arrays -> float32 [n, D].

    A sample may also be an (image, (x1, y1, x2, y2)) pair: the features of that box, equal to
    `featx extract --regions` for the same box.

    Paper: arXiv 1409.1556, Appendix B. Equal to `featx extract` for the same settings (see
    its options: `model` any backbone, e.g. "resnet50" or "timm:vit_small_patch14_dinov2";
    `layer="default"` its default tap); `fit` ignores X and y, and loads the net once per
    process for all clones. `weights="random"` is for tests and demos only: its features mean nothing.
    """

    def __init__(
        self,
        model: str = "vgg16",
        weights: str = "default",
        scales: tuple[int, ...] = DEFAULT_SCALES,
        flip: bool = True,
        aggregate: str = "mean",
        layer: str = "default",
        precision: str = ExtractConfig.precision,  # the CLI's default, so defaults agree
        device: str = "auto",
        batch_size: int = ExtractConfig.batch_size,  # the CLI's default, so defaults agree
        seed: int = 0,
    ):
        self.model = model
        self.weights = weights
        self.scales = scales
        self.flip = flip
        self.aggregate = aggregate
        self.layer = layer
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.seed = seed

    def _config(self) -> ExtractConfig:
        scales = (self.scales,) if isinstance(self.scales, (int, np.integer)) else self.scales
        try:
            scales = tuple(int(q) for q in scales)
        except (TypeError, ValueError):
            raise BadInput(
                f"scales={self.scales!r} is not a list of integers; write e.g. scales=(256, 384, 512)"
            ) from None
        return ExtractConfig(
            model=self.model,
            weights=str(self.weights),
            scales=scales,
            flip=bool(self.flip),
            aggregate=self.aggregate,
            layer=self.layer,
            precision=self.precision,
            device=self.device,
            batch_size=int(self.batch_size),
            seed=int(self.seed),
        )

    def fit(self, X=None, y=None):
        """Load the net (or take it from the cache); X and y are ignored: the net is pre-trained."""
        config = self._config()
        device = resolve_device(config.device)
        identity = provenance.weights_identity(config)
        self._describer = factory.make_describer(config, device, cache=True)
        # What transform runs: parameters set after fit take effect at the next fit.
        self.config_ = config
        self.weights_ = identity
        self.device_ = str(device)
        self.precision_ = self._describer.precision  # "auto" resolved for the device
        self.n_features_out_ = config.dim
        # Equal to `featx.read_provenance(file)["settings_hash"]` of a file with these features.
        self.settings_hash_ = provenance.descriptor_hash(config)
        return self

    def transform(self, X) -> np.ndarray:
        """float32 [n, D], L2-normalised rows, one per image of X, in X's order."""
        check_is_fitted(self)
        config = self.config_
        describer = self._fitted_describer()
        samples = _samples(X)
        out = np.zeros((len(samples), self.n_features_out_), np.float32)
        for start in range(0, len(samples), CHUNK):
            chunk = samples[start : start + CHUNK]
            decoded = [_decode_one(x, start + i, config.scales) for i, x in enumerate(chunk)]
            out[start : start + len(chunk)] = describe_decoded(
                describer, decoded, config.scales, config.aggregate, config.batch_size
            )
        return out

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """The tap's name and index: `fc7_0` (VGG), `pre_logits_0` ... for aggregate="mean"; `fc7_q256_0` ...
        per scale for "stack"."""
        check_is_fitted(self)
        config = self.config_
        per_scale = self.n_features_out_ // (len(config.scales) if config.aggregate == "stack" else 1)
        if config.aggregate == "stack":
            names = [f"{config.layer}_q{q}_{i}" for q in config.scales for i in range(per_scale)]
        else:
            names = [f"{config.layer}_{i}" for i in range(per_scale)]
        return np.asarray(names, dtype=object)

    def _fitted_describer(self) -> DenseDescriber:
        describer = self.__dict__.get("_describer")
        if describer is not None:
            return describer
        # Unpickled: the net did not travel (see __getstate__); take it from the cache again,
        # provided the weights are still the ones it was fitted with.
        config = self.config_
        identity = provenance.weights_identity(config)
        if identity != self.weights_:
            raise BadInput(
                f"weights {self.weights!r} are not the ones this transformer was fitted with "
                f"({self.weights_} then, {identity} now); call fit again"
            )
        self._describer = factory.make_describer(config, self.device_, cache=True)
        return self._describer

    def __getstate__(self):
        # The net is a function of the parameters: pickles (joblib, Pipeline memory) stay small.
        state = super().__getstate__()
        state.pop("_describer", None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Images, not a numeric matrix: a 1-D list of paths (strings), PIL images or arrays.
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        tags.input_tags.string = True
        # The output is float32 whatever the input is.
        tags.transformer_tags.preserves_dtype = []
        return tags


class VGGFeatures(Features):
    """`Features` under the name featx gave it first, when VGG was its only backbone (same parameters).

    A class of its own rather than a bare alias, so that pipelines keep naming its step
    `vggfeatures` (make_pipeline) and its repr stays `VGGFeatures(...)`.
    """
