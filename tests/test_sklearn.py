"""featx.sklearn.VGGFeatures: `featx extract`'s numbers, and scikit-learn's estimator contract.

Two nets keep this fast on a CPU: vgg11 fc7 at Q=224 where the numbers are compared with
the CLI's, and vgg11 pool5 at Q=32 (a 1x1 pool5 map, ~20 ms an image) where only the
estimator's behaviour is under test.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import NotFittedError, SkipTestWarning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks

import featx
from featx.extract import describer as factory
from featx.extract import provenance
from featx.sklearn import Features, VGGFeatures
from tests.conftest import smooth_image, write_images

# Precision explicit: the comparison is of fp32 numbers whatever the defaults become.
CLI_SETTINGS = dict(model="vgg11", weights="random", seed=0, scales=(224,), precision="fp32")
# The cheap net: pool5 needs a smaller side of only 32 pixels.
TINY = dict(model="vgg11", weights="random", layer="pool5", scales=(32,), precision="fp32")


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Small images of the kinds decoding must treat as the CLI does: same-shape pairs,
    portrait, square, grayscale PNG, RGBA PNG, and a JPEG whose EXIF says "rotate 90°"."""
    root = tmp_path_factory.mktemp("odd")
    write_images(root, [(40, 30), (40, 30), (30, 45)], seed=3, label="rgb")
    rng = np.random.default_rng(4)
    (root / "other").mkdir()
    smooth_image(rng, 36, 28).convert("L").save(root / "other" / "gray.png")
    rgba = smooth_image(rng, 28, 36).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((28, 36)))
    rgba.save(root / "other" / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    smooth_image(rng, 40, 30).save(root / "other" / "rotated.jpg", exif=exif, quality=92)
    return root


@pytest.fixture(scope="module")
def cli_file(odd_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "odd.parquet"
    featx.extract_features(odd_images, out, **CLI_SETTINGS)
    return out


@pytest.mark.slow
def test_features_equal_the_cli_for_paths_pil_images_and_arrays(odd_images, cli_file):
    cli_features = featx.read_features(cli_file)
    files = [odd_images / p for p in cli_features["path"]]
    expected = np.stack(cli_features["feature"])
    # Another batch size than the CLI's 8: the numbers must not depend on batching.
    vgg = VGGFeatures(**CLI_SETTINGS, batch_size=3).fit()
    X = vgg.transform([str(f) for f in files])
    assert X.dtype == np.float32 and X.shape == (len(files), 4096)
    np.testing.assert_allclose(X, expected, atol=1e-5)
    assert vgg.settings_hash_ == featx.read_provenance(cli_file)["settings_hash"]

    # PIL images as Image.open gives them (EXIF orientation and alpha still to handle).
    some = [i for i, p in enumerate(cli_features["path"]) if p.endswith(("rgba.png", "rotated.jpg"))]
    opened = [Image.open(files[i]) for i in some]
    np.testing.assert_allclose(vgg.transform(opened), expected[some], atol=1e-5)
    # HxWx3 uint8 arrays of the upright RGB pixels.
    arrays = [np.asarray(ImageOps.exif_transpose(Image.open(files[i])).convert("RGB")) for i in (2,)]
    np.testing.assert_allclose(vgg.transform(arrays), expected[[2]], atol=1e-5)


@pytest.mark.slow
def test_stacked_scales_without_flip_equal_the_cli(odd_images, tmp_path):
    settings = dict(CLI_SETTINGS, scales=(256, 224), aggregate="stack", flip=False)
    files = [odd_images / "rgb" / "img_002.jpg", odd_images / "other" / "rotated.jpg"]
    out = tmp_path / "stack.parquet"
    featx.extract_features(files, out, **settings)
    df = featx.read_features(out)
    vgg = VGGFeatures(**settings).fit()
    assert vgg.settings_hash_ == featx.read_provenance(out)["settings_hash"]
    by_name = {f.name: f for f in files}
    X = vgg.transform([by_name[p] for p in df["path"]])
    assert X.shape == (2, 2 * 4096)
    np.testing.assert_allclose(X, np.stack(df["feature"]), atol=1e-5)
    assert vgg.get_feature_names_out()[[0, 4096]].tolist() == ["fc7_q256_0", "fc7_q224_0"]


def test_settings_hash_names_the_descriptor():
    """The transformer names its descriptor as a feature file does: compare before mixing."""
    vgg = VGGFeatures(**CLI_SETTINGS).fit()
    assert vgg.settings_hash_ == featx.descriptor_hash(featx.ExtractConfig(**CLI_SETTINGS))
    assert VGGFeatures(**dict(CLI_SETTINGS, flip=False)).fit().settings_hash_ != vgg.settings_hash_
    # The default precision is the CLI's ("auto"), resolved for the device as the CLI does.
    auto = VGGFeatures(**{k: v for k, v in TINY.items() if k != "precision"}).fit()
    assert auto.get_params()["precision"] == featx.ExtractConfig().precision
    config = featx.ExtractConfig(**{k: v for k, v in TINY.items() if k != "precision"})
    assert auto.settings_hash_ == featx.descriptor_hash(config)
    assert auto.precision_ in ("fp32", "bf16")


# -- the estimator contract ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_paths(tmp_path_factory):
    """Six same-size images in two classes: one batch per transform, three per class for CV."""
    root = tmp_path_factory.mktemp("tiny")
    files = write_images(root, [(48, 32)] * 3, seed=5, label="a") + write_images(
        root, [(48, 32)] * 3, seed=6, label="b"
    )
    return [str(f) for f in files], [f.parent.name for f in files]


def test_features_is_the_general_name_and_vggfeatures_its_vgg_name(sample_paths):
    general, vgg = Features(**TINY).fit(), VGGFeatures(**TINY).fit()
    assert isinstance(vgg, Features) and vgg.get_params() == general.get_params()
    np.testing.assert_array_equal(general.transform(sample_paths[0][:2]), vgg.transform(sample_paths[0][:2]))
    # Named by the tap (here fc6), each transformer under its own name in a pipeline.
    fc6 = Features(**dict(TINY, layer="fc6", scales=(224,))).fit()
    assert fc6.get_feature_names_out()[[0, 4095]].tolist() == ["fc6_0", "fc6_4095"]
    assert [name for name, _ in make_pipeline(Features(), VGGFeatures()).steps] == ["features", "vggfeatures"]


def test_fit_returns_self_and_transform_needs_fit(sample_paths):
    vgg = VGGFeatures(**TINY)
    with pytest.raises(NotFittedError):
        vgg.transform(sample_paths[0])
    with pytest.raises(NotFittedError):
        vgg.get_feature_names_out()
    assert vgg.fit() is vgg and vgg.fit(sample_paths[0], sample_paths[1]) is vgg
    X = vgg.transform(sample_paths[0])
    assert X.shape == (6, 512) and X.dtype == np.float32 and X.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vgg.fit_transform(sample_paths[0]), X)
    assert vgg.get_feature_names_out()[:2].tolist() == ["pool5_0", "pool5_1"]
    assert vgg.transform([]).shape == (0, 512)
    # Transform runs what was fitted; parameters set later take effect at the next fit.
    vgg.set_params(aggregate="stack", scales=(32, 48))
    np.testing.assert_array_equal(vgg.transform(sample_paths[0]), X)
    assert vgg.fit().transform(sample_paths[0][:1]).shape == (1, 1024)


def test_init_only_stores_and_fit_validates():
    vgg = VGGFeatures(model="vgg99", scales="big", device="tpu")  # no error before fit
    assert vgg.get_params()["model"] == "vgg99"
    with pytest.raises(ValueError, match="vgg99"):
        VGGFeatures(**dict(TINY, model="vgg99")).fit()
    with pytest.raises(ValueError, match="scales='big'"):
        VGGFeatures(**dict(TINY, scales="big")).fit()
    with pytest.raises(ValueError, match="tpu"):
        VGGFeatures(**dict(TINY, device="tpu")).fit()
    with pytest.raises(ValueError, match="below 224"):
        VGGFeatures(**dict(TINY, layer="fc7")).fit()
    assert VGGFeatures(**dict(TINY, scales=32)).fit().n_features_out_ == 512


def test_bad_inputs_name_the_sample_and_the_fix(sample_paths, tmp_path):
    vgg = VGGFeatures(**TINY).fit()
    with pytest.raises(ValueError, match=r"one image .*\[x\]"):
        vgg.transform(sample_paths[0][0])
    with pytest.raises(FileNotFoundError, match=r"X\[1\] = 'nope.jpg'"):
        vgg.transform([sample_paths[0][0], "nope.jpg"])
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"X\[0\] = .*text.jpg.*not an image"):
        vgg.transform([tmp_path / "text.jpg"])
    with pytest.raises(ValueError, match=r"float64 array of shape \(40, 30, 3\).*HxWx3 uint8"):
        vgg.transform([np.zeros((40, 30, 3))])
    with pytest.raises(ValueError, match=r"one HxWx3 image"):
        vgg.transform(np.zeros((40, 30, 3), np.uint8))
    with pytest.raises(ValueError, match=r"X\[0\] is a float.*image paths"):
        vgg.transform([1.5])
    with pytest.raises(ValueError, match=r"columns \['a', 'b'\]"):
        vgg.transform(pd.DataFrame({"a": [1], "b": [2]}))


