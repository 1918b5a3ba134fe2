"""fit: train a gated model and prune it at the same time (docs/method.md), built on Pruner.

Each step minimises  mean minibatch loss + Pruner.loss()  (the regulariser per example) over the
weights (SGD with momentum or Adam, cosine-annealed per step) and over theta (Adam by default,
`theta_optimizer='sgd'` for plain projected SGD; projected onto [0, 1] after each step, its step
annealed with the weights'). Every `prune_every` steps and at the end of each epoch, structures
whose theta reached `prune_threshold` are removed physically; the optimizers keep their state,
sliced to the smaller parameters, so later steps are cheaper. The last `harden` share of the epochs
trains the rounded network. With `target`, the price is controlled so that the final network keeps
that share of the dense cost (docs/budget.md). Works under torchrun (DistributedDataParallel).

A run is a function of its settings and `seed`: every epoch starts by seeding torch's global RNG
(and Python's and NumPy's) from (seed, epoch, rank), and the data loader's / sampler's own
torch.Generator, if it has one, from (seed, epoch) (`seed_epoch`). So an epoch interrupted at any
point (kill -9) and restarted from the checkpoint written at the end of the previous one replays
exactly, and `resume=True` finishes with the same structure, weights and history as an
uninterrupted run.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
# tqdm.auto's asyncio variant calls iter(loader) when it is made, so the loader would be iterated twice
# per epoch (an extra draw from its generator, and its workers started twice): the plain one does not.
from tqdm import tqdm

from vpsurgery.config import FitConfig, default, make_config
from vpsurgery.surgery import gates as gates_of
from vpsurgery.train.batchnorm import batchnorms, recalibrate_batchnorm
from vpsurgery.train.checkpoint import (CHECKPOINT, cannot_resume, fingerprint, fingerprint_difference,
                                        load_checkpoint, save_checkpoint)
from vpsurgery.passes.analyse.cost import total_macs
from vpsurgery.train.precision import autocast, to_device
from vpsurgery.train.pruner import AT_END, Pruner, check_gated


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is kept."""


class NonFiniteInput(ValueError):
    """A training batch (inputs or targets) holds NaN or inf: a data problem, not a divergence."""


@dataclass
class FitResult:
    model: fx.GraphModule  # trained, shrunk, still gated (vpsurgery.shrink it to drop the gates)
    history: list[dict] = field(default_factory=list)
    removed_units: set[int] = field(default_factory=set)
    removed_sections: set[str] = field(default_factory=set)
    dense_params: int = 0  # of the model fit was given (gates excluded)
    dense_macs: int = 0  # conv/linear and attention MACs per example of the model fit was given
    decided_before_hardening: float | None = None  # share of theta at 0 or 1 by itself before the rounding
    removal_90_epoch: int | None = None  # first epoch by whose end 90% of the run's removal (in `per`) was done
    price: float | None = None  # the price at the end (found by the controller when a target is set)
    share_before_hardening: float | None = None  # expected cost share (per `per`) just before the rounding


# fit's own keyword arguments; every other keyword is a setting (a FitConfig field)
_OWN = ("loss_fn", "device", "checkpoint_dir", "resume", "progress", "log")


