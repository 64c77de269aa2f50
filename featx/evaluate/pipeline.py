"""An experiment as data: dataset, protocol, features, head and the paper's numbers (TOML).

Simonyan & Zisserman, arXiv 1409.1556, Appendix B and Table 11. The paper's four experiments
ship as pipelines/<dataset>.toml (package `featx.pipelines`); `featx evaluate --pipeline FILE`
runs a user's own file, and command-line overrides replace single fields.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from featx.errors import BadInput, MissingData
from featx.evaluate.datasets import DATASETS
from featx.evaluate.protocol import PIPELINE_FIELDS, Head, Protocol
from featx.extract.config import ExtractConfig
from featx.net.backbones import get_backbone


@dataclass(frozen=True)
class Features:
    """The descriptor of every net: the same settings, one model each (Appendix B)."""

    models: tuple[str, ...] = ("vgg16",)
    weights: str = "default"
    layer: str = "default"  # each net's default tap: fc7 for VGG (the paper's), pre_logits for the others
    scales: tuple[int, ...] = (256, 384, 512)
    flip: bool = True
    aggregate: str = "stack"

    def tap(self, model: str) -> str:
        """The layer `model` is described at: its default tap when the pipeline says 'default'."""
        return get_backbone(model).layer(self.layer)

    def config(self, model: str, base: ExtractConfig | None = None) -> ExtractConfig:
        """The extraction settings for one net: these descriptor settings over `base`'s others
        (device, precision, batch size, workers, the seed of random weights)."""
        return (base or ExtractConfig()).replace(
            model=model,
            weights=self.weights,
            layer=self.layer,
            scales=self.scales,
            flip=self.flip,
            aggregate=self.aggregate,
        )


@dataclass(frozen=True)
class PaperResult:
    """One row of the paper's Table 11: nets, value (percent) and spread over splits."""

    label: str
    models: tuple[str, ...]
    mean: float
    std: float | None = None
    # VOC action: "image" or "image_box" (Table 12's two settings).
    setting: str | None = None


