"""Benchmark of the method: pruning during training (vpsurgery.fit) against dense training and
Torch-Pruning prune-then-fine-tune baselines, its robustness over seeds/widths, its cost over a run,
and the per-step overhead of the gates.

    python bench/bench_method.py compare     [--epochs 30] [--data digits|mnist:DIR] [method flags]
    python bench/bench_method.py robustness  [--epochs 30] [--seeds 0 1 2] [--widths 0.5 1 2]
    python bench/bench_method.py cost        [--epochs 30] [--cost-models lenet300_100@2 lenet5@1]
    python bench/bench_method.py overhead    [--overhead-models resnet18 resnet50] [--repeats 8]
    python bench/bench_method.py all

Every method hyperparameter of vpsurgery.fit is a flag (default: fit's own default, read from its
signature) and the configuration used is printed and written with the results. Each subcommand
prints a markdown table, writes PNGs under docs/plots/ and replaces only its own sub-block inside
the <!-- method:begin --> ... <!-- method:end --> section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import inspect
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import vpsurgery  # noqa: E402
from common import out_widths, write_atomic  # noqa: E402
from vpsurgery.data import load_data  # noqa: E402
from vpsurgery.models import get_model  # noqa: E402
from vpsurgery.config import FitConfig  # noqa: E402
from vpsurgery.train import autocast, objective  # noqa: E402
from vpsurgery.train import AT_END, fit  # noqa: E402

from common_train import DenseTrainer, evaluate, loaders  # noqa: E402

PLOTS = REPO / "docs" / "plots"
BENCH_MD = REPO / "BENCHMARKS.md"
SECTION = "method"
HEADING = "## Training: pruning during training"
# fit arguments the benchmark decides itself (not method hyperparameters)
NOT_HPARAMS = {"gated", "train_loader", "val_loader", "config", "epochs", "loss_fn", "device", "checkpoint_dir",
               "resume", "progress", "log", "seed"}  # seed: each run's own (--seed / --seeds), passed to fit


# ---------------------------------------------------------------------------------- config
def fit_hparams() -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fit).parameters.items()
            if n not in NOT_HPARAMS and p.default is not inspect.Parameter.empty}


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method hyperparameters (vpsurgery.fit; default = fit's default)")
    for name, p in fit_hparams().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(p.default, bool):
            group.add_argument(flag, dest=f"fit_{name}", action=argparse.BooleanOptionalAction, default=p.default)
        elif p.default is None:
            kind = getattr(FitConfig, "__dataclass_fields__")[name].metadata["kind"]
            group.add_argument(flag, dest=f"fit_{name}", type=kind, default=None, help="default None")
        else:
            group.add_argument(flag, dest=f"fit_{name}", type=type(p.default), default=p.default,
                               help=f"default {p.default!r}")


def method_kwargs(args) -> dict:
    return {n: getattr(args, f"fit_{n}") for n in fit_hparams()}


def config_line(args) -> str:
    kw = method_kwargs(args)
    defaults = {n: p.default for n, p in fit_hparams().items()}
    changed = [n for n in kw if kw[n] != defaults[n]]
    text = ", ".join(f"{n}={kw[n]!r}" for n in kw)
    return (f"fit config: {text}; " + (f"changed from fit defaults: {', '.join(changed)}" if changed
                                       else "all fit defaults") +
            f"; batch {args.batch_size}, data {args.data}, data-split seed {args.split_seed}")


# ---------------------------------------------------------------------------------- helpers
def device(args) -> torch.device:
    if args.device != "auto":
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_spec(name: str, width: float, bundle_in_features: int):
    if name == "lenet300_100":
        return get_model("lenet300_100", in_features=bundle_in_features, width=width, num_classes=10)
    return get_model(name, width=width, num_classes=10)


def data_for(model: str, args):
    """LeNet-5 needs 28x28; LeNet-300-100 on digits uses the native 8x8 (64 features)."""
    if args.data == "digits":
        size = 28 if model == "lenet5" else None
    else:
        size = None  # mnist is 28x28 already
    return load_data(args.data, image_size=size, seed=args.split_seed)


def build(model: str, width: float, bundle, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c, h, w = bundle.input_shape
    return model_spec(model, width, c * h * w)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def count_flops(m: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    m.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    return int(fc.get_total_flops())


def example(bundle) -> torch.Tensor:
    return bundle.train[0][0].unsqueeze(0)


def widths_of(m: nn.Module) -> str:
    out = []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            out.append(f"{name}:{mod.out_features}")
        elif isinstance(mod, nn.Conv2d):
            out.append(f"{name}:{mod.out_channels}")
    return " ".join(out[:-1])  # the last layer's width is the class count


def layer_widths(m: nn.Module) -> list[int]:
    return out_widths(m)[:-1]  # the last layer's width is the class count


def run_fit(model: nn.Module, bundle, args, seed: int, epochs: int, log_prefix: str):
    torch.manual_seed(seed)
    train, val = loaders(bundle, args.batch_size, seed)
    x = example(bundle)
    t0 = time.perf_counter()
    gm = vpsurgery.wrap(model, (x,))
    t_wrap = time.perf_counter() - t0
    res = fit(gm, train, val, epochs=epochs, device=str(device(args)), progress=False, seed=seed,
              log=lambda s: print(f"  [{log_prefix}] {s}", flush=True), **method_kwargs(args))
    t_fit = time.perf_counter() - t0
    small = vpsurgery.shrink(res.model).cpu()
    acc_small = evaluate(small, val, torch.device("cpu"))
    last = res.history[-1]
    n_units = sum(g.theta.numel() for g in vpsurgery.gates(gm).values())
    return {"res": res, "small": small, "gated_units": n_units, "wrap_s": t_wrap, "time_s": t_fit,
            "acc_small": acc_small, "acc_gated": last["val_acc"], "params_fit": last["params"]}


def fmt_pct(a, b) -> str:
    return f"{100 * a / b:.1f}%"


def acc(a) -> str:
    return "-" if a is None else f"{100 * a:.2f}%"


def rng(values, f=lambda v: f"{v:.3g}") -> str:
    return f"{f(statistics.mean(values))} ({f(min(values))}–{f(max(values))})"


# ---------------------------------------------------------------------------------- BENCHMARKS.md
SUBS = ["intro", "compare", "robustness", "robustness_target", "cost", "overhead"]


def write_sub(sub: str, body: str) -> None:
    """Replace the sub-block `sub` inside this benchmark's section, leaving everything else alone."""
    begin, end = f"<!-- {SECTION}:begin -->", f"<!-- {SECTION}:end -->"
    with open("/tmp/vpsurgery_bench_method.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
        pat = re.compile(re.escape(begin) + r"(.*?)" + re.escape(end), re.S)
        m = pat.search(text)
        inner = m.group(1) if m else ""
        blocks = {}
        for s in SUBS:
            bm = re.search(rf"<!-- {SECTION}/{s} -->(.*?)<!-- /{SECTION}/{s} -->", inner, re.S)
            if bm:
                blocks[s] = bm.group(1).strip("\n")
        blocks[sub] = body.strip("\n")
        if "intro" not in blocks:
            blocks["intro"] = INTRO
        new_inner = "\n\n".join(f"<!-- {SECTION}/{s} -->\n{blocks[s]}\n<!-- /{SECTION}/{s} -->"
                                for s in SUBS if s in blocks)
        block = f"{begin}\n{new_inner}\n{end}"
        if m:
            text = text[:m.start()] + block + text[m.end():]
        else:
            text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
        write_atomic(BENCH_MD, text)


INTRO = ("Generated by `bench/bench_method.py` (subcommands `compare`, `robustness`, `cost`, `overhead`; "
         "each regenerates only its own block below). Every number is marked with the run that produced it. "
         "`vpsurgery` final model = `vpsurgery.shrink(fit(...).model)` (default threshold 0.5, theta folded "
         "into the weights); *gated val* = fit's own last-epoch val accuracy of the still-gated network "
         "(eval: gates at theta).")


def machine() -> str:
    import platform
    cores = len(os.sched_getaffinity(0))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return (f"{platform.processor() or platform.machine()}, {cores} cores, load avg {load:.1f} at start, "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op thread(s)), "
            f"cuda available: {torch.cuda.is_available()}")


