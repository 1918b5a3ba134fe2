"""Coverage sweep: wrap + random hard assignment + shrink on every torchvision classification model (images and video)
and vpsurgery's reference nets; writes docs/coverage.md.

    python bench/coverage.py                      # all models (~85)
    python bench/coverage.py --models resnet18 vps:lenet5 --out /tmp/cov.md

Per model: trace (wrap), channel groups and gated units, prunable share of conv/linear output
channels, residual sections found; then a seeded random hard assignment zeroing >= 30% of each
channel group's units (at least one unit of every group stays) and ~30% of the section gates;
shrink; and the exactness of shrink(gm)(x) against gm(x) (max abs diff / max abs output),
params / FLOPs (torch.utils.flop_counter, one forward) / conv-linear depth before -> after.
Every model runs in its own try/except (and time limit); the report is rewritten atomically after
each model so a partial run still leaves a valid file.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402

EXACT_TOL = 1e-4
CHANNEL_DROP = 0.3
SECTION_DROP = 0.3


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def rel_err(out, ref) -> float:
    a, b = _tensors(out), _tensors(ref)
    if len(a) != len(b) or not a:
        return float("inf")
    err = 0.0
    for o, r in zip(a, b):
        if o.shape != r.shape:
            return float("inf")
        diff = (o.double() - r.double()).abs().max().item()
        err = max(err, diff / max(r.double().abs().max().item(), 1e-12))
    return err


def short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}" + ("..." if len(msg) > n else "")


def random_assignment(gates: dict, seed: int) -> tuple[int, int, int, int]:
    """Hard 0/1 assignment. Channel gates: ceil(30%) of each group's units zeroed, at most n-1 (a
    group never vanishes, so the output stays a function of the input). Section gates: round(30%)
    of them zeroed (at least one when there are any). Returns (units zeroed, units, sections
    zeroed, sections)."""
    g = torch.Generator().manual_seed(seed)
    sections = [k for k, gate in gates.items() if gate.kind == "section"]
    zeroed, total = common.zero_channel_units(gates, CHANNEL_DROP, g)
    s_off = max(1, round(SECTION_DROP * len(sections))) if sections else 0
    off = set(sections[i] for i in torch.randperm(len(sections), generator=g)[:s_off].tolist())
    for name in sections:
        gates[name].set(0.0 if name in off else 1.0)
    return zeroed, total, s_off, len(sections)


def run_one(name: str, seed: int = 0) -> dict:
    model, x = common.build(name, seed)
    return measure(model, x, {"model": name}, seed)


def measure(model, x, r: dict, seed: int = 0, capture: str = "auto") -> dict:
    """The trial on one built (eval-mode) model and its example input; fills and returns `r`.
    Also used by bench/coverage_zoo.py on timm / segmentation / detection models."""
    import vpsurgery
    from vpsurgery.passes.analyse.sections import network_depth

    r["input"] = "x".join(map(str, x.shape))
    r["params0"] = common.n_params(model)
    # big models (vit_h_14, regnet_y_128gf: ~2.5 GB of weights): wait until other jobs sharing the
    # machine leave room for the copies wrap and shrink make
    if not common.wait_for_memory(5 * 4 * r["params0"] + 2**30):
        raise MemoryError(f"not enough free memory for {r['params0'] / 1e6:.0f}M params after waiting")
    try:
        r["flops0"] = common.count_flops(model, x)
    except Exception as e:  # noqa: BLE001
        r["flops_err"] = short(e)
    with torch.no_grad():
        ref0 = model(x)

    t = time.perf_counter()
    try:
        gm = vpsurgery.wrap(model, (x,), capture=capture)
    except Exception as e:  # noqa: BLE001
        r["trace_err"] = short(e, 240)
        r["trace_line"] = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]
        r["trace_tb"] = traceback.format_exc(limit=-3)
        return r
    r["wrap_s"] = time.perf_counter() - t
    gm.eval()
    plan = vpsurgery.plan(gm)
    r["capture"] = plan.capture
    r["groups"] = len(plan.groups)
    r["units"] = sum(len(g.units) for g in plan.groups.values())
    r["share"] = float(plan.prunable_share)
    r["sections"] = len(plan.sections)
    r["unprunable"] = Counter(u.reason for u in plan.unprunable).most_common()
    r["depth0"] = plan.depth
    with torch.no_grad():
        r["identity_err"] = rel_err(gm(x), ref0)

    gates = vpsurgery.gates(gm)
    r["units_off"], r["units_total"], r["sec_off"], _ = random_assignment(gates, seed)
    with torch.no_grad():
        ref = gm(x)
    t = time.perf_counter()
    try:
        small = vpsurgery.shrink(gm)
    except Exception as e:  # noqa: BLE001
        r["shrink_err"] = short(e, 240)
        r["shrink_tb"] = traceback.format_exc(limit=-3)
        return r
    r["shrink_s"] = time.perf_counter() - t
    small.eval()
    try:
        with torch.no_grad():
            out = small(x)
        r["err"] = rel_err(out, ref)
    except Exception as e:  # noqa: BLE001
        r["run_err"] = short(e, 240)
        r["run_tb"] = traceback.format_exc(limit=-3)
        return r
    # a removed section's add node is gone from the shrunk graph (shrink keeps node names)
    names = {n.name for n in small.graph.nodes}
    gone = {k for k, s in plan.sections.items() if s.add not in names}
    asked = {k for k, gate in gates.items() if gate.kind == "section" and float(gate.theta.max()) < 0.5}
    r["sec_removed"] = len(gone)
    r["sec_mismatch"] = sorted(gone ^ asked)
    r["params1"] = common.n_params(small)
    try:
        r["flops1"] = common.count_flops(small, x)
    except Exception as e:  # noqa: BLE001
        r["flops_err"] = short(e)
    r["depth1"] = network_depth(small)
    return r


# ----------------------------------------------------------------------------------------------- report

def _pct(a, b):
    return f"{100 * b / a:.0f}%" if a else "-"


def _fmt_err(e):
    if e is None:
        return "-"
    if e == float("inf"):
        return "shape/len mismatch"
    return f"{e:.1e}"


# pinned on every model (the input's channels and the logits): left out of the reasons column
_EVERYWHERE = ("model input", "reaches the model output")


def status(r: dict) -> str:
    for key, label in (("error", "error"), ("trace_err", "trace"), ("shrink_err", "shrink"), ("run_err", "run")):
        if key in r:
            return label
    if r.get("err") is None:
        return "?"
    return "exact" if r["err"] <= EXACT_TOL else "INEXACT"


def row(r: dict) -> str:
    esc = common.md_escape
    traced = "yes" if "wrap_s" in r else ("**no**: " + esc(r.get("trace_err") or r.get("error", "?")))
    cells = [f"`{r['model']}`", r.get("input", "-"), traced]
    if "wrap_s" not in r:
        return "| " + " | ".join(cells + ["-"] * 12) + " |"
    err = _fmt_err(r.get("err"))
    for key, label in (("shrink_err", "shrink failed"), ("run_err", "shrunk model failed")):
        if key in r:
            err = f"**{label}**: {esc(r[key])}"
    if r.get("err") is not None and r["err"] > EXACT_TOL:
        err = f"**{err}**"
    sec_rm = r.get("sec_removed")
    flops = (f"{common.human(r['flops0'])}→{common.human(r['flops1'])} ({_pct(r['flops0'], r['flops1'])})"
             if "flops1" in r else (common.human(r["flops0"]) if "flops0" in r else "-"))
    params = (f"{common.human(r['params0'])}→{common.human(r['params1'])} ({_pct(r['params0'], r['params1'])})"
              if "params1" in r else common.human(r["params0"]))
    reasons = "; ".join([f"{esc(reason[:70])} ×{n}" for reason, n in r.get("unprunable", [])
                         if reason not in _EVERYWHERE][:3]) or "-"
    cells += [
        str(r["groups"]),
        f"{r['units']} ({r['units_off']} off)" if "units_off" in r else str(r["units"]),
        f"{100 * r['share']:.0f}%",
        str(r["sections"]),
        "-" if sec_rm is None else f"{sec_rm}/{r.get('sec_off', '?')}" + (" (≠ asked)" if r.get("sec_mismatch") else ""),
        _fmt_err(r.get("identity_err")),
        err,
        params,
        flops,
        f"{r['depth0']}→{r['depth1']}" if "depth1" in r else str(r["depth0"]),
        f"{r['wrap_s']:.1f}s",
        f"{r['shrink_s']:.1f}s" if "shrink_s" in r else "-",
        reasons,
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | input | traced | channel groups | gated units | prunable share | sections | "
          "sections removed (got/asked) | gate-identity err | shrink err | params before→after | "
          "FLOPs before→after | depth before→after | wrap | shrink | top unprunable reasons |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---|")


def write_report(path, text: str) -> None:
    """Rewrite `path` with `text`, keeping any <!-- key:begin --> ... <!-- key:end --> blocks (with the
    heading line just above each) that other scripts put in the file, e.g. bench/coverage_zoo.py's."""
    import re
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    blocks = [m.group(0) for m in re.finditer(r"(?:^#+ [^\n]*\n\n)?<!-- (\w+):begin -->.*?<!-- \1:end -->",
                                              old, re.S | re.M)]
    common.write_atomic(path, text.rstrip("\n") + "".join("\n\n" + b for b in blocks) + "\n")


