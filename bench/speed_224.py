"""Surgery speed at full size: vpsurgery.wrap + shrink on every torchvision classifier at 224 px.

    python bench/speed_224.py                        # all models, writes docs/speed.md
    python bench/speed_224.py --models swin_t resnet50 --no-write

Each model runs twice, each time in its own process (memory comes back, a hang is cut off at
--timeout): seeded model (weights=None, num_classes=10, eval), input batch 2 x 3 x 224 x 224,
`wrap(model, (x,))`, a hard assignment zeroing ceil(30%) of the units of every channel group (as
bench_surgery.py does), then `shrink`; once as vpsurgery's default (wrap copies the model, shrink
the gated model) and once with inplace=True for both. Times are wall clock, one run each (the
first, as a user meets it: nothing warmed up).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import common  # noqa: E402

SIZE = 224
RATIO = 0.3
GOAL_S = 10.0


def one(name: str, inplace: bool = False) -> dict:
    """Time wrap and shrink of one model, in this process."""
    import torchvision

    import vpsurgery
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    params = common.n_params(model)
    # the model's tensors, held weakly: one that shrink frees must not keep the memory alive, and a
    # new tensor at a freed one's address is not mistaken for it
    old = {id(t): weakref.ref(t) for t in itertools.chain(model.parameters(), model.buffers())}
    t0 = time.perf_counter()
    gm = vpsurgery.wrap(model, (x,), inplace=inplace)
    t1 = time.perf_counter()
    common.zero_channel_units(vpsurgery.gates(gm), RATIO, torch.Generator().manual_seed(0))
    gated = {} if inplace else storages(gm, old)  # before an in-place shrink turns gm into the small model
    t2 = time.perf_counter()
    small = vpsurgery.shrink(gm, inplace=inplace)
    t3 = time.perf_counter()
    written = sum({**gated, **storages(small, old)}.values())
    return {"model": name, "params": params, "params_kept": common.n_params(small),
            "wrap": t1 - t0, "shrink": t3 - t2, "total": (t1 - t0) + (t3 - t2),
            "written_bytes": written, "fill": fill_time(written)}


def storages(module, old) -> dict[int, int]:
    """The distinct storages (address -> bytes) of a module's tensors that are not in `old` (the
    model's, id -> weak reference): for the gated copy and the shrunk model, what wrap and shrink
    wrote into new memory."""
    def is_old(t):
        ref = old.get(id(t))
        return ref is not None and ref() is t

    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in itertools.chain(module.parameters(), module.buffers()) if not is_old(t)}


def fill_time(nbytes: int) -> float:
    """The baseline: seconds to write `nbytes` into new memory in this process (the models still
    alive, so it is memory they do not hold). On a VM whose host backs guest pages on first touch
    this is far slower than a memory copy, and it bounds what any copying surgery can do."""
    t0 = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.fill_(1)
    dt = time.perf_counter() - t0
    del buf
    return dt


def run_isolated(name: str, timeout: int, threads: int, inplace: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--one", name, "--threads", str(threads)] + (["--inplace"] if inplace else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "error": tail[:200]}


def _cells(r: dict | None) -> list[str]:
    if r is None:
        return ["-"] * 6
    if "error" in r:
        return ["-", "-", f"**failed**: {common.md_escape(r['error'])}", "", "", ""]
    return [f"{r['wrap']:.2f}", f"{r['shrink']:.2f}", f"**{r['total']:.2f}**", f"{r['written_bytes'] / 2**30:.2f} GiB",
            f"{r['fill']:.2f}", f"{r['total'] / max(r['fill'], 1e-9):.1f}×"]


def table(rows: list[dict]) -> str:
    """One line per model: the copying default, then in place (rows carry both as 'copy', 'inplace')."""
    head = ["wrap s", "shrink s", "total s", "new tensors", "writing them fresh s", "total ÷ that"]
    out = ["| model | params | " + " | ".join(f"{h} (copying)" for h in head) + " | "
           + " | ".join(f"{h} (in place)" for h in head) + " |",
           "|---|---:|" + "---:|" * 12]
    for r in sorted(rows, key=lambda r: -r["copy"].get("total", float("inf"))):
        params = next((x["params"] for x in (r["copy"], r.get("inplace")) if x and "params" in x), None)
        out.append(f"| `{r['model']}` | {common.human(params) if params else '-'} | "
                   + " | ".join(_cells(r["copy"]) + _cells(r.get("inplace"))) + " |")
    return "\n".join(out)


def _summary(rows: list[dict], key: str, what: str) -> str:
    runs = [r[key] for r in rows if r.get(key)]
    ok = [r for r in runs if "error" not in r]
    over = [r["model"] for r in ok if r["total"] >= GOAL_S]
    slowest = max(ok, key=lambda r: r["total"]) if ok else None
    return (f"{what}: {len(ok)} of {len(runs)} models ran; {len(ok) - len(over)} took under {GOAL_S:.0f} s."
            + (f" Slowest: `{slowest['model']}` ({slowest['total']:.1f} s)." if slowest else "")
            + (f" At or over {GOAL_S:.0f} s: {', '.join(f'`{m}`' for m in over)}." if over else ""))


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Surgery speed at 224 px",
        "",
        f"Generated by `bench/speed_224.py` on {meta['date']}. Machine: {meta['machine']}. {meta['note']}",
        "",
        f"`vpsurgery.wrap` + `shrink` on every torchvision classification model (`weights=None, "
        f"num_classes=10`, eval), input 2 x 3 x {SIZE} x {SIZE}, after zeroing ceil({RATIO:.0%}) of the units "
        "of every channel group. Two runs per model, each in a fresh process (nothing warmed up), slowest "
        "first: vpsurgery's default (*copying*: wrap copies the model, shrink the gated model) and "
        "`inplace=True` for both (*in place*: the model, then the gated model, given up, as Torch-Pruning "
        "prunes the model it is given). "
        "Wrap runs the model on the example input once (the trace's shape propagation: for real until it "
        "has taken 0.5 s at over 2 ms a node, then on the meta device, shapes without arithmetic) and once "
        "more at a second batch size to find the batch dim (on the meta device where the first run was "
        "slow); nodes that capture's rewrites add get their shapes on the meta device. Shrink runs the "
        "shrunk graph once more, the same way (it checks its shapes). "
        "By default wrap also copies every weight (the gated model is a copy; the user's model is not "
        "touched); shrink writes the sliced weights (one gather per weight, no intermediate copies): "
        "*new tensors* is those bytes, and *writing them fresh* is the "
        "baseline, measured in the same process right after: the time to fill that many bytes of new memory "
        "(`torch.empty(n, dtype=uint8).fill_(1)`). On this VM new memory is backed by the host on first "
        "touch, at a rate that varies from run to run, so for the largest models that write, not the "
        "surgery, sets the time.",
        "",
        table(rows),
        "",
        _summary(rows, "copy", "Copying (the default)"),
        "",
        _summary(rows, "inplace", "In place"),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, help="default: every torchvision classifier")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model")
    ap.add_argument("--out", default=str(common.REPO / "docs" / "speed.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--note", default="")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--inplace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one, args.inplace)))
        return 0
    names = args.models or common.torchvision_models()
    rows = []
    for name in names:
        r = {"model": name}
        for key, inplace in (("copy", False), ("inplace", True)):
            r[key] = run_isolated(name, args.timeout, args.threads, inplace)
            x = r[key]
            print(f"{name:24s} {key:8s} " + (x["error"] if "error" in x else
                                             f"wrap {x['wrap']:.2f}s shrink {x['shrink']:.2f}s total {x['total']:.2f}s"),
                  flush=True)
        rows.append(r)
        done = "" if len(rows) == len(names) else f" Partial: {len(rows)} of {len(names)} models so far."
        text = report(rows, {"date": common.today(), "machine": common.machine(), "note": args.note + done})
        if not args.no_write:  # after every model, so that a cut-off sweep still leaves its table
            common.write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
