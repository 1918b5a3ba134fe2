"""The commands: compress, export, verify, inspect, demo. Each loads what it needs, calls wrap /
fit / shrink / export, and reports; what a run directory holds, and how it is built and read back,
is rundir's. Heavy modules (torch.onnx, onnxruntime, torchvision, matplotlib) are imported where a
command needs them, not before.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vpsurgery.cli import parser as cli_parser
from vpsurgery.cli import rundir as rd
from vpsurgery.cli.errors import EXIT_OK, CheckFailed, CLIError, CompressionFailed

SPEC_FORMS_TEXT = "vpsurgery:NAME, torchvision:NAME or package.module:factory"
# A compression run fails (exit 1) when its share of the dense cost is off the target by more than
# this share of the target ...
TARGET_TOLERANCE = 0.1
# ... or when its val accuracy is at most chance (1 / classes) plus this margin: min(0.05, half of
# chance), i.e. 15% for 10 classes, 55% for 2, 0.15% for 1000.
CHANCE_MARGIN, CHANCE_MARGIN_SHARE = 0.05, 0.5
NOTHING_REMOVED = 0.999  # at a price: a share above this means nothing was removed


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


# ======================================================================== loading

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
    from vpsurgery.io import load_weights
    from vpsurgery.specs import ModelSpec, parse_spec

    spec = parse_spec(args.model)
    image_size = args.image_size if args.image_size is not None else _registry_image_size(spec)
    data = load_data(args.data, image_size=image_size, download=args.download, seed=args.seed)
    _check_split_sizes(data, args)
    channels = data.input_shape[0]
    defaults = dict(zip(rd.DATA_DEFAULTS, (data.num_classes, channels, math.prod(data.input_shape))))
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


def _loaders(inputs: Inputs, args):
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(args.seed)
    train = DataLoader(inputs.train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                       generator=generator, drop_last=len(inputs.train) > args.batch_size)
    val = DataLoader(inputs.val, batch_size=max(args.batch_size, 256), num_workers=args.workers)
    return train, val


def _torch_device(name: str):
    """The device fit trains on for --device (auto: the first CUDA device, else the CPU)."""
    import torch

    if name != "auto":
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ======================================================================== compress

def fit_config(args):
    """The run's vpsurgery.config.FitConfig: compress's own flags and the method settings."""
    from vpsurgery.config import FitConfig

    return FitConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, seed=args.seed, **args.settings)


def _check_budget(gated, config, n_train: int) -> None:
    """Refuse a target the model cannot reach (pinned channels, unprunable layers) before anything is
    written: the Pruner checks it when it is made, and making one changes nothing."""
    if config.target is None:
        return
    from vpsurgery.train import Pruner

    try:
        Pruner(gated, n_train, steps_per_epoch=1, config=config)
    except ValueError as exc:
        raise CLIError(f"--target: {exc}") from exc


def train(gated, loaders, config, args, stage: rd.Stage):
    """fit into the stage's checkpoints/ (continuing from the checkpoint there, if any)."""
    from vpsurgery.train import TrainingDiverged, fit

    train_loader, val_loader = loaders
    try:
        return fit(gated, train_loader, val_loader, config, device=args.device, checkpoint_dir=stage.checkpoint_dir,
                   resume=stage.has_checkpoint, progress=not args.no_progress, log=log)
    except (ValueError, FileNotFoundError, TrainingDiverged) as exc:
        if isinstance(exc, TrainingDiverged):
            raise CLIError(f"{exc}; lower --lr or --theta-lr") from exc
        # fit validates its arguments and the checkpoint it resumes with ValueError
        raise CLIError(str(exc)) from exc