def render(results: list[dict], planned: int, meta: dict) -> str:
    traced = [r for r in results if "wrap_s" in r]
    shrunk = [r for r in traced if "err" in r]
    exact = [r for r in shrunk if r["err"] <= EXACT_TOL]
    id_exact = [r for r in traced if r.get("identity_err", float("inf")) <= EXACT_TOL]
    shares = [r["share"] for r in traced]
    kept_p = [r["params1"] / r["params0"] for r in shrunk if r.get("params0")]
    kept_f = [r["flops1"] / r["flops0"] for r in shrunk if r.get("flops0") and "flops1" in r]
    failures = [r for r in results if status(r) not in ("exact",)]
    total_s = sum(r.get("total_s", 0.0) for r in results)
    lines = [
        "# Coverage: vpsurgery on the torchvision classification zoo (images and video)",
        "",
        f"Generated by `bench/coverage.py` on {meta['date']}"
        + ("" if len(results) == planned else f" — **partial: {len(results)}/{planned} models so far**") + ".",
        f"Machine: {meta['machine']}. Sweep wall time {total_s / 60:.1f} min.",
        "",
        "Each model: `weights=None, num_classes=10`, eval mode, seed 0, batch 2, the smallest sensible input "
        "(64×64 for CNNs; ViT built with `image_size=64` (56 for /14); Swin and MaxViT 224×224; Inception-v3 96×96; "
        "video: 8×64×64 clips, 16×224×224 for S3D and MViT; vpsurgery's nets at their native shapes). After `wrap`, a seeded random hard assignment zeroes "
        f"⌈{CHANNEL_DROP:.0%}⌉ of the units of every channel group (keeping at least one) and "
        f"~{SECTION_DROP:.0%} of the section gates (at least one); `shrink` then must reproduce the gated model. "
        "*shrink err* = max|shrink(gm)(x) − gm(x)| / max|gm(x)|; *gate-identity err* is the same for the "
        "freshly wrapped model (all θ = 1) against the original. FLOPs from `torch.utils.flop_counter.FlopCounterMode` "
        "(one forward, batch 2, so 2×MACs×batch); depth = longest chain of conv/linear layers. The unprunable "
        "reasons leave out the two every model has (the model input and the logits). Wrap/shrink times are "
        "wall clock on a shared 2-core machine (other jobs were running), so read them as rough.",
        "",
        "## Summary",
        "",
        f"- models: {len(results)} run of {planned} planned",
        f"- traced (wrap succeeded): **{len(traced)}/{len(results)}**",
        f"- shrunk and run: {len(shrunk)}/{len(traced)}",
        f"- exact within {EXACT_TOL:g} after the random assignment: **{len(exact)}/{len(shrunk)}** "
        f"({len(exact)}/{len(results)} of all)",
        f"- gated model identical to the original at θ = 1 (within {EXACT_TOL:g}): {len(id_exact)}/{len(traced)}",
        f"- median prunable share of conv/linear output channels: **{100 * statistics.median(shares):.0f}%**"
        if shares else "- median prunable share: -",
        (f"- median params kept after the trial: {100 * statistics.median(kept_p):.0f}%; "
         f"median FLOPs kept: {100 * statistics.median(kept_f):.0f}%") if kept_p and kept_f else "",
        f"- models with residual sections: {sum(1 for r in traced if r['sections'])}/{len(traced)}; "
        f"sections found in all: {sum(r['sections'] for r in traced)}",
        "",
    ]
    if failures:
        lines += ["### Failures and inexact results", ""]
        for r in failures:
            msg = (r.get("error") or r.get("trace_err") or r.get("shrink_err") or r.get("run_err")
                   or f"max rel err {_fmt_err(r.get('err'))}")
            lines.append(f"- `{r['model']}` ({status(r)}): {common.md_escape(msg)}")
        lines.append("")
    lines += ["## Per model", "", HEADER]
    for r in results:
        if "error" in r and "wrap_s" not in r:
            r = {**r, "trace_err": r["error"]}
        lines.append(row(r))
    lines.append("")
    return "\n".join(lines)


