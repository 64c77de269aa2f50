"""Shared fixtures: the repo's sample images, generated images, a random-weight net."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
SHARED_MINI = REPO.parent / "shared" / "data" / "caltech101-mini" / "101_ObjectCategories"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/net exercises torch alone: marked torch_only (see pyproject.toml)."""
    net = REPO / "tests" / "net"
    for item in items:
        if net in Path(item.fspath).parents:
            item.add_marker(pytest.mark.torch_only)


@pytest.fixture(autouse=True)
def _quiet_random_weights_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised .*")
        yield


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random RGB image: natural-ish statistics, so resizing matters to the features."""
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int32) + noise, 0, 255).astype(np.uint8))


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, label: str = "cls") -> list[Path]:
    rng = np.random.default_rng(seed)
    (folder / label).mkdir(parents=True, exist_ok=True)
    files = []
    for i, (w, h) in enumerate(sizes):
        f = folder / label / f"img_{i:03d}.jpg"
        smooth_image(rng, w, h).save(f, quality=92)
        files.append(f)
    return files


def features_by_path(path) -> dict[str, np.ndarray]:
    """path -> feature of a feature file or folder; paths must be unique (one row per image)."""
    import featx

    df = featx.read_features(path)
    assert df["path"].is_unique
    return dict(zip(df["path"], df["feature"]))


def assert_same_rows(a_path, b_path, atol: float = 2e-6) -> None:
    """Two feature files hold the same paths with the same features (to `atol`)."""
    a, b = features_by_path(a_path), features_by_path(b_path)
    assert sorted(a) == sorted(b)
    for p in a:
        np.testing.assert_allclose(b[p], a[p], atol=atol, err_msg=p)


def seeded(make, seed: int = 7):
    """make() with torch's generator seeded, the caller's generator state left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def assert_the_same_build(ours, theirs) -> None:
    """Two nets built module for module alike: the same module names and class names, the same
    reprs (kernels, strides, eps, ...), the same state dict keys in order, every tensor equal."""
    import torch

    assert [(n, type(m).__name__) for n, m in ours.named_modules()][1:] == [
        (n, type(m).__name__) for n, m in theirs.named_modules()
    ][1:]
    assert repr(ours) == repr(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