def export_all(small, dense, example, out: Path, debug: bool) -> None:
    """model.pt2, model.onnx and dense.onnx into ``out``."""
    from vpsurgery.export import export_onnx, export_pt2

    with _quiet(debug):
        log(f"exporting {rd.MODEL_PT2} (torch.export, dynamic batch)")
        export_pt2(small, example, out / rd.MODEL_PT2)
        log(f"exporting {rd.MODEL_ONNX} and {rd.DENSE_ONNX} (dynamic batch)")
        export_onnx(small, example, out / rd.MODEL_ONNX)
        export_onnx(dense, example, out / rd.DENSE_ONNX)


def check_onnx(onnx_path: Path, small, dense_onnx: Path | None, input_shape, *, rtol: float, atol: float,
               repeats: int = 0, latency_batch: int = 1, debug: bool = False) \
        -> tuple[rd.Verification, rd.Latency | None]:
    """onnxruntime vs torch on random inputs, and (with a dense ONNX) the latency comparison."""
    from vpsurgery.export import compare_latency, verify_onnx

    log(f"checking {onnx_path.name} in onnxruntime against the torch model")
    with _quiet(debug):
        result = verify_onnx(onnx_path, small, rd.example_batch(input_shape), rtol=rtol, atol=atol, strict=False)
    verification = rd.Verification.of(result, rtol, atol)
    if dense_onnx is None or not dense_onnx.is_file() or repeats < 1:
        return verification, None
    log(f"timing {dense_onnx.name} vs {onnx_path.name} in onnxruntime ({repeats} runs each)")
    times = compare_latency(dense_onnx, onnx_path, (latency_batch, *input_shape[1:]), repeats=repeats)
    return verification, rd.Latency(times["dense_ms"], times["small_ms"], times["speedup"], latency_batch, repeats)


def _structure(dense_gated, small) -> rd.Structure:
    import vpsurgery

    before, after = vpsurgery.plan(dense_gated), vpsurgery.plan(small)
    return rd.Structure(sorted(after.removed_sections), sorted(before.sections), before.depth, after.depth)


def chance_level(num_classes: int) -> float:
    """The val accuracy at or below which a classifier is taken to have learnt nothing."""
    chance = 1.0 / max(num_classes, 1)
    return chance + min(CHANCE_MARGIN, CHANCE_MARGIN_SHARE * chance)


def judge(config, share: float, price: float | None, val_acc: float | None, dense_val_acc: float | None,
          num_classes: int) -> rd.Outcome:
    """Whether the run did its job: the share of the dense cost within TARGET_TOLERANCE of the
    target (at a price: something removed), and a val accuracy above chance level."""
    problems = []
    if config.target is not None:
        if abs(share - config.target) > TARGET_TOLERANCE * config.target:
            problems.append(f"the compressed model keeps {share:.1%} of the dense {config.per}, not the target "
                            f"{config.target:.1%} (+-{TARGET_TOLERANCE:.0%} of it)")
    elif share > NOTHING_REMOVED:
        problems.append(f"nothing was removed at --price {config.price:g} (it keeps {share:.1%} of the dense "
                        f"{config.per}); raise --price or give a --target")
    chance = chance_level(num_classes)
    if val_acc is not None and val_acc <= chance:
        problems.append(f"its val accuracy {val_acc:.1%} is at chance level (<= {chance:.1%} for {num_classes} "
                        "classes): it has learnt nothing; train longer, lower --lr, or ask for a larger --target")
    return rd.Outcome(config.per, config.target, price, share, TARGET_TOLERANCE, val_acc, dense_val_acc, chance,
                      tuple(problems))


def _run_config(args) -> dict[str, Any]:
    """config.json: the arguments that make the run (a --resume must repeat them)."""
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    return {"model": args.model, "data": args.data, "image_size": args.image_size,
            "checkpoint": str(checkpoint.resolve()) if checkpoint else None, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer, "seed": args.seed,
            **args.settings}


