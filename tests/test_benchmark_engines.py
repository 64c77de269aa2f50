"""benchmarks/engines.py: the other engines describe images with featx's own net and descriptor,
so their fidelity figures compare like with like; the ONNX export is made once per settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import features_by_path, write_images

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engines():
    spec = importlib.util.spec_from_file_location("bench_engines", REPO / "benchmarks" / "engines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def featx_fp32_and_onnxruntime(engines, tmp_path, settings: dict, sizes) -> tuple[dict, dict]:
    import featx

    folder = tmp_path / "images"
    write_images(folder, sizes)
    out = tmp_path / "featx.parquet"
    featx.extract_features(folder, out, **(settings | {"precision": "fp32", "device": "cpu"}))
    onnx, _ = engines.exported(settings, tmp_path / "onnx")
    job = {"engine": "onnxruntime-fp32", "onnx": str(onnx), "folder": str(folder), "out": str(tmp_path / "ort.npy")}
    ran = engines.child(job | {"settings": settings})
    return features_by_path(out), dict(zip(ran["paths"], np.load(tmp_path / "ort.npy")))


def assert_same_descriptors(featx_rows: dict, engine_rows: dict) -> None:
    assert sorted(engine_rows) == sorted(featx_rows)
    for path, d in featx_rows.items():
        np.testing.assert_allclose(engine_rows[path], d, atol=1e-4, err_msg=path)


@pytest.mark.slow
def test_onnxruntime_on_the_export_gives_featx_fp32_descriptor_pool5(engines, tmp_path):
    settings = {"model": "vgg11", "weights": "random", "seed": 0, "layer": "pool5", "scales": [48, 64]}
    settings |= {"flip": True, "aggregate": "stack"}
    featx_rows, engine_rows = featx_fp32_and_onnxruntime(engines, tmp_path, settings, [(70, 50), (64, 96)])
    assert next(iter(engine_rows.values())).shape == (2 * 512,)
    assert_same_descriptors(featx_rows, engine_rows)


@pytest.mark.slow
def test_onnxruntime_on_the_export_gives_featx_fp32_descriptor_fc7(engines, tmp_path):
    """The paper's dense net: fc6 as a 7x7 conv, fc7 as a 1x1 conv, averaged over positions."""
    settings = {"model": "vgg11", "weights": "random", "seed": 0, "layer": "fc7", "scales": [224, 256]}
    settings |= {"flip": True, "aggregate": "mean"}
    featx_rows, engine_rows = featx_fp32_and_onnxruntime(engines, tmp_path, settings, [(300, 224), (256, 290)])
    assert next(iter(engine_rows.values())).shape == (4096,)
    assert_same_descriptors(featx_rows, engine_rows)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny"])
def test_onnxruntime_on_the_export_of_another_backbone_gives_featx_fp32_descriptor(engines, tmp_path, model):
    """A torchvision convnet exports its trunk averaged, then its head (ConvNeXt's LayerNorm)."""
    settings = {"model": model, "weights": "random", "seed": 0, "layer": "default", "scales": [64, 96]}
    settings |= {"flip": True, "aggregate": "mean"}
    featx_rows, engine_rows = featx_fp32_and_onnxruntime(engines, tmp_path, settings, [(70, 50), (64, 96)])
    assert_same_descriptors(featx_rows, engine_rows)


def test_the_export_is_made_once_per_settings(engines, tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(engines, "export_onnx", lambda settings, path: made.append(path) or path.write_bytes(b"x"))
    settings = {"model": "vgg11", "weights": "random", "seed": 0, "layer": "pool5"}
    first, how = engines.exported(settings, tmp_path)
    again, how_again = engines.exported(settings, tmp_path)
    assert (first, how["reused"], how_again["reused"], len(made)) == (again, False, True, 1)
    for other in ({"layer": "fc7"}, {"seed": 1}, {"model": "vgg13"}):
        assert engines.exported(settings | other, tmp_path)[0] != first
    assert len(made) == 4
    assert not list(tmp_path.glob(".*partial"))  # written aside, then moved into place


def test_a_weights_file_is_keyed_by_its_contents(engines, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "export_onnx", lambda settings, path: path.write_bytes(b"x"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    settings = {"model": "vgg11", "weights": str(weights), "layer": "pool5"}
    first = engines.exported(settings, tmp_path / "onnx")[0]
    weights.write_bytes(b"three")  # another size: another state for sure
    assert engines.exported(settings, tmp_path / "onnx")[0] != first