def test_batch_of_arrays_and_dataframe_column(sample_paths):
    vgg = VGGFeatures(**TINY).fit()
    batch = np.stack([np.asarray(smooth_image(np.random.default_rng(i), 48, 32)) for i in range(3)])
    assert vgg.transform(batch).shape == (3, 512)  # [n, H, W, 3] uint8
    df = pd.DataFrame({"path": sample_paths[0][:3], "label": sample_paths[1][:3]})
    ct = ColumnTransformer([("vgg", VGGFeatures(**TINY), ["path"])])
    np.testing.assert_allclose(ct.fit_transform(df), vgg.transform(df["path"]), atol=1e-6)
    out = clone(vgg).set_output(transform="pandas").fit().transform(df["path"])
    assert list(out.columns[:2]) == ["pool5_0", "pool5_1"] and len(out) == 3


def test_clones_share_one_net_and_pickles_stay_small(sample_paths):
    vgg = VGGFeatures(**TINY).fit()
    twin = clone(vgg)
    assert "_describer" not in twin.__dict__  # clone copies parameters, nothing learned
    twin.fit()
    assert twin._describer is vgg._describer
    # A grid over descriptor settings that leave the net alone shares it too.
    assert VGGFeatures(**dict(TINY, scales=(48,), aggregate="stack")).fit()._describer is vgg._describer
    assert VGGFeatures(**dict(TINY, flip=False)).fit()._describer.net is vgg._describer.net
    blob = pickle.dumps(vgg)
    assert len(blob) < 10_000  # the net does not travel; it is a function of the parameters
    X = vgg.transform(sample_paths[0][:2])
    np.testing.assert_array_equal(pickle.loads(blob).transform(sample_paths[0][:2]), X)