def line(r: dict) -> str:
    s = status(r)
    if "wrap_s" not in r:
        return f"{r['model']:24s} {s.upper():7s} {r.get('trace_err') or r.get('error')}"
    parts = [f"{r['model']:24s} {s:7s} groups={r['groups']:3d} units={r['units']:5d} share={r['share']:.2f} "
             f"sec={r['sections']:2d} id={_fmt_err(r.get('identity_err'))}"]
    if "err" in r:
        parts.append(f"err={_fmt_err(r['err'])} P {common.human(r['params0'])}->{common.human(r['params1'])} "
                     f"depth {r['depth0']}->{r['depth1']} wrap={r['wrap_s']:.1f}s shrink={r['shrink_s']:.1f}s")
    for key in ("shrink_err", "run_err"):
        if key in r:
            parts.append(r[key])
    return " ".join(parts)


# rough relative cost of wrap+shrink (grows with the number of graph nodes, not with params): used by
# --cheap-first so that a sweep cut short has covered as many models as possible
_HEAVY = ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_m", "efficientnet_v2_l",
          "regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "vit_h_14", "vit_l_16", "vit_l_32", "swin_b",
          "swin_v2_b", "convnext_large", "convnext_base", "densenet161", "densenet169", "densenet201",
          "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2", "maxvit_t")
