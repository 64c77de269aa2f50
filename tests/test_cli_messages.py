"""Nothing a user does ends in a traceback, and a bug never looks like a user's mistake (issue 22).

Each command runs in a fresh interpreter (optionally after a few lines of `pre` code that stage a
fault), which then reports its exit code and whether torch and FAISS were imported: a refusal
that only needed the arguments must come before that work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import featx
from featx.cli import app
from featx.cli.common import BUG_LINE
from featx.errors import FeatxError
from tests.conftest import write_images
from tests.downstream.test_probe import clusters, feature_file

runner = CliRunner()
TINY = dict(model="vgg11", weights="random", layer="pool5", scales=(32,), flip=False, workers=0)

PROBE = """
import json, sys, traceback
{pre}
from featx.cli import app
code = 0
try:
    app(sys.argv[1:], prog_name="featx")
except SystemExit as e:
    code = e.code
except BaseException:  # what the interpreter would do with it: its traceback, exit 1
    traceback.print_exc()
    code = 1
print(json.dumps([code, 'torch' in sys.modules, 'faiss' in sys.modules]), file=sys.stderr)
"""


class Run:
    """What `featx ARGS` did in a fresh process: exit code, output, what it imported."""

    def __init__(self, args, pre: str = "", cwd=None, env=None):
        proc = subprocess.run(
            [sys.executable, "-c", PROBE.replace("{pre}", pre), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        *lines, last = proc.stderr.strip().splitlines()
        self.code, self.torch, self.faiss = json.loads(last)
        self.stderr, self.stdout = "\n".join(lines), proc.stdout
        self.errors = [line for line in lines if line.startswith("featx: error:")]

    def one_line(self, *needles: str) -> str:
        """The error line, after checking there is exactly one, no traceback, exit 2."""
        assert self.code == 2 and len(self.errors) == 1 and "Traceback" not in self.stderr, self.stderr
        for needle in needles:
            assert needle in self.errors[0], self.errors[0]
        return self.errors[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class folders of three small images, and their features (no real net: seconds)."""
    tmp = tmp_path_factory.mktemp("msgs")
    images = tmp / "images"
    write_images(images, [(40, 36)] * 3, seed=1, label="ant")
    write_images(images, [(36, 40)] * 3, seed=2, label="bee")
    featx.extract_features([images], tmp / "f.parquet", **TINY)
    (tmp / "a-file").write_text("")
    return tmp


@pytest.fixture(scope="module")
def index(folder):
    """An index folder over the features, and its parts."""
    pytest.importorskip("faiss")
    out = folder / "ix"
    assert runner.invoke(app, ["index", str(folder / "f.parquet"), "-o", str(out)]).exit_code == 0
    return out


def copy_index(index, to):
    import shutil

    shutil.copytree(index, to)
    return to


# -- item 13: featx's errors are one line; anything else is a bug with its traceback ------------


def test_a_bug_shows_its_traceback_and_asks_for_a_report(folder):
    # A numpy broadcasting error deep in the library: a bug, not the user's mistake.
    pre = (
        "import featx.store\n"
        "def broken(path): raise ValueError('operands could not be broadcast together with shapes (3,) (4,)')\n"
        "featx.store.feature_info = broken"
    )
    run = Run(["info", folder / "f.parquet"], pre=pre)
    assert run.code == 1, run.stderr
    assert "Traceback" in run.stderr and "operands could not be broadcast" in run.stderr
    assert run.stderr.strip().splitlines()[-1] == BUG_LINE
    assert "report it with the traceback above" in BUG_LINE


def test_a_featx_error_is_one_line_and_verbose_shows_its_traceback(folder):
    Run(["info", folder / "nowhere.parquet"]).one_line("no such feature file")
    verbose = Run(["-v", "info", folder / "nowhere.parquet"])
    assert verbose.code == 2 and "Traceback" in verbose.stderr and "MissingData" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("featx: error:")