def stamp(args, extra: str = "") -> str:
    return (f"_Run {time.strftime('%Y-%m-%d %H:%M')}: `{' '.join(['python bench/bench_method.py'] + sys.argv[1:])}`. "
            f"{machine()}.{(' ' + extra) if extra else ''}_\n\n`{config_line(args)}`")


def save_plot(fig, name: str) -> str:
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return f"docs/plots/{name}"


# ---------------------------------------------------------------------------------- Torch-Pruning
def tp_importances(model: nn.Module):
    import torch_pruning as tp
    out = [("TP L1 magnitude", "`MagnitudeImportance(p=1)`", lambda: tp.importance.MagnitudeImportance(p=1)),
           ("TP group-norm (L2)", "`GroupMagnitudeImportance(p=2)` (TP's group norm; one-shot, no sparse training)",
            lambda: tp.importance.GroupMagnitudeImportance(p=2))]
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn:
        out.append(("TP BN-scale", "`BNScaleImportance()`", lambda: tp.importance.BNScaleImportance()))
    else:
        out.append(("TP BN-scale", None, None))
    return out


def tp_prune(model: nn.Module, x: torch.Tensor, make_imp, ratio: float) -> nn.Module:
    import torch_pruning as tp
    m = copy.deepcopy(model).cpu().eval()
    last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    if ratio > 0:
        pruner = tp.pruner.BasePruner(m, x, importance=make_imp(), pruning_ratio=ratio, ignored_layers=[last])
        pruner.step()
    return m


