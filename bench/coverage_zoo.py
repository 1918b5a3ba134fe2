"""Coverage sweep over other zoos: timm classifiers (all families), torchvision segmentation models and
detectors; writes the <!-- zoo:begin --> / <!-- zoo:end --> section of docs/coverage.md.

    python bench/coverage_zoo.py                          # everything (82 models, 2.4 min on this 2-core VM)
    python bench/coverage_zoo.py --only levit_128s swin_tiny_patch4_window7_224
    python bench/coverage_zoo.py --family transformer hybrid
    python bench/coverage_zoo.py --list                   # names and families, nothing run
    python bench/coverage_zoo.py --render-only            # rewrite the section from --jsonl

The trial per model is bench/coverage.py's (`coverage.measure`): wrap (capture='auto': torch.fx, torch.export
where fx cannot trace), the plan's groups / sections / prunable share, a seeded random hard assignment
(ceil 30% of every channel group's units zeroed, at least one kept; ~30% of the section gates zeroed), shrink,
and max|shrink(gm)(x) - gm(x)| / max|gm(x)| in eval mode. Before the trial the norm statistics and affine
parameters are randomised (tests/conftest.py's `realistic_stats`), so that a wrongly removed channel shows.
Every model runs in its own forked subprocess with a time limit (a crash or hang costs one row). Results are kept
in --jsonl keyed by model, so `--only` / `--family` re-run some rows and keep the others.
timm is an optional extra: `pip install -e .[zoo]`; no weights are downloaded (pretrained=False).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import coverage  # noqa: E402

TESTS = common.REPO / "tests"
BATCH = 2
SIZE = 64  # CNN input side; transformers get img_size=64 where timm accepts it, else their default

# (name, family). timm names unless prefixed: tvseg: torchvision segmentation, tvdet: torchvision
# detection, test: tests/capture_nets.py, user: tests/user_nets.py (each with its own input)
ZOO: list[tuple[str, str]] = [
    # concat trees
    ("densenet121", "concat"), ("dla34", "concat"), ("dla46_c", "concat"), ("vovnet39a", "concat"),
    ("ese_vovnet19b_dw", "concat"), ("selecsls42b", "concat"), ("dpn48b", "concat"),
    ("hgnetv2_b0", "concat"),
    # split attention / selective kernel / multi-scale splits
    ("resnest14d", "split-attention"), ("resnest26d", "split-attention"), ("skresnet18", "split-attention"),
    ("res2net50_14w_8s", "split-attention"),
    # ghost modules (half the channels from a cheap depthwise op, concatenated)
    ("ghostnet_050", "ghost"), ("ghostnetv2_100", "ghost"), ("repghostnet_050", "ghost"),
    # re-parameterisable (multi-branch at train time)
    ("repvgg_a0", "rep"), ("mobileone_s0", "rep"), ("repvit_m0_9", "rep"),
    # scaled / weight-standardised convs, norm-free
    ("nf_resnet26", "nf/stdconv"), ("nf_regnet_b0", "nf/stdconv"), ("eca_nfnet_l0", "nf/stdconv"),
    ("resnetv2_50x1_bit", "nf/stdconv"), ("resnetv2_18", "nf/stdconv"),
    # efficientnet-style (inverted residuals, SE)
    ("efficientnet_b0", "efficientnet"), ("mobilenetv3_small_050", "efficientnet"),
    ("mobilenetv3_large_100", "efficientnet"), ("mixnet_s", "efficientnet"), ("rexnet_100", "efficientnet"),
    ("tinynet_e", "efficientnet"), ("lcnet_050", "efficientnet"), ("hardcorenas_a", "efficientnet"),
    ("mobilenetv4_conv_small", "efficientnet"),
    # regnet
    ("regnetx_002", "regnet"), ("regnety_002", "regnet"), ("regnetz_b16", "regnet"),
    # resnet / resnext variants
    ("resnet10t", "resnet"), ("resnet18d", "resnet"), ("resnet50d", "resnet"),
    ("seresnext26d_32x4d", "resnet"), ("ecaresnet26t", "resnet"), ("gernet_s", "resnet"),
    # cross-stage partial
    ("cspresnet50", "csp"), ("cs3darknet_s", "csp"), ("cspdarknet53", "csp"),
    # multi-resolution
    ("hrnet_w18_small", "hrnet"),
    # plain vision transformers
    ("vit_tiny_patch16_224", "transformer"), ("deit_tiny_patch16_224", "transformer"),
    ("deit_tiny_distilled_patch16_224", "transformer"), ("xcit_nano_12_p16_224", "transformer"),
    ("swin_tiny_patch4_window7_224", "transformer"), ("pvt_v2_b0", "transformer"),
    # hybrids: conv + attention / token mixers
    ("levit_128s", "hybrid"), ("mobilevit_xxs", "hybrid"), ("mobilevitv2_050", "hybrid"),
    ("coat_lite_tiny", "hybrid"), ("edgenext_xx_small", "hybrid"), ("poolformer_s12", "hybrid"),
    ("convnext_atto", "hybrid"), ("efficientformer_l1", "hybrid"), ("efficientformerv2_s0", "hybrid"),
    ("fastvit_t8", "hybrid"), ("efficientvit_b0", "hybrid"), ("efficientvit_m0", "hybrid"),
    ("tiny_vit_5m_224", "hybrid"), ("inception_next_atto", "hybrid"), ("mambaout_femto", "hybrid"),
    ("resmlp_12_224", "hybrid"), ("coatnet_pico_rw_224", "hybrid"),
    # torchvision segmentation (dict outputs)
    ("tvseg:fcn_resnet50", "segmentation"), ("tvseg:deeplabv3_mobilenet_v3_large", "segmentation"),
    ("tvseg:lraspp_mobilenet_v3_large", "segmentation"), ("tvseg:deeplabv3_resnet50", "segmentation"),
    # detectors
    ("test:TinyYolo", "detection"), ("tvdet:ssdlite320_mobilenet_v3_large", "detection"),
    ("tvdet:fasterrcnn_mobilenet_v3_large_320_fpn", "detection"),
    # users' own networks (tests/user_nets.py): embeddings, tied heads, LSTMs, pixel shuffle, weight_norm
    *((f"user:{n}", "user") for n in ("TextTransformer", "TiedLM", "CRNN", "SubPixelSR", "WeightNormAudio",
                                      "SNDiscriminator", "UNet")),
]
FAMILY = dict(ZOO)


def _conftest():
    """tests/conftest.py as a module (its realistic_stats), without pytest collecting anything."""
    spec = importlib.util.spec_from_file_location("vps_conftest", TESTS / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timm(name: str):
    """(model, input shape): img_size=SIZE where the builder accepts it and the model runs at that size,
    else at the model's default input size."""
    import timm
    import torch

    def runs(model, side):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, side, side))
            return True
        except Exception:  # noqa: BLE001
            return False

    for kw in ({"img_size": SIZE}, {}):
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
        except TypeError:
            continue
        if runs(model, SIZE):
            return model, (3, SIZE, SIZE), kw
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    return model, tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))), {}