def fit(gated: fx.GraphModule, train_loader, val_loader=None, config: FitConfig | None = None, *,
        loss_fn: Callable = F.cross_entropy, device: str = "auto", checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
        **settings) -> FitResult:
    """Train `gated` (from vpsurgery.wrap) and prune it while training; see docs/method.md.

    Settings (vpsurgery.config.FitConfig, the one source of their defaults and help): a `config`
    and/or keyword overrides named like its fields, e.g. fit(gated, loader, epochs=30, lr=0.01,
    target=0.3, per="flops"). Unknown keywords are a ValueError listing the valid ones.

    Batches are (inputs, targets), with loss_fn(outputs, targets) (default cross-entropy; accuracy
    is then reported), or dicts (Hugging Face style), with loss_fn(model, batch) returning the loss
    or an object with `.loss`; tensors in a dict are moved to the device.
    checkpoint_dir: a checkpoint is written there at the end of every epoch; resume=True continues
    from it (from the start if the directory holds none yet) and ends as the uninterrupted run would.
    """
    unknown = sorted(set(settings) - {f.name for f in fields(FitConfig)})
    if unknown:
        raise ValueError(f"fit: unknown argument(s) {', '.join(unknown)}; settings: "
                         f"{', '.join(sorted(f.name for f in fields(FitConfig)))}; fit's own: {', '.join(_OWN)}")
    config = make_config(config, settings)
    check_gated(gated)
    _check_loader(train_loader)
    if config.n_train is None:
        config = make_config(config, {"n_train": _dataset_length(train_loader)})
    dev = _device(device)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    say = log if rank0 else None
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    identity = fingerprint(gated)
    gm = copy.deepcopy(gated).to(dev)  # the caller's model is left as it was
    dense_params, dense_macs = kept_params(gm), kept_macs(gm)
    run = _Run(Pruner(gm, steps_per_epoch=len(train_loader), config=config), config)
    history, start = [], 0
    if resume:
        history, start = _resume(run, config, identity, ckpt_path, say)
    elif ckpt_path is not None and rank0:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)  # a run killed in epoch 1 is resumable
    pruner = run.pruner
    for epoch in range(start + 1, config.epochs + 1):
        seed_epoch(train_loader, config.seed, epoch)
        if epoch > pruner.hardening_epoch and not pruner.hard:
            _harden(run, say)
        t0 = time.perf_counter()
        stats = _train_epoch(run, train_loader, dev, loss_fn, epoch, progress and rank0)
        run.prune()
        if epoch == config.epochs and (config.target is None or pruner.hard):  # else after the rounding below
            _recalibrate(run, train_loader, dev, loss_fn, say)
        val_acc = evaluate(pruner.model, val_loader, dev) if val_loader is not None else None
        history.append(_epoch_record(pruner, epoch, stats, val_acc, time.perf_counter() - t0))
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, config=config.to_dict(), fingerprint=identity, epoch=epoch,
                            pruner=pruner.state_dict(), model=pruner.model.state_dict(),
                            optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(), history=history,
                            rank0=rank0)
        if say is not None:
            say(_log_line(history[-1], config.epochs))
    if config.target is not None and not pruner.hard:  # harden=0 (or too few epochs): round at the end
        _harden(run, say)
        _recalibrate(run, train_loader, dev, loss_fn, say)
    return FitResult(pruner.model, history, pruner.removed_units, pruner.removed_sections, dense_params, dense_macs,
                     pruner.state.decided_before_hardening,
                     _removal_epoch(history, dense_params if config.per == "params" else dense_macs, config.per),
                     pruner.price, pruner.state.share_before_hardening)


def _with_settings(func):
    """fit's signature as inspect (and so the CLI, and help()) sees it: its own arguments, then
    every FitConfig field as a keyword-only argument with its default."""
    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    settings = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default(f.name), annotation=f.type)
                for f in fields(FitConfig)]
    func.__signature__ = sig.replace(parameters=own + settings)
    return func


fit = _with_settings(fit)


class _Run:
    """The Pruner plus what fit adds around it: the weights' optimizer and schedule, and DDP."""

    def __init__(self, pruner: Pruner, config: FitConfig):
        self.pruner = pruner
        weights = pruner.weights()
        if config.optimizer == "adam":
            self.opt = torch.optim.Adam(weights, lr=config.lr)
        else:
            self.opt = torch.optim.SGD(weights, lr=config.lr, momentum=config.momentum)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=pruner.total_steps)
        self.model = _wrap_ddp(pruner.model)

    def prune(self) -> None:
        before = self.pruner.model
        self.pruner.prune(self.opt)  # the optimizer (and so the scheduler) is updated in place
        if self.pruner.model is not before:
            self.model = _wrap_ddp(self.pruner.model)


def _harden(run: _Run, log) -> None:
    pruner = run.pruner
    pruner.harden()
    if log is not None:
        done = f"hardening: {100 * pruner.state.decided_before_hardening:.1f}% of theta had reached 0 or 1"
        if pruner.config.target is not None:
            log(f"{done}; rounded to the budget: {pruner.state.share:.3f} of the dense {pruner.config.per} kept "
                f"(target {pruner.config.target:g}; expected share before rounding "
                f"{pruner.state.share_before_hardening:.3f}) and frozen")
        else:
            log(f"{done}; the rest rounded and frozen")
    run.prune()