def test_unpickled_transformer_refuses_other_weights(sample_paths, monkeypatch):
    """An unpickled transformer takes its net from the cache again, if the weights are the same."""
    vgg = VGGFeatures(**TINY).fit()
    blob = pickle.dumps(vgg)
    # As if the weights file had been rewritten between pickling and loading.
    monkeypatch.setattr(provenance, "weights_identity", lambda config: {"kind": "file", "sha256": "0" * 64})
    with pytest.raises(ValueError, match="call fit again"):
        pickle.loads(blob).transform(sample_paths[0][:1])


def test_grid_search_loads_the_net_once(sample_paths, monkeypatch):
    paths, labels = sample_paths
    builds = []
    real_build = factory.build_net
    monkeypatch.setattr(factory, "build_net", lambda *a, **k: builds.append(a) or real_build(*a, **k))
    # A seed no other test uses: a net not in the cache yet.
    pipe = make_pipeline(VGGFeatures(**TINY, seed=7, flip=False), LinearSVC())
    grid = GridSearchCV(pipe, {"vggfeatures__scales": [(32,), (48,)], "linearsvc__C": [0.1, 1.0]}, cv=3).fit(
        paths, labels
    )
    # 4 candidates x 3 folds + the refit = 13 fits of VGGFeatures, one load.
    assert len(grid.cv_results_["params"]) == 4
    assert len(builds) == 1 and builds[0][1].identity == {"kind": "random", "seed": 7}
    assert grid.predict(paths[:2]).shape == (2,)
    assert grid.best_estimator_[0].get_params()["scales"] in [(32,), (48,)]


