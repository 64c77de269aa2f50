"""VOC2012 action (Table 12): parsing, box convention, stable-sort AP, result files, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.cli import app
from featx.evaluate.action import load_action_set, read_objects, voc_box
from featx.evaluate.datasets import ACTIONS
from featx.evaluate.metrics import voc_ap
from featx.evaluate.pipeline import builtin_pipeline
from featx.extract.decode import open_upright
from tests.fake_datasets import ACTION_COLOURS, ACTION_PERSON_BOXES, make_voc_action

# A fast stand-in for the paper's pipeline: the same protocol, a small random net.
PIPELINE = """
name = "voc2012-action-test"
dataset = "voc2012-action"
[protocol]
metric = "voc_ap"
[features]
models = ["vgg11"]
weights = "random"
layer = "pool5"
scales = [64]
flip = false
aggregate = "mean"
[head]
C = [0.1, 1.0, 10.0]
[paper]
results = [
    { label = "Net-D & Net-E", models = ["vgg11"], setting = "image", mean = 79.2 },
    { label = "Net-D & Net-E", models = ["vgg11"], setting = "image_box", mean = 84.0 },
]
"""


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return root, make_voc_action(root)


def test_parsing_each_action_from_its_own_file(voc):
    _, year = voc
    train = load_action_set(year, "train")
    # 8 images x 3 persons; objects 2-4 (object 1 is a bicycle, counted in the 1-based index).
    assert len(train) == 24 and set(train.objects) == {2, 3, 4}
    assert train.ids[:3] == ("2011_000001",) * 3
    # The last image's persons are not in the (shorter) jumping file: 0, never a negative.
    jumping = train.labels[:, ACTIONS.index("jumping")]
    assert (jumping[-3:] == 0).all() and set(jumping[:-3]) <= {1, -1}
    # Person j of image i does action (3i + j) % 10: exactly one positive per listed row.
    for n, (obj, row) in enumerate(zip(train.objects, train.labels)):
        action = (3 * (n // 3) + obj - 2) % 10
        assert row[action] == 1 and (np.delete(row, action) <= 0).all()
    val = load_action_set(year, "val")
    assert val.labels[0, ACTIONS.index("walking")] == 0


def test_boxes_become_the_region_convention_and_crop_exactly_those_pixels(voc):
    _, year = voc
    boxes, size = read_objects(year / "Annotations" / "2011_000001.xml")
    assert size == (160, 120)
    assert boxes[1:] == list(ACTION_PERSON_BOXES)  # 1-based inclusive in the XML
    assert voc_box(1, 1, 10, 20, 160, 120) == (0, 0, 10, 20)  # pixels 1..10 are 0..9
    assert voc_box(1, 1, 500, 20, 160, 120) == (0, 0, 160, 20)  # clipped to the image
    # Person 2 of the first image is painted in action 1's colour over grey noise: the converted
    # box holds that colour up to its edge rows and columns, and the pixels just outside do not.
    img = np.asarray(open_upright(year / "JPEGImages" / "2011_000001.jpg", 10**8)).astype(int)
    x1, y1, x2, y2 = boxes[2]
    colour = np.array(ACTION_COLOURS[1])
    crop = img[y1:y2, x1:x2]
    for edge in (crop[0], crop[-1], crop[:, 0], crop[:, -1]):
        assert np.abs(edge.mean(axis=0) - colour).max() < 25
    for outside in (img[y1 - 1, x1:x2], img[y2, x1:x2], img[y1:y2, x1 - 1], img[y1:y2, x2]):
        assert np.abs(outside.mean(axis=0) - colour).max() > 40


def test_ap_ranks_ties_in_input_order_and_ignores_label_0():
    # Ties keep the input order (MATLAB's stable sort): a hit first gives 1/2*1 + 1/2*2/3.
    assert voc_ap([1, -1, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # The same scores with the miss first: precision 1/2 at recall 1/2, interpolated up to 2/3.
    assert voc_ap([-1, 1, 1], [0.5, 0.5, 0.2]) == pytest.approx(2 / 3)
    # A 0 (ignored) person changes nothing, wherever it ranks.
    assert voc_ap([1, 0, -1, 1], [0.9, 0.8, 0.7, 0.6]) == pytest.approx(voc_ap([1, -1, 1], [0.9, 0.7, 0.6]))
    assert voc_ap([1, -1, 1], [0.9, 0.7, 0.6]) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_builtin_pipeline_states_the_papers_choices():
    p = builtin_pipeline("voc2012-action")
    assert p.features.models == ("vgg16", "vgg19") and p.features.scales == (256, 384, 512, 640, 768)
    assert (p.protocol.box_margin, p.protocol.stack_norm, p.protocol.metric) == (0.0, "final", "voc_ap")
    assert [(r.setting, r.mean) for r in p.paper] == [("image", 79.2), ("image_box", 84.0)]


@pytest.mark.slow
def test_end_to_end_image_and_box_beats_image(voc, tmp_path):
    root, year = voc
    pipeline = tmp_path / "action.toml"
    pipeline.write_text(PIPELINE)
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--pipeline",
            str(pipeline),
            "--root",
            str(root),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--results",
            str(tmp_path / "results"),
            "--report",
            str(out / "action.json"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "PASCAL VOC 2012 action" in r.stdout and "79.2" in r.stdout and "84.0" in r.stdout
    report = json.loads((out / "action.json").read_text())
    by = {x["setting"]: x for x in report["results"]}
    image, box = by["image"]["mean"], by["image_box"]["mean"]
    # Image-only scores tie for the three persons of an image, whose actions differ.
    assert box > image + 10 and box > 90, (image, box)
    assert set(by["image"]["splits"][0]["per_class"]) == set(ACTIONS)
    assert report["settings"]["image_box"]["mAP"] == box and set(report["settings"]["image"]["per_action"]) == set(
        ACTIONS
    )
    assert report["config"]["n_persons"] == {"train": 24, "val": 24}
    notes = " ".join(report["config"]["notes"])
    assert "test-server" in notes and "24 of 3134 train persons" in notes and "not comparable" in notes

    # The devkit's result files: one per action and setting, every val person, "<id> <obj> <score>".
    val = load_action_set(year, "val")
    for setting in ("image", "image_box"):
        files = sorted((tmp_path / "results" / setting).iterdir())
        assert [f.name for f in files] == sorted(f"comp10_action_val_{a}.txt" for a in ACTIONS)
        lines = [line.split() for line in files[0].read_text().splitlines()]
        assert [(i, int(o)) for i, o, _ in lines] == list(zip(val.ids, val.objects))
        assert all(float(s) == float(s) for _, _, s in lines)
    image_scores = [
        float(line.split()[2]) for line in (tmp_path / "results" / "image" / files[0].name).read_text().splitlines()
    ]
    assert image_scores[0] == image_scores[1] == image_scores[2]  # one image, one score
    print(
        f"\nmAP image {image:.1f}, image and box {box:.1f}; "
        f"{report['config']['extract_seconds_per_person']:.3f} s per person to extract"
    )


def test_test_server_persons_come_from_test_txt_and_the_xml(voc, tmp_path):
    import shutil

    from featx.evaluate.action import load_test_persons

    _, year = voc
    copy = tmp_path / "VOC2012"
    shutil.copytree(year, copy)
    # As in the test archive: persons listed by image id and object index, boxes in the XML.
    (copy / "ImageSets" / "Action" / "test.txt").write_text("2011_000009 3\n2011_000009 2\n2011_000010\n")
    test = load_test_persons(copy)
    assert list(zip(test.ids, test.objects)) == [
        ("2011_000009", 2),
        ("2011_000009", 3),
        ("2011_000010", 2),
        ("2011_000010", 3),
        ("2011_000010", 4),
    ]
    assert tuple(test.boxes[0]) == ACTION_PERSON_BOXES[0] and not test.labels.any()


@pytest.mark.slow
def test_test_server_trains_on_trainval_and_writes_the_test_files(voc, tmp_path):
    import shutil

    root, _year = voc
    copy = tmp_path / "data"
    shutil.copytree(root / "VOCdevkit", copy / "VOCdevkit")
    # The test archive adds its persons (by image id and object index) and their XML/JPEGs.
    test_year = make_voc_action(tmp_path / "test", {"test": 2})
    for sub in ("Annotations", "JPEGImages"):
        for f in (test_year / sub).iterdir():
            shutil.copy(f, copy / "VOCdevkit" / "VOC2012" / sub / f.name.replace("2011_", "2012_"))
    ids = sorted(f.stem.replace("2011_", "2012_") for f in (test_year / "JPEGImages").iterdir())
    (copy / "VOCdevkit" / "VOC2012" / "ImageSets" / "Action" / "test.txt").write_text(
        "".join(f"{i} {k}\n" for i in ids for k in (2, 3, 4))
    )
    pipeline = tmp_path / "action.toml"
    pipeline.write_text(PIPELINE)
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--pipeline",
            str(pipeline),
            "--root",
            str(copy),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--test-server",
            "--results",
            str(tmp_path / "results"),
            "--report",
            str(tmp_path / "r.json"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["test_server"] and report["config"]["n_persons"] == {"trainval": 48, "test": 6}
    assert all(x["mean"] is None for x in report["results"])
    for setting in ("image", "image_box"):
        lines = (tmp_path / "results" / setting / "comp10_action_test_walking.txt").read_text().splitlines()
        assert [tuple(line.split()[:2]) for line in lines] == [(i, str(k)) for i in ids for k in (2, 3, 4)]


def test_the_shipped_experiment_runs_from_the_cli_and_says_what_is_missing(tmp_path):
    r = CliRunner().invoke(app, ["evaluate", "--dataset", "voc2012-action", "--root", str(tmp_path)])
    assert r.exit_code == 2 and "PASCAL VOC 2012 action not found" in r.output and "--download" in r.output
    r = CliRunner().invoke(app, ["evaluate", "--dataset", "voc2012-action", "--root", str(tmp_path), "--test-server"])
    assert r.exit_code == 2 and "--results" in r.output
    r = CliRunner().invoke(
        app, ["evaluate", "--dataset", "voc2007", "--root", str(tmp_path), "--results", str(tmp_path)]
    )
    assert r.exit_code == 2 and "voc2012-action only" in r.output


@pytest.mark.slow
def test_image_and_box_features_are_cache_entries_described_and_reused(voc, tmp_path):
    root, _ = voc
    pipeline = tmp_path / "action.toml"
    pipeline.write_text(PIPELINE.replace("[protocol]\n", "[protocol]\nsplits = 1\n"))
    cache = tmp_path / "cache"

    def evaluate(report):
        args = ["evaluate", "--pipeline", pipeline, "--root", root, "--cache-dir", cache, "--report", report, "--quiet"]
        r = CliRunner().invoke(app, list(map(str, args)))
        assert r.exit_code == 0, r.output
        return json.loads(report.read_text())

    first = evaluate(tmp_path / "first.json")
    (made,) = first["config"]["features"]
    assert made["new_rows"] == 16 + 48  # 16 images, and the 48 persons' boxes in them
    # A second run finds both entries and describes nothing again.
    again = evaluate(tmp_path / "again.json")
    (reused,) = again["config"]["features"]
    assert reused["new_rows"] == 0 and reused["files"] == made["files"]
    assert again["results"] == first["results"]

    listed = CliRunner().invoke(app, ["cache", "ls", "--cache-dir", str(cache)])
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    described = {lines[i]: lines[i + 1] for i in range(0, len(lines), 2)}
    image, box = (Path(f).stem for f in made["files"])
    assert set(described) == {image, box}
    for stem in (image, box):
        assert described[stem].startswith("  voc2012-action, vgg11 pool5 Q=64 no flip ")
        assert "weights random (seed 0)" in described[stem]
    assert "; 16 images," in described[image] and "; 48 regions of 16 images," in described[box]
    info = json.loads((cache / f"{box}.json").read_text())
    assert (info["name"], info["images"], info["rows"], info["regions"]["rows"]) == ("voc2012-action", 16, 48, 48)
    assert json.loads((cache / f"{image}.json").read_text())["regions"] is None