def _recalibrate(run: _Run, loader, dev, loss_fn, log) -> None:
    """BatchNorm statistics of the network training ends with (vpsurgery.train.batchnorm); the
    batches come in the order of a further epoch, so a resumed run uses the same ones."""
    config = run.pruner.config
    batches = config.bn_recalibration_batches
    if batches and batchnorms(run.pruner.model):
        seed_epoch(loader, config.seed, config.epochs + 1)
        used = recalibrate_batchnorm(run.pruner.model, loader, batches=batches, device=dev,
                                     forward=lambda model, batch: _forward_loss(model, batch, loss_fn, dev))
        if log is not None:
            log(f"BatchNorm statistics re-estimated over {used} training batches")


def _removal_epoch(history: list[dict], dense: int, per: str, share: float = 0.9) -> int | None:
    """First epoch by whose end `share` of the run's final removal (in params or MACs) was done."""
    key = "params" if per == "params" else "macs"
    if not history or not dense:
        return None
    final = dense - history[-1][key]
    if final <= 0:
        return None
    return next(h["epoch"] for h in history if dense - h[key] >= share * final)


# ---------------------------------------------------------------------------------- seeding
def seed_epoch(loader, seed: int, epoch: int) -> None:
    """Make epoch `epoch` (1-based) a function of (seed, epoch) alone, however it was reached.

    torch's global RNG (gate samples, dropout, a RandomSampler without a generator, the workers'
    base seed) also depends on the rank, so ranks draw different gate samples; the loader's own
    generators (data order) do not. fit calls it at the start of every epoch; call it in your own
    loop for exactly fit's run."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(_derive_seed(seed, epoch, f"global/{rank}"))  # also every CUDA device
    random.seed(_derive_seed(seed, epoch, f"python/{rank}"))
    np.random.seed(_derive_seed(seed, epoch, f"numpy/{rank}") % 2 ** 32)
    for g in _loader_generators(loader):
        g.manual_seed(_derive_seed(seed, epoch, "data"))
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # DistributedSampler: its order is (its seed, epoch)
        sampler.set_epoch(epoch)


def _derive_seed(seed: int, epoch: int, stream: str) -> int:
    digest = hashlib.sha256(f"vpsurgery.fit/{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63, what manual_seed takes


def _loader_generators(loader) -> list[torch.Generator]:
    """The torch.Generators a DataLoader draws its order and worker seeds from, if it has its own."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and not any(g is f for f in found):
            found.append(g)
    return found


# ---------------------------------------------------------------------------------- setup
def _check_loader(loader) -> None:
    """An empty training set, or one that yields no batch, is an error, not an epoch with loss 0."""
    dataset = getattr(loader, "dataset", None)
    try:
        examples = len(dataset) if dataset is not None else None
    except TypeError:  # an IterableDataset without __len__
        examples = None
    if examples == 0:
        raise ValueError("the training set is empty (len(train_loader.dataset) == 0); fit needs examples to train on")
    if len(loader) == 0:
        batch_size, drop_last = getattr(loader, "batch_size", None), getattr(loader, "drop_last", False)
        detail = f"{examples} examples" if examples is not None else "its dataset"
        if batch_size is not None:
            detail += f", batch_size {batch_size}" + (", drop_last=True" if drop_last else "")
        fix = "use a smaller batch size or drop_last=False" if drop_last else "check the dataset and sampler"
        raise ValueError(f"train_loader yields no batch ({detail}); {fix}")


def _dataset_length(loader) -> int:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        raise ValueError("fit needs n_train (the number of training examples): train_loader has no dataset "
                         "with a length; pass n_train=...") from None


