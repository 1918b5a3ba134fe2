"""What a compression run reports: per-layer sizes and FLOPs, text tables, report.json,
report.md and its PNG plots. Everything is written atomically (temp file + rename)."""
from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vpsurgery.io import atomic_write_bytes

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
    2 FLOPs), in total and per module name (as in ``named_modules``)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(example)
    finally:
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


def layer_rows(dense: nn.Module, small: nn.Module | None, example: torch.Tensor) -> list[dict[str, Any]]:
    """One row per conv/linear layer of ``dense``: in/out channels, parameters and FLOPs before
    and (when ``small`` is given) after; a layer that no longer exists has ``removed: True``."""
    _, dense_flops = count_flops(dense, example)
    after = dict(small.named_modules()) if small is not None else {}
    small_flops = count_flops(small, example)[1] if small is not None else {}
    rows = []
    for name, module in dense.named_modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        row = {"layer": name, "type": type(module).__name__, "in": _width(module)[0], "out": _width(module)[1],
               "params": n_params(module), "flops": dense_flops.get(name, 0)}
        if small is not None:
            kept = after.get(name)
            row["removed"] = not isinstance(kept, LAYER_TYPES)
            row["in_after"], row["out_after"] = _width(kept) if not row["removed"] else (0, 0)
            row["params_after"] = n_params(kept) if not row["removed"] else 0
            row["flops_after"] = small_flops.get(name, 0) if not row["removed"] else 0
        rows.append(row)
    return rows