@dataclass(frozen=True)
class Pipeline:
    """One experiment: everything `featx evaluate` needs besides the data's location."""

    name: str
    dataset: str
    protocol: Protocol = field(default_factory=Protocol)
    features: Features = field(default_factory=Features)
    head: Head = field(default_factory=Head)
    paper: tuple[PaperResult, ...] = ()
    paper_source: str = ""
    paper_note: str = ""
    description: str = ""
    # Where it was read from (a file path or featx.pipelines/<name>.toml).
    source: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """What depends on the dataset; the protocol, head and descriptor settings check themselves."""
        where = f" in {self.source}" if self.source else ""
        if self.dataset not in DATASETS:
            raise BadInput(f"unknown dataset {self.dataset!r}{where}; choose one of {', '.join(DATASETS)}")
        kind = DATASETS[self.dataset].kind
        p, f = self.protocol, self.features
        if kind == "voc_action" and p.metric != "voc_ap":
            raise BadInput(f"metric {p.metric!r} does not fit {self.dataset}{where}: VOC2012 action uses voc_ap")
        if (kind == "caltech") != (p.metric == "mean_class_recall"):
            raise BadInput(
                f"metric {p.metric!r} does not fit {self.dataset}{where}: Caltech uses "
                "mean_class_recall, VOC voc07_ap (2007) or voc_ap (2012)"
            )
        if kind == "caltech" and not p.n_train:
            raise BadInput(f"[protocol] n_train is missing{where}; Caltech needs it (e.g. 30)")
        if self.head.solver == "streamed":
            raise BadInput(
                f"[head] solver 'streamed'{where} reads features from a file for every pass (featx probe); "
                "featx evaluate holds them in memory: use auto, exact or scalable"
            )
        if not f.models:
            raise BadInput(f"no model given{where}; name at least one, e.g. --model vgg16")
        for m in f.models:
            try:
                get_backbone(m)
            except BadInput as e:
                raise BadInput(f"{e}{where}") from None
        if len(set(f.models)) != len(f.models):
            raise BadInput(f"--model {list(f.models)} repeats a net; give each once")
        f.config(f.models[0])  # the extraction settings check themselves (scales, layer, ...)

    @property
    def kind(self) -> str:
        return DATASETS[self.dataset].kind

    def override(
        self,
        *,
        models: tuple[str, ...] | list[str] | None = None,
        weights: str | None = None,
        scales: tuple[int, ...] | None = None,
        aggregate: str | None = None,
        flip: bool | None = None,
        head: str | None = None,
        solver: str | None = None,
        splits: int | None = None,
        seed: int | None = None,
        background: bool | None = None,
    ) -> Pipeline:
        """A copy with the given fields replaced; None keeps the pipeline's value."""
        f = {
            "models": tuple(models) if models else None,
            "weights": weights,
            "scales": tuple(int(q) for q in scales) if scales else None,
            "aggregate": aggregate,
            "flip": flip,
        }
        p = {"splits": splits, "seed": seed, "background": background}
        features = dataclasses.replace(self.features, **{k: v for k, v in f.items() if v is not None})
        protocol = dataclasses.replace(self.protocol, **{k: v for k, v in p.items() if v is not None})
        h = {"name": head, "solver": solver}
        h = dataclasses.replace(self.head, **{k: v for k, v in h.items() if v is not None})
        return dataclasses.replace(self, features=features, protocol=protocol, head=h)

    def rows(self) -> list[tuple[str, ...]]:
        """The nets evaluated: each alone, then their late fusion when there are several."""
        models = list(self.features.models)
        return [(m,) for m in models] + ([tuple(models)] if len(models) > 1 else [])

    def paper_result(self, models: tuple[str, ...], setting: str | None = None) -> PaperResult | None:
        return next((r for r in self.paper if tuple(r.models) == tuple(models) and r.setting == setting), None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["protocol"] = {k: d["protocol"][k] for k in PIPELINE_FIELDS}
        d["features"]["models"] = list(self.features.models)
        d["features"]["scales"] = list(self.features.scales)
        d["head"]["C"] = list(self.head.C)
        d["paper"] = [dict(r, models=list(r["models"])) for r in d["paper"]]
        return d


_SECTIONS = {"protocol": Protocol, "features": Features, "head": Head}
_TOP = ("name", "dataset", "description", "protocol", "features", "head", "paper")
_PAPER = ("source", "note", "results")


def _fields(cls) -> tuple[str, ...]:
    return PIPELINE_FIELDS if cls is Protocol else tuple(f.name for f in dataclasses.fields(cls))


def parse_pipeline(data: dict, source: str = "") -> Pipeline:
    """A Pipeline from parsed TOML; unknown keys are refused (they are usually typos)."""
    where = f" in {source}" if source else ""
    unknown = sorted(set(data) - set(_TOP))
    if unknown:
        raise BadInput(f"unknown key {unknown[0]!r}{where}; top-level keys are {', '.join(_TOP)}")
    if "dataset" not in data:
        raise BadInput(f'no dataset{where}; add e.g. dataset = "caltech101"')
    sections = {}
    for key, cls in _SECTIONS.items():
        table = data.get(key, {})
        if not isinstance(table, dict):
            raise BadInput(f"[{key}]{where} must be a table")
        bad = sorted(set(table) - set(_fields(cls)))
        if bad:
            raise BadInput(f"unknown key {bad[0]!r} in [{key}]{where}; allowed: {', '.join(_fields(cls))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
        try:
            sections[key] = cls(**values)
        except BadInput as e:
            raise BadInput(f"[{key}]{where}: {e}") from None
    paper = data.get("paper", {})
    bad = sorted(set(paper) - set(_PAPER))
    if bad:
        raise BadInput(f"unknown key {bad[0]!r} in [paper]{where}; allowed: {', '.join(_PAPER)}")
    results = []
    for r in paper.get("results", []):
        extra = sorted(set(r) - set(_fields(PaperResult)))
        if extra or "models" not in r or "mean" not in r:
            raise BadInput(f"[paper] results entry {r}{where} needs label, models, mean (and optional std)")
        results.append(
            PaperResult(
                r.get("label", "+".join(r["models"])), tuple(r["models"]), r["mean"], r.get("std"), r.get("setting")
            )
        )
    return Pipeline(
        name=data.get("name", data["dataset"]),
        dataset=data["dataset"],
        description=data.get("description", ""),
        paper=tuple(results),
        paper_source=paper.get("source", ""),
        paper_note=paper.get("note", ""),
        source=source,
        **sections,
    )


def load_pipeline(path: str | Path) -> Pipeline:
    """Read a pipeline TOML file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingData(
            f"--pipeline {path}: no such file; give a TOML file like the shipped ones ({', '.join(builtin_names())})"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"--pipeline {path} is not valid TOML ({err}); fix the file") from None
    return parse_pipeline(data, str(path))


def _builtin_folder():
    try:
        return resources.files("featx.pipelines")
    except ModuleNotFoundError:
        # A source checkout that was never installed: the files sit beside the package.
        return Path(__file__).resolve().parent.parent / "pipelines"


def builtin_names() -> list[str]:
    """The experiments that ship with featx (one TOML each)."""
    return sorted(p.name[: -len(".toml")] for p in _builtin_folder().iterdir() if p.name.endswith(".toml"))


def builtin_pipeline(dataset: str) -> Pipeline:
    """The paper's experiment for `dataset`, from featx.pipelines/<dataset>.toml."""
    if dataset not in DATASETS:
        raise BadInput(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    entry = _builtin_folder() / f"{dataset.replace('-', '_')}.toml"  # voc2012-action: voc2012_action.toml
    return parse_pipeline(tomllib.loads(entry.read_text()), f"featx.pipelines/{dataset}.toml")


def pipeline_for(dataset: str | None = None, file: str | Path | None = None) -> Pipeline:
    """The pipeline of `featx evaluate`: the user's --pipeline FILE, else the shipped one."""
    if file is not None:
        pipeline = load_pipeline(file)
        if dataset is not None and dataset != pipeline.dataset:
            raise BadInput(
                f"--dataset {dataset} contradicts --pipeline {file} (dataset {pipeline.dataset!r}); give one of them"
            )
        return pipeline
    if dataset is None:
        raise BadInput(f"give --dataset ({', '.join(DATASETS)}) or --pipeline FILE to say what to evaluate")
    return builtin_pipeline(dataset)