_MEDIUM = ("efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_v2_s", "regnet_y_16gf",
           "regnet_x_16gf", "regnet_y_8gf", "regnet_x_8gf", "swin_s", "swin_v2_s", "convnext_small",
           "resnet101", "densenet121", "inception_v3", "vit_b_16", "vit_b_32")


def cost_rank(name: str) -> int:
    if name.startswith(("swin", "vit_", "maxvit")):  # wrap's channel analysis is slowest on these
        return 3
    return 2 if name in _HEAVY else 1 if name in _MEDIUM else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="subset (torchvision names, or vps:<name> for vpsurgery.models)")
    ap.add_argument("--out", default=str(common.REPO / "docs" / "coverage.md"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared machine)")
    ap.add_argument("--timeout", type=int, default=600, help="per-model time limit, seconds")
    ap.add_argument("--jsonl", default="/tmp/vpsurgery_coverage.jsonl",
                    help="raw per-model results, appended as they finish (for --resume)")
    ap.add_argument("--cheap-first", action="store_true",
                    help="run cheap models first (the report keeps the list order)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite --out from the results in --jsonl, running nothing")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the results in --jsonl for models already done; run only the rest")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    names = args.models or common.all_models()
    valid = set(common.all_models())
    for n in names:
        if n not in valid and f"vps:{n}" in valid:
            names[names.index(n)] = f"vps:{n}"
    meta = {"date": common.today(), "machine": common.machine()}
    done: dict[str, dict] = {}
    if (args.resume or args.render_only) and os.path.exists(args.jsonl):
        with open(args.jsonl) as f:
            for ln in f:
                if ln.strip():
                    r = json.loads(ln)
                    done[r["model"]] = r
    elif os.path.exists(args.jsonl):
        os.unlink(args.jsonl)
    results: list[dict] = [done[n] for n in names if n in done]
    todo = [] if args.render_only else [n for n in names if n not in done]
    if args.cheap_first:
        todo.sort(key=cost_rank)
    if done:
        print(f"resuming: {len(results)} models from {args.jsonl}, {len(todo)} to run")
    bar = tqdm(todo, unit="model", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            with common.time_limit(args.timeout):
                r = run_one(name, args.seed)
        except (Exception, common.Timeout) as e:  # noqa: BLE001
            r = {"model": name, "error": short(e, 240), "tb": traceback.format_exc(limit=-3)}
        r["total_s"] = time.perf_counter() - t0
        results.append(r)
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        tqdm.write(line(r))
        for key in ("trace_tb", "shrink_tb", "run_tb", "tb"):
            if key in r:
                tqdm.write("    " + r[key].strip().splitlines()[-1][:300])
        order = {n: i for i, n in enumerate(names)}
        results.sort(key=lambda r: order[r["model"]])
        write_report(args.out, render(results, len(names), meta))
        gc.collect()
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: order[r["model"]])
    write_report(args.out, render(results, len(names), meta))
    traced = sum(1 for r in results if "wrap_s" in r)
    exact = sum(1 for r in results if status(r) == "exact")
    print(f"\n{traced}/{len(results)} traced, {exact}/{len(results)} exact within {EXACT_TOL:g}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
