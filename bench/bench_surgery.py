"""Surgery cost: vpsurgery wrap+shrink vs Torch-Pruning's DependencyGraph build + one pruning step.

    python bench/bench_surgery.py                       # default models, median of 3, writes BENCHMARKS.md
    python bench/bench_surgery.py --models resnet18 --repeats 1 --no-write

Both tools get the same seeded model (weights=None, num_classes=10, eval) and the same input
(batch 2, 64x64). vpsurgery: `wrap(model, (x,))`, a hard assignment zeroing ceil(30%) of the
units of every channel group (section gates left on, so both tools prune channels only), then
`shrink`. Torch-Pruning: `tp.pruner.MagnitudePruner(model, x, MagnitudeImportance(p=2),
pruning_ratio=0.3, ignored_layers=[classifier])` (its constructor builds the DependencyGraph) and one
`pruner.step()`. Each repeat starts from a fresh deep copy of the model; times are wall clock, the
table shows the median. Failures are recorded with their error text, not hidden.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402

DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121",
                  "regnet_x_400mf", "convnext_tiny", "shufflenet_v2_x0_5"]
RATIO = 0.3
SIZE = 64
MARK = "surgery"
HEADING = "## Surgery: wrap+shrink vs Torch-Pruning"


def short(e: BaseException, n: int = 200) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}" + ("..." if len(msg) > n else "")


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    import torchvision
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def check_run(model: nn.Module, x: torch.Tensor) -> str | None:
    """None if the pruned model runs and gives (batch, 10) finite logits, else what went wrong."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001
        return short(e)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], 10):
        return f"output shape {getattr(out, 'shape', type(out))}"
    if not torch.isfinite(out).all():
        return "non-finite output"
    return None


