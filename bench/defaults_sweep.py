"""Do fit's defaults hold on models nobody tuned them for? (issue #10)

Each model: torchvision's builder (`weights=None, num_classes=10`) or one of ours, wrapped at
32x32 on scikit-learn's digits (3 channels, bilinear upsampling; the split of vpsurgery.data),
then `fit(gated, ..., epochs=10, target=T, per=P)` with every other setting at fit's default
(SGD lr 0.05, momentum 0.9, batch 64), then shrink. Pass: the shrunk model keeps T +- 10% of the
dense cost and its val accuracy is above chance (15% for 10 classes: compress's own check).

    .venv/bin/python bench/defaults_sweep.py [--models resnet18,mobilenet_v3_small,...]
        [--targets 0.5,0.25] [--per flops] [--write]

--write puts the table into docs/budget.md between its markers.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import vpsurgery  # noqa: E402
from common import machine, today  # noqa: E402
from common_train import DenseTrainer  # noqa: E402
from vpsurgery.config import FitConfig  # noqa: E402
from vpsurgery.data import load_data  # noqa: E402
from vpsurgery.models import get_model  # noqa: E402
from vpsurgery.train import evaluate, kept_macs, kept_params, recalibrate_batchnorm  # noqa: E402

DOC = REPO / "docs" / "budget.md"
BEGIN, END = "<!-- defaults_sweep:begin -->", "<!-- defaults_sweep:end -->"
MODELS = "resnet18,mobilenet_v3_small,shufflenet_v2_x0_5,squeezenet1_1,mnasnet0_5,regnet_x_400mf,resnet20,vgg16"
CHANCE = 0.15


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name in ("resnet20", "resnet56", "vgg16"):
        return get_model(name, num_classes=10)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def data():
    bundle = load_data("digits", image_size=32)
    three = lambda d: TensorDataset(d.tensors[0].expand(-1, 3, -1, -1).contiguous(), d.tensors[1])  # noqa: E731
    return three(bundle.train), three(bundle.val)


def train_dense(name: str, train_loader, val_loader, epochs: int, lr: float) -> tuple[dict, float]:
    """The dense model with fit's weight settings: (last epoch's record, val accuracy after the
    BatchNorm re-estimation fit ends with)."""
    tr = DenseTrainer(build(name), train_loader, val_loader, total_epochs=epochs, lr=lr, optimizer="sgd",
                      momentum=0.9, dev=torch.device("cpu"))
    last = [tr.run_epoch() for _ in range(epochs)][-1]
    recalibrate_batchnorm(tr.model, train_loader)
    return last, evaluate(tr.model, val_loader, torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--per", default="flops")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="the weights' learning rate for fit and the dense "
                    "check (default: fit's)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--dense", action="store_true", help="also train the dense model with the same settings "
                    "(is a row at chance the model's or the method's?)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    lr = FitConfig().lr if a.lr is None else a.lr
    train, val = data()
    rows = []
    head = ("| model | per | target | kept share | in ±10 % | val acc (shrunk) | above chance | fit s |"
            + (" dense val acc (same settings, BatchNorm re-estimated like fit's) |" if a.dense else "") + "\n|---|---|---|---|---|---|---|---|"
            + ("---|" if a.dense else ""))
    dense_acc = {}
    print(head, flush=True)
    if a.targets == "none":  # dense only: does the model learn with these settings at all?
        for name in a.models.split(","):
            g = torch.Generator().manual_seed(0)
            tl = DataLoader(train, batch_size=64, shuffle=True, generator=g, drop_last=True)
            last, again = train_dense(name, tl, DataLoader(val, batch_size=256), a.epochs, lr)
            print(f"{name}: dense, last epoch: train loss {last['loss']:.3f}, train acc {100 * last['train_acc']:.1f} %, "
                  f"val acc {100 * last['val_acc']:.1f} %, after re-estimating BatchNorm statistics "
                  f"{100 * again:.1f} %", flush=True)
        return
    for name in a.models.split(","):
        for target in map(float, a.targets.split(",")):
            for per in a.per.split(","):
                model = build(name)
                g = torch.Generator().manual_seed(0)
                tl = DataLoader(train, batch_size=64, shuffle=True, generator=g, drop_last=True)
                vl = DataLoader(val, batch_size=256)
                t0 = time.perf_counter()
                try:
                    gated = vpsurgery.wrap(model, train.tensors[0][:2])
                    dense = {"params": kept_params(gated), "flops": kept_macs(gated)}
                    res = vpsurgery.fit(gated, tl, vl, epochs=a.epochs, target=target, per=per, seed=0, lr=lr,
                                        device="cpu", progress=False, log=lambda line: None)
                    small = vpsurgery.shrink(res.model)
                    kept = {"params": kept_params(small), "flops": kept_macs(small)}[per]
                    share, acc = kept / dense[per], evaluate(small, vl, torch.device("cpu"))
                    band = abs(share - target) <= 0.1 * target
                    row = (f"| {name} | {per} | {target:g} | {share:.3f} | {'yes' if band else '**no**'} | "
                           f"{100 * acc:.1f} % | {'yes' if acc > CHANCE else '**no**'} | "
                           f"{time.perf_counter() - t0:.0f} |")
                except Exception as e:  # a failure is a result of this sweep, recorded as such
                    row = f"| {name} | {per} | {target:g} | **failed**: {type(e).__name__}: {str(e)[:120]} | | | | |"
                if a.dense:
                    if name not in dense_acc:
                        dense_acc[name] = train_dense(name, tl, vl, a.epochs, lr)[1]
                    row += f" {100 * dense_acc[name]:.1f} % |"
                rows.append(row)
                print(row, flush=True)
    if a.write:
        settings = "fit's defaults" + ("" if a.lr is None else f" but lr {a.lr:g}")
        table = (f"{BEGIN}\nMeasured by `bench/defaults_sweep.py` on {today()} ({machine()}): {settings}, "
                 f"{a.epochs} epochs, digits at 32×32 (3 channels), batch 64, seed 0.\n\n{head}\n"
                 + "\n".join(rows) + f"\n{END}")
        text = DOC.read_text()
        if BEGIN in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: table, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n## Defaults on models nobody tuned them for\n\n" + table + "\n"
        DOC.write_text(text)


if __name__ == "__main__":
    main()