def test_an_os_error_of_the_users_file_is_one_line_naming_it(folder, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n")
    pre = (
        "import errno, pandas\n"
        "def denied(path, *a, **k): raise PermissionError(errno.EACCES, 'Permission denied', str(path))\n"
        "pandas.read_csv = denied"
    )
    run = Run(["probe", folder / "f.parquet", "--labels", labels], pre=pre)
    run.one_line(f"{labels}: Permission denied", "check its permissions")


def test_a_library_oserror_without_an_errno_is_a_bug(folder):
    pre = "import featx.store\ndef broken(path): raise OSError('thrift: bad state')\nfeatx.store.feature_info = broken"
    run = Run(["info", folder / "f.parquet"], pre=pre)
    assert run.code == 1 and "Traceback" in run.stderr and run.stderr.strip().endswith(BUG_LINE)


def test_download_and_checksum_errors_are_featx_errors():
    from featx.evaluate.download import ChecksumError, DownloadError

    assert issubclass(DownloadError, FeatxError) and issubclass(DownloadError, FileNotFoundError)
    assert issubclass(ChecksumError, FeatxError) and issubclass(ChecksumError, ValueError)


def test_internal_invariants_are_not_user_errors():
    """Checks no user input reaches (featx's own arrays, an unresolved precision) raise a plain
    ValueError: if one fires it is a bug, and the CLI says so."""
    from featx.evaluate.heads import OneVsRest
    from featx.evaluate.metrics import mean_ap, mean_class_recall, voc_ap
    from featx.net.device import torch_dtype

    for call in (
        lambda: mean_class_recall([0, 1], [0]),
        lambda: mean_ap(np.ones(3), np.ones(3)),
        lambda: voc_ap([1, 2], [0.5, 0.5]),
        lambda: OneVsRest().fit(np.ones((4, 2), np.float32), np.ones(4)),
        lambda: torch_dtype("auto"),
    ):
        with pytest.raises(ValueError) as raised:
            call()
        assert not isinstance(raised.value, FeatxError), raised.value


@pytest.mark.parametrize(
    "case",
    ["regions: binary CSV", "pipeline: binary TOML", "labels: binary CSV", "probe: NaN features", "index: no feature"],
)
def test_a_library_error_about_the_users_file_is_one_line_naming_it(folder, tmp_path, case):
    """pyarrow, the csv module, tomllib and sklearn raise builtins for a bad file: featx says which file."""
    binary = tmp_path / "bin.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    table = pq.read_table(folder / "f.parquet")
    if case == "regions: binary CSV":
        args = ["extract", folder / "images", "-o", tmp_path / "o.parquet", "--regions", binary, "--weights", "random"]
        Run(args).one_line(f"--regions {binary} is not a readable UTF-8 CSV table")
    elif case == "pipeline: binary TOML":
        Run(["evaluate", "--pipeline", binary]).one_line(f"--pipeline {binary} is not valid TOML")
    elif case == "labels: binary CSV":
        Run(["probe", folder / "f.parquet", "--labels", binary]).one_line(f"--labels {binary} is not a readable CSV")
    elif case == "probe: NaN features":
        X = np.stack(table.column("feature").to_numpy(zero_copy_only=False))
        X[2, 0] = np.nan
        nan = tmp_path / "nan.parquet"
        feature = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel(), pa.float32()), X.shape[1])
        pq.write_table(
            table.set_column(table.schema.get_field_index("feature"), table.schema.field("feature"), feature), nan
        )
        path = table.column("path")[2].as_py()
        Run(["probe", nan, "--splits", "1"]).one_line(
            f"the features of {path} (row 3) hold NaN or infinity", "extract the features again"
        )
    else:
        cut = tmp_path / "cut.parquet"
        pq.write_table(table.drop_columns(["feature"]), cut)
        Run(["index", cut, "-o", tmp_path / "ix"]).one_line(f"{cut}: cannot read path, label, feature")


# -- item 10: the probe checks the folder's layout before extracting -------------------------


def test_probe_refuses_a_folder_without_class_folders_before_any_extraction(folder, tmp_path):
    flat = write_images(tmp_path, [(40, 36)] * 3, label="flat")[0].parent  # images, no class folders
    run = Run(["probe", flat, "--cache-dir", tmp_path / "cache"])
    run.one_line("has no class subfolders and 3 images directly in it", "--labels FILE")
    assert not run.torch and not (tmp_path / "cache").exists(), "images were described before the refusal"
    one = Run(["probe", tmp_path, "--cache-dir", tmp_path / "cache"])
    one.one_line("only one class folder (flat)")
    assert not one.torch


# -- item 11: tracebacks that became one line -------------------------------------------------