def cmd_compress(args) -> int:
    import vpsurgery
    from vpsurgery import reporting as rep
    from vpsurgery.io import atomic_save, sha256_file, write_json
    from vpsurgery.train import evaluate, kept_macs, kept_params

    config_json = _run_config(args)
    config = fit_config(args)
    stage = rd.plan_stage(Path(args.out), config_json, resume=args.resume, force=args.force)  # before any work
    if stage.finished:  # killed after the run was complete, before its rename to DIR
        log(f"{stage.dir} is complete; moving it to {stage.out}")
        rd.finish_stage(stage, args.keep_checkpoint)
        report = rd.read_report(stage.out)
        print_run_summary(report, stage.out, layers=args.show_layers)
        return _verdict(report, stage.out)
    inputs = load_inputs(args)
    example = rd.example_batch(inputs.input_shape)
    log(f"tracing {inputs.spec} on input {inputs.input_shape}")
    gated = vpsurgery.wrap(inputs.model, example, capture=getattr(args, "capture", "auto"))
    log(vpsurgery.report(gated).splitlines()[0])
    _check_budget(gated, config, len(inputs.train))
    loaders = _loaders(inputs, args)
    dev = _torch_device(args.device)
    dense_val_acc = None
    if args.checkpoint:
        dense_val_acc = evaluate(inputs.model.to(dev), loaders[1], dev)
        inputs.model.cpu()
        log(f"the dense model of {args.checkpoint}: val accuracy {dense_val_acc:.2%}")

    rd.open_stage(stage, config_json)  # the first write of the run: DIR.partial/config.json
    out = stage.dir
    started = time.perf_counter()
    result = train(gated, loaders, config, args, stage)
    seconds = time.perf_counter() - started
    cost = kept_macs if config.per == "flops" else kept_params
    share = cost(result.model) / max(result.dense_macs if config.per == "flops" else result.dense_params, 1)
    small = vpsurgery.shrink(result.model).eval()
    val_acc = evaluate(small, loaders[1], dev)  # after the final rounding, which the last epoch may precede
    small = small.cpu()
    dense = inputs.model.cpu().eval()

    rd.clear_outputs(stage)  # outputs of an interrupted attempt: rebuilt below from the checkpoint
    atomic_save(small.state_dict(), out / rd.WEIGHTS)
    write_json(out / rd.KEPT_MAP, vpsurgery.kept_map(small))
    export_all(small, dense, example, out, args.debug)
    verification, latency = check_onnx(out / rd.MODEL_ONNX, small, out / rd.DENSE_ONNX, inputs.input_shape,
                                       rtol=args.rtol, atol=args.atol, repeats=args.repeats,
                                       latency_batch=args.latency_batch, debug=args.debug)
    x1 = example[0][:1]
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    report = rd.Report(
        vpsurgery_version=vpsurgery.__version__,
        model=rd.ModelRecord(args.model, inputs.spec.source, inputs.spec.name, dict(inputs.spec.kwargs)),
        checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None,
        data=rd.DataRecord(args.data, inputs.data.name, inputs.data.num_classes, inputs.channels_repeated,
                           tuple(inputs.data.mean), tuple(inputs.data.std)),
        input_shape=tuple(inputs.input_shape),
        training=rd.TrainingRecord(args.epochs, args.batch_size, args.lr, args.optimizer, args.seed, args.device,
                                   dict(args.settings), seconds),
        history=result.history,
        totals=rep.summary(dense, small, x1),
        structure=_structure(gated, small),
        layers=rep.layer_rows(dense, small, x1),
        verification=verification,
        latency=latency,
        outcome=judge(config, share, result.price, val_acc, dense_val_acc, inputs.data.num_classes),
    )
    rd.write_report(out, report)
    if not verification.passed:
        print_run_summary(report, out, layers=args.show_layers)
        raise CheckFailed(f"the ONNX model does not match the torch model: {verification.detail}; the run stays in "
                          f"{out} ({stage.out} is unchanged)")
    rd.finish_stage(stage, args.keep_checkpoint)
    print_run_summary(report, stage.out, layers=args.show_layers)
    return _verdict(report, stage.out)