def summary(dense: nn.Module, small: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Totals and ratios (compressed / dense) of parameters and FLOPs."""
    dense_flops, small_flops = count_flops(dense, example)[0], count_flops(small, example)[0]
    dense_params, small_params = n_params(dense), n_params(small)
    return {
        "dense": {"params": dense_params, "flops": dense_flops},
        "compressed": {"params": small_params, "flops": small_flops},
        "ratio": {"params": small_params / max(dense_params, 1), "flops": small_flops / max(dense_flops, 1)},
    }


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


def layer_table(rows: list[dict[str, Any]]) -> str:
    compared = bool(rows) and "out_after" in rows[0]
    if not compared:
        header = ("layer", "type", "in", "out", "params", "FLOPs")
        body = [(r["layer"], r["type"], r["in"], r["out"], human(r["params"]), human(r["flops"])) for r in rows]
        return format_table(header, body)
    header = ("layer", "in", "out", "params", "FLOPs")
    body = []
    for r in rows:
        if r["removed"]:
            body.append((r["layer"], f"{r['in']} -> removed", f"{r['out']} -> removed",
                         f"{human(r['params'])} -> 0", f"{human(r['flops'])} -> 0"))
        else:
            body.append((r["layer"], f"{r['in']} -> {r['in_after']}", f"{r['out']} -> {r['out_after']}",
                         f"{human(r['params'])} -> {human(r['params_after'])}",
                         f"{human(r['flops'])} -> {human(r['flops_after'])}"))
    return format_table(header, body)


def totals_table(totals: dict[str, Any], accuracy: dict[str, Any] | None = None) -> str:
    d, c, r = totals["dense"], totals["compressed"], totals["ratio"]
    rows = [("parameters", human(d["params"]), human(c["params"]), f"{r['params']:.1%}"),
            ("FLOPs / example", human(d["flops"]), human(c["flops"]), f"{r['flops']:.1%}")]
    if accuracy and accuracy.get("val_acc") is not None:
        rows.append(("val accuracy", "-", f"{accuracy['val_acc']:.2%}", ""))
    return format_table(("", "dense", "compressed", "kept"), rows)


def verification_line(verification: dict[str, Any], latency: dict[str, Any] | None) -> str:
    status = "PASSED" if verification["passed"] else "FAILED"
    line = f"onnxruntime check {status}: {verification['detail']}"
    if latency:
        line += (f"\nonnxruntime latency (batch {latency['batch']}, median of {latency['repeats']}): dense "
                 f"{latency['dense_ms']:.3f} ms, compressed {latency['small_ms']:.3f} ms, "
                 f"speedup {latency['speedup']:.2f}x")
    return line


# ---------------------------------------------------------------- files

def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


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


def plot_widths(rows: list[dict[str, Any]], path: Path) -> bool:
    """Output channels per conv/linear layer, dense vs kept."""
    if not rows or "out_after" not in rows[0]:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(xs, [r["out"] for r in rows], color="lightgray", label="dense")
    ax.bar(xs, [r["out_after"] for r in rows], color="tab:blue", label="kept")
    ax.set_xticks(list(xs), [r["layer"] for r in rows], rotation=90, fontsize=7)
    ax.set(ylabel="output channels", title="Kept width per layer")
    ax.legend()
    _save_figure(fig, path)
    plt.close(fig)
    return True


def plot_training(history: list[dict[str, Any]], path: Path, dense: dict[str, Any] | None = None) -> bool:
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
    baseline = {"macs": dense["flops"] / 2, "params": dense["params"]} if dense else {}
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


def write_plots(out_dir: Path, history: list[dict[str, Any]], rows: list[dict[str, Any]],
                dense: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the PNGs that have data; returns {plot: relative path}."""
    written = {}
    if plot_theta(history, out_dir / PLOTS["theta"]):
        written["theta"] = PLOTS["theta"]
    if plot_widths(rows, out_dir / PLOTS["widths"]):
        written["widths"] = PLOTS["widths"]
    if plot_training(history, out_dir / PLOTS["training"], dense):
        written["training"] = PLOTS["training"]
    return written


def markdown(report: dict[str, Any]) -> str:
    """report.md: what was compressed, the totals, the verification, per-layer table, plots."""
    history = report.get("history") or []
    last = history[-1] if history else {}
    lines = [
        f"# vpsurgery compression report: `{report['model']['spec']}`",
        "",
        f"- data: `{report['data']['spec']}` ({report['data']['num_classes']} classes), "
        f"input shape {tuple(report['input_shape'])}",
        f"- checkpoint: {report.get('checkpoint') or 'none (trained from the initialisation)'}",
        f"- training: {report['training']['epochs']} epochs, {report['training'].get('seconds', 0):.1f} s",
        f"- removed residual sections: {', '.join(report['structure']['removed_sections']) or 'none'}; "
        f"depth {report['structure']['depth_before']} -> {report['structure']['depth_after']} conv/linear layers",
        "",
        "## Totals",
        "",
        totals_table(report["totals"], {"val_acc": last.get("val_acc")}),
        "",
        "## Verification",
        "",
        verification_line(report["verification"], report.get("latency")).replace("\n", "\n\n"),
        "",
        "## Layers",
        "",
        layer_table(report["layers"]),
        "",
    ]
    if history:
        header = ("epoch", "loss", "train acc", "val acc", "params", "MACs", "theta=0", "theta=1", "between", "s")
        body = [(h["epoch"], f"{h['loss']:.4f}", _pct(h.get("train_acc")), _pct(h.get("val_acc")), human(h["params"]),
                 human(h["macs"]), h.get("theta_at_0", ""), h.get("theta_at_1", ""), h.get("theta_between", ""),
                 f"{h.get('epoch_time_s', 0):.1f}") for h in history]
        lines += ["## Training", "", format_table(header, body), ""]
    for key, title in (("training", "Accuracy and cost"), ("theta", "Gates"), ("widths", "Kept width per layer")):
        if key in report.get("plots", {}):
            lines += [f"![{title}]({report['plots'][key]})", ""]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Plots, report.json and report.md into ``out_dir``."""
    report["plots"] = write_plots(out_dir, report.get("history") or [], report["layers"],
                                  report.get("totals", {}).get("dense"))
    write_json(out_dir / "report.json", report)
    atomic_write_bytes(out_dir / "report.md", markdown(report).encode())