def build(name: str, seed: int = 0):
    """Seeded eval-mode model with realistic norm statistics, its input batch, and the builder kwargs."""
    import torch
    kw: dict = {}
    if name.startswith("tvseg:"):
        import torchvision
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name[6:], weights=None, weights_backbone=None, num_classes=5,
                                             aux_loss=False)
        shape = (3, SIZE, SIZE)
    elif name.startswith("tvdet:"):
        import torchvision
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name[6:], weights=None, weights_backbone=None, num_classes=5)
        shape = (3, 320, 320)
    elif name.startswith("user:"):
        sys.path.insert(0, str(TESTS))
        from user_nets import USER_NETS
        make, example = USER_NETS[name[5:]]
        torch.manual_seed(seed)
        model = _conftest().realistic_stats(make(), seed).eval()
        return model, example(torch.Generator().manual_seed(seed + 1)), kw
    elif name.startswith("test:"):
        sys.path.insert(0, str(TESTS))
        import capture_nets
        torch.manual_seed(seed)
        model, shape = getattr(capture_nets, name[5:])(), (3, 32, 32)
    else:
        model, shape, kw = _timm(name)
    model = _conftest().realistic_stats(model, seed).eval()
    x = torch.randn((BATCH, *shape), generator=torch.Generator().manual_seed(seed + 1))
    return model, x, kw


def child(name: str, out: str, seed: int) -> None:
    """Run one model's trial (in this process) and write its result as JSON to `out`."""
    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    r: dict = {"model": name, "family": FAMILY.get(name, "?")}
    t0 = time.perf_counter()
    try:
        model, x, kw = build(name, seed)
        r["builder_kw"] = kw
        coverage.measure(model, x, r, seed)
    except Exception as e:  # noqa: BLE001
        r["error"] = coverage.short(e, 240)
    r["total_s"] = time.perf_counter() - t0
    Path(out).write_text(json.dumps(r, default=str))