def _device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _wrap_ddp(gm: fx.GraphModule) -> torch.nn.Module:
    if not dist.is_initialized():
        return gm
    dev = next(gm.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(gm, device_ids=[dev.index] if dev.type == "cuda" else None)


# ---------------------------------------------------------------------------------- batches
def _pair(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    raise ValueError(f"a batch must be (inputs, targets) or a dict; got a {type(batch).__name__} of "
                     f"{len(batch)} items")


def _batch_size(batch: dict) -> int:
    return next((len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim > 0), 1)


def _forward_loss(model, batch, loss_fn, dev):
    """(loss, examples, correct predictions or None) of one batch."""
    if isinstance(batch, dict):
        if loss_fn is F.cross_entropy:
            raise ValueError("a dict batch needs loss_fn(model, batch), returning the loss or an object with .loss "
                             "(e.g. lambda model, batch: model(**batch)); fit(..., loss_fn=...)")
        with autocast(dev):
            out = loss_fn(model, batch)
        loss = getattr(out, "loss", out)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ValueError(f"loss_fn(model, batch) must return a scalar loss tensor or an object with .loss, "
                             f"got {type(out).__name__}")
        return loss.float().reshape(()), _batch_size(batch), None
    x, y = _pair(batch)
    with autocast(dev):
        out = model(x)
    return loss_fn(out.float(), y), len(y), _correct(out, y)


def _correct(out, y) -> int | None:
    """Correct class predictions, or None when this is not classification."""
    if not torch.is_tensor(out) or out.ndim != 2 or not torch.is_tensor(y) or y.is_floating_point():
        return None
    return int((out.argmax(1) == y).sum())


# ---------------------------------------------------------------------------------- one epoch
def _train_epoch(run: _Run, loader, dev, loss_fn, epoch: int, bar: bool) -> dict:
    run.model.train()
    totals = {"loss": 0.0, "objective": 0.0, "correct": 0, "seen": 0, "classified": False}
    disarm = run.pruner.config.estimator == "disarm"
    step_in_epoch = 0
    for batch in tqdm(loader, desc=f"epoch {epoch}", disable=not bar, leave=False):
        batch = to_device(batch, dev)
        loss, reg, n, correct = (_disarm_step if disarm else _straight_through_step)(run, batch, loss_fn, dev)
        _check_finite(loss + reg, batch, epoch, step_in_epoch)
        run.pruner.clip_gradients()
        run.opt.step()
        due = run.pruner.step(loss)
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        step_in_epoch += 1
        if due:
            run.prune()
            run.model.train()
        totals["loss"] += float(loss) * n
        totals["objective"] += float(loss + reg) * n
        totals["correct"] += correct or 0
        totals["classified"] = correct is not None
        totals["seen"] += n
    if step_in_epoch == 0:
        raise ValueError(f"train_loader yielded no batch in epoch {epoch} although len(train_loader) is "
                         f"{len(loader)}; check the dataset and sampler")
    return totals


def check_estimator(config: FitConfig, batch, loss_fn: Callable) -> None:
    """DisARM needs per-example losses: (inputs, targets) batches and loss_fn(..., reduction='none')."""
    if config.estimator != "disarm":
        return
    if isinstance(batch, dict):
        raise ValueError("estimator='disarm' needs (inputs, targets) batches, got a dict batch; use "
                         "estimator='straight_through' (one pass) for dict batches")
    if not _takes_reduction(loss_fn):
        raise ValueError(f"estimator='disarm' needs per-example losses, but loss_fn {loss_fn!r} takes no "
                         f"reduction= argument; give a loss_fn(outputs, targets, reduction='mean') such as "
                         f"F.cross_entropy, or use estimator='straight_through'")


def _takes_reduction(loss_fn: Callable) -> bool:
    try:  # a loss module's __call__ takes **kwargs whatever its forward takes
        params = inspect.signature(getattr(loss_fn, "forward", loss_fn)).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume nothing
        return False
    return any(p.name == "reduction" or p.kind is p.VAR_KEYWORD for p in params)


def _straight_through_step(run: _Run, batch, loss_fn, dev):
    loss, n, correct = _forward_loss(run.model, batch, loss_fn, dev)
    reg = run.pruner.loss()
    (loss + reg).backward()
    return loss.detach(), reg.detach(), n, correct


def _disarm_step(run: _Run, batch, loss_fn, dev):
    """DisARM (Dong et al. 2020) in theta coordinates: two antithetic samples b1 = [u < theta],
    b2 = [1 - u < theta]; unbiased for d E[loss] / d theta on (0, 1). With per-example gates
    (the default wherever wrap found the batch dim) every example is its own antithetic pair, so
    one minibatch averages N estimates instead of one. Weight gradients average both passes."""
    check_estimator(run.pruner.config, batch, loss_fn)
    x, y = _pair(batch)
    gates = gates_of(run.pruner.model)
    thetas = {name: g.theta.detach() for name, g in gates.items()}
    rows = len(x) if all(g.per_example for g in gates.values()) else None
    u = {n: torch.rand(((rows,) if rows else ()) + t.shape, device=t.device) for n, t in thetas.items()}
    samples = [{n: (u[n] < t).to(t.dtype) for n, t in thetas.items()},
               {n: (1 - u[n] < t).to(t.dtype) for n, t in thetas.items()}]
    losses = []
    try:
        for sample in samples:
            for name, g in gates.items():
                g.fixed_sample = sample[name]
            with autocast(dev):
                out = run.model(x)
            per_example = loss_fn(out.float(), y, reduction="none").reshape(len(x), -1).mean(1)
            correct = _correct(out, y)
            reg = run.pruner.loss()  # in both passes, so DDP sees theta used each time
            (0.5 * (per_example.mean() + reg)).backward()
            losses.append(per_example.detach())
    finally:
        for g in gates.values():
            g.fixed_sample = None
    diff = losses[0] - losses[1]  # (N,) per example, or one value per minibatch
    grads = []
    for name, t in thetas.items():
        b1, b2 = samples[0][name], samples[1][name]
        d = diff.view(-1, *[1] * t.ndim) if rows else diff.mean()
        g = 0.5 * d * (1 - 2 * b2) * (b1 != b2) / torch.minimum(t, 1 - t).clamp_min(1e-6)
        grads.append(g.mean(0) if rows else g)
    flat = torch.cat(grads)
    if dist.is_initialized():
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    for g, part in zip(gates.values(), flat.split([t.numel() for t in thetas.values()])):
        g.theta.grad = part.view_as(g.theta) if g.theta.grad is None else g.theta.grad + part.view_as(g.theta)
    return 0.5 * (losses[0] + losses[1]).mean(), reg.detach(), len(x), correct  # accuracy of the second sample


def _non_finite(t) -> int:
    """NaN/inf entries of a floating-point tensor (0 for integer labels and non-tensors)."""
    if not torch.is_tensor(t) or not (t.is_floating_point() or t.is_complex()):
        return 0
    return int((~torch.isfinite(t)).sum())


def _check_finite(total: torch.Tensor, batch, epoch: int, step: int) -> None:
    """Stop on a non-finite loss: as bad data when the batch holds NaN/inf, else as a divergence."""
    loss_bad = ~torch.isfinite(total)
    # The batch is only inspected when the loss is bad (no extra cost on healthy steps).
    bad_inputs = bad_targets = 0
    where = ""
    if loss_bad.item():
        if isinstance(batch, dict):
            bad = {k: _non_finite(v) for k, v in batch.items()}
            bad_inputs = sum(bad.values())
            where = "non-finite values in " + ", ".join(f"{k!r} ({n})" for k, n in bad.items() if n)
        else:
            x, y = _pair(batch)
            bad_inputs, bad_targets = _non_finite(x), _non_finite(y)
            where = f"the inputs hold {bad_inputs} and the targets {bad_targets} non-finite values"
    flags = torch.stack([loss_bad.float(), total.new_tensor(float(bad_inputs + bad_targets > 0))])
    if dist.is_initialized():  # every rank must stop together, or the others hang in all_reduce
        dist.all_reduce(flags)
    if flags[1].item():
        raise NonFiniteInput(
            f"the input batch contains NaN/inf at epoch {epoch} step {step}; clean the data "
            f"({where if bad_inputs + bad_targets else 'on another rank'}; "
            "the last checkpoint written before this is kept)")
    if flags[0].item():
        raise TrainingDiverged(
            f"training diverged: the loss is {float(total)} at epoch {epoch}, step {step} of the epoch; "
            "lower lr or theta_lr (the last checkpoint written before this is kept)")


# ---------------------------------------------------------------------------------- reporting
@torch.no_grad()
def evaluate(gm: fx.GraphModule, loader, dev) -> float | None:
    """Accuracy of the deterministic network (gates at theta) on (inputs, targets) batches; None
    unless classification (or for dict batches)."""
    gm.eval()
    correct = seen = 0
    for batch in loader:
        if isinstance(batch, Mapping):
            return None
        x, y = _pair(to_device(batch, dev))
        with autocast(dev):
            c = _correct(gm(x), y)
        if c is None:
            return None
        correct += c
        seen += len(y)
    return correct / seen if seen else None


def kept_params(gm: fx.GraphModule) -> int:
    """Parameters of the network, gates excluded."""
    theta_ids = {id(g.theta) for g in gates_of(gm).values()}
    return sum(p.numel() for p in gm.parameters() if id(p) not in theta_ids)


def kept_macs(gm: fx.GraphModule) -> int:
    """Conv/linear and activation-product multiply-accumulates per example (the one cost model)."""
    return total_macs(gm)


def _epoch_record(pruner: Pruner, epoch: int, stats: dict, val_acc, seconds: float) -> dict:
    gates = gates_of(pruner.model)
    thetas = [g.theta.detach().float().cpu().flatten() for g in gates.values()]
    theta = torch.cat(thetas) if thetas else torch.zeros(0)
    seen = max(stats["seen"], 1)
    return {
        "epoch": epoch,
        "loss": stats["loss"] / seen,
        "objective": stats["objective"] / seen,
        "train_acc": stats["correct"] / seen if stats["classified"] else None,
        "val_acc": val_acc,
        "params": kept_params(pruner.model),
        "macs": kept_macs(pruner.model),
        "theta_at_0": int((theta <= AT_END).sum()),
        "theta_at_1": int((theta >= 1 - AT_END).sum()),
        "theta_between": int(((theta > AT_END) & (theta < 1 - AT_END)).sum()),
        "hard_gates": pruner.hard,
        "decided_before_hardening": pruner.state.decided_before_hardening,
        "units_removed": len(pruner.removed_units),
        "sections_removed": len(pruner.removed_sections),
        "price": pruner.price,
        "share": pruner.state.share,  # expected share of the dense cost (per `per`) under theta
        "goal": pruner.goal,  # the share aimed at (target mode), else None
        "theta_mean": {name: float(g.theta.detach().float().mean()) for name, g in gates.items()},
        "width": {name: g.theta.numel() for name, g in gates.items() if g.kind == "channel"},
        "epoch_time_s": seconds,
    }


def _log_line(r: dict, epochs: int) -> str:
    acc = lambda a: "-" if a is None else f"{100 * a:.2f}%"  # noqa: E731
    budget = f"  share {r['share']:.3f} (goal {r['goal']:.3f}, price {r['price']:.3g})" if r["goal"] is not None else ""
    return (f"epoch {r['epoch']}/{epochs}  loss {r['loss']:.4f}  acc {acc(r['train_acc'])}  "
            f"val {acc(r['val_acc'])}  params {r['params']:,}  MACs {r['macs']:,}  "
            f"theta 0/1/between {r['theta_at_0']}/{r['theta_at_1']}/{r['theta_between']}  "
            f"removed {r['units_removed']} units {r['sections_removed']} sections{budget}  {r['epoch_time_s']:.1f}s")


# ---------------------------------------------------------------------------------- resume
def _resume(run: _Run, config: FitConfig, identity: dict, path: Path | None, log) -> tuple[list, int]:
    if path is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if not path.is_file():
        if path.parent.is_dir() and not path.exists():  # killed before the end of the first epoch
            if log is not None:
                log(f"resume: no checkpoint in {path.parent} yet; starting at epoch 1")
            return [], 0
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {path}; run without resume first")
    ckpt = load_checkpoint(path)
    difference = fingerprint_difference(ckpt["fingerprint"], identity)
    if difference:
        raise cannot_resume(path, f"was written for another model ({difference})")
    stored = ckpt["config"]
    diff = {k: (stored.get(k), v) for k, v in config.to_dict().items() if stored.get(k) != v}
    if diff:
        raise ValueError(f"checkpoint {path} was written with other settings (checkpoint, now): {diff}; "
                         "resume with the same fit arguments")
    pruner = run.pruner
    try:
        pruner.load_state_dict(ckpt["pruner"])
        pruner.model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise cannot_resume(path, f"does not fit the model it was written for ({' '.join(str(exc).split())[:300]})")
    fresh = _Run(pruner, config)
    run.opt, run.sched, run.model = fresh.opt, fresh.sched, fresh.model
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["history"], ckpt["epoch"]