def tp_prune_to(model: nn.Module, x: torch.Tensor, make_imp, target: int):
    """Bisect the (uniform, per-layer) pruning ratio so the pruned model has the parameter count closest
    to `target`. Returns (model, ratio)."""
    lo, hi = 0.0, 0.995
    best = (abs(n_params(model) - target), model, 0.0)
    for _ in range(18):
        mid = (lo + hi) / 2
        m = tp_prune(model, x, make_imp, mid)
        p = n_params(m)
        if abs(p - target) < best[0]:
            best = (abs(p - target), m, mid)
        if p > target:
            lo = mid
        else:
            hi = mid
        if p == target:
            break
    m = tp_prune(model, x, make_imp, hi)
    if abs(n_params(m) - target) < best[0]:
        best = (abs(n_params(m) - target), m, hi)
    return best[1], best[2]


# ---------------------------------------------------------------------------------- compare
def cmd_compare(args) -> None:
    rows, notes, curves = [], [], {}
    dev = device(args)
    for model_name in args.models:
        bundle = data_for(model_name, args)
        x = example(bundle)
        seed = args.seed
        E = args.epochs
        pre = max(1, min(E - 1, round(E * args.tp_pretrain_frac)))
        # (a) dense, snapshot at `pre` epochs for the TP baselines (same schedule, same data order)
        model = build(model_name, 1.0, bundle, seed)
        dense_params, dense_flops = n_params(model), count_flops(model, x)
        torch.manual_seed(seed)
        train, val = loaders(bundle, args.batch_size, seed)
        kw = method_kwargs(args)
        tr = DenseTrainer(model, train, val, total_epochs=E, lr=kw["lr"], optimizer=kw["optimizer"],
                          momentum=kw["momentum"], dev=dev)
        t0 = time.perf_counter()
        snapshot = None
        for e in range(E):
            tr.run_epoch()
            if e + 1 == pre:
                snapshot = (copy.deepcopy(tr.model).cpu(), tr.step, time.perf_counter() - t0,
                            torch.get_rng_state(), copy.deepcopy(train.generator.get_state()))
        t_dense = time.perf_counter() - t0
        dense_acc = tr.history[-1]["val_acc"]
        rows.append([model_name, "dense", f"{E}", acc(dense_acc), "-", f"{dense_params:,} (100%)", "100%",
                     f"{t_dense:.1f}s", "(a) dense"])
        print(f"[{model_name}] dense: val {acc(dense_acc)} in {t_dense:.1f}s", flush=True)
        # (b) vpsurgery fit
        model = build(model_name, 1.0, bundle, seed)
        r = run_fit(model, bundle, args, seed, E, f"{model_name} fit")
        small = r["small"]
        vp_params, vp_flops = n_params(small), count_flops(small, x)
        curves[model_name] = (r["res"].history, dense_params)
        rows.append([model_name, "vpsurgery fit", f"{E}", acc(r["acc_small"]), acc(r["acc_gated"]),
                     f"{vp_params:,} ({fmt_pct(vp_params, dense_params)})", fmt_pct(vp_flops, dense_flops),
                     f"{r['time_s']:.1f}s", f"(b) fit + shrink; widths {widths_of(small)}; "
                     f"params with theta>0 at the end of fit: {r['params_fit']:,}"])
        print(f"[{model_name}] vpsurgery: val {acc(r['acc_small'])} (gated {acc(r['acc_gated'])}), "
              f"params {vp_params:,}, widths {widths_of(small)}", flush=True)
        if vp_params >= 0.99 * dense_params:
            notes.append(f"`{model_name}`: fit with these settings kept ~100% of the parameters (no pruning).")
        # (c) Torch-Pruning at the same parameter count and total epochs
        target = vp_params
        for label, desc, make_imp in tp_importances(model):
            if make_imp is None:
                rows.append([model_name, label, "-", "skipped", "-", "-", "-", "-",
                             f"(c) skipped: `{model_name}` has no BatchNorm"])
                continue
            base, step0, t_pre, rng_state, gen_state = snapshot
            t1 = time.perf_counter()
            pruned, ratio = tp_prune_to(base, x, make_imp, target)
            t_prune = time.perf_counter() - t1
            tr2 = DenseTrainer(copy.deepcopy(pruned), train, val, total_epochs=E, lr=kw["lr"],
                               optimizer=kw["optimizer"], momentum=kw["momentum"], dev=dev)
            tr2.step, tr2.epoch = step0, pre
            torch.set_rng_state(rng_state)
            train.generator.set_state(gen_state)  # same data order as the dense run's remaining epochs
            acc_after_prune = evaluate(tr2.model, val, dev)
            t2 = time.perf_counter()
            for _ in range(E - pre):
                tr2.run_epoch()
            t_ft = time.perf_counter() - t2
            final = tr2.model.cpu()
            p, fl = n_params(final), count_flops(final, x)
            total = t_pre + t_prune + t_ft
            rows.append([model_name, label, f"{pre}+{E - pre}", acc(tr2.history[-1]["val_acc"]), "-",
                         f"{p:,} ({fmt_pct(p, dense_params)})", fmt_pct(fl, dense_flops), f"{total:.1f}s",
                         f"(c) {desc}, uniform ratio {ratio:.3f} (bisected to {target:,} params), "
                         f"ignored last Linear; val right after pruning {acc(acc_after_prune)}; "
                         f"widths {widths_of(final)}; prune search {t_prune:.1f}s"])
            print(f"[{model_name}] {label}: val {acc(tr2.history[-1]['val_acc'])}, params {p:,}, "
                  f"ratio {ratio:.3f}", flush=True)
    header = ["model", "method", "epochs", "val acc (final model)", "gated val (fit)", "params kept",
              "FLOPs kept", "train time", "what produced it"]
    table = md_table(header, rows)
    print(table)
    plot = plot_compare(curves, rows)
    body = (f"### compare: dense vs vpsurgery fit vs Torch-Pruning (same final params, same epochs)\n\n"
            f"{stamp(args)}\n\n"
            f"Data: `{args.data}` (LeNet-5 on digits upsampled to 28x28; LeNet-300-100 on the native 8x8 = 64 "
            f"features), the same split (seed {args.split_seed}), init seed {args.seed} and shuffle order for "
            f"every method. Weights: {method_kwargs(args)['optimizer']} lr {method_kwargs(args)['lr']} "
            f"momentum {method_kwargs(args)['momentum']}, cosine per step over all epochs, for every method "
            f"(dense and TP get no weight decay; fit's slab prior is its own). TP: dense training for the first "
            f"{args.tp_pretrain_frac:.0%} of the epochs (the dense run's own snapshot), one-shot prune with "
            f"`tp.pruner.BasePruner` to the parameter count of vpsurgery's final model, fine-tune for the "
            f"rest (optimizer rebuilt, schedule continued). TP time = dense pre-training share + prune search "
            f"(bisection, {18} prunes) + fine-tune. FLOPs: `torch.utils.flop_counter` on one example. "
            f"Val set: {len(data_for(args.models[0], args).val)} examples (one example = "
            f"{100 / len(data_for(args.models[0], args).val):.2f} points).\n\n{table}\n\n"
            + "".join(f"- {n}\n" for n in notes) + f"\n![compare]({plot})\n")
    write_sub("compare", body)


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_compare(curves, rows) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(5.5 * max(1, len(curves)), 3.8), squeeze=False)
    for ax, (name, (hist, p0)) in zip(axes[0], curves.items()):
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [100 * h["val_acc"] for h in hist], "b-", label="fit val acc (gated)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val acc %", color="b")
        ax2 = ax.twinx()
        ax2.plot(ep, [100 * h["params"] / max(p0, 1) for h in hist], "r--", label="params with theta>0")
        ax2.set_ylabel("params with theta>0, % of dense", color="r")
        ax2.set_ylim(0, 105)
        ax.set_title(f"{name}: vpsurgery fit")
    return save_plot(fig, "method_compare.png")