def run_isolated(name: str, seed: int, timeout: int) -> dict:
    """The trial in a forked child (the parent has torch, timm and vpsurgery imported, so a fork starts at
    once); a crash, a hang past `timeout` seconds or a memory kill costs that one row."""
    import multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        t0 = time.perf_counter()
        p = mp.get_context("fork").Process(target=child, args=(name, out, seed))
        p.start()
        p.join(timeout)
        fail = None
        if p.is_alive():
            p.kill()
            p.join()
            fail = f"Timeout: no result after {timeout}s"
        elif not os.path.exists(out):
            fail = f"crashed: exit status {p.exitcode}"
        r = ({"model": name, "family": FAMILY.get(name, "?"), "error": fail} if fail
             else json.loads(Path(out).read_text()))
        r["total_s"] = time.perf_counter() - t0
        return r


# ----------------------------------------------------------------------------------------------- report

def path_of(r: dict) -> str:
    """fx / export / timeout (no result within the limit: capture or a later pass did not finish) / refused."""
    if "capture" in r:
        return r["capture"]
    return "timeout" if str(r.get("error", "")).startswith("Timeout") else "refused"


def refusal(r: dict) -> str | None:
    if "wrap_s" in r:
        return None
    return r.get("trace_line") or r.get("trace_err") or r.get("error") or "?"


def err_cell(r: dict) -> str:
    esc = common.md_escape
    why = refusal(r)
    if why is not None:
        return f"**{why}**" if path_of(r) == "timeout" else f"refused: {esc(why[:200])}"
    for key, label in (("shrink_err", "shrink failed"), ("run_err", "shrunk model failed"), ("error", "error")):
        if key in r:
            return f"**{label}**: {esc(r[key][:200])}"
    e = r.get("err")
    s = coverage._fmt_err(e)
    return f"**{s}**" if e is not None and e > coverage.EXACT_TOL else s


def row(r: dict) -> str:
    h = common.human
    captured = "wrap_s" in r
    after_p = f"{h(r['params1'])} ({coverage._pct(r['params0'], r['params1'])})" if "params1" in r else "-"
    after_f = (f"{h(r['flops1'])} ({coverage._pct(r['flops0'], r['flops1'])})"
               if "flops1" in r and r.get("flops0") else "-")
    cells = [
        f"`{r['model']}`", r.get("family", "?"), r.get("input", "-"), path_of(r),
        h(r["params0"]) if "params0" in r else "-",
        h(r["flops0"]) if "flops0" in r else "-",
        f"{100 * r['share']:.0f}%" if captured else "-",
        str(r["groups"]) if captured else "-",
        str(r["sections"]) if captured else "-",
        coverage._fmt_err(r.get("identity_err")) if captured else "-",
        err_cell(r), after_p, after_f,
        f"{r['wrap_s']:.1f}" if captured else "-",
        f"{r['shrink_s']:.1f}" if "shrink_s" in r else "-",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | family | input | capture | params | FLOPs | prunable share | groups | sections | "
          "gate-identity err | shrink err (random hard gates) | params after | FLOPs after | wrap s | shrink s |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")


