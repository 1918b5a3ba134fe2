"""fit under DistributedDataParallel: two gloo processes on the CPU end with the same structure."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import vpsurgery
from test_fit import teacher_data  # the same toy problem
from vpsurgery.train import fit

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # fit reseeds per (seed, epoch, rank): gate samples differ, theta must agree
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))
        torch.manual_seed(0)
        gated = vpsurgery.wrap(model, torch.randn(2, 10))
        data = teacher_data(512)
        loader = DataLoader(data, batch_size=32, sampler=DistributedSampler(data, WORLD, rank, seed=0))
        result = fit(gated, loader, epochs=3, price=3.0, theta_lr=2.0, prune_every=5, device="cpu",
                     progress=False, log=lambda line: None, loss_fn=F.mse_loss)
        torch.save({"removed": sorted(result.removed_units),
                    "theta": {n: g.theta.detach() for n, g in vpsurgery.gates(result.model).items()},
                    "params": [h["params"] for h in result.history]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_prune_identically(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["removed"] == r1["removed"]
    assert r0["params"] == r1["params"]
    assert r0["theta"].keys() == r1["theta"].keys()
    assert all(torch.equal(r0["theta"][n], r1["theta"][n]) for n in r0["theta"])
    assert r0["removed"], "the run should have pruned something for the test to mean anything"