def test_neighbours_writes_into_a_new_folder_and_refuses_a_bad_one_before_describing(folder, index):
    query = folder / "images" / "ant" / "img_000.jpg"
    out = folder / "new" / "dir" / "p.csv"
    run = Run(["neighbours", index, folder / "f.parquet", "-k", "2", "-o", out])
    assert run.code == 0, run.stderr
    assert out.read_text().splitlines()[0] == "query,rank,path,label,score"
    sheet = Run(["neighbours", index, folder / "f.parquet", "-k", "2", "--sheet", folder / "new" / "s" / "s.png"])
    assert sheet.code == 0 and (folder / "new" / "s" / "s.png").is_file(), sheet.stderr
    bad = Run(["neighbours", index, query, "-o", folder / "a-file" / "p.csv"])
    bad.one_line("a-file is a file, not a folder")
    assert not bad.torch, "the query image was described before the output was refused"
    Run(["neighbours", index, query, "--sheet", folder / "s.jpg"]).one_line("must end in .png")


def test_a_damaged_index_is_one_line_with_the_fix(index, tmp_path):
    bad = copy_index(index, tmp_path / "bad")
    (bad / "faiss.index").write_bytes((index / "faiss.index").read_bytes()[:100])
    Run(["neighbours", bad, "--duplicates", "0.9"]).one_line("faiss.index is damaged", "featx index FEATURES -o")
    meta = copy_index(index, tmp_path / "meta")
    (meta / "index.json").write_text("[]")
    Run(["neighbours", meta, "--duplicates", "0.9"]).one_line("index.json is damaged")


def test_index_rows_that_do_not_match_the_index_are_refused(index, tmp_path):
    rows = pq.read_table(index / "rows.parquet")
    short = copy_index(index, tmp_path / "short")
    pq.write_table(rows.slice(0, rows.num_rows - 1), short / "rows.parquet")
    Run(["neighbours", short, "--duplicates", "0.9"]).one_line("rows.parquet is damaged", "5 rows for the index's 6")
    # Reordered rows would silently name every neighbour wrongly: the fingerprint refuses them.
    swapped = copy_index(index, tmp_path / "swapped")
    pq.write_table(rows.take([1, 0, *range(2, rows.num_rows)]), swapped / "rows.parquet")
    Run(["neighbours", swapped, "--duplicates", "0.9"]).one_line("not the ones the index was built over")
    assert "rows_sha256" in json.loads((index / "index.json").read_text())


def test_info_with_a_damaged_errors_file_or_metadata_that_is_not_an_object(folder, tmp_path):
    out = tmp_path / "g.parquet"
    out.write_bytes((folder / "f.parquet").read_bytes())
    (tmp_path / "g.errors.parquet").write_text("not parquet")
    run = Run(["info", out])
    assert run.code == 0, run.stderr
    assert "g.errors.parquet is damaged: delete it" in run.stdout
    table = pq.read_table(folder / "f.parquet")
    for meta in (b"[1, 2]", b"{not json"):
        odd = tmp_path / "odd.parquet"
        pq.write_table(table.replace_schema_metadata({b"featx": meta}), odd)
        Run(["info", odd]).one_line("featx metadata is not a JSON object")


def test_a_state_file_holding_a_list_is_one_line(folder, tmp_path):
    out = tmp_path / "o.parquet"
    (tmp_path / "o.parquet.partial").mkdir()
    (tmp_path / "o.parquet.partial" / "settings.json").write_text("[1, 2]")
    args = ["extract", folder / "images", "-o", out, "--model", "vgg11", "--weights", "random", "--layer", "pool5"]
    Run([*args, "--scales", "32", "--no-flip", "--quiet"]).one_line("settings.json holds a list", "--overwrite")


def test_a_full_disk_before_the_run_starts_is_one_line(folder, tmp_path):
    # The lock holder's file is the first thing a run writes; ENOSPC as the OS raises it there.
    pre = (
        "import errno, featx.store.lock as lock\n"
        "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "lock.atomic.write_json = full"
    )
    out = tmp_path / "o.parquet"
    args = ["extract", folder / "images", "-o", out, "--model", "vgg11", "--weights", "random", "--layer", "pool5"]
    run = Run([*args, "--scales", "32", "--no-flip"], pre=pre)
    run.one_line(".o.parquet.lock.json", "No space left on device", "free some space")


# -- item 12: unclear messages ---------------------------------------------------------------


def test_a_truncated_piece_names_the_file_and_the_fix(folder, tmp_path, monkeypatch):
    from featx.store.output import Output

    out = tmp_path / "o.parquet"
    added = Output.add

    def interrupted_after_one(self, *args, **kwargs):  # Ctrl-C once the first piece is persisted
        added(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Output, "add", interrupted_after_one)
    assert featx.extract_features([folder / "images"], out, **TINY, rows_per_group=2).interrupted
    piece = next((tmp_path / "o.parquet.partial").glob("rows-*.parquet"))
    piece.write_bytes(piece.read_bytes()[:50])
    args = ["extract", folder / "images", "-o", out, "--model", "vgg11", "--weights", "random", "--layer", "pool5"]
    run = Run([*args, "--scales", "32", "--no-flip", "--rows-per-group", "2", "--quiet"])
    run.one_line(f"{piece} is damaged", "delete that file")


