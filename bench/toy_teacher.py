"""Known-answer toy for the method: a ReLU teacher with k hidden units; does fit prune a wider
student to exactly k? Sweeps estimator, price, theta lr, seeds and starting widths; prints a table
(used to choose fit's defaults, see docs/method.md)."""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vpsurgery

torch.set_num_threads(1)  # tiny MLP: threading costs more than it gives


def teacher_data(n, seed=0, d=10, k=4):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(k, d, generator=g), 0.5 * torch.randn(k, generator=g)
    w2 = torch.randn(k, generator=g).sign() * (1 + torch.rand(k, generator=g))
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (torch.relu(x @ w1.T + b1) @ w2)[:, None] / 3)


def run(width, seed, epochs, **kw):
    torch.manual_seed(seed)
    gm = vpsurgery.wrap(nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, 1)), torch.randn(2, 10))
    data = teacher_data(2000)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t = time.time()
    res = vpsurgery.fit(gm, loader, epochs=epochs, progress=False, log=lambda s: None, loss_fn=F.mse_loss,
                        device="cpu", **kw)
    theta = vpsurgery.gates(res.model)["0"].theta.detach()
    res.model.eval()
    with torch.no_grad():
        mse = F.mse_loss(res.model(data.tensors[0]), data.tensors[1]).item()
    decided = float(((theta < 0.01) | (theta > 0.99)).float().mean())
    return int((theta > 0.5).sum()), decided, mse, time.time() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--estimators", default="straight_through,disarm")
    ap.add_argument("--prices", default="0.5,1,2")
    ap.add_argument("--theta-lrs", default="0.5")
    ap.add_argument("--optimizers", default="adam")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--theta-optimizer", default="sgd")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--widths", default="16,32,64")
    a = ap.parse_args()
    print("| estimator | optimizer | price | theta lr | width | seed | kept | theta decided | mse | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for est, opt, price, tlr, width, seed in itertools.product(
            a.estimators.split(","), a.optimizers.split(","), map(float, a.prices.split(",")),
            map(float, a.theta_lrs.split(",")), map(int, a.widths.split(",")), map(int, a.seeds.split(","))):
        kept, decided, mse, sec = run(width, seed, a.epochs, estimator=est, optimizer=opt, lr=a.lr,
                                      price=price, theta_lr=tlr, prune_every=100,
                                      theta_optimizer=a.theta_optimizer)
        print(f"| {est} | {opt} | {price} | {tlr} | {width} | {seed} | {kept} | {decided:.2f} | {mse:.4f} | {sec:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