# ---------------------------------------------------------------------------------- robustness
def cmd_robustness(args) -> None:
    """Claim 2: from different seeds and start widths, does fit land on the same network? With
    --kept-params N every start width is asked for the same absolute size (target = N / its own
    dense params, per params), so the question becomes whether it finds the same *shape*."""
    model_name = "lenet300_100"
    bundle = data_for(model_name, args)
    runs = []
    t_all = time.perf_counter()
    for width in args.widths:
        for seed in args.seeds:
            model = build(model_name, width, bundle, seed)
            dense = n_params(model)
            if args.kept_params:
                args.fit_target, args.fit_per = args.kept_params / dense, "params"
            r = run_fit(model, bundle, args, seed, args.epochs, f"w{width} s{seed}")
            last = r["res"].history[-1]
            decided = (last["units_removed"] + last["theta_at_0"] + last["theta_at_1"]) / r["gated_units"]
            runs.append({"width": width, "seed": seed, "dense": dense, "widths": layer_widths(r["small"]),
                         "fit_widths": list(last["width"].values()), "params": n_params(r["small"]),
                         "acc": r["acc_small"], "acc_gated": r["acc_gated"], "decided": decided,
                         "between": last["theta_between"], "time": r["time_s"]})
            print(f"width {width} seed {seed}: {runs[-1]}", flush=True)
    if args.kept_params:
        args.fit_target = None  # per start width, shown in the heading; not one value for the config line
    rows = []
    for width in args.widths:
        rs = [r for r in runs if r["width"] == width]
        nl = len(rs[0]["widths"])
        wcol = " / ".join(rng([r["widths"][i] for r in rs], lambda v: f"{v:.0f}" if v == int(v) else f"{v:.1f}")
                          for i in range(nl))
        fcol = " / ".join(rng([r["fit_widths"][i] for r in rs], lambda v: f"{v:.0f}" if v == int(v) else f"{v:.1f}")
                          for i in range(len(rs[0]["fit_widths"])))
        rows.append([f"{width}x ({'-'.join(str(w) for w in layer_widths(build(model_name, width, bundle, 0)))})",
                     len(rs), wcol, fcol,
                     rng([r["params"] for r in rs], lambda v: f"{v:,.0f}"),
                     rng([100 * r["params"] / r["dense"] for r in rs], lambda v: f"{v:.1f}%"),
                     rng([100 * r["acc"] for r in rs], lambda v: f"{v:.1f}%"),
                     rng([100 * r["acc_gated"] for r in rs], lambda v: f"{v:.1f}%"),
                     rng([100 * r["decided"] for r in rs], lambda v: f"{v:.0f}%"),
                     rng([r["time"] for r in rs], lambda v: f"{v:.1f}s")])
    header = ["start width (fc1-fc2)", "seeds", "final widths fc1 / fc2 (shrink)", "units with theta>0 fc1 / fc2 (end of fit)",
              "kept params", "% of own dense", "val acc (final model)", "gated val (fit)",
              f"theta decided (removed or within {AT_END} of 0/1)", "fit time"]
    table = md_table(header, rows)
    print(table)
    sub = "robustness_target" if args.kept_params else "robustness"
    plot = plot_robustness(runs, f"method_{sub}.png")
    per_run = md_table(["width", "seed", "final widths", "params", "val acc", "gated val", "theta decided"],
                       [[r["width"], r["seed"], "-".join(map(str, r["widths"])), f"{r['params']:,}",
                         acc(r["acc"]), acc(r["acc_gated"]), f"{100 * r['decided']:.0f}%"] for r in runs])
    asked = (f", every start asked for {args.kept_params:,} params (target = that / its own dense, per params)"
             if args.kept_params else "")
    body = (f"### {sub}: LeNet-300-100, seeds {args.seeds} x start widths {args.widths}{asked}\n\n{stamp(args)}\n\n"
            f"Each cell: mean (min–max) over the seeds; seed = init and shuffle order, data split fixed. "
            f"{args.epochs} epochs per run; total {time.perf_counter() - t_all:.0f}s. "
            f"*theta decided*: (units removed during fit + remaining gates within {AT_END} of 0 or 1) / all "
            f"gated units of the starting model.\n\n{table}\n\n<details><summary>per run</summary>\n\n"
            f"{per_run}\n\n</details>\n\n![robustness]({plot})\n")
    write_sub(sub, body)