def test_a_damaged_cache_entry_says_remove_the_entry(folder, tmp_path):
    cache = tmp_path / "cache"
    args = ["probe", folder / "images", "--cache-dir", cache, "--model", "vgg11", "--weights", "random"]
    args += ["--layer", "pool5", "--scales", "32", "--no-flip", "--splits", "1", "--quiet"]
    assert Run(args).code == 0
    (entry,) = cache.glob("probe-*.parquet")
    entry.write_bytes(b"garbage")
    line = Run(args).one_line(f"featx cache rm {entry.stem}")
    assert "--overwrite" not in line
    with pytest.raises(FeatxError, match=rf"featx.evaluate.cache.remove\(\['{entry.stem}'\]\)"):
        featx.probe(folder / "images", cache_dir=cache, splits=1, **{**TINY, "workers": 2})


def test_python_callers_are_told_the_python_setting(folder, tmp_path):
    out = tmp_path / "o.parquet"
    featx.extract_features([folder / "images"], out, **TINY)
    with pytest.raises(FeatxError) as raised:
        featx.extract_features([folder / "images"], out, **{**TINY, "flip": True})
    assert "overwrite=True" in str(raised.value) and "--overwrite" not in str(raised.value)
    args = ["extract", folder / "images", "-o", out, "--model", "vgg11", "--weights", "random", "--layer", "pool5"]
    line = Run([*args, "--scales", "32", "--flip", "--quiet"]).one_line("pass --overwrite")
    assert "overwrite=True" not in line


def test_a_state_dict_that_does_not_fit_says_why_in_full(folder, tmp_path):
    import torch

    other = tmp_path / "other-net.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3), "fc.weight": torch.zeros(2, 2)}, other)
    shallower = tmp_path / "vgg11-like.pth"  # 8 conv layers: the shape of vgg11, the size of a toy
    torch.save({f"features.{i}.weight": torch.zeros(2, 2, 3, 3) for i in range(8)}, shallower)
    base = ["extract", folder / "images", "-o", tmp_path / "o.parquet", "--layer", "pool5", "--scales", "32", "--quiet"]
    line = Run([*base, "--model", "vgg16", "--weights", other]).one_line("not the state dict of a torchvision VGG")
    assert line.endswith("torch.save(model.state_dict(), FILE)")
    Run([*base, "--model", "vgg16", "--weights", shallower]).one_line("8 conv layers", "pass --model vgg11")


# -- item 14: one rule for outputs, checked before any work ----------------------------------


def test_extract_refuses_an_output_that_is_not_parquet_before_torch(folder):
    run = Run(["extract", folder / "images", "-o", folder / "x.csv"])
    run.one_line("-o", "must end in .parquet (or have no suffix)")
    assert not run.torch


def test_index_refuses_a_bad_output_before_building(folder, index):
    run = Run(["index", folder / "f.parquet", "-o", folder / "a-file" / "ix"])
    run.one_line("a-file")
    assert not run.faiss, "the index was built before its output was refused"
    Run(["index", folder / "f.parquet", "-o", index]).one_line("already holds an index", "--overwrite")


def test_every_output_makes_its_missing_folders(folder, index, tmp_path):
    new = tmp_path / "new"
    run = Run(["index", folder / "f.parquet", "-o", new / "a" / "ix"])
    assert run.code == 0 and (new / "a" / "ix" / "index.json").is_file(), run.stderr
    run = Run(["neighbours", index, "--duplicates", "0.5", "-o", new / "b" / "pairs.parquet"])
    assert run.code == 0 and (new / "b" / "pairs.parquet").is_file(), run.stderr
    y, X = clusters(2, 4)
    file = feature_file(tmp_path / "c.parquet", y, X)
    report, predictions = new / "c" / "r.json", new / "d" / "p.parquet"
    run = Run(["probe", file, "--report", report, "--predictions", predictions, "--splits", "1", "--quiet"])
    assert run.code == 0 and report.is_file() and predictions.is_file(), run.stderr


# -- item 15: process-wide state is restored ------------------------------------------------


