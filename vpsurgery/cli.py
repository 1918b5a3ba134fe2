"""The ``vpsurgery`` command line (also ``python -m vpsurgery``).

It only parses arguments, loads models and data, calls wrap / fit / shrink / export, and reports.
Errors in what the user passed end the program with one line on stderr (exit code 2); failed
verification exits with 1; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

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
_DATA_DEFAULTS = ("num_classes", "in_channels", "in_features")  # builder arguments compress takes from the data

RUN_DIR_HELP = f"""\
A run directory (what `compress --out DIR` writes):
  {MODEL_PT2:<14} compressed model, torch.export program, dynamic batch (needs only torch to load)
  {MODEL_ONNX:<14} compressed model, ONNX, dynamic batch (input "input", output "logits")
  {DENSE_ONNX:<14} the dense (uncompressed) model, ONNX, for latency comparisons
  {WEIGHTS:<14} state_dict of the compressed model
  {KEPT_MAP:<14} which channels/sections were kept (vpsurgery.replay rebuilds the small model)
  {REPORT_JSON:<14} model spec, data, input shape, history, per-layer sizes, FLOPs, verification
  {REPORT_MD:<14} the same for humans, with {PLOTS_DIR}/*.png
  {CONFIG:<14} the arguments of the run (--resume must repeat them)
  {MANIFEST:<14} sha256 of every file above; export, verify and inspect refuse a changed or missing file
  {CHECKPOINTS + '/':<14} the last training checkpoint, only with --keep-checkpoint
The run is built in DIR{PARTIAL}/ (training checkpoints in DIR{PARTIAL}/{CHECKPOINTS}/, which --resume
continues from) and renamed to DIR once everything is written and verified, so DIR never mixes
files of two runs; with --force an earlier run in DIR is replaced only then.
The compressed torch model is rebuilt as replay(MODEL spec from report.json, {KEPT_MAP}) with {WEIGHTS};
a MODEL outside the vpsurgery: and torchvision: registries is imported only when passed again as --model."""

DEMO_MODEL = "vpsurgery:resnet20:width=0.5"
DEMO_DATA = "digits"
DEMO_IMAGE_SIZE = 8  # digits' native size: ~1 s per epoch on 2 CPU cores
DEMO_EPOCHS = 40  # measured: 28% of parameters, 3 of 9 blocks left, 97.8% val (docs/method.md)
DEMO_BATCH_SIZE = 64
DEMO_OPTIMIZER, DEMO_LR = "adam", 0.003
# The fit default (0.5) collapses a 70k-parameter net on the 1.6k digits images (the regulariser
# is divided by n_train); 0.01 still removed ~75% of parameters in one epoch at 17% accuracy.
DEMO_PRICE = 0.01  # fit's default; measured on digits (docs/method.md)
DEFAULT_INSPECT_SHAPE = (1, 3, 64, 64)
SPEC_FORMS_TEXT = "vpsurgery:NAME, torchvision:NAME or package.module:factory"

# fit() arguments the CLI sets itself; every other keyword argument of fit with a plain default
# becomes a --option of `compress`.
_FIT_OWNED = {"gated", "train_loader", "val_loader", "epochs", "lr", "optimizer", "device", "checkpoint_dir",
              "resume", "progress", "log", "seed"}


class CLIError(Exception):
    """A problem with what the user passed; the message names it and the fix."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from vpsurgery import ExampleInputError, TraceError
    from vpsurgery.data import DataError
    from vpsurgery.io import CheckpointError, OutputExistsError, RunDirError
    from vpsurgery.specs import SpecError

    return (CLIError, SpecError, DataError, CheckpointError, OutputExistsError, NotADirectoryError,
            TraceError, ExampleInputError, RunDirError)


def log(message: str) -> None:
    print(f"[vpsurgery] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet(debug: bool) -> Iterator[None]:
    """Hide the exporters' chatter (stdout prints, warnings) unless --debug."""
    if debug:
        yield
        return
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ======================================================================== argument types
# Every number is checked while parsing, so a bad one ends the program before anything is read or
# written, with one line naming the option (argparse: "argument --batch-size: ...").

def _number(kind: type, what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _number(int, "an integer >= 1", lambda v: v >= 1)
NONNEGATIVE_INT = _number(int, "an integer >= 0", lambda v: v >= 0)
POSITIVE_FLOAT = _number(float, "a number > 0", lambda v: v > 0)
NONNEGATIVE_FLOAT = _number(float, "a number >= 0", lambda v: v >= 0)
SEED = _number(int, "an integer in [0, 2**63)", lambda v: 0 <= v < 2 ** 63)


def _device(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps, present on this machine."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), cuda:0..{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: device type {device.type!r} is not supported; "
                                         "use auto, cpu, cuda, cuda:N or mps")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `vpsurgery: error: argument --x: ... (see ... --help)`."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"vpsurgery: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


# ======================================================================== loading

def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write e.g. 1,3,64,64")
    return shape


def _registry_image_size(spec) -> int | None:
    """The input size a vpsurgery reference network was designed for (28 for LeNets, 32 else)."""
    if not spec.registry:
        return None
    from vpsurgery.models import default_input_shape

    shape = default_input_shape(spec.name)
    return shape[-1] if len(shape) == 4 else int(round(math.sqrt(shape[-1])))


def _first_conv_channels(model) -> int | None:
    from torch import nn

    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return conv.in_channels if conv is not None else None


class _RepeatChannels:
    """A dataset view that repeats grayscale images to 3 channels (for RGB-only models)."""

    def __init__(self, dataset, channels: int):
        self.dataset, self.channels = dataset, channels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return x.expand(self.channels, *x.shape[1:]), y


@dataclass
class Inputs:
    spec: Any  # ModelSpec as built (kwargs include the defaults taken from the data)
    model: Any
    data: Any
    train: Any
    val: Any
    input_shape: tuple[int, ...]  # (1, C, H, W)
    channels_repeated: bool


def load_inputs(args) -> Inputs:
    """Parse MODEL, load the data, build the model (num_classes from the data), load --checkpoint."""
    import torch

    from vpsurgery.data import load_data
    from vpsurgery.specs import ModelSpec, parse_spec

    spec = parse_spec(args.model)
    image_size = args.image_size if args.image_size is not None else _registry_image_size(spec)
    data = load_data(args.data, image_size=image_size, download=args.download, seed=args.seed)
    _check_split_sizes(data, args)
    channels = data.input_shape[0]
    defaults = dict(zip(_DATA_DEFAULTS, (data.num_classes, channels, math.prod(data.input_shape))))
    torch.manual_seed(args.seed)
    built = ModelSpec(spec.source, spec.name, spec.build_kwargs(**defaults))
    model = built.build()
    wanted = _first_conv_channels(model) or channels
    train, val, repeated = data.train, data.val, False
    if wanted != channels:
        if channels != 1:
            raise CLIError(f"{spec} reads {wanted}-channel images but {args.data} has {channels} channels; "
                           "pick a model or dataset that agree")
        log(f"{spec} reads {wanted}-channel images: repeating the grayscale channel of {data.name}")
        train, val, repeated = _RepeatChannels(train, wanted), _RepeatChannels(val, wanted), True
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    return Inputs(built, model, data, train, val, (1, wanted, *data.input_shape[1:]), repeated)


def _check_split_sizes(data, args) -> None:
    n_train, n_val = len(data.train), len(data.val)
    if n_train == 0:
        raise CLIError(f"the training split of {args.data} is empty; add training examples")
    if n_train < args.batch_size:
        raise CLIError(f"the training split of {args.data} has {n_train} examples, fewer than one batch "
                       f"(--batch-size {args.batch_size}); pass --batch-size {n_train} or less, or add data")
    if n_val == 0:
        raise CLIError(f"the validation split of {args.data} is empty; add validation examples")


def load_weights(model, path) -> None:
    from vpsurgery.io import check_state_dict, load_checkpoint

    state = load_checkpoint(path)
    check_state_dict(model, state)
    model.load_state_dict(state)


def sha256(path: Path) -> str:
    from vpsurgery.io import sha256_file

    return sha256_file(path)


def example_batch(input_shape, batch: int = 2):
    import torch

    return (torch.randn((batch, *input_shape[1:]), generator=torch.Generator().manual_seed(0)),)


@dataclass
class Run:
    """A run directory read back: its report and the dense and compressed models."""

    dir: Path
    report: dict[str, Any]
    dense: Any
    small: Any

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.report["input_shape"])


def partial_dir(out: Path) -> Path:
    """DIR.partial: where the run into DIR is built (and, while unfinished, resumed)."""
    return out.with_name(out.name + PARTIAL)


def _unfinished_hint(run_dir: Path) -> str:
    target = run_dir.with_name(run_dir.name[: -len(PARTIAL)]) if run_dir.name.endswith(PARTIAL) else run_dir
    if partial_dir(target).is_dir():
        return (f"; {partial_dir(target)} holds an unfinished run into {target}: finish it with "
                f"`vpsurgery compress ... --out {target} --resume` (the original arguments)")
    return ""


def find_run_dir(source: Path) -> tuple[Path, Path]:
    """(run directory, compressed weights file) for a run directory or a weights file in one."""
    if not source.exists():
        raise CLIError(f"{source} does not exist; pass a run directory written by `vpsurgery compress`"
                       + _unfinished_hint(source))
    if source.is_dir() and source.name.endswith(PARTIAL):
        raise CLIError(f"{source} is an unfinished run (compress builds the run there, then renames it)"
                       + (_unfinished_hint(source) or "; re-run `vpsurgery compress`"))
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
                           "of a finished `vpsurgery compress`" + _unfinished_hint(run_dir))
    return run_dir, weights


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {path}: {exc}; re-run `vpsurgery compress`") from exc


def _recorded_input_shape(report: Any, where: Path) -> tuple[int, ...]:
    shape = report.get("input_shape")
    if not (isinstance(shape, list) and 2 <= len(shape) <= 5
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 16 for d in shape)
            and math.prod(shape) <= 1 << 28):
        raise CLIError(f"{where}: 'input_shape' is {shape!r}, not a shape like [1, 3, 32, 32]; re-run `vpsurgery compress`")
    return tuple(shape)


def recorded_spec(report: dict[str, Any], where: Path, model: str | None = None):
    """The ModelSpec recorded in report.json, for rebuilding the dense model.

    A run directory is data, never code: a spec from the file is only looked up in the vpsurgery:
    and torchvision: registries with plain-value arguments. Any other factory is imported only when
    the user names it as ``model`` (--model), and then it must be the recorded one."""
    from vpsurgery.specs import ModelSpec, parse_spec

    entry = report.get("model")
    if not (isinstance(entry, dict) and isinstance(entry.get("source"), str) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("kwargs", {}), dict)):
        raise CLIError(f"{where} has no valid 'model' entry; re-run `vpsurgery compress`")
    kwargs = dict(entry.get("kwargs", {}))
    not_plain = [k for k, v in kwargs.items() if not isinstance(v, (bool, int, float, str, type(None)))]
    if not_plain:
        raise CLIError(f"{where}: the model arguments {', '.join(map(str, not_plain))} are not plain values; "
                       "re-run `vpsurgery compress`")
    recorded = ModelSpec(entry["source"], entry["name"], kwargs)
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
        own = {k: v for k, v in kwargs.items() if k not in _DATA_DEFAULTS}
        from_data_ok = all(isinstance(kwargs[k], int) and not isinstance(kwargs[k], bool)
                           for k in _DATA_DEFAULTS if k in kwargs and k not in given.kwargs)
        if (given.source, given.name) != (recorded.source, recorded.name) or not from_data_ok or \
                {k: v for k, v in given.kwargs.items() if k not in _DATA_DEFAULTS or kwargs.get(k) != v} != own:
            raise CLIError(f"--model {model} does not match the model recorded in {where} ({recorded}); "
                           "pass the spec the run was compressed with")
    if recorded.source == "torchvision" and kwargs.get("weights") is not None:
        # the dense weights are never needed (the compressed ones are in weights.pt): no download
        recorded = ModelSpec(recorded.source, recorded.name, {**kwargs, "weights": None})
    return recorded


def load_run(source: str | Path, model: str | None = None) -> Run:
    """Rebuild a run's models: the dense one from the recorded spec, the compressed one by replaying
    kept_map.json onto it and loading the compressed weights. Every file is first checked against
    manifest.json; ``model`` (--model) is needed for a factory outside the built-in registries."""
    import vpsurgery
    from vpsurgery.io import check_kept_map, check_manifest

    run_dir, weights = find_run_dir(Path(source))
    check_manifest(run_dir, required=(REPORT_JSON, KEPT_MAP))
    report = _read_json(run_dir / REPORT_JSON)
    if not isinstance(report, dict):
        raise CLIError(f"{run_dir / REPORT_JSON} holds a JSON {type(report).__name__}, not a run report; "
                       "re-run `vpsurgery compress`")
    input_shape = _recorded_input_shape(report, run_dir / REPORT_JSON)
    kept = check_kept_map(_read_json(run_dir / KEPT_MAP), run_dir / KEPT_MAP)
    example = example_batch(input_shape)
    dense = recorded_spec(report, run_dir / REPORT_JSON, model).build()
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


# ======================================================================== compress

def fit_options() -> dict[str, inspect.Parameter]:
    """The method hyperparameters of vpsurgery.train.fit that become --options (empty if train.py
    is not importable)."""
    try:
        from vpsurgery.train import fit
    except ImportError:
        return {}
    params = inspect.signature(fit).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _FIT_OWNED
            and (p.default is None or isinstance(p.default, (bool, int, float, str)))}


def _fit_default(name: str, fallback):
    try:
        from vpsurgery.train import fit
    except ImportError:
        return fallback
    param = inspect.signature(fit).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


def _fit_choices() -> dict[str, tuple[str, ...]]:
    try:
        from dataclasses import fields

        from vpsurgery.config import FitConfig
    except ImportError:
        return {}
    return {f.name: f.metadata["choices"] for f in fields(FitConfig) if f.metadata.get("choices")}


_KIND_TEXT = {int: "an integer", float: "a number", str: "a string"}


def _checked_setting(name: str, kind: type) -> Callable[[str], Any] | None:
    """An argparse type for fit setting ``name`` that applies vpsurgery.config's check (type, range,
    choices), or None where config does not know the setting."""
    try:
        from vpsurgery.config import check_value, default
        default(name)
    except (ImportError, KeyError):
        return None

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KIND_TEXT.get(kind, 'a value')}, "
                                             f"got {text!r}") from None
        try:
            return check_value(name, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind.__name__
    return parse


def _setting_kind(name: str, param: inspect.Parameter) -> type | None:
    if param.default is not None:
        return type(param.default)
    try:
        from vpsurgery.config import FitConfig
        from dataclasses import fields
    except ImportError:
        return None
    field = next((f for f in fields(FitConfig) if f.name == name), None)
    return field.metadata.get("kind") if field is not None else None


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    from vpsurgery.specs import parse_value

    choices = _fit_choices()
    group = parser.add_argument_group("method hyperparameters (passed to vpsurgery.train.fit)")
    for name, param in fit_options().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(param.default, bool):
            group.add_argument(flag, dest=f"fit_{name}", action=argparse.BooleanOptionalAction, default=param.default)
        else:
            setting_kind = _setting_kind(name, param)
            kind = (_checked_setting(name, setting_kind) if setting_kind in (int, float, str) else None) \
                or (parse_value if param.default is None else type(param.default))
            options = choices.get(name)
            metavar = "{" + ",".join(options) + "}" if options else (setting_kind or type(param.default)).__name__.upper() \
                if param.default is not None or setting_kind is not None else "VALUE"
            group.add_argument(flag, dest=f"fit_{name}", type=kind, default=param.default, choices=options,
                               metavar=metavar, help=f"default: {param.default}")


def _fit_kwargs(args) -> dict[str, Any]:
    return {name: getattr(args, f"fit_{name}") for name in fit_options() if hasattr(args, f"fit_{name}")}


def _foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that neither compress nor export writes (nor their temp files)."""
    from vpsurgery.io import _TMP_FILE

    return sorted(p.name for p in directory.iterdir() if p.name not in KNOWN_ENTRIES and not _TMP_FILE.match(p.name))


def _check_replaceable(out: Path, force: bool, what: str = "run") -> None:
    """Refuse an ``out`` that exists and is not an empty directory, unless ``force`` and it holds
    only what vpsurgery writes (a previous run or export): the user's own files are never deleted."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise CLIError(f"output directory {out} exists and is not empty; pass --force to replace it with the new "
                       f"{what} (the old directory is replaced only once the new one is complete)")
    foreign = _foreign_entries(out)
    if foreign:
        from vpsurgery.io import _summarise

        raise CLIError(f"--force replaces only a directory written by vpsurgery, and {out} also holds "
                       f"{_summarise(foreign)}; move those files or choose another --out")


def _check_writable(out: Path) -> None:
    """Refuse an --out whose parent directory cannot take new entries (the run is built beside it)."""
    from vpsurgery.io import writable_parent

    try:
        writable_parent(out)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = Path(exc.filename).parent if exc.filename else out.absolute().parent
        raise CLIError(f"cannot write --out {out}: {reason} in {where} (the run is built next to {out.name}, so "
                       "that directory must be writable); choose another --out") from exc


def _is_finished(directory: Path) -> bool:
    from vpsurgery.io import RunDirError, check_manifest

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


def _plan_stage(args, config: dict[str, Any]) -> Stage:
    """Decide where the run is built, refusing what cannot work, before anything is read or written."""
    out = Path(args.out)
    stage = partial_dir(out)
    _check_writable(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory; choose another --out")
    if stage.exists() and not stage.is_dir():
        raise NotADirectoryError(f"{stage} exists and is not a directory; move it away (compress builds the run "
                                 "there)")
    if not args.resume:
        if stage.is_dir():
            if not args.force:
                raise CLIError(f"{stage} holds an unfinished run into {out}; continue it with --resume (and the "
                               "original arguments), or pass --force to discard it and start over")
            foreign = _foreign_entries(stage)
            if foreign:
                raise CLIError(f"{stage} holds files vpsurgery did not write ({', '.join(foreign[:5])}); move them")
        _check_replaceable(out, args.force)
        return Stage(out, stage, fresh=True, finished=False)
    if stage.is_dir():
        source = stage
    elif out.is_dir() and (out / CHECKPOINTS).is_dir() and not (out / MANIFEST).is_file():
        source = out  # interrupted before run directories were built in DIR.partial
    elif out.is_dir() and _is_finished(out):
        raise CLIError(f"nothing to resume: {out} is a finished run (its {MANIFEST} checks out); drop --resume "
                       "(with --force to redo it)")
    else:
        raise CLIError(f"nothing to resume: neither {stage} nor {out / CHECKPOINTS} exists; drop --resume to start "
                       "a new run")
    before = _read_json(source / CONFIG) if (source / CONFIG).is_file() else {}
    before = before if isinstance(before, dict) else {}
    changed = [k for k in config if before.get(k) != config[k]]
    if changed:
        raise CLIError(f"--resume with different {', '.join(changed)} than the run in {source} "
                       f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); repeat the original arguments")
    if source is stage:
        _check_replaceable(out, args.force)
        return Stage(out, stage, fresh=False, finished=_is_finished(stage))
    return Stage(out, stage, fresh=False, finished=False, adopt=True)


def _open_stage(stage: Stage, config: dict[str, Any]) -> None:
    """Create (or take over) DIR.partial: the first write of the run."""
    from vpsurgery.io import remove_temp_files, temp_dir_beside
    from vpsurgery.reporting import write_json

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


def _finish_stage(stage: Stage, keep_checkpoint: bool) -> None:
    """Manifest, drop the training checkpoint, then rename DIR.partial to DIR (replacing an old run)."""
    from vpsurgery.io import replace_dir, write_manifest

    if not stage.finished:
        write_manifest(stage.dir, exclude=(CHECKPOINTS,))
    if not keep_checkpoint and stage.checkpoint_dir.exists():
        shutil.rmtree(stage.checkpoint_dir)
    replace_dir(stage.dir, stage.out)


def _loaders(inputs: Inputs, args):
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(args.seed)
    train = DataLoader(inputs.train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                       generator=generator, drop_last=len(inputs.train) > args.batch_size)
    val = DataLoader(inputs.val, batch_size=max(args.batch_size, 256), num_workers=args.workers)
    return train, val


def train(gated, inputs: Inputs, args, out: Path, resume: bool | None = None):
    """fit into ``out``/checkpoints; ``resume``: continue from the checkpoint there (default --resume)."""
    resume = args.resume if resume is None else resume
    try:
        from vpsurgery.train import TrainingDiverged, fit
    except ImportError as exc:
        raise CLIError(f"training is unavailable: cannot import vpsurgery.train ({exc})") from exc
    train_loader, val_loader = _loaders(inputs, args)
    try:
        return fit(gated, train_loader, val_loader, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                   device=args.device, checkpoint_dir=out / CHECKPOINTS, resume=resume, seed=args.seed,
                   progress=not args.no_progress, log=log, **_fit_kwargs(args))
    except (ValueError, FileNotFoundError, TrainingDiverged) as exc:
        if isinstance(exc, TrainingDiverged):
            raise CLIError(f"{exc}; lower --lr or --theta-lr") from exc
        # fit validates its arguments and the checkpoint it resumes with ValueError
        raise CLIError(str(exc)) from exc


def export_all(small, dense, example, out: Path, debug: bool) -> None:
    """model.pt2, model.onnx and dense.onnx into ``out``."""
    from vpsurgery.export import export_onnx, export_pt2

    with _quiet(debug):
        log(f"exporting {MODEL_PT2} (torch.export, dynamic batch)")
        export_pt2(small, example, out / MODEL_PT2)
        log(f"exporting {MODEL_ONNX} and {DENSE_ONNX} (dynamic batch)")
        export_onnx(small, example, out / MODEL_ONNX)
        export_onnx(dense, example, out / DENSE_ONNX)


def check_onnx(onnx_path: Path, small, dense_onnx: Path | None, input_shape, args) -> tuple[dict, dict | None]:
    """onnxruntime vs torch on random inputs, and (with a dense ONNX) the latency comparison."""
    from dataclasses import asdict

    from vpsurgery.export import compare_latency, verify_onnx

    log(f"checking {onnx_path.name} in onnxruntime against the torch model")
    with _quiet(args.debug):
        result = verify_onnx(onnx_path, small, example_batch(input_shape), rtol=args.rtol, atol=args.atol, strict=False)
    verification = {**asdict(result), "rtol": args.rtol, "atol": args.atol}
    if dense_onnx is None or not dense_onnx.is_file() or args.repeats < 1:
        return verification, None
    log(f"timing {dense_onnx.name} vs {onnx_path.name} in onnxruntime ({args.repeats} runs each)")
    shape = (args.latency_batch, *input_shape[1:])
    latency = compare_latency(dense_onnx, onnx_path, shape, repeats=args.repeats)
    return verification, {**latency, "batch": args.latency_batch, "repeats": args.repeats}


def _structure(dense_gated, small) -> dict[str, Any]:
    import vpsurgery

    before, after = vpsurgery.plan(dense_gated), vpsurgery.plan(small)
    return {"removed_sections": sorted(after.removed_sections), "sections_before": sorted(before.sections),
            "depth_before": before.depth, "depth_after": after.depth}


def cmd_compress(args) -> int:
    import vpsurgery
    from vpsurgery import reporting as rep
    from vpsurgery.io import atomic_save

    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    config = {"model": args.model, "data": args.data, "image_size": args.image_size,
              "checkpoint": str(checkpoint.resolve()) if checkpoint else None, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer, "seed": args.seed,
              **_fit_kwargs(args)}
    stage = _plan_stage(args, config)  # refuses a bad --out / --resume before any work
    if stage.finished:  # killed after the run was complete, before its rename to DIR
        log(f"{stage.dir} is complete; moving it to {stage.out}")
        _finish_stage(stage, args.keep_checkpoint)
        print_run_summary(_read_json(stage.out / REPORT_JSON), stage.out, layers=args.show_layers)
        return EXIT_OK
    inputs = load_inputs(args)
    example = example_batch(inputs.input_shape)
    log(f"tracing {inputs.spec} on input {inputs.input_shape}")
    gated = vpsurgery.wrap(inputs.model, example)
    log(vpsurgery.report(gated).splitlines()[0])

    _open_stage(stage, config)  # the first write of the run: DIR.partial/config.json
    out = stage.dir
    started = time.perf_counter()
    result = train(gated, inputs, args, out, resume=(stage.checkpoint_dir / "last.pt").is_file())
    seconds = time.perf_counter() - started
    small = vpsurgery.shrink(result.model).cpu().eval()
    dense = inputs.model.cpu().eval()

    for entry in out.iterdir():  # outputs of an interrupted attempt: rebuilt below from the checkpoint
        if entry.name in KNOWN_ENTRIES - {CONFIG, CHECKPOINTS}:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    atomic_save(small.state_dict(), out / WEIGHTS)
    rep.write_json(out / KEPT_MAP, vpsurgery.kept_map(small))
    export_all(small, dense, example, out, args.debug)
    verification, latency = check_onnx(out / MODEL_ONNX, small, out / DENSE_ONNX, inputs.input_shape, args)

    x1 = example[0][:1]
    report = {
        "format": 1,
        "vpsurgery_version": vpsurgery.__version__,
        "model": {**inputs.spec.to_json(), "spec": args.model},
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256(checkpoint) if checkpoint else None,
        "data": {"spec": args.data, "name": inputs.data.name, "num_classes": inputs.data.num_classes,
                 "channels_repeated": inputs.channels_repeated, "mean": inputs.data.mean, "std": inputs.data.std},
        "input_shape": list(inputs.input_shape),
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
                     "seed": args.seed, "device": args.device, "hyperparameters": _fit_kwargs(args),
                     "seconds": seconds},
        "history": result.history,
        "totals": rep.summary(dense, small, x1),
        "structure": _structure(gated, small),
        "layers": rep.layer_rows(dense, small, x1),
        "verification": verification,
        "latency": latency,
        "files": {"pt2": MODEL_PT2, "onnx": MODEL_ONNX, "dense_onnx": DENSE_ONNX, "weights": WEIGHTS,
                  "kept_map": KEPT_MAP, "report": REPORT_MD, "manifest": MANIFEST},
    }
    rep.write_report(out, report)
    if not verification["passed"]:
        print_run_summary(report, out, layers=args.show_layers)
        raise _Failed(f"the ONNX model does not match the torch model: {verification['detail']}; the run stays in "
                      f"{out} ({stage.out} is unchanged)")
    _finish_stage(stage, args.keep_checkpoint)
    print_run_summary(report, stage.out, layers=args.show_layers)
    return EXIT_OK


class _Failed(Exception):
    """The work ran but its check failed (exit code 1)."""


def print_run_summary(report: dict[str, Any], out: Path, layers: bool) -> None:
    from vpsurgery import reporting as rep

    history = report.get("history") or []
    print(f"\n{report['model']['spec']} on {report['data']['spec']}, input {tuple(report['input_shape'])}")
    print(rep.totals_table(report["totals"], {"val_acc": history[-1].get("val_acc") if history else None}))
    structure = report["structure"]
    print(f"residual sections removed: {len(structure['removed_sections'])} of {len(structure['sections_before'])}; "
          f"depth {structure['depth_before']} -> {structure['depth_after']} conv/linear layers")
    if layers:
        print(rep.layer_table(report["layers"]))
    print(rep.verification_line(report["verification"], report.get("latency")))
    kept = f", {CHECKPOINTS}/" if (out / CHECKPOINTS).is_dir() else ""
    print(f"wrote {out}/: {MODEL_PT2}, {MODEL_ONNX}, {DENSE_ONNX}, {KEPT_MAP}, {WEIGHTS}, {REPORT_JSON}, {REPORT_MD}, "
          f"{MANIFEST}{kept}")


# ======================================================================== export / verify / inspect

def cmd_export(args) -> int:
    from vpsurgery.export import export_onnx, export_pt2
    from vpsurgery.io import replace_dir, temp_dir_beside, write_manifest
    from vpsurgery.reporting import write_json

    out = Path(args.out)
    _check_replaceable(out, args.force, what="export")
    _check_writable(out)
    run = load_run(args.source, args.model)
    if out.resolve() == run.dir.resolve():
        raise CLIError(f"--out {out} is the run directory itself; export into another directory")
    example = example_batch(run.input_shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    # built whole in a temporary sibling, then renamed to --out: never a mix of two exports
    stage = temp_dir_beside(out)
    try:
        with _quiet(args.debug):
            log(f"exporting {out / MODEL_PT2}")
            export_pt2(run.small, example, stage / MODEL_PT2)
            log(f"exporting {out / MODEL_ONNX}")
            export_onnx(run.small, example, stage / MODEL_ONNX)
        verification, _ = check_onnx(stage / MODEL_ONNX, run.small, None, run.input_shape, _no_latency(args))
        if not verification["passed"]:
            print(_verification_text(verification))
            raise _Failed(f"the ONNX model does not match the torch model: {verification['detail']}; nothing written")
        write_json(stage / EXPORT_JSON, {"source_run": str(run.dir.resolve()), "input_shape": list(run.input_shape),
                                         "model": run.report["model"], "verification": verification})
        write_manifest(stage)
        replace_dir(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote {out / MODEL_PT2} and {out / MODEL_ONNX} (input shape {run.input_shape}, dynamic batch)")
    print(_verification_text(verification))
    return EXIT_OK


def _no_latency(args):
    return argparse.Namespace(**{**vars(args), "repeats": 0, "rtol": getattr(args, "rtol", 1e-4),
                                 "atol": getattr(args, "atol", 1e-5), "latency_batch": 1})


def _verification_text(verification: dict[str, Any]) -> str:
    return f"onnxruntime check {'PASSED' if verification['passed'] else 'FAILED'}: {verification['detail']}"


def _check_onnx_file(path: Path) -> None:
    import onnx

    if path.is_dir():
        raise CLIError(f"{path} is a directory; pass the .onnx file itself, e.g. {path / MODEL_ONNX}")
    if not path.is_file():
        raise CLIError(f"{path} does not exist; pass the .onnx file written by `vpsurgery compress` or `export`")
    if path.stat().st_size == 0:
        raise CLIError(f"{path} is empty (0 bytes), not an ONNX model; re-export it")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CLIError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from exc
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise CLIError(f"{path} holds no ONNX graph (no nodes, inputs or outputs); re-export it")


def cmd_verify(args) -> int:
    from vpsurgery import reporting as rep

    from vpsurgery.io import check_manifest

    onnx_path = Path(args.onnx)
    _check_onnx_file(onnx_path)
    reference = Path(args.reference) if args.reference else onnx_path.parent
    run = load_run(reference, args.model)
    if (onnx_path.parent / MANIFEST).is_file() and onnx_path.parent.resolve() != run.dir.resolve():
        check_manifest(onnx_path.parent)  # an export directory: its files must be what export wrote
    verification, latency = check_onnx(onnx_path, run.small, run.dir / DENSE_ONNX, run.input_shape, args)
    ratio = run.report["totals"]["ratio"]
    print(f"{onnx_path} vs the compressed torch model of {run.dir} (input {run.input_shape})")
    print(rep.verification_line(verification, latency))
    print(f"FLOPs: compressed / dense = {ratio['flops']:.1%}; parameters {ratio['params']:.1%}")
    if latency is None:
        print(f"(no latency comparison: {run.dir / DENSE_ONNX} is missing or --repeats 0)")
    if not verification["passed"]:
        raise _Failed(f"{onnx_path} does not match the torch model: {verification['detail']}")
    return EXIT_OK


def _inspect_model(args) -> None:
    import vpsurgery
    from vpsurgery import reporting as rep
    from vpsurgery.specs import parse_spec

    spec = parse_spec(args.target)
    model = spec.build().eval()
    if args.input_shape:
        shape = args.input_shape
    elif spec.registry:
        from vpsurgery.models import default_input_shape

        shape = default_input_shape(spec.name)
    else:
        shape = DEFAULT_INSPECT_SHAPE
    example = example_batch(shape)
    gated = vpsurgery.wrap(model, example)
    flops = rep.count_flops(model, example[0][:1])[0]
    print(f"{spec}, input {tuple(shape)}: {rep.human(rep.n_params(model))} parameters, {rep.human(flops)} FLOPs")
    print(vpsurgery.report(gated))
    print(rep.layer_table(rep.layer_rows(model, None, example[0][:1])))


def _inspect_run(args) -> None:
    import vpsurgery
    from vpsurgery import reporting as rep

    run = load_run(args.target, args.model)
    x = example_batch(run.input_shape)
    gated = vpsurgery.wrap(run.dense, x)
    removed = run.report.get("structure", {}).get("removed_sections", [])
    print(f"run {run.dir}: {run.report['model']['spec']}, input {run.input_shape}")
    print("dense model as analysed by wrap:")
    print(vpsurgery.report(gated))
    print(f"removed residual sections: {', '.join(removed) or 'none'}")
    print(rep.totals_table(rep.summary(run.dense, run.small, x[0][:1])))
    print(rep.layer_table(rep.layer_rows(run.dense, run.small, x[0][:1])))


def cmd_inspect(args) -> int:
    target = Path(args.target)
    if target.is_dir() or (target.is_file() and target.suffix == ".pt"):
        _inspect_run(args)
    elif ":" not in args.target:
        raise CLIError(f"{target} is neither a run directory nor a model spec ({SPEC_FORMS_TEXT})"
                       + _unfinished_hint(target))
    else:
        if args.model:
            raise CLIError("--model is for inspecting a run directory; give the MODEL spec as the argument")
        _inspect_model(args)
    return EXIT_OK


# ======================================================================== demo

def _fresh_demo_dir(base: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = base / f"demo-{stamp}", 1
    while candidate.exists():
        candidate, n = base / f"demo-{stamp}-{n}", n + 1
    return candidate


def cmd_demo(args) -> int:
    out = Path(args.out) if args.out else _fresh_demo_dir(Path("runs"))
    argv = ["compress", DEMO_MODEL, "--data", DEMO_DATA, "--image-size", str(DEMO_IMAGE_SIZE),
            "--epochs", str(args.epochs), "--batch-size", str(DEMO_BATCH_SIZE), "--out", str(out), "--show-layers",
            "--device", args.device, "--optimizer", DEMO_OPTIMIZER, "--lr", str(DEMO_LR)]
    if "price" in fit_options():
        argv += ["--price", str(args.price)]
    if args.debug:
        argv.append("--debug")
    log(f"demo: vpsurgery {' '.join(argv)}")
    return cmd_compress(build_parser().parse_args(argv))


# ======================================================================== parser

def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and exporter output")


def _add_check_options(parser: argparse.ArgumentParser, latency: bool = True) -> None:
    parser.add_argument("--rtol", type=NONNEGATIVE_FLOAT, default=1e-4,
                        help="relative tolerance of the ONNX check (default 1e-4)")
    parser.add_argument("--atol", type=NONNEGATIVE_FLOAT, default=1e-5,
                        help="absolute tolerance of the ONNX check (default 1e-5)")
    if latency:
        parser.add_argument("--repeats", type=NONNEGATIVE_INT, default=30,
                            help="onnxruntime runs per model for the median latency (0: skip timing; default 30)")
        parser.add_argument("--latency-batch", type=POSITIVE_INT, default=1,
                            help="batch size of the latency runs (default 1)")


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="SPEC",
                        help="the MODEL spec the run was compressed with; needed (and checked against report.json) "
                             "when it is a package.module:factory, whose code is never imported from a run directory")


def _compress_parser(sub) -> None:
    from vpsurgery.data import SPECS
    from vpsurgery.specs import SPEC_HELP

    p = sub.add_parser("compress", help="prune a model while training, then shrink, export and verify it",
                       description="Wrap MODEL with gates, train it with pruning, shrink it, export it to PT2 and "
                                   "ONNX and check the ONNX file against torch.\n\n" + RUN_DIR_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP + "; num_classes defaults to the dataset's")
    p.add_argument("--data", required=True, help=f"dataset: {', '.join(SPECS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write (must be new or empty)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="dense weights to start from: a state_dict or {'model': state_dict} (loaded weights_only)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier run in DIR (only once the new run is complete; a DIR holding files "
                        "vpsurgery did not write is refused), or discard an unfinished DIR" + PARTIAL)
    p.add_argument("--resume", action="store_true",
                   help=f"finish an interrupted run: continue from DIR{PARTIAL}/{CHECKPOINTS}/ (same arguments)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help=f"keep the last training checkpoint in DIR/{CHECKPOINTS}/ (default: deleted once the run "
                        "is complete; it is not needed to use the model)")
    p.add_argument("--download", action="store_true", help="download mnist/cifar10 into the data directory if absent")
    p.add_argument("--epochs", type=POSITIVE_INT, default=10, help="training epochs (default 10)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="default 128")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=_fit_default("lr", 0.05), help="learning rate (default: fit's)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=_fit_default("optimizer", "sgd"))
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    p.add_argument("--image-size", type=POSITIVE_INT,
                   help="resize images to SxS (default: the model's or the dataset's)")
    p.add_argument("--workers", type=NONNEGATIVE_INT, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the initialisation and data order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--show-layers", action="store_true", help="print the per-layer before/after table")
    _add_check_options(p)
    _add_common(p)
    _add_fit_options(p)
    p.set_defaults(run=cmd_compress)


def build_parser() -> argparse.ArgumentParser:
    from vpsurgery.specs import SPEC_HELP

    parser = _Parser(
        prog="vpsurgery", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Structured pruning compiler on torch.fx: train with channel and residual-section gates, "
                    "then emit a genuinely smaller model (PT2 and ONNX).",
        epilog="Exit codes: 0 success, 1 a check failed or an internal error, 2 bad input, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _compress_parser(sub)

    p = sub.add_parser("export", help="turn a compressed run into model.pt2 and model.onnx",
                       description="Rebuild the compressed model of a run and export it.\n\nSOURCE is a run "
                                   f"directory or a weights file inside one (e.g. RUN/{WEIGHTS}).\n\n" + RUN_DIR_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_DIR_or_CHECKPOINT")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write model.pt2 and model.onnx")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export in DIR (a DIR holding other files is refused)")
    _add_model_option(p)
    _add_check_options(p, latency=False)
    _add_common(p)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("verify", help="check an ONNX file against the torch model and time it",
                       description="Run MODEL.onnx in onnxruntime on random inputs of the run's recorded input shape "
                                   "(batch 1 and 3), compare with the compressed torch model (max abs/rel error, must "
                                   "be within atol + rtol * max|ref|), and time it against the run's dense.onnx "
                                   "(median latency) next to the FLOP ratio.\n\nThe reference is the run directory "
                                   "--reference, by default the directory holding MODEL.onnx.\n\n" + RUN_DIR_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("--reference", metavar="RUN_DIR", help="the run directory (default: MODEL.onnx's directory)")
    _add_model_option(p)
    _add_check_options(p)
    _add_common(p)
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("inspect", help="what wrap finds in a model, or dense vs compressed for a run",
                       description="For a MODEL spec: channel groups, residual sections and gates, what is unprunable "
                                   "and why, and per-layer channels, parameters and FLOPs.\nFor a run directory: the "
                                   "same, dense vs compressed.\n\nMODEL: " + SPEC_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="MODEL-or-DIR")
    p.add_argument("--input-shape", type=_parse_shape, metavar="N,C,H,W",
                   help="input shape for a MODEL spec (default: the reference net's, else 1,3,64,64)")
    _add_model_option(p)
    _add_common(p)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("demo", help=f"compress {DEMO_MODEL} on {DEMO_DATA} end to end on the CPU (a few minutes)",
                       description=f"Runs `compress {DEMO_MODEL} --data {DEMO_DATA} --image-size {DEMO_IMAGE_SIZE}` "
                                   "into a fresh ./runs/demo-<timestamp> and prints a before/after table and the "
                                   "onnxruntime verification.")
    p.add_argument("--out", metavar="DIR", help="run directory (default: a new ./runs/demo-<timestamp>)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=DEMO_EPOCHS, help=f"default {DEMO_EPOCHS}")
    p.add_argument("--device", type=_device, default="cpu", help="default cpu")
    p.add_argument("--price", type=NONNEGATIVE_FLOAT, default=DEMO_PRICE,
                   help=f"regulariser price (default {DEMO_PRICE})")
    _add_common(p)
    p.set_defaults(run=cmd_demo)
    return parser


# ======================================================================== main

def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's message
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].replace(".", "").isidentifier() \
            else last
    return " ".join(text.split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except KeyboardInterrupt:
        print("vpsurgery: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _Failed):
            print(f"vpsurgery: check failed: {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, _user_errors()):
            print(f"vpsurgery: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"vpsurgery: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
