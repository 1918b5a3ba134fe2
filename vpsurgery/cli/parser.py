"""The command line's arguments: `build_parser`, `parse_args` and every check that runs while
parsing, so a bad value ends the program before anything is read or written, with one line naming
the option (argparse: "argument --batch-size: ...").

compress's method options are generated from the fields of vpsurgery.config.FitConfig (their help,
type, choices and range, checked by vpsurgery.config.check_value), so a new setting there is a new
--option here with no change to this file. The CLI sets epochs, lr, optimizer and seed with its own
flags, with FitConfig's defaults, and has its own defaults for the budget (`target`, `per`): a
plain `compress` always compresses, to DEFAULT_TARGET of the dense FLOPs.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any

from vpsurgery.cli.errors import EXIT_USAGE
from vpsurgery.cli.rundir import CHECKPOINTS, PARTIAL, RUN_DIR_HELP, WEIGHTS
from vpsurgery.config import FitConfig, check_value

DEMO_MODEL = "vpsurgery:resnet20:width=0.5"
DEMO_DATA = "digits"
DEMO_IMAGE_SIZE = 8  # digits' native size: ~1 s per epoch on 2 CPU cores
DEMO_EPOCHS = 40  # measured: 24.8% of the FLOPs, 42.1% of the parameters, 5 of 9 blocks removed, 97.8% val
DEMO_BATCH_SIZE = 64
DEMO_OPTIMIZER, DEMO_LR = "adam", 0.003
DEMO_TARGET, DEMO_PER = 0.25, "flops"  # the main job: ask for a budget, get it
DEFAULT_INSPECT_SHAPE = (1, 3, 64, 64)

# FitConfig settings with compress's own flags (below); every other field is generated.
OWN_SETTINGS = ("epochs", "lr", "optimizer", "seed")
# compress's budget: without --target and --price it keeps DEFAULT_TARGET of the dense FLOPs;
# `--target none`, or a --price without --target, prunes at a fixed price (FitConfig's `per`).
DEFAULT_TARGET = 0.5
DEFAULT_PER_WITH_TARGET = "flops"
NOT_GIVEN = argparse.SUPPRESS  # a generated option the user did not pass is absent from the namespace
_CLI_NOTES = {
    "target": f"; compress's default: {DEFAULT_TARGET:g} (of the dense {DEFAULT_PER_WITH_TARGET}); `none` prunes at "
              "--price instead, as does a --price without --target",
    "per": f"; compress's default: {DEFAULT_PER_WITH_TARGET} with a target, "
           f"{FitConfig.__dataclass_fields__['per'].default} at a --price",
    "price": f"; default: {FitConfig.__dataclass_fields__['price'].default}; passing it without --target selects "
             "price mode",
}


# ======================================================================== argument types

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


def device(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps, present on this machine."""
    if text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here; use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), cuda:0..{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: device type {dev.type!r} is not supported; "
                                         "use auto, cpu, cuda, cuda:N or mps")
    return text


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write e.g. 1,3,64,64")
    return dims


_KIND_TEXT = {int: "an integer", float: "a number", str: "a string"}