def test_the_warning_printer_is_restored_after_a_command(folder):
    before = warnings.showwarning
    result = runner.invoke(app, ["extract", str(folder / "nowhere"), "-o", str(folder / "x.parquet"), "--seed", "3"])
    assert warnings.showwarning is before  # the command's one-line printer did not outlive it
    assert result.exit_code == 2 and "--seed is deprecated" in result.output


def test_the_remembered_weights_hashes_are_bounded(tmp_path):
    """A notebook or server that sees many weights files keeps only the last few hashes."""
    from featx.extract import provenance
    from featx.extract.config import ExtractConfig

    provenance.forget_file_hashes()
    for i in range(40):
        file = tmp_path / f"w{i}.pth"
        file.write_bytes(bytes([i]))
        assert provenance.weights_identity(ExtractConfig(weights=str(file)))["file"] == file.name
    assert len(provenance._FILE_IDS) <= 16
    provenance.forget_file_hashes()


# -- item 16: one default, one name, one place for each option -------------------------------


def _defaults(name: str) -> dict:
    import typer.main

    group = typer.main.get_command(app)
    return {p.name: p.default for p in group.commands[name].params}


def test_batch_size_has_one_default_everywhere():
    from featx.downstream.search import Index, describe_images
    from featx.extract.config import ExtractConfig
    from featx.extract.provenance import config_from_provenance
    from featx.sklearn import VGGFeatures

    default = ExtractConfig.batch_size
    for command in ("extract", "probe", "evaluate", "neighbours"):
        assert _defaults(command)["batch_size"] == default, command
    assert VGGFeatures().batch_size == default
    for fn in (Index.neighbours, Index.query_features, describe_images, config_from_provenance):
        assert fn.__kwdefaults__["batch_size"] == default, fn


def test_probe_on_a_feature_file_notes_no_unused_setting(tmp_path):
    y, X = clusters(2, 4)
    run = Run(["probe", feature_file(tmp_path / "f.parquet", y, X), "--splits", "1"])
    assert run.code == 0, run.stderr
    assert "not used" not in run.stdout


def test_weights_seed_is_one_name_and_extract_keeps_seed_as_an_alias(folder, tmp_path):
    for command in ("extract", "probe", "evaluate"):
        assert "weights_seed" in _defaults(command), command
    assert "seed" in _defaults("evaluate") and "seed" in _defaults("probe")  # the splits' seed
    args = ["extract", str(folder / "images"), "--model", "vgg11", "--weights", "random", "--layer", "pool5"]
    args += ["--scales", "32", "--no-flip", "--quiet"]
    new = runner.invoke(app, [*args, "-o", str(tmp_path / "a.parquet"), "--weights-seed", "5"])
    old = runner.invoke(app, [*args, "-o", str(tmp_path / "b.parquet"), "--seed", "5"])
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert "--seed is deprecated" in old.output and "deprecated" not in new.output
    for out in ("a", "b"):
        assert featx.read_provenance(tmp_path / f"{out}.parquet")["weights"] == {"kind": "random", "seed": 5}


def test_evaluate_seeds_random_weights_with_weights_seed(monkeypatch):
    import featx.evaluate.run as run_module

    seen = {}

    def fake(pipeline, config, **kwargs):
        seen["config"] = config
        raise featx.BadInput("stop here")

    monkeypatch.setattr(run_module, "evaluate", fake)
    result = runner.invoke(app, ["evaluate", "--dataset", "caltech101", "--weights", "random", "--weights-seed", "7"])
    assert result.exit_code == 2 and seen["config"].seed == 7


def test_quiet_works_after_the_command_and_version(folder):
    for args in (["info", folder / "f.parquet", "-q"], ["model", "vgg11", "-q"], ["cache", "ls", "-q"]):
        run = Run(args, env={"XDG_CACHE_HOME": str(folder / "xdg")})
        assert run.code == 0, run.stderr
    version = Run(["--version"])
    assert version.code == 0 and version.stdout.strip() == f"featx {featx.__version__}"


def test_quiet_after_the_command_silences_progress_as_before_it(folder, tmp_path):
    args = ["extract", folder / "images", "--model", "vgg11", "--weights", "random", "--layer", "pool5"]
    args += ["--scales", "32", "--no-flip"]
    after = Run([*args, "-o", tmp_path / "a.parquet", "-q"])
    before = Run(["-q", *args, "-o", tmp_path / "b.parquet"])
    for run in (after, before):
        assert run.code == 0 and "6 images (6 new)" in run.stdout, run.stderr
        assert "extract" not in run.stderr and "6/6" not in run.stderr, run.stderr