def plot_robustness(runs, name: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        axes[0].scatter(r["width"], r["widths"][0], c="C0", label="fc1")
        axes[0].scatter(r["width"], r["widths"][1], c="C1", marker="s", label="fc2")
        axes[1].scatter(r["params"], 100 * r["acc"], c=f"C{int(math.log2(r['width'])) + 1}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("start width multiplier")
    axes[0].set_ylabel("final width (after shrink)")
    h, lab = axes[0].get_legend_handles_labels()
    axes[0].legend(h[:2], lab[:2])
    axes[1].set_xlabel("kept params")
    axes[1].set_ylabel("val acc % (final model)")
    axes[1].set_title("colour = start width")
    return save_plot(fig, name)


# ---------------------------------------------------------------------------------- cost
def cmd_cost(args) -> None:
    rows, series = [], {}
    dev = device(args)
    for spec in args.cost_models:
        name, _, w = spec.partition("@")
        width = float(w or 1)
        bundle = data_for(name, args)
        kw = method_kwargs(args)
        # dense first, then fit (same init, same data order)
        model = build(name, width, bundle, args.seed)
        torch.manual_seed(args.seed)
        train, val = loaders(bundle, args.batch_size, args.seed)
        tr = DenseTrainer(model, train, val, total_epochs=args.epochs, lr=kw["lr"], optimizer=kw["optimizer"],
                          momentum=kw["momentum"], dev=dev)
        for _ in range(args.epochs):
            tr.run_epoch()
        dense_t = [h["epoch_time_s"] for h in tr.history]
        r = run_fit(build(name, width, bundle, args.seed), bundle, args, args.seed, args.epochs, f"{spec} fit")
        hist = r["res"].history
        fit_t = [h["epoch_time_s"] for h in hist]
        p_start = n_params(build(name, width, bundle, args.seed))
        p_end = hist[-1]["params"]
        removed = p_start - p_end

        def epoch_reaching(frac):
            if removed <= 0:
                return "-"
            return next(h["epoch"] for h in hist if p_start - h["params"] >= frac * removed)
        series[spec] = (dense_t, fit_t, [h["params"] / p_start for h in hist])
        sd, sf = sum(dense_t), sum(fit_t)
        med_ratio_first = statistics.median(fit_t[:3]) / statistics.median(dense_t[:3])
        med_ratio_last = statistics.median(fit_t[-3:]) / statistics.median(dense_t[-3:])
        rows.append([f"{name} {width:g}x", args.epochs, f"{sd:.1f}s", f"{sf:.1f}s (+wrap {r['wrap_s']:.2f}s)",
                     f"**{sf / sd:.2f}x**", f"{med_ratio_first:.2f}x / {med_ratio_last:.2f}x",
                     f"{100 * p_end / p_start:.1f}%", f"{epoch_reaching(0.5)} / {epoch_reaching(0.9)}",
                     acc(tr.history[-1]["val_acc"]), acc(r["acc_small"])])
        print(rows[-1], flush=True)
    header = ["model", "epochs", "dense total", "fit total", "fit/dense", "per-epoch ratio first 3 / last 3 (medians)",
              "params with theta>0 at end", "epoch by which 50% / 90% of the removal was done", "dense val",
              "fit val (final model)"]
    table = md_table(header, rows)
    print(table)
    plot = plot_cost(series)
    body = (f"### cost: time per epoch, vpsurgery fit vs dense training of the same model\n\n{stamp(args)}\n\n"
            f"Same init, data order and weight optimizer; epoch time = train + end-of-epoch work + val "
            f"(fit: its `epoch_time_s`, which includes its pruning; dense: `bench/common_train.py`). "
            f"Measured on a shared, loaded CPU: single epochs are noisy; read the totals and the medians.\n\n"
            f"{table}\n\n![cost]({plot})\n")
    write_sub("cost", body)


def plot_cost(series) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.8), squeeze=False)
    for ax, (spec, (d, f, p)) in zip(axes[0], series.items()):
        ep = list(range(1, len(d) + 1))
        ax.plot(ep, d, "k-o", ms=3, label="dense")
        ax.plot(ep, f, "b-o", ms=3, label="vpsurgery fit")
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch time (s)")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(ep, [100 * v for v in p], "r--", label="fit params kept %")
        ax2.set_ylabel("params with theta>0 (%)", color="r")
        ax2.set_ylim(0, 105)
        ax.legend(loc="lower left")
        ax.set_title(spec)
    return save_plot(fig, "method_cost.png")


