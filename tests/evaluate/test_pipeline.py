"""Experiments as data: the shipped pipelines/ TOML files, user files, overrides."""

import pytest

from featx.evaluate.pipeline import (
    builtin_names,
    builtin_pipeline,
    load_pipeline,
    pipeline_for,
)

PAPER = {  # Table 11 of arXiv 1409.1556: Net-D, Net-E, D & E
    "caltech101": [(91.8, 1.0), (92.3, 0.5), (92.7, 0.5)],
    "caltech256": [(85.0, 0.2), (85.1, 0.3), (86.2, 0.3)],
    "voc2007": [(89.3, None), (89.3, None), (89.7, None)],
    "voc2012": [(89.0, None), (89.0, None), (89.3, None)],
}


def test_the_four_experiments_ship_with_the_package():
    assert builtin_names() == ["caltech101", "caltech256", "voc2007", "voc2012", "voc2012_action"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_shipped_pipeline_holds_the_papers_numbers(name):
    p = builtin_pipeline(name)
    assert p.dataset == name and p.features.models == ("vgg16", "vgg19")
    assert p.rows() == [("vgg16",), ("vgg19",), ("vgg16", "vgg19")]
    assert [(p.paper_result(m).mean, p.paper_result(m).std) for m in p.rows()] == PAPER[name]
    assert p.head.name == "svm" and p.protocol.holdout == 0.2 and p.features.flip


def test_protocols_follow_appendix_b():
    c101, c256 = builtin_pipeline("caltech101"), builtin_pipeline("caltech256")
    assert (c101.protocol.n_train, c101.protocol.n_test, c101.protocol.splits) == (30, 50, 3)
    assert (c256.protocol.n_train, c256.protocol.n_test, c256.protocol.splits) == (60, None, 3)
    assert c101.features.scales == (256, 384, 512) and c101.features.aggregate == "stack"
    voc07, voc12 = builtin_pipeline("voc2007"), builtin_pipeline("voc2012")
    assert voc07.features.scales == (256, 384, 512, 640, 768) and voc07.features.aggregate == "mean"
    assert (voc07.protocol.metric, voc12.protocol.metric) == ("voc07_ap", "voc_ap")
    assert "evaluation server" in voc12.paper_source


def test_overrides_replace_single_fields():
    p = builtin_pipeline("caltech101").override(
        models=["vgg11"],
        weights="random",
        scales=(224,),
        flip=False,
        head="logreg",
        splits=1,
        seed=4,
        background=False,
    )
    assert p.features.models == ("vgg11",) and p.rows() == [("vgg11",)]
    assert (p.features.weights, p.features.scales, p.features.flip) == ("random", (224,), False)
    assert (p.head.name, p.protocol.splits, p.protocol.seed, p.protocol.background) == ("logreg", 1, 4, False)
    assert p.features.aggregate == "stack" and p.protocol.n_train == 30
    assert builtin_pipeline("caltech101").override() == builtin_pipeline("caltech101")


def test_bad_overrides_are_refused():
    p = builtin_pipeline("voc2007")
    with pytest.raises(ValueError, match="unknown --model 'resnet5'"):
        p.override(models=["resnet5"])
    with pytest.raises(ValueError, match="--splits 0"):
        p.override(splits=0)
    with pytest.raises(ValueError, match="--scales 100 is below 224"):
        p.override(scales=(100,))


def test_user_pipeline_file(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(
        'dataset = "caltech101"\n[protocol]\nn_train = 5\nn_test = 3\nsplits = 1\n'
        '[features]\nmodels = ["vgg11"]\nscales = [224]\n[head]\nC = [1]\n'
    )
    p = load_pipeline(f)
    assert (p.name, p.protocol.n_train, p.head.C, p.paper) == ("caltech101", 5, (1.0,), ())
    assert pipeline_for(None, f) == p


def test_typos_in_a_pipeline_file_are_named(tmp_path):
    f = tmp_path / "typo.toml"
    f.write_text('dataset = "caltech101"\n[protocol]\nn_trian = 5\n')
    with pytest.raises(ValueError, match=r"unknown key 'n_trian' in \[protocol\].*allowed: splits"):
        load_pipeline(f)
    f.write_text('dataset = "voc2007"\n[protocol]\nmetric = "mean_class_recall"\n')
    with pytest.raises(ValueError, match="does not fit voc2007"):
        load_pipeline(f)
    f.write_text("dataset = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_pipeline(f)
    with pytest.raises(FileNotFoundError, match="no such file.*caltech101, caltech256"):
        load_pipeline(tmp_path / "absent.toml")


def test_dataset_and_pipeline_must_agree(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('dataset = "caltech101"\n[protocol]\nn_train = 5\n')
    with pytest.raises(ValueError, match="contradicts"):
        pipeline_for("voc2007", f)
    with pytest.raises(ValueError, match="give --dataset"):
        pipeline_for(None, None)
