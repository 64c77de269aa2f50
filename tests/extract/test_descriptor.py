"""featx's descriptor equals the paper's definition, computed here image by image.

The reference below is written straight from Appendix B and shares no code with featx's
dense net: fc6 is applied as torchvision's Linear layer to every 7x7 window of pool5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

import featx
from featx.net.backbones.vgg import torchvision_model
from featx.net.weights import IMAGENET_MEAN, IMAGENET_STD, Weights

MODEL = "vgg11"
SEED = 0
SCALES = (224, 288)


@pytest.fixture(scope="module")
def vgg():
    return torchvision_model(MODEL, Weights({"kind": "random", "seed": SEED}, None))


def reference_map_mean(vgg, img: torch.Tensor) -> torch.Tensor:
    """fc7 of every 7x7 window of pool5 via torchvision's classifier, averaged over positions."""
    pool5 = vgg.features(img[None])[0]  # [512, H, W]
    windows = pool5.unfold(1, 7, 1).unfold(2, 7, 1)  # [512, H-6, W-6, 7, 7]
    flat = windows.permute(1, 2, 0, 3, 4).reshape(-1, 512 * 7 * 7)
    fc7 = vgg.classifier[:5](flat)  # Linear, ReLU, Dropout (eval: identity), Linear, ReLU
    return fc7.mean(dim=0)


def reference_descriptor(vgg, file, scales, flip: bool, aggregate: str) -> np.ndarray:
    image = v2.functional.pil_to_tensor(Image.open(file).convert("RGB"))
    per_scale = []
    for q in scales:
        x = v2.Resize(q, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)(image)
        x = v2.functional.normalize(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
        d = reference_map_mean(vgg, x)
        if flip:
            d = (d + reference_map_mean(vgg, x.flip(-1))) / 2
        per_scale.append(d)
    d = torch.stack(per_scale).mean(0) if aggregate == "mean" else torch.cat(per_scale)
    return F.normalize(d, dim=0).numpy()


@pytest.fixture(scope="module")
def images(samples):
    # Several sizes and aspect ratios, portrait and landscape, and a grayscale JPEG.
    names = ["anchor/image_0001.jpg", "anchor/image_0003.jpg", "lotus/image_0001.jpg", "camera/image_0003.jpg"]
    return {n: samples / n for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("aggregate,flip", [("mean", True), ("stack", True), ("mean", False), ("stack", False)])
def test_descriptor_equals_the_papers_definition(vgg, images, tmp_path, aggregate, flip):
    out = tmp_path / "f.parquet"
    for name, file in images.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(file.read_bytes())
    # fp32: the exact definition (the default, "auto", may compute in bf16).
    featx.extract_features(
        tmp_path / "in",
        out,
        model=MODEL,
        weights="random",
        seed=SEED,
        scales=SCALES,
        flip=flip,
        aggregate=aggregate,
        batch_size=4,
        precision="fp32",
    )
    df = featx.read_features(out).set_index("path")
    with torch.inference_mode():
        for name, file in images.items():
            expected = reference_descriptor(vgg, file, SCALES, flip, aggregate)
            got = df.loc[name, "feature"]
            assert got.shape == expected.shape == ((2 if aggregate == "stack" else 1) * 4096,)
            assert np.abs(got - expected).max() < 2e-5, file
    # The comparison can fail: the same image without flip is far off at this tolerance.
    if flip:
        with torch.inference_mode():
            name, file = next(iter(images.items()))
            other = reference_descriptor(vgg, file, SCALES, not flip, aggregate)
        assert np.abs(df.loc[name, "feature"] - other).max() > 1e-3