# ---------------------------------------------------------------------------------- overhead
def cmd_overhead(args) -> None:
    import torchvision
    dev = device(args)
    cuda = dev.type == "cuda"
    batch = args.overhead_batch or (256 if cuda else 32)
    size = args.overhead_size
    kw = method_kwargs(args)
    rows, data = [], {}
    for name in args.overhead_models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
        x = torch.randn(batch, 3, size, size, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        t0 = time.perf_counter()
        gm = vpsurgery.wrap(copy.deepcopy(model), (x[:2].cpu(),))
        t_wrap = time.perf_counter() - t0
        for g in vpsurgery.gates(gm).values():
            g.set(1.0)
        model, gm = model.to(dev).train(), gm.to(dev).train()
        n_train = kw["n_train"] or 50_000
        opt_m = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=kw["momentum"])
        th = [g.theta for g in vpsurgery.gates(gm).values()]
        w = [p for p in gm.parameters() if all(p is not t for t in th)]
        opt_w = torch.optim.SGD(w, lr=1e-4, momentum=kw["momentum"])
        # theta's optimizer as fit builds it (theta_optimizer when fit has that option, else SGD)
        theta_opt = kw.get("theta_optimizer", "sgd")
        opt_t = torch.optim.Adam(th, lr=1e-6) if theta_opt == "adam" else torch.optim.SGD(th, lr=1e-6)

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def plain_step():
            with autocast(dev):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
            opt_m.step()
            opt_m.zero_grad(set_to_none=True)

        def gated_step():
            with autocast(dev):
                out = gm(x)
            loss = F.cross_entropy(out.float(), y) + objective(gm, n_train, price=kw["price"], sigma1=kw["sigma1"],
                                                                per=kw["per"], prior=kw["prior"], sigma0=kw["sigma0"])
            loss.backward()
            opt_w.step()
            opt_t.step()
            with torch.no_grad():
                for p in th:
                    p.clamp_(0.0, 1.0)
            opt_w.zero_grad(set_to_none=True)
            opt_t.zero_grad(set_to_none=True)

        def timed(fn):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t

        for _ in range(args.warmup):
            plain_step()
            gated_step()
        tp_, tg_ = [], []
        for i in range(args.repeats):
            order = (plain_step, gated_step) if i % 2 == 0 else (gated_step, plain_step)
            for fn in order:
                (tp_ if fn is plain_step else tg_).append(timed(fn))
        mp, mg = statistics.median(tp_), statistics.median(tg_)
        pair = statistics.median([g / p for g, p in zip(tg_, tp_)])
        data[name] = (tp_, tg_)
        n_gates = sum(g.theta.numel() for g in vpsurgery.gates(gm).values())
        rows.append([name, f"{batch}x3x{size}x{size}", str(dev), f"{mp * 1e3:.0f} ms", f"{mg * 1e3:.0f} ms",
                     f"**{mg / mp:.3f}x**", f"{pair:.3f}x", f"{min(tp_) * 1e3:.0f} / {min(tg_) * 1e3:.0f} ms",
                     "yes" if mg / mp <= 1.10 else "no", f"{n_gates:,} gates; wrap {t_wrap:.1f}s"])
        print(rows[-1], flush=True)
        del model, gm
    header = ["model", "input", "device", "plain step (median)", "gated step (median)", "ratio of medians",
              "median of paired ratios", "min plain / gated", "≤ 1.10x", "notes"]
    table = md_table(header, rows)
    print(table)
    body = (f"### overhead: one training step, gated (all theta = 1, no pruning) vs the unwrapped model\n\n"
            f"{stamp(args)}\n\n"
            f"Step = forward + cross-entropy (+ `vpsurgery.objective(...)` with fit's price/per/prior/sigma for "
            f"the gated model, n_train {kw['n_train'] or 50_000}) + backward + SGD step on the weights (gated: "
            f"also the theta step ({kw.get('theta_optimizer', 'sgd')}) and the [0,1] projection, i.e. fit's per-step work without data loading). "
            f"Gates sample z ~ Bernoulli(theta) in train mode with the straight-through gradient (one pass; with `estimator='disarm'` fit does two passes per step, not measured here). Synthetic "
            f"{batch}x3x{size}x{size} input, torchvision `weights=None, num_classes=10`, train mode. "
            f"{args.warmup} warm-up steps each, then {args.repeats} timed steps each, interleaved (order "
            f"alternating). {'bf16 autocast as in fit.' if cuda else 'No GPU was available to this run: CPU, so the goal (batch 256 on GPU) is not what was measured.'}"
            f"\n\n{table}\n")
    write_sub("overhead", body)


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["compare", "robustness", "cost", "overhead", "all"])
    p.add_argument("--data", default="digits", help="digits (default) or mnist:DIR")
    p.add_argument("--split-seed", type=int, default=0, help="train/val split seed (digits)")
    p.add_argument("--seed", type=int, default=0, help="init/shuffle seed for compare and cost")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--models", nargs="+", default=["lenet300_100", "lenet5"], help="compare: models")
    p.add_argument("--tp-pretrain-frac", type=float, default=0.5,
                   help="compare: share of the epochs trained dense before Torch-Pruning prunes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="robustness")
    p.add_argument("--widths", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="robustness")
    p.add_argument("--kept-params", type=int, default=None,
                   help="robustness: ask every start width for this many params (fit's target)")
    p.add_argument("--cost-models", nargs="+", default=["lenet300_100@2", "lenet5@1"], help="cost: NAME@WIDTH")
    p.add_argument("--overhead-models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--overhead-batch", type=int, default=None, help="default 256 on GPU, 32 on CPU")
    p.add_argument("--overhead-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    add_method_flags(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(config_line(args), flush=True)
    cmds = {"compare": cmd_compare, "robustness": cmd_robustness, "cost": cmd_cost, "overhead": cmd_overhead}
    for name in (cmds if args.command == "all" else [args.command]):
        t0 = time.perf_counter()
        cmds[name](args)
        print(f"[{name}] wall time {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