def _verdict(report: rd.Report, out: Path) -> int:
    """EXIT_OK, or CompressionFailed for a complete run that missed its goal."""
    if report.outcome is not None and not report.outcome.ok:
        raise CompressionFailed(f"{'; '.join(report.outcome.problems)}. The run is complete in {out} (see "
                                f"{out / rd.REPORT_MD}, or `vpsurgery inspect {out}`)")
    return EXIT_OK


def print_run_summary(report: rd.Report, out: Path, layers: bool) -> None:
    from vpsurgery import reporting as rep

    outcome = report.outcome
    print(f"\n{report.model.spec} on {report.data.spec}, input {tuple(report.input_shape)}")
    print(rep.totals_table(report.totals, report.val_acc, outcome.dense_val_acc if outcome else None))
    structure = report.structure
    print(f"residual sections removed: {len(structure.removed_sections)} of {len(structure.sections_before)}; "
          f"depth {structure.depth_before} -> {structure.depth_after} conv/linear layers")
    if layers:
        print(rep.layer_table(report.layers))
    print(rep.verification_line(report.verification, report.latency, outcome))
    if outcome is not None:
        print(rep.outcome_line(outcome))
    kept = f", {rd.CHECKPOINTS}/" if (out / rd.CHECKPOINTS).is_dir() else ""
    print(f"wrote {out}/: {rd.MODEL_PT2}, {rd.MODEL_ONNX}, {rd.DENSE_ONNX}, {rd.KEPT_MAP}, {rd.WEIGHTS}, "
          f"{rd.REPORT_JSON}, {rd.REPORT_MD}, {rd.MANIFEST}{kept}")


# ======================================================================== export / verify / inspect

def _verification_text(verification: rd.Verification) -> str:
    return f"onnxruntime check {'PASSED' if verification.passed else 'FAILED'}: {verification.detail}"


