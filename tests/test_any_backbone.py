"""Every command that takes --model takes any backbone: extract (both engines, --regions),
evaluate (each net's row and their late fusion beside the paper's), probe, neighbours, and the
scikit-learn transformer, with a torchvision convnet (random weights: fast and offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx.cli import app
from featx.extract.provenance import config_from_provenance, descriptor_hash
from featx.sklearn import Features, VGGFeatures
from tests.fake_datasets import make_caltech

runner = CliRunner()
RESNET = dict(model="resnet18", weights="random", scales=(64, 96), precision="fp32")


@pytest.fixture(scope="module")
def resnet_file(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet") / "samples.parquet"
    result = featx.extract_features(samples, out, **RESNET, workers=0)
    return out, result


def test_extract_writes_the_protocols_descriptor_with_its_provenance(resnet_file):
    out, result = resnet_file
    prov = featx.read_provenance(out)
    assert (prov["model"], prov["layer"], prov["dim"]) == ("resnet18", "pre_logits", 512)
    assert prov["descriptor"].startswith("pre_logits: the last map averaged over positions")
    assert prov["batching"].startswith("mixed sizes share padded batches, exactly")
    assert "BatchNorm folded, ReLU and residual sums fused" in prov["conv_kernels"]  # lowered
    assert prov["weights_preprocessing"] is None
    assert result.batches.images_per_batch > 1  # the sample images of different sizes did share batches
    X, _ = featx.load_xy(out)
    assert X.shape == (12, 512) and np.allclose((X**2).sum(1), 1, atol=1e-5)


def test_the_sklearn_transformer_is_extracts_numbers_for_any_backbone(samples, resnet_file):
    out, _ = resnet_file
    df = featx.read_features(out)
    features = Features(**RESNET).fit()
    X = features.transform([str(samples / p) for p in df["path"]])
    assert np.abs(X - np.stack(df["feature"])).max() < 1e-5
    assert features.get_feature_names_out()[:2].tolist() == ["pre_logits_0", "pre_logits_1"]
    assert features.settings_hash_ == featx.read_provenance(out)["settings_hash"]
    # VGGFeatures stays VGG's name: same parameters, fc7 by default.
    assert VGGFeatures().get_params()["layer"] == "default" and VGGFeatures(weights="random")._config().layer == "fc7"


def test_regions_of_any_backbone_are_the_crops_features(samples, tmp_path):
    import pandas as pd

    boxes = pd.DataFrame(
        {"path": ["crab/image_0001.jpg"] * 2, "x1": [0, 30], "y1": [0, 20], "x2": [120, 200], "y2": [90, 150]}
    )
    boxes.to_csv(tmp_path / "boxes.csv", index=False)
    out = tmp_path / "r.parquet"
    featx.extract_features(samples, out, **RESNET, regions=tmp_path / "boxes.csv", workers=0)
    rows = featx.read_features(out).sort_values("region")
    image = samples / "crab" / "image_0001.jpg"
    ours = Features(**RESNET).fit_transform([(str(image), (0, 0, 120, 90)), (str(image), (30, 20, 200, 150))])
    assert np.abs(np.stack(rows["feature"]) - ours).max() < 1e-5


def test_neighbours_describe_queries_as_the_files_rows_were(samples, resnet_file, tmp_path):
    out, _ = resnet_file
    prov = featx.read_provenance(out)
    assert descriptor_hash(config_from_provenance(prov)) == prov["settings_hash"]
    pytest.importorskip("faiss")
    ix = tmp_path / "ix"
    assert runner.invoke(app, ["index", str(out), "-o", str(ix)]).exit_code == 0
    result = runner.invoke(
        app, ["neighbours", str(ix), str(samples / "crab" / "image_0002.jpg"), "-k", "2", "-o", str(tmp_path / "n.csv")]
    )
    assert result.exit_code == 0, result.output
    import pandas as pd

    first = pd.read_csv(tmp_path / "n.csv").iloc[0]
    assert first["path"] == "crab/image_0002.jpg" and first["score"] == pytest.approx(1.0, abs=1e-4)


def test_probe_runs_the_protocol_with_any_backbone(samples, tmp_path):
    args = ["probe", samples, "--model", "mobilenet_v3_small", "--weights", "random", "--scales", "64"]
    args += ["--precision", "fp32", "--splits", "2", "--cache-dir", tmp_path / "cache", "--report", tmp_path / "p.json"]
    result = runner.invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["metrics"]["accuracy"]["mean"] >= 0
    assert "mobilenet_v3_small" in json.dumps(report)


TWO_NETS = """
name = "tiny-caltech"
dataset = "caltech101"
[protocol]
splits = 1
n_train = 3
n_test = 2
holdout = 0.34
metric = "mean_class_recall"
[features]
models = ["vgg11"]
weights = "random"
scales = [224]
flip = false
aggregate = "stack"
[head]
C = [1.0]
[paper]
results = [{ label = "Net-A", models = ["vgg11"], mean = 99.0, std = 0.1 }]
"""


def test_evaluate_gives_each_nets_row_and_their_fusion_beside_the_papers(tmp_path):
    make_caltech(tmp_path / "data" / "caltech101" / "101_ObjectCategories")
    (tmp_path / "p.toml").write_text(TWO_NETS)
    args = ["evaluate", "--pipeline", tmp_path / "p.toml", "--root", tmp_path / "data", "--model", "vgg11"]
    args += ["--model", "resnet18", "--cache-dir", tmp_path / "cache", "--precision", "fp32", "--quiet"]
    result = runner.invoke(app, [*map(str, args), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["models"] for r in report["results"]] == [["vgg11"], ["resnet18"], ["vgg11", "resnet18"]]
    assert "99.0 ± 0.1" in result.stdout and "vgg11 + resnet18" in result.stdout
    assert [f["dim"] for f in report["config"]["features"]] == [4096, 512]


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_rows_for_any_backbone(samples, resnet_file, tmp_path):
    pytest.importorskip("ray")
    out, _ = resnet_file
    folder = tmp_path / "ray"
    featx.extract_features(samples, folder, **RESNET, engine="ray", actors=1)
    local, ray = featx.read_features(out).set_index("path"), featx.read_features(folder).set_index("path")
    assert featx.read_provenance(folder)["settings_hash"] == featx.read_provenance(out)["settings_hash"]
    diff = np.abs(np.stack(ray.loc[local.index, "feature"]) - np.stack(local["feature"])).max()
    assert diff < 1e-5
