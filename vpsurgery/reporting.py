"""What a compression run reports: per-layer sizes and FLOPs (typed: Cost, Totals, LayerRow), text
tables, report.md and its PNG plots. report.json, the run's record, is vpsurgery.cli.rundir.Report,
which this module renders; everything is written atomically (temp file + rename)."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vpsurgery.io import atomic_write_bytes

if TYPE_CHECKING:
    from vpsurgery.cli.rundir import Latency, Outcome, Report, Verification

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
PLOTS = {
    "theta": "plots/theta.png",
    "widths": "plots/widths.png",
    "training": "plots/accuracy_flops.png",
}


# ---------------------------------------------------------------- measuring models

def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass on ``example`` (torch.utils.flop_counter; a multiply-add is
    2 FLOPs), in total and per module name (as in ``named_modules``). Attention runs unfused while
    counting (the math kernel, plain bmm, and MultiheadAttention without its fast path): the counter
    has no count for the fused CPU kernels."""
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with sdpa_kernel([SDPBackend.MATH]), counter:
            model(example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        # Names are "<RootClass>.sub.module"; drop the root class to match named_modules().
        _, _, qualname = name.partition(".")
        if qualname:
            per_module[qualname] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def _width(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


@dataclass(frozen=True)
class Cost:
    """Parameters and FLOPs per example (a multiply-add is 2 FLOPs) of one model."""

    params: int
    flops: int

    def to_json(self) -> dict[str, int]:
        return {"params": self.params, "flops": self.flops}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Cost":
        return cls(int(data["params"]), int(data["flops"]))


@dataclass(frozen=True)
class Ratio:
    """compressed / dense, of parameters and of FLOPs."""

    params: float
    flops: float


@dataclass(frozen=True)
class Totals:
    dense: Cost
    compressed: Cost

    @property
    def ratio(self) -> Ratio:
        return Ratio(self.compressed.params / max(self.dense.params, 1),
                     self.compressed.flops / max(self.dense.flops, 1))

    def to_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {"dense": self.dense.to_json(), "compressed": self.compressed.to_json(),
                "ratio": {"params": ratio.params, "flops": ratio.flops}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Totals":
        return cls(Cost.from_json(data["dense"]), Cost.from_json(data["compressed"]))


@dataclass(frozen=True)
class LayerRow:
    """One conv/linear layer of the dense model: its width (channels or features), parameters and
    FLOPs, and, when compared with a compressed model (``compared``), the same after it; a layer the
    compressed model no longer has is ``removed``, with zeros after."""

    layer: str
    type: str
    width_in: int
    width_out: int
    params: int
    flops: int
    removed: bool | None = None
    width_in_after: int | None = None
    width_out_after: int | None = None
    params_after: int | None = None
    flops_after: int | None = None

    @property
    def compared(self) -> bool:
        return self.width_out_after is not None

    def to_json(self) -> dict[str, Any]:
        row = {"layer": self.layer, "type": self.type, "in": self.width_in, "out": self.width_out,
               "params": self.params, "flops": self.flops}
        if self.compared:
            row.update({"removed": self.removed, "in_after": self.width_in_after, "out_after": self.width_out_after,
                        "params_after": self.params_after, "flops_after": self.flops_after})
        return row

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerRow":
        row = cls(str(data["layer"]), str(data["type"]), int(data["in"]), int(data["out"]), int(data["params"]),
                  int(data["flops"]))
        if "out_after" not in data:
            return row
        return replace(row, removed=bool(data["removed"]), width_in_after=int(data["in_after"]),
                       width_out_after=int(data["out_after"]), params_after=int(data["params_after"]),
                       flops_after=int(data["flops_after"]))


def layer_rows(dense: nn.Module, small: nn.Module | None, example: torch.Tensor) -> list[LayerRow]:
    """One row per conv/linear layer of ``dense``, compared with ``small`` when it is given."""
    _, dense_flops = count_flops(dense, example)
    after = dict(small.named_modules()) if small is not None else {}
    small_flops = count_flops(small, example)[1] if small is not None else {}
    rows = []
    for name, module in dense.named_modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        row = LayerRow(name, type(module).__name__, *_width(module), n_params(module), dense_flops.get(name, 0))
        if small is not None:
            kept = after.get(name)
            if isinstance(kept, LAYER_TYPES):
                row = replace(row, removed=False, width_in_after=_width(kept)[0], width_out_after=_width(kept)[1],
                              params_after=n_params(kept), flops_after=small_flops.get(name, 0))
            else:
                row = replace(row, removed=True, width_in_after=0, width_out_after=0, params_after=0, flops_after=0)
        rows.append(row)
    return rows


def summary(dense: nn.Module, small: nn.Module, example: torch.Tensor) -> Totals:
    """Parameters and FLOPs of both models (``.ratio``: compressed / dense)."""
    return Totals(Cost(n_params(dense), count_flops(dense, example)[0]),
                  Cost(n_params(small), count_flops(small, example)[0]))


# ---------------------------------------------------------------- text

def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain, aligned text table (also valid Markdown)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def layer_table(rows: list[LayerRow]) -> str:
    if not (rows and rows[0].compared):
        header = ("layer", "type", "in", "out", "params", "FLOPs")
        body = [(r.layer, r.type, r.width_in, r.width_out, human(r.params), human(r.flops)) for r in rows]
        return format_table(header, body)
    header = ("layer", "in", "out", "params", "FLOPs")
    body = []
    for r in rows:
        if r.removed:
            body.append((r.layer, f"{r.width_in} -> removed", f"{r.width_out} -> removed",
                         f"{human(r.params)} -> 0", f"{human(r.flops)} -> 0"))
        else:
            body.append((r.layer, f"{r.width_in} -> {r.width_in_after}", f"{r.width_out} -> {r.width_out_after}",
                         f"{human(r.params)} -> {human(r.params_after)}",
                         f"{human(r.flops)} -> {human(r.flops_after)}"))
    return format_table(header, body)


def totals_table(totals: Totals, val_acc: float | None = None, dense_val_acc: float | None = None) -> str:
    """Dense vs compressed parameters and FLOPs, and the val accuracy of the compressed model (and of
    the dense one, when it was measured: a run from --checkpoint)."""
    d, c, r = totals.dense, totals.compressed, totals.ratio
    rows = [("parameters", human(d.params), human(c.params), f"{r.params:.1%}"),
            ("FLOPs / example", human(d.flops), human(c.flops), f"{r.flops:.1%}")]
    if val_acc is not None or dense_val_acc is not None:
        rows.append(("val accuracy", _pct(dense_val_acc), _pct(val_acc),
                     f"{val_acc - dense_val_acc:+.2%}" if val_acc is not None and dense_val_acc is not None else ""))
    return format_table(("", "dense", "compressed", "kept"), rows)


def verification_line(verification: "Verification", latency: "Latency | None", outcome: "Outcome | None" = None) -> str:
    """The ONNX check (and the latency comparison). It says PASSED only for a run that also met its
    goal (``outcome``): a faithful export of a model that was not compressed is no success."""
    if not verification.passed:
        line = f"onnxruntime check FAILED: {verification.detail}"
    elif outcome is not None and not outcome.ok:
        line = f"onnxruntime check: the ONNX model matches the torch model ({verification.detail})"
    else:
        line = f"onnxruntime check PASSED: {verification.detail}"
    if latency:
        line += (f"\nonnxruntime latency (batch {latency.batch}, median of {latency.repeats}): dense "
                 f"{latency.dense_ms:.3f} ms, compressed {latency.small_ms:.3f} ms, "
                 f"speedup {latency.speedup:.2f}x")
    return line


def outcome_line(outcome: "Outcome") -> str:
    """What the run was asked for and what it reached; COMPRESSION FAILED and why when it did not."""
    if not outcome.ok:
        return f"COMPRESSION FAILED: {'; '.join(outcome.problems)}"
    if outcome.target is not None:
        goal = f"target {outcome.target:.1%}, +-{outcome.tolerance:.0%} of it"
    else:
        goal = "price mode" + (f", price {outcome.price:g}" if outcome.price is not None else "")
    return f"compression: kept {outcome.share:.1%} of the dense {outcome.per} ({goal})"


# ---------------------------------------------------------------- files

def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_theta(history: list[dict[str, Any]], path: Path) -> bool:
    """Mean theta of every gate over the epochs."""
    if not history or not history[0].get("theta_mean"):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in history]
    names = sorted({name for h in history for name in h.get("theta_mean", {})})
    for name in names:
        ax.plot(epochs, [h.get("theta_mean", {}).get(name, math.nan) for h in history], marker=".",
                label=name, linewidth=1)
    ax.set(xlabel="epoch", ylabel="mean theta (keep probability)", ylim=(-0.05, 1.05), title="Gates over training")
    if len(names) <= 12:
        ax.legend(fontsize=6, ncol=2)
    _save_figure(fig, path)
    plt.close(fig)
    return True


def plot_widths(rows: list[LayerRow], path: Path) -> bool:
    """Output channels per conv/linear layer, dense vs kept."""
    if not rows or not rows[0].compared:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(xs, [r.width_out for r in rows], color="lightgray", label="dense")
    ax.bar(xs, [r.width_out_after for r in rows], color="tab:blue", label="kept")
    ax.set_xticks(list(xs), [r.layer for r in rows], rotation=90, fontsize=7)
    ax.set(ylabel="output channels", title="Kept width per layer")
    ax.legend()
    _save_figure(fig, path)
    plt.close(fig)
    return True


def plot_training(history: list[dict[str, Any]], path: Path, dense: Cost | None = None) -> bool:
    """Accuracy and MACs/parameters over the epochs, as a share of the dense model's (``dense``:
    its params and FLOPs; a MAC is 2 FLOPs), else of the first epoch's."""
    if not history:
        return False
    plt = _pyplot()
    fig, (acc, cost) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train_acc", "val_acc"):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            acc.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=key)
    acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    acc.legend()
    baseline = {"macs": dense.flops / 2, "params": dense.params} if dense else {}
    for key in ("macs", "params"):
        values = [h.get(key) for h in history]
        base = baseline.get(key) or (values[0] if values else None)
        if base:
            label = f"{key} (share of {'dense' if key in baseline else f'epoch {epochs[0]}'})"
            cost.plot(epochs, [v / base for v in values], marker="o", label=label)
    cost.set(xlabel="epoch", ylabel="share", ylim=(0, 1.05), title="MACs and parameters")
    cost.legend()
    _save_figure(fig, path)
    plt.close(fig)
    return True


def write_plots(out_dir: Path, history: list[dict[str, Any]], rows: list[LayerRow],
                dense: Cost | None = None) -> dict[str, str]:
    """Write the PNGs that have data; returns {plot: relative path}."""
    written = {}
    if plot_theta(history, out_dir / PLOTS["theta"]):
        written["theta"] = PLOTS["theta"]
    if plot_widths(rows, out_dir / PLOTS["widths"]):
        written["widths"] = PLOTS["widths"]
    if plot_training(history, out_dir / PLOTS["training"], dense):
        written["training"] = PLOTS["training"]
    return written


def markdown(report: "Report") -> str:
    """report.md: what was compressed, the outcome, the totals, the verification, per-layer table,
    the training history and the plots."""
    history = report.history
    outcome = report.outcome
    structure = report.structure
    lines = [
        f"# vpsurgery compression report: `{report.model.spec}`",
        "",
        f"- data: `{report.data.spec}` ({report.data.num_classes} classes), input shape {tuple(report.input_shape)}",
        f"- checkpoint: {report.checkpoint or 'none (trained from the initialisation)'}",
        f"- training: {report.training.epochs} epochs, {report.training.seconds:.1f} s",
        f"- removed residual sections: {', '.join(structure.removed_sections) or 'none'}; "
        f"depth {structure.depth_before} -> {structure.depth_after} conv/linear layers",
    ]
    if outcome is not None:
        lines.append(f"- {outcome_line(outcome)}")
    lines += [
        "",
        "## Totals",
        "",
        totals_table(report.totals, report.val_acc, outcome.dense_val_acc if outcome else None),
        "",
        "## Verification",
        "",
        verification_line(report.verification, report.latency, outcome).replace("\n", "\n\n"),
        "",
        "## Layers",
        "",
        layer_table(report.layers),
        "",
    ]
    if history:
        header = ("epoch", "loss", "train acc", "val acc", "params", "MACs", "theta=0", "theta=1", "between", "s")
        body = [(h["epoch"], f"{h['loss']:.4f}", _pct(h.get("train_acc")), _pct(h.get("val_acc")), human(h["params"]),
                 human(h["macs"]), h.get("theta_at_0", ""), h.get("theta_at_1", ""), h.get("theta_between", ""),
                 f"{h.get('epoch_time_s', 0):.1f}") for h in history]
        lines += ["## Training", "", format_table(header, body), ""]
    for key, title in (("training", "Accuracy and cost"), ("theta", "Gates"), ("widths", "Kept width per layer")):
        if key in report.plots:
            lines += [f"![{title}]({report.plots[key]})", ""]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
