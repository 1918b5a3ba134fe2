"""Which price per parameter prunes a classifier without hurting it? LeNet-300-100 on the bundled
digits (offline), fit's defaults otherwise; prints kept params, theta decided, val accuracy."""
import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import vpsurgery
from vpsurgery.data import load_data
from vpsurgery.models import get_model

torch.set_num_threads(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prices", default="0.003,0.01,0.03")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=float, default=1.0)
    a = ap.parse_args()
    data = load_data("digits")
    print("| price | width | seed | kept params | hidden widths | theta decided | val acc | dense params |")
    print("|---|---|---|---|---|---|---|---|")
    for price in map(float, a.prices.split(",")):
        torch.manual_seed(a.seed)
        model = get_model("lenet300_100", in_features=64, width=a.width)
        dense = sum(p.numel() for p in model.parameters())
        gm = vpsurgery.wrap(model, torch.randn(2, 64))
        g = torch.Generator().manual_seed(a.seed)
        train = DataLoader(data.train, batch_size=64, shuffle=True, generator=g)
        val = DataLoader(data.val, batch_size=256)
        res = vpsurgery.fit(gm, train, val, epochs=a.epochs, optimizer="adam", lr=1e-3, price=price,
                            device="cpu", progress=False, log=lambda s: None)
        thetas = torch.cat([g.theta.detach() for g in vpsurgery.gates(res.model).values()])
        decided = float(((thetas < 0.01) | (thetas > 0.99)).float().mean())
        small = vpsurgery.shrink(res.model)
        widths = [m.out_features for m in small.modules() if isinstance(m, torch.nn.Linear)][:-1]
        last = res.history[-1]
        print(f"| {price} | {a.width} | {a.seed} | {sum(p.numel() for p in small.parameters())} | {widths} | "
              f"{decided:.2f} | {last['val_acc']:.3f} | {dense} |", flush=True)


if __name__ == "__main__":
    main()