def test_sklearn_sees_an_image_transformer():
    """Tags say what X is: a 1-D list of paths or images, not a numeric matrix. sklearn's
    generic checks feed numeric matrices, so on VGGFeatures itself it runs none and says so."""
    tags = VGGFeatures().__sklearn_tags__()
    assert not tags.input_tags.two_d_array and tags.input_tags.one_d_array and tags.input_tags.string
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_estimator(VGGFeatures(**TINY))
    assert any(issubclass(w.category, SkipTestWarning) for w in caught)


class RowsAsImages(VGGFeatures):
    """Test double for sklearn's generic checks: each numeric row becomes a 32x32 image.

    The checks only make numeric matrices; turning each row into an image (row values tiled,
    as uint8) lets them reach VGGFeatures' real fit, transform, clone and pickle. It adds no
    validation of its own, so the checks of numeric input validation are listed below as
    expected failures with the reason they do not apply.
    """

    def transform(self, X):
        rows = np.asarray(X, dtype=np.float64)
        images = [np.resize(np.clip(np.rint(r * 40 + 128), 0, 255).astype(np.uint8), (32, 32, 3)) for r in rows]
        return super().transform(images)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.one_d_array = tags.input_tags.string = False
        return tags


FIT_IGNORES_X = (
    "fit ignores X: the net is pre-trained and learns nothing from the data, so fit does "
    "not validate a numeric X nor set n_features_in_ (VGGFeatures validates its images in "
    "transform: test_bad_inputs_name_the_sample_and_the_fix)"
)
NOT_APPLICABLE = {
    "check_n_features_in_after_fitting": FIT_IGNORES_X,
    "check_n_features_in": FIT_IGNORES_X,
    "check_complex_data": FIT_IGNORES_X,
    "check_dtype_object": FIT_IGNORES_X,
    "check_estimators_empty_data_messages": FIT_IGNORES_X,
    "check_estimators_nan_inf": FIT_IGNORES_X,
    "check_estimator_sparse_tag": FIT_IGNORES_X,
    "check_fit1d": FIT_IGNORES_X,
    "check_fit2d_predict1d": (
        "a 1-D X is VGGFeatures' normal input (a list of paths or images); it refuses a 1-D "
        "numeric X sample by sample (test_bad_inputs_name_the_sample_and_the_fix), whereas "
        "the test double turns the numbers into images"
    ),
    # Its other assertions (fit_transform == fit().transform, shapes) are in
    # test_fit_returns_self_and_transform_needs_fit; it fails on "n_features differs".
    "check_transformer_general": FIT_IGNORES_X,
}


# flip=False halves the cost; flipping is covered by the CLI comparisons above.
@parametrize_with_checks(
    [RowsAsImages(**TINY, flip=False, batch_size=16)], expected_failed_checks=lambda est: NOT_APPLICABLE
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
