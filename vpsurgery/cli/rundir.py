"""The run directory: what `compress --out DIR` writes, how it is built and how it is read back.

* its files (the names below, RUN_DIR_HELP) and manifest.json;
* `Report`, the typed record in report.json that compress writes and verify / export / inspect and
  report.md read (report format 2; format 1, written before the outcome section existed, is read
  too);
* the build: DIR.partial (a `Stage`), resumed after a kill, renamed onto DIR once complete (an
  earlier run is replaced only then, and only if it holds nothing but these files);
* `load_run`: the dense model rebuilt from the recorded spec (registries only, unless the user
  names the factory again: a run directory is data, never code), the compressed one replayed from
  kept_map.json, every file first checked against the manifest.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpsurgery.cli.errors import CLIError
from vpsurgery.io import RunDirError
from vpsurgery.reporting import LayerRow, Totals

# The files of a run directory (written by `compress`).
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
KEPT_MAP = "kept_map.json"
WEIGHTS = "weights.pt"  # state_dict of the compressed model
MODEL_PT2 = "model.pt2"
MODEL_ONNX = "model.onnx"
DENSE_ONNX = "dense.onnx"  # the uncompressed architecture, for the latency comparison
CONFIG = "config.json"  # what the run was started with; --resume must match it
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"  # file -> sha256 of everything above; checked by export / verify / inspect
EXPORT_JSON = "export.json"
PLOTS_DIR = "plots"
PARTIAL = ".partial"  # DIR.partial: the run being built, until it is complete and renamed to DIR
# What compress and export write; --force replaces a directory holding only these, nothing else.
KNOWN_ENTRIES = frozenset({REPORT_JSON, REPORT_MD, KEPT_MAP, WEIGHTS, MODEL_PT2, MODEL_ONNX, DENSE_ONNX, CONFIG,
                           CHECKPOINTS, MANIFEST, EXPORT_JSON, PLOTS_DIR})
# Model sources a run directory may name: registries, looked up by name. Any other factory is code,
# and a run directory is data, so it is rebuilt only when the user names it again with --model.
REGISTRY_SOURCES = ("vpsurgery", "torchvision")
DATA_DEFAULTS = ("num_classes", "in_channels", "in_features")  # builder arguments compress takes from the data
REPORT_FORMAT = 2  # 2 added "outcome"; 1 is still read
READABLE_FORMATS = (1, 2)
RERUN = "re-run `vpsurgery compress`"

RUN_DIR_HELP = f"""\
A run directory (what `compress --out DIR` writes):
  {MODEL_PT2:<14} compressed model, torch.export program, dynamic batch (needs only torch to load)
  {MODEL_ONNX:<14} compressed model, ONNX, dynamic batch (input "input", output "logits")
  {DENSE_ONNX:<14} the dense (uncompressed) model, ONNX, for latency comparisons
  {WEIGHTS:<14} state_dict of the compressed model
  {KEPT_MAP:<14} which channels/sections were kept (vpsurgery.replay rebuilds the small model)
  {REPORT_JSON:<14} model spec, data, input shape, history, per-layer sizes, FLOPs, verification, outcome
  {REPORT_MD:<14} the same for humans, with {PLOTS_DIR}/*.png
  {CONFIG:<14} the arguments of the run (--resume must repeat them)
  {MANIFEST:<14} sha256 of every file above; export, verify and inspect refuse a changed or missing file
  {CHECKPOINTS + '/':<14} the last training checkpoint, only with --keep-checkpoint
The run is built in DIR{PARTIAL}/ (training checkpoints in DIR{PARTIAL}/{CHECKPOINTS}/, which --resume
continues from) and renamed to DIR once everything is written and verified, so DIR never mixes
files of two runs; with --force an earlier run in DIR is replaced only then.
The compressed torch model is rebuilt as replay(MODEL spec from report.json, {KEPT_MAP}) with {WEIGHTS};
a MODEL outside the vpsurgery: and torchvision: registries is imported only when passed again as --model."""


# ======================================================================== the report

@dataclass(frozen=True)
class ModelRecord:
    spec: str  # as the user wrote it
    source: str  # "vpsurgery", "torchvision" or a module path
    name: str
    kwargs: dict[str, Any]  # as built: the spec's arguments and the defaults taken from the data

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "source": self.source, "name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, entry: Any, where: Path) -> "ModelRecord":
        if not (isinstance(entry, dict) and isinstance(entry.get("source"), str) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("kwargs", {}), dict)):
            raise CLIError(f"{where} has no valid 'model' entry; {RERUN}")
        kwargs = dict(entry.get("kwargs", {}))
        not_plain = [k for k, v in kwargs.items() if not isinstance(v, (bool, int, float, str, type(None)))]
        if not_plain:
            raise CLIError(f"{where}: the model arguments {', '.join(map(str, not_plain))} are not plain values; "
                           f"{RERUN}")
        spec = entry.get("spec")
        return cls(spec if isinstance(spec, str) else f"{entry['source']}:{entry['name']}", entry["source"],
                   entry["name"], kwargs)


@dataclass(frozen=True)
class DataRecord:
    spec: str  # as the user wrote it (--data)
    name: str
    num_classes: int
    channels_repeated: bool  # grayscale repeated to the model's 3 channels
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": self.name, "num_classes": self.num_classes,
                "channels_repeated": self.channels_repeated, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DataRecord":
        return cls(str(data["spec"]), str(data.get("name", data["spec"])), int(data["num_classes"]),
                   bool(data.get("channels_repeated", False)), tuple(map(float, data.get("mean") or ())),
                   tuple(map(float, data.get("std") or ())))


@dataclass(frozen=True)
class TrainingRecord:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    seed: int
    device: str
    hyperparameters: dict[str, Any]  # the other vpsurgery.config.FitConfig settings of the run
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
                "seed": self.seed, "device": self.device, "hyperparameters": dict(self.hyperparameters),
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainingRecord":
        return cls(int(data["epochs"]), int(data["batch_size"]), float(data["lr"]), str(data["optimizer"]),
                   int(data["seed"]), str(data["device"]), dict(data.get("hyperparameters") or {}),
                   float(data.get("seconds", 0.0)))


@dataclass(frozen=True)
class Structure:
    removed_sections: list[str]
    sections_before: list[str]
    depth_before: int  # conv/linear layers on the longest path
    depth_after: int

    def to_json(self) -> dict[str, Any]:
        return {"removed_sections": list(self.removed_sections), "sections_before": list(self.sections_before),
                "depth_before": self.depth_before, "depth_after": self.depth_after}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Structure":
        return cls([str(s) for s in data["removed_sections"]], [str(s) for s in data["sections_before"]],
                   int(data["depth_before"]), int(data["depth_after"]))


@dataclass(frozen=True)
class Verification:
    """onnxruntime vs torch (vpsurgery.export.VerifyResult) and the tolerances it was checked with."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    reference_max: float
    batch_sizes: tuple[int, ...]
    detail: str
    rtol: float
    atol: float

    @classmethod
    def of(cls, result, rtol: float, atol: float) -> "Verification":
        return cls(result.passed, result.max_abs_error, result.max_rel_error, result.reference_max,
                   tuple(result.batch_sizes), result.detail, rtol, atol)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "reference_max": self.reference_max, "batch_sizes": list(self.batch_sizes), "detail": self.detail,
                "rtol": self.rtol, "atol": self.atol}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Verification":
        return cls(bool(data["passed"]), float(data["max_abs_error"]), float(data["max_rel_error"]),
                   float(data["reference_max"]), tuple(int(b) for b in data["batch_sizes"]), str(data["detail"]),
                   float(data["rtol"]), float(data["atol"]))


@dataclass(frozen=True)
class Latency:
    """Median onnxruntime CPU latency, dense.onnx vs model.onnx."""

    dense_ms: float
    small_ms: float
    speedup: float
    batch: int
    repeats: int

    def to_json(self) -> dict[str, Any]:
        return {"dense_ms": self.dense_ms, "small_ms": self.small_ms, "speedup": self.speedup, "batch": self.batch,
                "repeats": self.repeats}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Latency | None":
        if data is None:
            return None
        return cls(float(data["dense_ms"]), float(data["small_ms"]), float(data["speedup"]), int(data["batch"]),
                   int(data["repeats"]))


@dataclass(frozen=True)
class Outcome:
    """What the run was asked for and what it reached (report format 2). ``problems`` is empty for
    a run that did its job; otherwise compress exits with 1 (see commands.judge)."""

    per: str  # what target and share count: "params" or "flops"
    target: float | None  # share of the dense cost asked for; None: price mode
    price: float | None  # the price at the end (found by the controller with a target)
    share: float  # share of the dense cost (per) the compressed model keeps
    tolerance: float  # the share must be within target * (1 +- tolerance)
    val_acc: float | None  # of the compressed model, on the validation split
    dense_val_acc: float | None  # of the dense model before training (a run from --checkpoint)
    chance: float  # accuracy at or below which the model is taken to have learnt nothing
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "per": self.per, "target": self.target, "price": self.price, "share": self.share,
                "tolerance": self.tolerance, "val_acc": self.val_acc, "dense_val_acc": self.dense_val_acc,
                "chance": self.chance, "problems": list(self.problems)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Outcome | None":
        if data is None:
            return None

        def number(key):
            return None if data.get(key) is None else float(data[key])

        return cls(str(data["per"]), number("target"), number("price"), float(data["share"]),
                   float(data["tolerance"]), number("val_acc"), number("dense_val_acc"), float(data["chance"]),
                   tuple(str(p) for p in data.get("problems", ())))


FILES = {"pt2": MODEL_PT2, "onnx": MODEL_ONNX, "dense_onnx": DENSE_ONNX, "weights": WEIGHTS, "kept_map": KEPT_MAP,
         "report": REPORT_MD, "manifest": MANIFEST}


@dataclass
class Report:
    """report.json: everything compress measured, typed. ``to_json`` / ``from_json`` are the file
    format (the keys of format 1, plus "outcome")."""

    model: ModelRecord
    data: DataRecord
    input_shape: tuple[int, ...]  # (1, C, H, W) as the model reads it
    training: TrainingRecord
    history: list[dict[str, Any]]  # vpsurgery.fit's per-epoch records, as it returns them
    totals: Totals
    structure: Structure
    layers: list[LayerRow]
    verification: Verification
    latency: Latency | None
    checkpoint: str | None = None  # --checkpoint, as given
    checkpoint_sha256: str | None = None
    outcome: Outcome | None = None  # None in format 1 reports
    plots: dict[str, str] = field(default_factory=dict)  # plot -> path relative to the run directory
    files: dict[str, str] = field(default_factory=lambda: dict(FILES))
    vpsurgery_version: str = ""
    format: int = REPORT_FORMAT

    @property
    def val_acc(self) -> float | None:
        """The compressed model's val accuracy (format 1: the last epoch's)."""
        if self.outcome is not None and self.outcome.val_acc is not None:
            return self.outcome.val_acc
        return self.history[-1].get("val_acc") if self.history else None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "vpsurgery_version": self.vpsurgery_version,
            "model": self.model.to_json(),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "data": self.data.to_json(),
            "input_shape": list(self.input_shape),
            "training": self.training.to_json(),
            "history": self.history,
            "totals": self.totals.to_json(),
            "structure": self.structure.to_json(),
            "layers": [row.to_json() for row in self.layers],
            "verification": self.verification.to_json(),
            "latency": self.latency.to_json() if self.latency else None,
            "outcome": self.outcome.to_json() if self.outcome else None,
            "files": dict(self.files),
            "plots": dict(self.plots),
        }

    @classmethod
    def from_json(cls, data: Any, where: Path) -> "Report":
        """The report in ``data`` (report.json as read from ``where``); CLIError / RunDirError naming
        the file and what is wrong with it."""
        if not isinstance(data, dict):
            raise CLIError(f"{where} holds a JSON {type(data).__name__}, not a run report; {RERUN}")
        version = data.get("format", 1)
        if version not in READABLE_FORMATS:
            raise RunDirError(f"{where} is report format {version!r}; this vpsurgery reads formats "
                              f"{', '.join(map(str, READABLE_FORMATS))}; {RERUN} with this version")
        input_shape = _input_shape(data, where)
        model = ModelRecord.from_json(data.get("model"), where)
        try:
            history = data.get("history") or []
            if not all(isinstance(h, dict) for h in history):
                raise TypeError("'history' is not a list of epoch records")
            return cls(
                model=model, data=DataRecord.from_json(data["data"]), input_shape=input_shape,
                training=TrainingRecord.from_json(data["training"]), history=list(history),
                totals=Totals.from_json(data["totals"]), structure=Structure.from_json(data["structure"]),
                layers=[LayerRow.from_json(row) for row in data["layers"]],
                verification=Verification.from_json(data["verification"]),
                latency=Latency.from_json(data.get("latency")),
                checkpoint=data.get("checkpoint"), checkpoint_sha256=data.get("checkpoint_sha256"),
                outcome=Outcome.from_json(data.get("outcome")), plots=dict(data.get("plots") or {}),
                files=dict(data.get("files") or FILES), vpsurgery_version=str(data.get("vpsurgery_version", "")),
                format=version)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"no {exc.args[0]!r} entry" if isinstance(exc, KeyError) else str(exc)
            raise RunDirError(f"{where} is not a complete run report ({what}); {RERUN}") from exc


def _input_shape(report: dict[str, Any], where: Path) -> tuple[int, ...]:
    shape = report.get("input_shape")
    if not (isinstance(shape, list) and 2 <= len(shape) <= 5
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 16 for d in shape)
            and math.prod(shape) <= 1 << 28):
        raise CLIError(f"{where}: 'input_shape' is {shape!r}, not a shape like [1, 3, 32, 32]; {RERUN}")
    return tuple(shape)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {path}: {exc}; {RERUN}") from exc


def read_report(run_dir: Path) -> Report:
    return Report.from_json(read_json(run_dir / REPORT_JSON), run_dir / REPORT_JSON)


def write_report(run_dir: Path, report: Report) -> None:
    """The plots, report.json and report.md into ``run_dir`` (``report.plots`` is set)."""
    from vpsurgery import reporting
    from vpsurgery.io import atomic_write_bytes, write_json

    report.plots = reporting.write_plots(run_dir, report.history, report.layers, report.totals.dense)
    write_json(run_dir / REPORT_JSON, report.to_json())
    atomic_write_bytes(run_dir / REPORT_MD, reporting.markdown(report).encode())


@dataclass(frozen=True)
class ExportRecord:
    """export.json, beside what `export` writes."""

    source_run: str
    input_shape: tuple[int, ...]
    model: ModelRecord
    verification: Verification

    def to_json(self) -> dict[str, Any]:
        return {"source_run": self.source_run, "input_shape": list(self.input_shape), "model": self.model.to_json(),
                "verification": self.verification.to_json()}


def example_batch(input_shape, batch: int = 2):
    """A fixed random batch of the recorded input shape (for tracing, export and the checks)."""
    import torch

    return (torch.randn((batch, *input_shape[1:]), generator=torch.Generator().manual_seed(0)),)


# ======================================================================== finding and reading a run

def partial_dir(out: Path) -> Path:
    """DIR.partial: where the run into DIR is built (and, while unfinished, resumed)."""
    return out.with_name(out.name + PARTIAL)


def unfinished_hint(run_dir: Path) -> str:
    target = run_dir.with_name(run_dir.name[: -len(PARTIAL)]) if run_dir.name.endswith(PARTIAL) else run_dir
    if partial_dir(target).is_dir():
        return (f"; {partial_dir(target)} holds an unfinished run into {target}: finish it with "
                f"`vpsurgery compress ... --out {target} --resume` (the original arguments)")
    return ""


def find_run_dir(source: Path) -> tuple[Path, Path]:
    """(run directory, compressed weights file) for a run directory or a weights file in one."""
    if not source.exists():
        raise CLIError(f"{source} does not exist; pass a run directory written by `vpsurgery compress`"
                       + unfinished_hint(source))
    if source.is_dir() and source.name.endswith(PARTIAL):
        raise CLIError(f"{source} is an unfinished run (compress builds the run there, then renames it)"
                       + (unfinished_hint(source) or "; re-run `vpsurgery compress`"))
    if source.is_dir():
        run_dir, weights = source, source / WEIGHTS
    else:
        run_dir, weights = next((d for d in (source.parent, source.parent.parent) if (d / REPORT_JSON).is_file()),
                                source.parent), source
    if weights.parent.name == CHECKPOINTS:
        raise CLIError(f"{weights} is a training checkpoint (the gated model mid-training); finish the run with "
                       f"`vpsurgery compress ... --out {run_dir} --resume`, then export {run_dir}")
    for needed in (REPORT_JSON, KEPT_MAP):
        if not (run_dir / needed).is_file():
            raise CLIError(f"{run_dir} has no {needed}, so it is not a run directory; pass the --out directory "
                           "of a finished `vpsurgery compress`" + unfinished_hint(run_dir))
    return run_dir, weights


def recorded_spec(record: ModelRecord, where: Path, model: str | None = None):
    """The ModelSpec to rebuild the dense model of a run from.

    A run directory is data, never code: a recorded spec is only looked up in the vpsurgery: and
    torchvision: registries. Any other factory is imported only when the user names it as ``model``
    (--model), and then it must be the recorded one."""
    from vpsurgery.specs import ModelSpec, parse_spec

    kwargs = dict(record.kwargs)
    recorded = ModelSpec(record.source, record.name, kwargs)
    shown = f"{recorded.source}:{recorded.name}"
    if model is None:
        if recorded.source not in REGISTRY_SOURCES:
            raise CLIError(f"{where} names the model factory {shown}, which is outside the vpsurgery: and "
                           "torchvision: registries; a run directory is data, so its code is not imported from the "
                           f"file: pass --model {shown} (the spec the run was compressed with) if you trust that code")
    else:
        # Every argument the factory gets must be the user's, except the ones compress took from
        # the data (num_classes, ...), which must be plain integers.
        given = parse_spec(model)  # imports what the user named on the command line
        own = {k: v for k, v in kwargs.items() if k not in DATA_DEFAULTS}
        from_data_ok = all(isinstance(kwargs[k], int) and not isinstance(kwargs[k], bool)
                           for k in DATA_DEFAULTS if k in kwargs and k not in given.kwargs)
        if (given.source, given.name) != (recorded.source, recorded.name) or not from_data_ok or \
                {k: v for k, v in given.kwargs.items() if k not in DATA_DEFAULTS or kwargs.get(k) != v} != own:
            raise CLIError(f"--model {model} does not match the model recorded in {where} ({recorded}); "
                           "pass the spec the run was compressed with")
    if recorded.source == "torchvision" and kwargs.get("weights") is not None:
        # the dense weights are never needed (the compressed ones are in weights.pt): no download
        recorded = ModelSpec(recorded.source, recorded.name, {**kwargs, "weights": None})
    return recorded


@dataclass
class Run:
    """A run directory read back: its report and the dense and compressed models."""

    dir: Path
    report: Report
    dense: Any
    small: Any

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.report.input_shape


def load_run(source: str | Path, model: str | None = None) -> Run:
    """Rebuild a run's models: the dense one from the recorded spec, the compressed one by replaying
    kept_map.json onto it and loading the compressed weights. Every file is first checked against
    manifest.json; ``model`` (--model) is needed for a factory outside the built-in registries."""
    import vpsurgery
    from vpsurgery.io import check_kept_map, check_manifest, load_weights

    run_dir, weights = find_run_dir(Path(source))
    check_manifest(run_dir, required=(REPORT_JSON, KEPT_MAP))
    report = read_report(run_dir)
    kept = check_kept_map(read_json(run_dir / KEPT_MAP), run_dir / KEPT_MAP)
    example = example_batch(report.input_shape)
    dense = recorded_spec(report.model, run_dir / REPORT_JSON, model).build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = vpsurgery.plan(vpsurgery.wrap(dense, example))
        check_kept_map(kept, run_dir / KEPT_MAP, modules={name for name, _ in dense.named_modules()},
                       units={int(u) for g in plan.groups.values() for u in g.units}, sections=set(plan.sections))
        try:
            small = vpsurgery.replay(dense, kept, example)
        except (ValueError, KeyError, IndexError) as exc:
            raise CLIError(f"{run_dir / KEPT_MAP}: {exc}") from exc
    load_weights(small, weights)
    return Run(run_dir, report, dense.eval(), small.eval())


# ======================================================================== building a run

def foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that neither compress nor export writes (nor their temp files)."""
    from vpsurgery.io import is_temp_file

    return sorted(p.name for p in directory.iterdir() if p.name not in KNOWN_ENTRIES and not is_temp_file(p.name))


def check_replaceable(out: Path, force: bool, what: str = "run") -> None:
    """Refuse an ``out`` that exists and is not an empty directory, unless ``force`` and it holds
    only what vpsurgery writes (a previous run or export): the user's own files are never deleted."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise CLIError(f"output directory {out} exists and is not empty; pass --force to replace it with the new "
                       f"{what} (the old directory is replaced only once the new one is complete)")
    foreign = foreign_entries(out)
    if foreign:
        from vpsurgery.io import summarise

        raise CLIError(f"--force replaces only a directory written by vpsurgery, and {out} also holds "
                       f"{summarise(foreign)}; move those files or choose another --out")


def check_writable(out: Path) -> None:
    """Refuse an --out whose parent directory cannot take new entries (the run is built beside it)."""
    from vpsurgery.io import writable_parent

    try:
        writable_parent(out)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = Path(exc.filename).parent if exc.filename else out.absolute().parent
        raise CLIError(f"cannot write --out {out}: {reason} in {where} (the run is built next to {out.name}, so "
                       "that directory must be writable); choose another --out") from exc


def is_finished(directory: Path) -> bool:
    from vpsurgery.io import check_manifest

    try:
        check_manifest(directory, required=(REPORT_JSON, KEPT_MAP))
    except RunDirError:
        return False
    return True


@dataclass
class Stage:
    """Where compress builds the run: DIR.partial (a directory, or ``adopt``: DIR itself, an
    interrupted run of an older vpsurgery, moved there)."""

    out: Path
    dir: Path
    fresh: bool  # start training from scratch (discarding an earlier DIR.partial)
    finished: bool  # every file is written and in the manifest: only the rename to DIR is left
    adopt: bool = False

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / CHECKPOINTS

    @property
    def has_checkpoint(self) -> bool:
        """Whether fit has left a checkpoint to continue from."""
        from vpsurgery.train import CHECKPOINT

        return (self.checkpoint_dir / CHECKPOINT).is_file()


def plan_stage(out: Path, config: dict[str, Any], *, resume: bool, force: bool) -> Stage:
    """Decide where the run into ``out`` is built, refusing what cannot work, before anything is
    read or written. ``config``: the run's arguments, which a --resume must repeat."""
    stage = partial_dir(out)
    check_writable(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory; choose another --out")
    if stage.exists() and not stage.is_dir():
        raise NotADirectoryError(f"{stage} exists and is not a directory; move it away (compress builds the run "
                                 "there)")
    if not resume:
        if stage.is_dir():
            if not force:
                raise CLIError(f"{stage} holds an unfinished run into {out}; continue it with --resume (and the "
                               "original arguments), or pass --force to discard it and start over")
            foreign = foreign_entries(stage)
            if foreign:
                raise CLIError(f"{stage} holds files vpsurgery did not write ({', '.join(foreign[:5])}); move them")
        check_replaceable(out, force)
        return Stage(out, stage, fresh=True, finished=False)
    if stage.is_dir():
        source = stage
    elif out.is_dir() and (out / CHECKPOINTS).is_dir() and not (out / MANIFEST).is_file():
        source = out  # interrupted before run directories were built in DIR.partial
    elif out.is_dir() and is_finished(out):
        raise CLIError(f"nothing to resume: {out} is a finished run (its {MANIFEST} checks out); drop --resume "
                       "(with --force to redo it)")
    else:
        raise CLIError(f"nothing to resume: neither {stage} nor {out / CHECKPOINTS} exists; drop --resume to start "
                       "a new run")
    before = read_json(source / CONFIG) if (source / CONFIG).is_file() else {}
    before = before if isinstance(before, dict) else {}
    changed = [k for k in config if before.get(k) != config[k]]
    if changed:
        raise CLIError(f"--resume with different {', '.join(changed)} than the run in {source} "
                       f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); repeat the original arguments")
    if source is stage:
        check_replaceable(out, force)
        return Stage(out, stage, fresh=False, finished=is_finished(stage))
    return Stage(out, stage, fresh=False, finished=False, adopt=True)


def open_stage(stage: Stage, config: dict[str, Any]) -> None:
    """Create (or take over) DIR.partial: the first write of the run."""
    from vpsurgery.io import remove_temp_files, temp_dir_beside, write_json

    stage.dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stage.dir.parent.glob(f".{stage.dir.name}.*.tmp"):  # a stage killed while being created
        shutil.rmtree(leftover, ignore_errors=True)
    if stage.adopt:
        os.rename(stage.out, stage.dir)
    elif stage.fresh:
        if stage.dir.exists():
            shutil.rmtree(stage.dir)
        # created under a temporary name and renamed, so DIR.partial always has its config.json
        tmp = temp_dir_beside(stage.dir)
        write_json(tmp / CONFIG, config)
        os.rename(tmp, stage.dir)
    remove_temp_files(stage.dir)


def clear_outputs(stage: Stage) -> None:
    """Remove the outputs of an interrupted attempt (they are rebuilt from the training checkpoint)."""
    for entry in stage.dir.iterdir():
        if entry.name in KNOWN_ENTRIES - {CONFIG, CHECKPOINTS}:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def finish_stage(stage: Stage, keep_checkpoint: bool) -> None:
    """Manifest, drop the training checkpoint, then rename DIR.partial to DIR (replacing an old run)."""
    from vpsurgery.io import replace_dir, write_manifest

    if not stage.finished:
        write_manifest(stage.dir, exclude=(CHECKPOINTS,))
    if not keep_checkpoint and stage.checkpoint_dir.exists():
        shutil.rmtree(stage.checkpoint_dir)
    replace_dir(stage.dir, stage.out)
