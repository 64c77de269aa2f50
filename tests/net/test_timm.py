"""timm:NAME (the optional extra featx[timm]): ViTs and convnets under the paper's protocol.

timm's own tiny test models (test_vit, test_resnet, test_efficientnet: a few hundred thousand
parameters, random init) keep this fast; nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

timm = pytest.importorskip("timm")

import featx  # noqa: E402
from featx.cli import app  # noqa: E402
from featx.extract.batching import BatchStats  # noqa: E402
from featx.extract.config import ExtractConfig  # noqa: E402
from featx.extract.describer import DenseDescriber, make_describer  # noqa: E402
from featx.extract.descriptor import combine, pooled_per_scale  # noqa: E402
from featx.extract.provenance import provenance  # noqa: E402
from featx.net.backbones import get_backbone  # noqa: E402
from featx.net.padding import randomize_  # noqa: E402
from featx.net.weights import Weights, normalization  # noqa: E402
from featx.sklearn import Features  # noqa: E402

VIT, RESNET, EFFNET = "timm:test_vit", "timm:test_resnet", "timm:test_efficientnet"


def image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(model: str, x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(model, "random"))
    return (x.float() / 255 - mean) / std


def describer(model: str, layer: str = "pre_logits", flip: bool = False, weights=None) -> DenseDescriber:
    config = ExtractConfig(model=model, layer=layer, weights="random", seed=2, flip=flip, precision="fp32")
    return make_describer(config, "cpu", weights=weights)


@pytest.fixture(scope="module")
def vit():
    """timm's test_vit with random weights (seed 2), as featx builds it, and timm's plain model."""
    d = describer(VIT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        plain = timm.create_model("test_vit").eval()
    return d, plain


def test_a_vit_is_its_patch_tokens_mean_at_the_native_size(vit):
    d, plain = vit
    images = [image(160, 160, seed) for seed in (0, 1)]
    ours = combine([d(images)], "mean")
    with torch.inference_mode():
        tokens = plain.forward_features(normalised(VIT, torch.stack(images)))
    expected = F.normalize(tokens[:, plain.num_prefix_tokens :].mean(dim=1), dim=1)
    assert plain.num_prefix_tokens == 1 and ours.shape == (2, 64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # The class token is the other tap.
    cls = combine([describer(VIT, "cls")(images)], "mean")
    torch.testing.assert_close(cls, F.normalize(tokens[:, 0], dim=1), rtol=0, atol=1e-5)


def test_at_another_size_the_position_embeddings_are_timms_interpolation(vit):
    """At 128x192 (an 8x12 grid, the model's is 10x10): the same as timm's model made for that
    size, its position embeddings resampled as timm resamples a checkpoint."""
    d, plain = vit
    from timm.layers import resample_abs_pos_embed

    state = dict(plain.state_dict())
    grid = tuple(plain.patch_embed.grid_size)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (8, 12), old_size=grid, num_prefix_tokens=1)
    sized = timm.create_model("test_vit", img_size=(128, 192), dynamic_img_size=False).eval()
    sized.load_state_dict(state)
    x = image(128, 192, 3)
    with torch.inference_mode():
        tokens = sized.forward_features(normalised(VIT, x[None]))
    expected = tokens[:, 1:].mean(dim=1)
    torch.testing.assert_close(d([x]), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_side_that_is_no_multiple_of_the_patch_is_centre_cropped(vit):
    d, _ = vit
    x = image(171, 165, 4)  # 11 and 5 pixels over 160: 5 rows off the top, 2 columns off the left
    torch.testing.assert_close(d([x]), d([x[:, 5:165, 2:162].contiguous()]), rtol=0, atol=0)


def test_a_vit_batches_one_token_grid_at_a_time(vit):
    """Images of different sizes are never padded into one batch; each equals itself alone."""
    d, _ = vit
    assert not d.mixes_sizes
    sizes = [(160, 160), (160, 192), (160, 160), (192, 160), (160, 192)]
    scaled = [{160: image(h, w, i)} for i, (h, w) in enumerate(sizes)]
    stats = BatchStats()
    batched = pooled_per_scale(d, scaled, (160,), batch_size=8, stats=stats)[0]
    alone = torch.cat([d([s[160]]) for s in scaled])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    assert stats.batches == 3 and stats.padding == 0.0  # one batch per shape, nothing padded


def test_a_timm_convnet_the_hooks_follow_batches_mixed_sizes_exactly():
    """test_resnet (ResNet-D: average-pool shortcuts in ceil mode): exact, and not without the hooks."""
    model = randomize_(get_backbone(RESNET).torchvision_model(Weights({"kind": "random", "seed": 1}, None)))
    weights = Weights({"kind": "file", "file": "randomised"}, model.state_dict(), *normalization(RESNET, "random"))
    d = describer(RESNET, weights=weights)
    assert d.mixes_sizes and get_backbone(RESNET).mixes_sizes()
    images = [image(h, w, seed) for seed, (h, w) in enumerate([(64, 93), (81, 64), (77, 77)])]
    alone = torch.cat([d([x]) for x in images])
    scale = alone.abs().max()
    assert (d(images) - alone).abs().max() <= 1e-5 * scale
    assert (d.run(d.stage(images), rezero=False).cpu() - alone).abs().max() > 1e-4 * scale
    # At one size it is timm's own pre-logits (forward_head(pre_logits=True)).
    x = image(160, 160, 9)
    with torch.inference_mode():
        own = model.forward_head(model.forward_features(normalised(RESNET, x[None])), pre_logits=True)
    torch.testing.assert_close(d([x]), own, rtol=1e-5, atol=1e-5 * own.abs().max().item())


def test_a_timm_convnet_the_hooks_cannot_follow_batches_one_shape_and_says_so():
    """test_efficientnet's squeeze-excitation is a functional mean: the probe sees the leak."""
    assert not get_backbone(EFFNET).mixes_sizes()
    d = describer(EFFNET)
    assert not d.mixes_sizes
    config = ExtractConfig(model=EFFNET, weights="random", scales=(96,), precision="fp32")
    prov = provenance(config, "cpu")
    assert prov["batching"].startswith("same-shape images only") and prov["timm"] == timm.__version__
    assert prov["dim"] == 256 and prov["settings"]["normalize"]["mean"] == [0.485, 0.456, 0.406]
    assert prov["weights_preprocessing"]["source"] == "timm pretrained_cfg"


def test_featx_extract_with_a_vit(samples, tmp_path):
    out = tmp_path / "vit.parquet"
    featx.extract_features(
        samples / "crab", out, model=VIT, weights="random", scales=(160, 176), precision="fp32", workers=0
    )
    prov = featx.read_provenance(out)
    assert prov["model"] == VIT and prov["layer"] == "pre_logits" and prov["dim"] == 64
    assert "patch tokens averaged" in prov["descriptor"] and "same-shape" in prov["batching"]
    X, _ = featx.load_xy(out)
    assert X.shape == (3, 64) and abs(float((X**2).sum(1).mean()) - 1) < 1e-5


def test_model_command_for_timm_models():
    runner = CliRunner()
    result = runner.invoke(app, ["model", VIT, "--size", "160x192"])
    assert result.exit_code == 0, result.output
    total = sum(p.numel() for p in timm.create_model("test_vit").parameters())
    assert f"timm counts {total:,} parameters" in result.output and "embeddings" in result.output
    assert "taps (--layer): pre_logits (default), cls" in result.output
    bad = runner.invoke(app, ["model", RESNET, "--layer", "cls"])
    assert bad.exit_code == 2 and "no class token" in bad.output and bad.output.count("\n") == 1


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_names_weights_and_a_missing_timm_are_refused_in_one_line(tmp_path):
    runner = CliRunner()
    for args, words in [
        (["model", "timm:no_such_net"], "unknown timm model 'no_such_net'"),
        (["model", "timm:test_vit.no_such_tag"], "unknown pretrained tag"),
        (["model", "timm:swin_tiny_patch4_window7_224"], "takes only its own input size (224x224)"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and words in result.output and result.output.count("\n") == 1, result.output
    with pytest.raises(ValueError, match=r"^--weights 'IMAGENET1K_V1' for timm:test_vit: a timm model takes 'default'"):
        featx.descriptor_hash(ExtractConfig(model=VIT, weights="IMAGENET1K_V1"))
    # Without timm installed, one line naming the fix.
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "from featx.extract.config import ExtractConfig\n"
        "try:\n    ExtractConfig(model='timm:test_vit').dim\nexcept ValueError as e:\n    print(e)"
    )
    assert run_python(code).stdout.strip() == (
        "timm models need timm, which is not installed; pip install 'featx[timm]'"
    )


@pytest.mark.slow
def test_default_weights_unreachable_are_one_line_naming_the_fix(samples, tmp_path):
    code = (
        "from featx.net.weights import resolve\n"
        "from featx.errors import FeatxError\n"
        "try:\n    resolve('timm:test_vit', 'default')\nexcept FeatxError as e:\n    print(type(e).__name__, e)"
    )
    proc = run_python(code, HF_HUB_OFFLINE="1")
    line = proc.stdout.strip()
    assert line.startswith("Unreachable cannot download the timm weights of test_vit"), proc.stdout + proc.stderr
    assert "--weights FILE" in line and "--weights random" in line and "\n" not in line


def test_a_state_dict_file_and_random_weights_work_offline(samples, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = timm.create_model("test_vit")
    file = tmp_path / "test_vit.pth"
    torch.save(model.state_dict(), file)
    out = tmp_path / "f.parquet"
    featx.extract_features(samples / "crab", out, model=VIT, weights=str(file), scales=(160,), precision="fp32")
    prov = featx.read_provenance(out)
    assert prov["weights"]["kind"] == "file" and prov["weights"]["file"] == "test_vit.pth"
    X, _ = featx.load_xy(out)
    # The sklearn transformer gives the same rows for the same settings.
    Y = Features(model=VIT, weights=str(file), scales=(160,), precision="fp32").fit_transform(
        sorted(str(p) for p in (samples / "crab").glob("*.jpg"))
    )
    assert abs(X - Y).max() < 1e-5
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), other)
    with pytest.raises(
        ValueError, match=r"does not fit timm:test_vit: .*; give model=NAME of the net they were saved from"
    ):
        make_describer(ExtractConfig(model=VIT, weights=str(other), precision="fp32"), "cpu")


def test_a_timm_files_settings_are_rebuilt_for_queries():
    """featx neighbours describes queries as a file's rows were: timm's default weights included."""
    from featx.extract.provenance import config_from_provenance

    config = ExtractConfig(model=VIT, scales=(160,), precision="fp32")
    prov = provenance(config, "cpu")
    assert prov["weights"]["kind"] == "timm" and prov["weights"]["name"].startswith("test_vit")
    rebuilt = config_from_provenance(prov)
    assert (rebuilt.model, rebuilt.weights) == (VIT, "default")
    assert featx.descriptor_hash(rebuilt) == prov["settings_hash"]