def cmd_export(args) -> int:
    from vpsurgery.export import export_onnx, export_pt2
    from vpsurgery.io import replace_dir, temp_dir_beside, write_json, write_manifest

    out = Path(args.out)
    rd.check_replaceable(out, args.force, what="export")
    rd.check_writable(out)
    run = rd.load_run(args.source, args.model)
    if out.resolve() == run.dir.resolve():
        raise CLIError(f"--out {out} is the run directory itself; export into another directory")
    example = rd.example_batch(run.input_shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    # built whole in a temporary sibling, then renamed to --out: never a mix of two exports
    stage = temp_dir_beside(out)
    try:
        with _quiet(args.debug):
            log(f"exporting {out / rd.MODEL_PT2}")
            export_pt2(run.small, example, stage / rd.MODEL_PT2)
            log(f"exporting {out / rd.MODEL_ONNX}")
            export_onnx(run.small, example, stage / rd.MODEL_ONNX)
        verification, _ = check_onnx(stage / rd.MODEL_ONNX, run.small, None, run.input_shape, rtol=args.rtol,
                                     atol=args.atol, debug=args.debug)
        if not verification.passed:
            print(_verification_text(verification))
            raise CheckFailed(f"the ONNX model does not match the torch model: {verification.detail}; "
                              "nothing written")
        record = rd.ExportRecord(str(run.dir.resolve()), run.input_shape, run.report.model, verification)
        write_json(stage / rd.EXPORT_JSON, record.to_json())
        write_manifest(stage)
        replace_dir(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote {out / rd.MODEL_PT2} and {out / rd.MODEL_ONNX} (input shape {run.input_shape}, dynamic batch)")
    print(_verification_text(verification))
    return EXIT_OK


def _check_onnx_file(path: Path) -> None:
    import onnx

    if path.is_dir():
        raise CLIError(f"{path} is a directory; pass the .onnx file itself, e.g. {path / rd.MODEL_ONNX}")
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
    run = rd.load_run(reference, args.model)
    if (onnx_path.parent / rd.MANIFEST).is_file() and onnx_path.parent.resolve() != run.dir.resolve():
        check_manifest(onnx_path.parent)  # an export directory: its files must be what export wrote
    verification, latency = check_onnx(onnx_path, run.small, run.dir / rd.DENSE_ONNX, run.input_shape,
                                       rtol=args.rtol, atol=args.atol, repeats=args.repeats,
                                       latency_batch=args.latency_batch, debug=args.debug)
    ratio = run.report.totals.ratio
    print(f"{onnx_path} vs the compressed torch model of {run.dir} (input {run.input_shape})")
    print(rep.verification_line(verification, latency))
    print(f"FLOPs: compressed / dense = {ratio.flops:.1%}; parameters {ratio.params:.1%}")
    if latency is None:
        print(f"(no latency comparison: {run.dir / rd.DENSE_ONNX} is missing or --repeats 0)")
    if not verification.passed:
        raise CheckFailed(f"{onnx_path} does not match the torch model: {verification.detail}")
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
        shape = cli_parser.DEFAULT_INSPECT_SHAPE
    example = rd.example_batch(shape)
    gated = vpsurgery.wrap(model, example)
    flops = rep.count_flops(model, example[0][:1])[0]
    print(f"{spec}, input {tuple(shape)}: {rep.human(rep.n_params(model))} parameters, {rep.human(flops)} FLOPs")
    print(vpsurgery.report(gated))
    print(rep.layer_table(rep.layer_rows(model, None, example[0][:1])))


def _inspect_run(args) -> None:
    import vpsurgery
    from vpsurgery import reporting as rep

    run = rd.load_run(args.target, args.model)
    x = rd.example_batch(run.input_shape)
    gated = vpsurgery.wrap(run.dense, x)
    print(f"run {run.dir}: {run.report.model.spec}, input {run.input_shape}")
    print("dense model as analysed by wrap:")
    print(vpsurgery.report(gated))
    print(f"removed residual sections: {', '.join(run.report.structure.removed_sections) or 'none'}")
    outcome = run.report.outcome
    print(rep.totals_table(rep.summary(run.dense, run.small, x[0][:1]), run.report.val_acc,
                           outcome.dense_val_acc if outcome else None))
    if outcome is not None:
        print(rep.outcome_line(outcome))
    print(rep.layer_table(rep.layer_rows(run.dense, run.small, x[0][:1])))


def cmd_inspect(args) -> int:
    target = Path(args.target)
    if target.is_dir() or (target.is_file() and target.suffix == ".pt"):
        _inspect_run(args)
    elif ":" not in args.target:
        raise CLIError(f"{target} is neither a run directory nor a model spec ({SPEC_FORMS_TEXT})"
                       + rd.unfinished_hint(target))
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
    p = cli_parser
    out = Path(args.out) if args.out else _fresh_demo_dir(Path("runs"))
    argv = ["compress", p.DEMO_MODEL, "--data", p.DEMO_DATA, "--image-size", str(p.DEMO_IMAGE_SIZE),
            "--epochs", str(args.epochs), "--batch-size", str(p.DEMO_BATCH_SIZE), "--out", str(out), "--show-layers",
            "--device", args.device, "--optimizer", p.DEMO_OPTIMIZER, "--lr", str(p.DEMO_LR),
            "--target", str(args.target), "--per", cli_parser.DEMO_PER]
    # Both of the papers' structures: a budgeted run keeps its residual sections unless asked
    # (docs/budget.md); 40 epochs are long enough for whole blocks to be decided.
    argv.append("--prune-sections")
    if args.debug:
        argv.append("--debug")
    log(f"demo: vpsurgery {' '.join(argv)}")
    return cmd_compress(p.parse_args(argv))


COMMANDS = {"compress": cmd_compress, "export": cmd_export, "verify": cmd_verify, "inspect": cmd_inspect,
            "demo": cmd_demo}