def render(results: list[dict], planned: int, meta: dict) -> str:
    captured = [r for r in results if "wrap_s" in r]
    paths = {p: sum(1 for r in results if path_of(r) == p) for p in ("fx", "fx+export", "export", "refused", "timeout")}
    errs = [r["err"] for r in captured if r.get("err") is not None]
    exact = [r for r in captured if r.get("err") is not None and r["err"] <= coverage.EXACT_TOL]
    broken = [r for r in captured if r.get("err") is None]  # captured, but shrink or the shrunk model failed
    shares = [r["share"] for r in captured]
    worst = max(captured, key=lambda r: r.get("err") if r.get("err") is not None else -1.0, default=None)
    total_s = sum(r.get("total_s", 0.0) for r in results)
    lines = [
        f"Generated by `bench/coverage_zoo.py` on {meta['date']}"
        + ("" if len(results) == planned else f" — **{len(results)} of {planned} models**") + ". "
        f"Machine: {meta['machine']}, timm {meta['timm']}. Sweep wall time {total_s / 60:.1f} min "
        "(one forked subprocess per model).",
        "",
        f"timm models with `pretrained=False, num_classes=10`, built with `img_size={SIZE}` where timm accepts it "
        f"and the model runs at {SIZE}×{SIZE}, else at the model's default input size; torchvision segmentation "
        "models with `weights=None, weights_backbone=None, num_classes=5, aux_loss=False` (dict outputs); "
        "torchvision detectors with `weights=None, weights_backbone=None, num_classes=5` at 320×320 in eval; "
        "`TinyYolo` from tests/capture_nets.py at 32×32. Batch 2, seed 0, eval mode. Norm statistics and affine "
        "parameters are randomised first (tests/conftest.py's `realistic_stats`) so that outputs are not ~0. "
        "`wrap(capture='auto')`: torch.fx (*fx+export*: calls fx keeps whole exported alone and spliced in), or "
        "torch.export where fx cannot trace; *capture* says which one. Then "
        f"the trial of bench/coverage.py: a seeded random hard 0/1 assignment zeroes ⌈{coverage.CHANNEL_DROP:.0%}⌉ "
        f"of every channel group's units (keeping one) and ~{coverage.SECTION_DROP:.0%} of the section gates; "
        "*shrink err* = max|shrink(gm)(x) − gm(x)| / max|gm(x)| per output tensor (the worst one); *gate-identity "
        "err* the same for the freshly wrapped model against the original. FLOPs by "
        "`torch.utils.flop_counter.FlopCounterMode`, one forward of the example batch. *refused*: the first line "
        "of wrap's error. Times are wall clock on a shared 2-core machine: rough.",
        "",
        f"**Summary**: {len(results)} models; captured by fx **{paths['fx']}**, by fx+export **{paths['fx+export']}**, "
        f"by export **{paths['export']}**, "
        f"refused **{paths['refused']}**, timed out **{paths['timeout']}**; exact within {coverage.EXACT_TOL:g}: **{len(exact)}/{len(captured)}** "
        f"captured" + (f" ({len(broken)} failed in shrink or after it)" if broken else "") + "; worst error "
        + (f"{coverage._fmt_err(worst['err'])} (`{worst['model']}`)" if errs else "-")
        + (f"; median prunable share **{100 * statistics.median(shares):.0f}%**." if shares else "."),
        "",
    ]
    bad = [r for r in results if "wrap_s" not in r or r.get("err") is None or r["err"] > coverage.EXACT_TOL]
    if bad:
        lines += ["Refused, failed or inexact:", ""]
        for r in bad:
            why = refusal(r)
            if why is None:
                lines.append(f"- `{r['model']}`: ({r['capture']}) {err_cell(r)}")
            else:
                lines.append(f"- `{r['model']}`: {path_of(r)}: {common.md_escape(why[:400])}")
        lines.append("")
    lines += [HEADER] + [row(r) for r in results]
    return "\n".join(lines)


def line(r: dict) -> str:
    if "wrap_s" not in r:
        return f"{r['model']:36s} REFUSED {refusal(r)}"
    return (f"{r['model']:36s} {r['capture']:6s} share={r['share']:.2f} groups={r['groups']} "
            f"sections={r['sections']} id={coverage._fmt_err(r.get('identity_err'))} {err_cell(r)} "
            f"wrap={r['wrap_s']:.1f}s shrink={r.get('shrink_s', float('nan')):.1f}s total={r['total_s']:.0f}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="these models (names as in --list)")
    ap.add_argument("--family", nargs="*", help="these families (as in --list)")
    ap.add_argument("--out", default=str(common.REPO / "docs" / "coverage.md"))
    ap.add_argument("--jsonl", default=str(common.REPO / "docs" / "results" / "coverage_zoo.jsonl"),
                    help="per-model results, kept between runs (in the repo): rows not re-run are taken from here")
    ap.add_argument("--fresh", action="store_true", help="forget the results in --jsonl first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=300, help="per-model time limit, seconds")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.child_out, args.seed)
        return 0
    if args.list:
        for name, fam in ZOO:
            print(f"{fam:16s} {name}")
        return 0
    todo = [n for n, fam in ZOO if (not args.only or n in args.only) and (not args.family or fam in args.family)]
    unknown = set(args.only or ()) - set(FAMILY)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; see --list")
    done: dict[str, dict] = {}
    if os.path.exists(args.jsonl) and not args.fresh:
        for ln in Path(args.jsonl).read_text().splitlines():
            if ln.strip():
                r = json.loads(ln)
                done[r["model"]] = r
    if args.render_only:
        todo = []

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import timm
    import torch
    import vpsurgery  # noqa: F401  (imported once here; every forked child has it)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    meta = {"date": common.today(), "machine": common.machine(), "timm": timm.__version__}

    def write():
        order = [n for n, _ in ZOO if n in done]
        results = [done[n] for n in order]
        common.replace_section(args.out, "zoo", "## Other zoos: timm, torchvision segmentation, detection",
                               render(results, len(ZOO), meta))
        Path(args.jsonl).write_text("".join(json.dumps(done[n], default=str) + "\n" for n in order))

    t0 = time.perf_counter()
    for i, name in enumerate(todo, 1):
        r = run_isolated(name, args.seed, args.timeout)
        done[name] = r
        print(f"[{i}/{len(todo)} {time.perf_counter() - t0:5.0f}s] {line(r)}", flush=True)
        write()
    write()
    print(f"{len(todo)} models run in {(time.perf_counter() - t0) / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