def vps_once(model: nn.Module, x: torch.Tensor, seed: int = 0, *, inplace: bool = True) -> dict:
    """wrap + shrink, timed. inplace=True: both give up their input (as Torch-Pruning prunes the
    model it is given); False: vpsurgery's default, which copies the model and the gated model."""
    import vpsurgery
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    gm = vpsurgery.wrap(m, (x,), inplace=inplace)
    t1 = time.perf_counter()
    off, total = common.zero_channel_units(vpsurgery.gates(gm), RATIO, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = gm.eval()(x)  # before an in-place shrink consumes the gated model
    t2 = time.perf_counter()
    small = vpsurgery.shrink(gm, inplace=inplace)
    t3 = time.perf_counter()
    small.eval()
    err = check_run(small, x)
    exact = None
    if err is None:
        with torch.no_grad():
            exact = ((small(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    return {"wrap": t1 - t0, "shrink": t3 - t2, "total": (t1 - t0) + (t3 - t2), "params": common.n_params(small),
            "run_err": err, "exact": exact, "units_off": off, "units": total}


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers producing the logits (10 outputs): Torch-Pruning must not prune those."""
    return [m for m in model.modules()
            if (isinstance(m, nn.Linear) and m.out_features == 10)
            or (isinstance(m, nn.Conv2d) and m.out_channels == 10)]


class StageError(RuntimeError):
    pass


def _where(e: BaseException) -> str:
    """file:line of the innermost frame, relative to site-packages."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return "?"
    f = tb[-1]
    return f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"


def tp_once(model: nn.Module, x: torch.Tensor) -> dict:
    import torch_pruning as tp
    m = copy.deepcopy(model)
    imp = tp.importance.MagnitudeImportance(p=2)
    t0 = time.perf_counter()
    try:
        pruner = tp.pruner.MagnitudePruner(m, x, importance=imp, pruning_ratio=RATIO,
                                           ignored_layers=classifier_layers(m))
    except Exception as e:
        raise StageError(f"in DependencyGraph build: {short(e)} [{_where(e)}]") from e
    t1 = time.perf_counter()
    try:
        pruner.step()
    except Exception as e:
        raise StageError(f"in pruner.step(): {short(e)} [{_where(e)}]") from e
    t2 = time.perf_counter()
    m.eval()
    return {"build": t1 - t0, "step": t2 - t1, "total": t2 - t0, "params": common.n_params(m),
            "run_err": check_run(m, x)}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench(name: str, repeats: int) -> dict:
    model, x = build(name)
    row: dict = {"model": name, "params0": common.n_params(model), "input": "x".join(map(str, x.shape))}
    for tool, fn in (("vps", lambda: vps_once(model, x)), ("vps_copy", lambda: vps_once(model, x, inplace=False)),
                     ("tp", lambda: tp_once(model, x))):
        runs = []
        try:
            for _ in range(repeats):
                runs.append(fn())
                gc.collect()
        except Exception as e:  # noqa: BLE001
            row[f"{tool}_err"] = str(e) if isinstance(e, StageError) else f"{short(e)} [{_where(e)}]"
            row[f"{tool}_tb"] = traceback.format_exc(limit=-2)
        if runs:
            row[tool] = {k: (median_of(runs, k) if isinstance(runs[0][k], float) and k != "exact" else runs[-1][k])
                         for k in runs[0]}
            row[tool]["n"] = len(runs)
    return row


def _t(s: float) -> str:
    return f"{s:.2f}s" if s < 10 else f"{s:.1f}s"


def table(rows: list[dict]) -> str:
    esc = common.md_escape
    out = ["| model | params | vpsurgery wrap | shrink | **wrap+shrink** | ran / params kept | "
           "TP DG build | TP step | **TP total** | ran / params kept | **vps / TP** | vps copying (default) | "
           "copying / TP |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        p0 = r["params0"]
        cells = [f"`{r['model']}`", common.human(p0)]
        v, t = r.get("vps"), r.get("tp")
        if v:
            ran = "yes" if v["run_err"] is None else f"**no**: {esc(v['run_err'])}"
            ex = f", err {v['exact']:.0e}" if v.get("exact") is not None else ""
            cells += [_t(v["wrap"]), _t(v["shrink"]), f"**{_t(v['total'])}**",
                      f"{ran}{ex}, {common.human(v['params'])} ({100 * v['params'] / p0:.0f}%)"]
        else:
            cells += ["-", "-", "**failed**", esc(r.get("vps_err", "?"))]
        if t:
            ran = "yes" if t["run_err"] is None else f"**no**: {esc(t['run_err'])}"
            cells += [_t(t["build"]), _t(t["step"]), f"**{_t(t['total'])}**",
                      f"{ran}, {common.human(t['params'])} ({100 * t['params'] / p0:.0f}%)"]
        else:
            cells += ["-", "-", "**failed**", f"**{esc(r.get('tp_err', '?'))}**"]
        cells.append(f"{v['total'] / t['total']:.2f}×" if v and t else "-")
        c = r.get("vps_copy")
        cells.append(_t(c["total"]) if c else esc(r.get("vps_copy_err", "-")))
        cells.append(f"{c['total'] / t['total']:.2f}×" if c and t else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def section(rows: list[dict], meta: dict) -> str:
    from importlib.metadata import version
    ratios = [r["vps"]["total"] / r["tp"]["total"] for r in rows if r.get("vps") and r.get("tp")]
    copy_ratios = [r["vps_copy"]["total"] / r["tp"]["total"] for r in rows if r.get("vps_copy") and r.get("tp")]
    tp_fail = [r for r in rows if "tp_err" in r or (r.get("tp") and r["tp"]["run_err"])]
    vps_fail = [r for r in rows if "vps_err" in r or (r.get("vps") and r["vps"]["run_err"])]
    lines = [
        f"Generated by `bench/bench_surgery.py` on {meta['date']}. Machine: {meta['machine']}; "
        f"torch-pruning {version('torch-pruning')}. {meta['note']}",
        "",
        f"Same seeded model (`weights=None, num_classes=10`, eval) and input ({rows[0]['input'] if rows else '-'}) "
        f"for both tools; median of {meta['repeats']} runs, each from a fresh deep copy. "
        "vpsurgery: `wrap(model, inplace=True)` (trace, channel/section analysis, gate insertion) + "
        "`shrink(gated, inplace=True)` after a hard "
        f"assignment zeroing ⌈{RATIO:.0%}⌉ of every channel group's units (sections kept, so both prune channels only). "
        "Torch-Pruning: `MagnitudePruner(model, x, MagnitudeImportance(p=2), pruning_ratio="
        f"{RATIO}, ignored_layers=[classifier])` (the constructor builds the DependencyGraph) + one `step()`. "
        "*ran* = the pruned model runs and returns finite (2, 10) logits; for vpsurgery *err* is "
        "max|shrunk − gated| / max|gated|. Params kept differ because the two tools count what "
        "a 30% ratio applies to differently (TP also leaves some layers unpruned, vpsurgery prunes every gated group). "
        "In place, as Torch-Pruning works: both tools give up the model they are given. *vps copying* is "
        "vpsurgery's default (`inplace=False`: wrap copies the model, shrink the gated model), timed in the same run.",
        "",
        table(rows),
        "",
    ]
    if ratios:
        lines.append(f"Median vps/TP time ratio: **{statistics.median(ratios):.2f}×** "
                     f"(range {min(ratios):.2f}–{max(ratios):.2f}×; < 1 means vpsurgery is faster); "
                     f"{sum(q < 1 for q in ratios)} of {len(ratios)} models faster than Torch-Pruning.")
    if copy_ratios:
        lines.append(f"With vpsurgery's copying default: median **{statistics.median(copy_ratios):.2f}×** "
                     f"(range {min(copy_ratios):.2f}–{max(copy_ratios):.2f}×).")
    if tp_fail:
        lines.append("")
        lines.append("Torch-Pruning failures (recorded as raised / as the pruned model behaved):")
        for r in tp_fail:
            lines.append(f"- `{r['model']}`: {common.md_escape(r.get('tp_err') or r['tp']['run_err'])}")
    if vps_fail:
        lines.append("")
        lines.append("vpsurgery failures:")
        for r in vps_fail:
            lines.append(f"- `{r['model']}`: {common.md_escape(r.get('vps_err') or r['vps']['run_err'])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(common.REPO / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--note", default="", help="free text for the report (e.g. other load on the machine)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        r = bench(name, args.repeats)
        rows.append(r)
        v, t = r.get("vps"), r.get("tp")
        print(f"{name:20s} vps={v['total'] if v else float('nan'):.2f}s ({r.get('vps_err') or (v and v['run_err']) or 'ok'}) "
              f"tp={t['total'] if t else float('nan'):.2f}s ({r.get('tp_err') or (t and t['run_err']) or 'ok'}) "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        for key in ("vps_tb", "tp_tb"):
            if key in r:
                print("    " + r[key].strip().splitlines()[-1][:300], flush=True)
    meta = {"date": common.today(), "machine": common.machine(), "repeats": args.repeats, "note": args.note}
    body = section(rows, meta)
    print()
    print(table(rows))
    if not args.no_write:
        common.replace_section(args.out, MARK, HEADING, body)
        print(f"\nwrote the '{MARK}' section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
