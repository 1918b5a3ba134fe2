"""Budget mode (issue #10): does fit(target=..., per=...) land in the +-10% band of the target
share, without collapsing accuracy, on short runs? ResNet-20 (width 0.5) and LeNet-300-100 on
scikit-learn's digits at 8 px, 10 epochs of ~12 steps, targets 0.5 / 0.25 / 0.1, per params and
flops. Writes the table into docs/budget.md (between the markers) with --write.

    .venv/bin/python bench/budget_sweep.py [--models resnet20,lenet300_100] [--targets 0.5,0.25,0.1]
        [--per params,flops] [--epochs 10] [--seeds 0] [--write]

Constants of vpsurgery/train/pruner.py can be overridden for tuning: --set RAMP=0.5 --set PRICE_RATE=0.1.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import vpsurgery  # noqa: E402
from vpsurgery.data import load_data  # noqa: E402
from vpsurgery.models import get_model  # noqa: E402
from vpsurgery.train import evaluate, kept_macs, kept_params, pruner as pruner_module  # noqa: E402

from common_train import DenseTrainer  # noqa: E402

DOC = REPO / "docs" / "budget.md"
BEGIN, END = "<!-- budget_sweep:begin -->", "<!-- budget_sweep:end -->"
SETTINGS = {"optimizer": "adam", "lr": 0.003}  # the demo's weights optimizer; everything else fit's defaults
BATCH = 128


def data(model_name: str):
    bundle = load_data("digits", image_size=8)
    if model_name.startswith("resnet"):  # the CIFAR ResNets take 3 channels
        bundle_train = TensorDataset(bundle.train.tensors[0].expand(-1, 3, -1, -1).contiguous(), bundle.train.tensors[1])
        bundle_val = TensorDataset(bundle.val.tensors[0].expand(-1, 3, -1, -1).contiguous(), bundle.val.tensors[1])
        return bundle_train, bundle_val, (1, 3, 8, 8)
    flat = lambda d: TensorDataset(d.tensors[0].flatten(1), d.tensors[1])  # noqa: E731
    return flat(bundle.train), flat(bundle.val), (1, 64)


def build(model_name: str, seed: int):
    torch.manual_seed(seed)
    if model_name == "lenet300_100":
        return get_model("lenet300_100", in_features=64, num_classes=10)
    return get_model(model_name, width=0.5, num_classes=10)


def loaders(train, val, seed):
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=BATCH, shuffle=True, generator=g, drop_last=True),
            DataLoader(val, batch_size=512))


def dense_accuracy(model_name, epochs, seed, train, val, shape):
    model = build(model_name, seed)
    tl, vl = loaders(train, val, seed)
    tr = DenseTrainer(model, tl, vl, total_epochs=epochs, lr=SETTINGS["lr"], optimizer=SETTINGS["optimizer"],
                      momentum=0.9, dev=torch.device("cpu"))
    for _ in range(epochs):
        rec = tr.run_epoch()
    return rec["val_acc"]


def one_run(model_name, target, per, epochs, seed, train, val, shape):
    model = build(model_name, seed)
    gated = vpsurgery.wrap(model, torch.randn(2, *shape[1:]))
    dense = {"params": kept_params(gated), "flops": kept_macs(gated)}
    tl, vl = loaders(train, val, seed)
    t0 = time.perf_counter()
    res = vpsurgery.fit(gated, tl, vl, epochs=epochs, target=target, per=per, seed=seed, device="cpu",
                        progress=False, log=lambda line: None, **SETTINGS)
    seconds = time.perf_counter() - t0
    small = vpsurgery.shrink(res.model)
    kept = {"params": kept_params(small), "flops": kept_macs(small)}
    acc = evaluate(small, vl, torch.device("cpu"))
    share = kept[per] / dense[per]
    return {"model": model_name, "per": per, "target": target, "seed": seed, "share": share,
            "in_band": abs(share - target) <= 0.1 * target, "other": kept["flops" if per == "params" else "params"]
            / dense["flops" if per == "params" else "params"],
            "before": res.share_before_hardening, "acc": acc, "removal_90": res.removal_90_epoch,
            "decided": res.decided_before_hardening, "price": res.price, "seconds": seconds,
            "steps": len(tl)}


HEADER = ("| model | per | target | kept share | in ±10 % | other share | expected share before rounding | "
          "val acc (shrunk) | dense val acc | 90 % of removal by epoch | θ decided before hardening | "
          "final price | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(r, dense_acc):
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    return (f"| {r['model']} | {r['per']} | {r['target']:g} | {r['share']:.3f} | {'yes' if r['in_band'] else 'NO'} | "
            f"{r['other']:.3f} | {fmt(r['before'], '.3f')} | {fmt(r['acc'], '.3f')} | {dense_acc:.3f} | "
            f"{fmt(r['removal_90'], 'd')} | {fmt(r['decided'], '.2f')} | {r['price']:.3g} | {r['seconds']:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,lenet300_100")
    ap.add_argument("--targets", default="0.5,0.25,0.1")
    ap.add_argument("--per", default="params,flops")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", action="append", default=[], help="NAME=VALUE: override a pruner constant")
    ap.add_argument("--write", action="store_true", help=f"write the table into {DOC.relative_to(REPO)}")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for item in a.set:
        name, value = item.split("=")
        setattr(pruner_module, name, float(value))
    consts = ", ".join(f"{n}={getattr(pruner_module, n)}" for n in ("RAMP", "PRICE_RATE", "INITIAL_LOAD", "THETA_TRAVEL", "THETA_LR_CAP"))
    print(f"constants: {consts}; settings {SETTINGS}, batch {BATCH}, {a.epochs} epochs", flush=True)
    print(HEADER, flush=True)
    rows = []
    for model_name in a.models.split(","):
        train, val, shape = data(model_name)
        for seed in map(int, a.seeds.split(",")):
            dense_acc = dense_accuracy(model_name, a.epochs, seed, train, val, shape)
            for per in a.per.split(","):
                for target in map(float, a.targets.split(",")):
                    r = one_run(model_name, target, per, a.epochs, seed, train, val, shape)
                    rows.append(row(r, dense_acc))
                    print(rows[-1], flush=True)
    if a.write:
        text = DOC.read_text()
        table = (f"{BEGIN}\nMeasured by `bench/budget_sweep.py` ({consts}; weights: Adam lr 0.003, batch {BATCH}, "
                 f"{a.epochs} epochs, seeds {a.seeds}, digits 8×8, one CPU thread):\n\n{HEADER}\n" + "\n".join(rows)
                 + f"\n{END}")
        DOC.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: table, text, flags=re.S))


if __name__ == "__main__":
    main()