def setting_type(f: Field) -> Callable[[str], Any]:
    """An argparse type for FitConfig field ``f``: its kind, then vpsurgery.config.check_value
    (range, choices); `none` for a setting whose default is None."""
    kind, optional = f.metadata["kind"], f.default is None

    def parse(text: str):
        if optional and text.strip().lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KIND_TEXT.get(kind, 'a value')}"
                                             f"{' or none' if optional else ''}, got {text!r}") from None
        try:
            return check_value(f.name, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind.__name__
    return parse


def _default(name: str):
    f = FitConfig.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else None


def method_fields() -> list[Field]:
    """The FitConfig fields that are generated --options of compress."""
    return [f for f in fields(FitConfig) if f.name not in OWN_SETTINGS]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `vpsurgery: error: argument --x: ... (see ... --help)`."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"vpsurgery: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


# ======================================================================== options

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


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One --option per FitConfig field (but OWN_SETTINGS), from its metadata."""
    group = parser.add_argument_group(
        "method hyperparameters (vpsurgery.config.FitConfig, passed to vpsurgery.train.fit)")
    for f in method_fields():
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        note = _CLI_NOTES.get(f.name, "" if "default" in meta.get("help", "") else f"; default: {_default(f.name)}")
        text = (meta.get("help", "") + note).replace("%", "%%")
        if meta["kind"] is bool:
            group.add_argument(flag, dest=f"fit_{f.name}", action=argparse.BooleanOptionalAction, default=NOT_GIVEN,
                               help=text)
            continue
        choices = meta.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else meta["kind"].__name__.upper()
        if f.default is None and not choices:
            metavar += "|none"
        group.add_argument(flag, dest=f"fit_{f.name}", type=setting_type(f), default=NOT_GIVEN, metavar=metavar,
                           help=text)


def method_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The FitConfig settings of a compress run (every field but OWN_SETTINGS): what was passed,
    else compress's budget defaults, else FitConfig's."""
    given = {f.name: getattr(args, f"fit_{f.name}") for f in method_fields() if hasattr(args, f"fit_{f.name}")}
    settings = {f.name: given.get(f.name, _default(f.name)) for f in method_fields()}
    if "target" in given:
        if given["target"] is not None and "price" in given:
            parser.error("argument --price: not used with --target SHARE (the price is then found during training); "
                         "pass --target none to prune at a fixed --price")
    else:
        settings["target"] = None if "price" in given else DEFAULT_TARGET
    if "per" not in given and settings["target"] is not None:
        settings["per"] = DEFAULT_PER_WITH_TARGET
    return settings


def _compress_parser(sub) -> argparse.ArgumentParser:
    from vpsurgery.data import SPECS
    from vpsurgery.specs import SPEC_HELP

    p = sub.add_parser("compress", help="prune a model while training, then shrink, export and verify it",
                       description="Wrap MODEL with gates, train it with pruning, shrink it, export it to PT2 and "
                                   "ONNX and check the ONNX file against torch.\n\n"
                                   f"By default the compressed model keeps {DEFAULT_TARGET:g} of the dense model's "
                                   "FLOPs (--target, --per); --target none (or a --price without --target) prunes at "
                                   "a fixed price instead. A run that ends outside its target by more than 10%, "
                                   "whose val accuracy is at chance level, or (at a price) that removed nothing, "
                                   "exits with 1; its run directory is still written.\n\n" + RUN_DIR_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=SPEC_HELP + "; num_classes defaults to the dataset's")
    p.add_argument("--data", required=True, help=f"dataset: {', '.join(SPECS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write (must be new or empty)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="dense weights to start from: a state_dict or {'model': state_dict} (loaded weights_only); "
                        "their val accuracy is measured and reported beside the compressed model's")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier run in DIR (only once the new run is complete; a DIR holding files "
                        "vpsurgery did not write is refused), or discard an unfinished DIR" + PARTIAL)
    p.add_argument("--resume", action="store_true",
                   help=f"finish an interrupted run: continue from DIR{PARTIAL}/{CHECKPOINTS}/ (same arguments)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help=f"keep the last training checkpoint in DIR/{CHECKPOINTS}/ (default: deleted once the run "
                        "is complete; it is not needed to use the model)")
    p.add_argument("--download", action="store_true", help="download mnist/cifar10 into the data directory if absent")
    p.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                   help="how the model becomes a graph: torch.fx, torch.export, or auto (fx; export where fx "
                        "cannot trace or sees less; default auto)")
    p.add_argument("--epochs", type=setting_type(FitConfig.__dataclass_fields__["epochs"]),
                   default=_default("epochs"), help=f"training epochs (default {_default('epochs')})")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="default 128")
    p.add_argument("--lr", type=setting_type(FitConfig.__dataclass_fields__["lr"]), default=_default("lr"),
                   help=f"learning rate (default {_default('lr')})")
    p.add_argument("--optimizer", choices=FitConfig.__dataclass_fields__["optimizer"].metadata["choices"],
                   default=_default("optimizer"), help=f"optimizer of the weights (default {_default('optimizer')})")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    p.add_argument("--image-size", type=POSITIVE_INT,
                   help="resize images to SxS (default: the model's or the dataset's)")
    p.add_argument("--workers", type=NONNEGATIVE_INT, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--seed", type=SEED, default=_default("seed"),
                   help=f"seed of the initialisation and data order (default {_default('seed')})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--show-layers", action="store_true", help="print the per-layer before/after table")
    _add_check_options(p)
    _add_common(p)
    _add_method_options(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    from vpsurgery.specs import SPEC_HELP

    parser = _Parser(
        prog="vpsurgery", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Structured pruning compiler on torch.fx: train with channel and residual-section gates, "
                    "then emit a genuinely smaller model (PT2 and ONNX).",
        epilog="Exit codes: 0 success, 1 a check failed, the compression missed its goal or an internal error, "
               "2 bad input, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {"compress": _compress_parser(sub)}

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

    p = sub.add_parser("inspect", help="what wrap finds in a model, or dense vs compressed for a run",
                       description="For a MODEL spec: channel groups, residual sections and gates, what is unprunable "
                                   "and why, and per-layer channels, parameters and FLOPs.\nFor a run directory: the "
                                   "same, dense vs compressed.\n\nMODEL: " + SPEC_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="MODEL-or-DIR")
    p.add_argument("--input-shape", type=shape, metavar="N,C,H,W",
                   help="input shape for a MODEL spec (default: the reference net's, else 1,3,64,64)")
    _add_model_option(p)
    _add_common(p)

    p = sub.add_parser("demo", help=f"compress {DEMO_MODEL} on {DEMO_DATA} end to end on the CPU (a few minutes)",
                       description=f"Runs `compress {DEMO_MODEL} --data {DEMO_DATA} --image-size {DEMO_IMAGE_SIZE}` "
                                   "into a fresh ./runs/demo-<timestamp> and prints a before/after table and the "
                                   "onnxruntime verification.")
    p.add_argument("--out", metavar="DIR", help="run directory (default: a new ./runs/demo-<timestamp>)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=DEMO_EPOCHS, help=f"default {DEMO_EPOCHS}")
    p.add_argument("--device", type=device, default="cpu", help="default cpu")
    p.add_argument("--target", type=float, default=DEMO_TARGET,
                   help=f"share of the dense model's {DEMO_PER} to keep (default {DEMO_TARGET})")
    _add_common(p)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed arguments; for compress, ``settings``: its FitConfig settings but OWN_SETTINGS.
    SystemExit (code 2, one line on stderr) for anything wrong."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compress":
        args.settings = method_settings(args, parser.commands["compress"])
        for f in method_fields():
            if hasattr(args, f"fit_{f.name}"):
                delattr(args, f"fit_{f.name}")
    return args
