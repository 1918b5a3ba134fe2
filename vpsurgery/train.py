"""fit: train a gated model and prune it at the same time (projected SGD on theta, docs/method.md).

Each step minimises  mean minibatch loss + objective(gm) (the regulariser per example) over the
weights (SGD or Adam) and over theta (plain SGD, then clamped to [0, 1]). Every `prune_every` steps
and at the end of each epoch, structures whose theta reached `prune_threshold` are removed
physically (shrink with keep_gates=True); the optimizer is rebuilt on the smaller parameters with
its state sliced, so later steps are cheaper. Works under torchrun (DistributedDataParallel).

A run is a function of its arguments and `seed`: every epoch starts by seeding torch's global RNG
(and Python's and NumPy's) from (seed, epoch, rank), and the data loader's / sampler's own
torch.Generator, if it has one, from (seed, epoch). So an epoch interrupted at any point (kill -9)
and restarted from the checkpoint written at the end of the previous one replays exactly, and
`resume=True` finishes with the same structure, weights and history as an uninterrupted run.
"""
from __future__ import annotations

import copy
import hashlib
import os
import pickle
import pickletools
import random
import re
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from vpsurgery.io import CheckpointError, atomic_save
from vpsurgery.objective import macs_per_weight_entry, objective
from vpsurgery.passes.insert_gates import GATES, MASKS
from vpsurgery.passes.shrink import SLICES_KEY, plan_of
from vpsurgery.passes.shrink import shrink as shrink_exact

CHECKPOINT = "last.pt"
CHECKPOINT_FORMAT = 2
THETA_ESTIMATORS = ("straight_through", "disarm")
# theta within this distance of 0 or 1 counts as "at" that end in the history
AT_END = 0.01


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is kept."""


class NonFiniteInput(ValueError):
    """A training batch (inputs or targets) holds NaN or inf: a data problem, not a divergence."""


@dataclass
class FitConfig:
    """Everything that decides the result; stored in checkpoints and compared on resume."""

    epochs: int
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    theta_lr: float = 0.01
    price: float = 0.01
    sigma1: float = 1.0
    per: str = "params"
    prior: str = "slab"
    sigma0: float = 0.01
    estimator: str = "straight_through"
    prune_every: int = 20
    prune_threshold: float = 0.0
    n_train: int = 0
    theta_optimizer: str = "adam"
    harden: float = 0.2
    seed: int = 0


@dataclass
class FitResult:
    model: fx.GraphModule  # trained, shrunk, still gated (vpsurgery.shrink it to drop the gates)
    history: list[dict] = field(default_factory=list)
    removed_units: set[int] = field(default_factory=set)
    removed_sections: set[str] = field(default_factory=set)


@dataclass
class _State:
    """The parts of training that shrinking replaces."""

    gm: fx.GraphModule
    model: torch.nn.Module  # gm, or gm wrapped in DistributedDataParallel
    opt: torch.optim.Optimizer
    theta_opt: torch.optim.Optimizer | None  # None once no gate is left (every section removed)
    sched: torch.optim.lr_scheduler.LRScheduler
    all_sections: set[str]


def fit(gated: fx.GraphModule, train_loader, val_loader=None, *, epochs: int, lr: float = 0.05,
        optimizer: str = "sgd", momentum: float = 0.9, theta_lr: float = 0.01, price: float = 0.01,
        sigma1: float = 1.0, per: str = "params", prior: str = "slab", sigma0: float = 0.01,
        estimator: str = "straight_through", theta_optimizer: str = "adam", harden: float = 0.2,
        prune_every: int = 20, prune_threshold: float = 0.0, n_train: int | None = None, seed: int = 0,
        loss_fn: Callable = F.cross_entropy, device: str = "auto",
        checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> FitResult:
    """Train `gated` (from vpsurgery.wrap) and prune it while training; see docs/method.md.

    lr/optimizer/momentum: the weights' optimizer ('sgd' or 'adam'), cosine-annealed per step.
    theta_lr: projected-SGD step on theta. price/sigma1/per/prior/sigma0: the regulariser
    (vpsurgery.objective). estimator: theta's gradient, 'straight_through' (one pass) or 'disarm'
    (unbiased, two passes). Structures with theta <= prune_threshold are removed every
    prune_every steps and at each epoch's end. n_train defaults to len(train_loader.dataset).
    seed: each epoch's randomness (gate samples, dropout, data order; see the module docstring).
    Each epoch reseeds torch's, Python's and NumPy's global RNGs and the loader's own generator.
    checkpoint_dir: a checkpoint is written there at the end of every epoch; resume=True continues
    from it (from the start if the directory holds none yet) and ends as the uninterrupted run would.
    """
    config = _config(epochs, lr, optimizer, momentum, theta_lr, price, sigma1, per, prior, sigma0,
                     estimator, prune_every, prune_threshold, n_train, train_loader)
    config.theta_optimizer = theta_optimizer
    if not 0.0 <= harden < 1.0:
        raise ValueError(f"harden is the share of the epochs trained with hard gates, in [0, 1); got {harden}")
    config.harden = harden
    if theta_optimizer not in ("sgd", "adam"):
        raise ValueError(f"theta_optimizer must be 'sgd' or 'adam', got {theta_optimizer!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    config.seed = seed
    _check_gated(gated)
    dev = _device(device)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    all_sections = set(plan_of(gated).sections)
    fingerprint = _fingerprint(gated)
    # Work on a copy: the caller's model is left as it was.
    state = _new_state(copy.deepcopy(gated).to(dev), config, len(train_loader), all_sections)
    history, start = [], 0
    if resume:
        state, history, start = _resume(state, config, fingerprint, ckpt_path, dev, len(train_loader),
                                        log if rank0 else None)
    elif ckpt_path is not None and rank0:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)  # a run killed in epoch 1 is resumable
    for epoch in range(start + 1, epochs + 1):
        _seed_epoch(train_loader, seed, epoch)
        if epoch > hardening_epoch(config) and not _is_hard(state.gm):
            state = _harden(state, config, log if rank0 else None)
        t0 = time.perf_counter()
        state, stats = _train_epoch(state, train_loader, config, dev, loss_fn, epoch, progress and rank0)
        state = _prune(state, config)
        val_acc = _evaluate(state.gm, val_loader, dev) if val_loader is not None else None
        history.append(_epoch_record(state, epoch, stats, val_acc, time.perf_counter() - t0))
        if ckpt_path is not None:
            _save(state, config, fingerprint, history, epoch, ckpt_path, rank0)
        if rank0:
            log(_log_line(history[-1], epochs))
    removed_units, removed_sections = _removed(state)
    return FitResult(state.gm, history, removed_units, removed_sections)


def _check_gated(gated) -> None:
    if not isinstance(gated, fx.GraphModule):
        raise ValueError(f"fit trains a gated model, got a {type(gated).__name__} that vpsurgery.wrap did not "
                         "make; call fit(vpsurgery.wrap(model), ...)")
    plan_of(gated)  # ValueError naming the fix when wrap did not make it
    if not getattr(gated, GATES, None):
        raise ValueError("fit: the model has no gates, so there is nothing to prune or train theta for "
                         "(wrap was called with channels=False and sections=False, or found no prunable channel "
                         "group or residual section; see vpsurgery.report(gated)); wrap with channels=True "
                         "and/or sections=True, or train the model with an ordinary loop")


def _seed_epoch(loader, seed: int, epoch: int) -> None:
    """Make epoch `epoch` a function of (seed, epoch) alone, however it was reached.

    torch's global RNG (gate samples, dropout, a RandomSampler without a generator, the workers'
    base seed) also depends on the rank, so ranks draw different gate samples; the loader's own
    generators (data order) do not."""
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
def _config(epochs, lr, optimizer, momentum, theta_lr, price, sigma1, per, prior, sigma0, estimator,
            prune_every, prune_threshold, n_train, train_loader) -> FitConfig:
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if estimator not in THETA_ESTIMATORS:
        raise ValueError(f"estimator must be one of {THETA_ESTIMATORS}, got {estimator!r}")
    if epochs < 1 or prune_every < 1:
        raise ValueError(f"epochs and prune_every must be >= 1, got {epochs} and {prune_every}")
    _check_loader(train_loader)
    if n_train is None:
        n_train = len(train_loader.dataset)
    return FitConfig(epochs, lr, optimizer, momentum, theta_lr, price, sigma1, per, prior, sigma0,
                     estimator, prune_every, prune_threshold, n_train)


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


def _device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _split_params(gm: fx.GraphModule) -> tuple[list, list]:
    weights, thetas = [], []
    for name, p in gm.named_parameters():
        (thetas if name.startswith(GATES + ".") else weights).append(p)
    return weights, thetas


def _make_optimizers(gm, config: FitConfig):
    weights, thetas = _split_params(gm)
    if config.optimizer == "adam":
        opt = torch.optim.Adam(weights, lr=config.lr)
    else:
        opt = torch.optim.SGD(weights, lr=config.lr, momentum=config.momentum)
    if not thetas:
        return opt, None
    # Projected SGD on theta: no momentum, no adaptive scaling (the objective is linear in theta).
    if config.theta_optimizer == "adam":  # sign-like, noise-averaged steps toward the chosen vertex
        return opt, torch.optim.Adam(thetas, lr=config.theta_lr)
    return opt, torch.optim.SGD(thetas, lr=config.theta_lr)


def _wrap_ddp(gm: fx.GraphModule, dev: torch.device) -> torch.nn.Module:
    if not dist.is_initialized():
        return gm
    ids = [dev.index] if dev.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(gm, device_ids=ids)


def _new_state(gm, config: FitConfig, steps_per_epoch: int, all_sections: set[str]) -> _State:
    opt, theta_opt = _make_optimizers(gm, config)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    return _State(gm, _wrap_ddp(gm, next(gm.parameters()).device), opt, theta_opt, sched, all_sections)


# ---------------------------------------------------------------------------------- one epoch
def _train_epoch(state: _State, loader, config: FitConfig, dev, loss_fn, epoch: int,
                 bar: bool) -> tuple[_State, dict]:
    state.model.train()
    totals = {"loss": 0.0, "objective": 0.0, "correct": 0, "seen": 0, "classified": False}
    step_in_epoch = 0
    for x, y in tqdm(loader, desc=f"epoch {epoch}", disable=not bar, leave=False):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        step = _disarm_step if config.estimator == "disarm" else _straight_through_step
        loss, reg, correct = step(state, x, y, config, loss_fn)
        _check_finite(loss + reg, x, y, epoch, step_in_epoch)
        state.opt.step()
        if state.theta_opt is not None and not _is_hard(state.gm):
            state.theta_opt.step()
        state.sched.step()
        _anneal_theta_lr(state, config)
        _project(state.gm)
        state.opt.zero_grad(set_to_none=True)
        if state.theta_opt is not None:
            state.theta_opt.zero_grad(set_to_none=True)
        step_in_epoch += 1
        if state.sched.last_epoch % config.prune_every == 0:
            state = _prune(state, config)
            state.model.train()
        totals["loss"] += float(loss) * len(y)
        totals["objective"] += float(loss + reg) * len(y)
        totals["correct"] += correct or 0
        totals["classified"] = correct is not None
        totals["seen"] += len(y)
    if step_in_epoch == 0:
        raise ValueError(f"train_loader yielded no batch in epoch {epoch} although len(train_loader) is "
                         f"{len(loader)}; check the dataset and sampler")
    return state, totals


def _forward_loss(state: _State, x, y, loss_fn):
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        out = state.model(x)
    loss = loss_fn(out.float(), y)
    return loss, _correct(out, y)


def _correct(out: torch.Tensor, y: torch.Tensor) -> int | None:
    """Correct class predictions, or None when this is not classification."""
    if out.ndim != 2 or y.is_floating_point():
        return None
    return int((out.argmax(1) == y).sum())


def _regulariser(state: _State, config: FitConfig) -> torch.Tensor:
    return objective(state.gm, config.n_train, price=config.price, sigma1=config.sigma1, per=config.per,
                     prior=config.prior, sigma0=config.sigma0)


def _straight_through_step(state: _State, x, y, config, loss_fn):
    loss, correct = _forward_loss(state, x, y, loss_fn)
    reg = _regulariser(state, config)
    (loss + reg).backward()
    return loss.detach(), reg.detach(), correct


def _disarm_step(state: _State, x, y, config, loss_fn):
    """DisARM (Dong et al. 2020) in theta coordinates: two antithetic samples b1 = [u < theta],
    b2 = [1 - u < theta]; unbiased for d E[loss] / d theta on (0, 1). With per-example gates
    (the default wherever wrap found the batch dim) every example is its own antithetic pair, so
    one minibatch averages N estimates instead of one. Weight gradients average both passes."""
    gates = getattr(state.gm, GATES)
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
            per_example, correct = _forward_losses(state, x, y, loss_fn)
            loss = per_example.mean()
            reg = _regulariser(state, config)  # in both passes, so DDP sees theta used each time
            (0.5 * (loss + reg)).backward()
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
    return 0.5 * (losses[0] + losses[1]).mean(), reg.detach(), correct  # accuracy of the second sample


def _forward_losses(state: _State, x, y, loss_fn):
    """Per-example losses (the loss function is called with reduction='none')."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        out = state.model(x)
    per = loss_fn(out.float(), y, reduction="none")
    return per.reshape(len(x), -1).mean(1), _correct(out, y)


def _non_finite(t) -> int:
    """NaN/inf entries of a floating-point tensor (0 for integer labels and non-tensors)."""
    if not torch.is_tensor(t) or not (t.is_floating_point() or t.is_complex()):
        return 0
    return int((~torch.isfinite(t)).sum())


def _check_finite(total: torch.Tensor, x, y, epoch: int, step: int) -> None:
    """Stop on a non-finite loss: as bad data when the batch holds NaN/inf, else as a divergence."""
    loss_bad = ~torch.isfinite(total)
    # The batch is only inspected when the loss is bad (no extra cost on healthy steps).
    bad_inputs = bad_targets = 0
    if loss_bad.item():
        bad_inputs, bad_targets = _non_finite(x), _non_finite(y)
    flags = torch.stack([loss_bad.float(), total.new_tensor(float(bad_inputs + bad_targets > 0))])
    if dist.is_initialized():  # every rank must stop together, or the others hang in all_reduce
        dist.all_reduce(flags)
    if flags[1].item():
        where = (f"the inputs hold {bad_inputs} and the targets {bad_targets} non-finite values"
                 if bad_inputs + bad_targets else "on another rank")
        raise NonFiniteInput(
            f"the input batch contains NaN/inf at epoch {epoch} step {step}; clean the data ({where}; "
            "the last checkpoint written before this is kept)")
    if flags[0].item():
        raise TrainingDiverged(
            f"training diverged: the loss is {float(total)} at epoch {epoch}, step {step} of the epoch; "
            "lower lr or theta_lr (the last checkpoint written before this is kept)")


def _anneal_theta_lr(state: _State, config: FitConfig) -> None:
    """theta's step follows the weights' cosine schedule: projected SGD converges to a vertex only
    with a decaying step (stochastic approximation), else theta keeps diffusing with the noise."""
    if state.theta_opt is None:
        return
    base = state.opt.param_groups[0]["initial_lr"]
    factor = state.opt.param_groups[0]["lr"] / base if base else 1.0
    for group in state.theta_opt.param_groups:
        group["lr"] = config.theta_lr * factor


@torch.no_grad()
def _project(gm: fx.GraphModule) -> None:
    for g in getattr(gm, GATES, {}).values():
        g.theta.clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------- pruning
def _prune_decision(gm: fx.GraphModule, threshold: float) -> tuple[set[int], set[str]]:
    plan, gates = plan_of(gm), getattr(gm, GATES, {})
    units, sections = set(), set()
    for name, group in plan.groups.items():
        theta = gates[name].theta.detach().cpu()
        units |= {u for u, t in zip(group.units, theta.tolist()) if t <= threshold}
    for name in plan.sections:
        if name in gates and float(gates[name].theta.detach()) <= threshold:
            sections.add(name)
    # A unit the shrink keeps (so no tensor goes empty) would be "removed" again at every check.
    return units - plan.removed_units - _kept_anyway(gm), sections


def _kept_anyway(gm: fx.GraphModule) -> set[int]:
    return gm.meta.get("vpsurgery.train.kept_anyway", set())


def hardening_epoch(config: FitConfig) -> int:
    """The last epoch with stochastic gates; later ones train the rounded, deterministic network."""
    return config.epochs - int(round(config.harden * config.epochs))


def _is_hard(gm: fx.GraphModule) -> bool:
    return bool(gm.meta.get("vpsurgery.train.hard", False))


@torch.no_grad()
def _harden(state: _State, config: FitConfig, log) -> _State:
    """Round every theta (>= 0.5 -> 1, else 0), freeze it, and remove what went to 0, so the last
    epochs fine-tune exactly the network that shrink will emit (the stochastic phase's undecided
    thetas would otherwise be rounded only after training, at a cost in accuracy)."""
    gates = getattr(state.gm, GATES, {})
    thetas = torch.cat([g.theta.detach().flatten() for g in gates.values()]) if gates else torch.zeros(0)
    decided = float(((thetas <= AT_END) | (thetas >= 1 - AT_END)).float().mean()) if len(thetas) else 1.0
    for g in gates.values():
        g.theta.copy_((g.theta >= 0.5).to(g.theta.dtype))
    state.gm.meta["vpsurgery.train.hard"] = True
    state.gm.meta["vpsurgery.train.decided_before_hardening"] = decided
    if log is not None:
        log(f"hardening: {100 * decided:.1f}% of theta had reached 0 or 1; the rest rounded and frozen")
    return _prune(state, config)


def _prune(state: _State, config: FitConfig) -> _State:
    units, sections = _prune_decision(state.gm, config.prune_threshold)
    if dist.is_initialized():  # theta is identical on every rank; make the decision identical too
        decision = [(sorted(units), sorted(sections))]
        dist.broadcast_object_list(decision, src=0)
        units, sections = set(decision[0][0]), set(decision[0][1])
    if not units and not sections:
        return state
    return _shrink_state(state, config, units, sections)


def _shrink_state(state: _State, config: FitConfig, units: set[int], sections: set[str]) -> _State:
    old_plan = plan_of(state.gm)
    gm = shrink_exact(state.gm, keep_gates=True, removed_units=old_plan.removed_units | units,
                      removed_sections=sections)
    kept = units - plan_of(gm).removed_units
    gm.meta["vpsurgery.train.kept_anyway"] = _kept_anyway(state.gm) | kept
    opt, theta_opt = _make_optimizers(gm, config)
    _carry_optimizer(state.opt, state.gm, opt, gm)
    if state.theta_opt is not None and theta_opt is not None:  # Adam's moments and step count go on
        _carry_optimizer(state.theta_opt, state.gm, theta_opt, gm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=state.sched.T_max)
    sched.load_state_dict(state.sched.state_dict())
    dev = next(gm.parameters()).device
    return _State(gm, _wrap_ddp(gm, dev), opt, theta_opt, sched, state.all_sections)


def _carry_optimizer(old_opt, old_gm, new_opt, new_gm) -> None:
    """Move the optimizer state to the shrunk parameters, sliced by meta['vpsurgery.slices']."""
    for old_group, new_group in zip(old_opt.param_groups, new_opt.param_groups):
        new_group.update({k: v for k, v in old_group.items() if k != "params"})
    slices = new_gm.meta.get(SLICES_KEY, {})
    old_params = dict(old_gm.named_parameters())
    for name, p in new_gm.named_parameters():
        old = old_params.get(name)
        if old is None or old not in old_opt.state:
            continue
        new_opt.state[p] = {k: _slice_like(v, old, slices.get(name, {})) for k, v in old_opt.state[old].items()}


def _slice_like(value, param: torch.Tensor, dims: dict[int, torch.Tensor]):
    if not torch.is_tensor(value) or value.shape != param.shape:
        return value  # e.g. Adam's step count
    for d, keep in dims.items():
        value = value.index_select(d, keep.to(value.device))
    return value.clone()


def _removed(state: _State) -> tuple[set[int], set[str]]:
    plan = plan_of(state.gm)
    return set(plan.removed_units), state.all_sections - set(plan.sections)


# ---------------------------------------------------------------------------------- reporting
@torch.no_grad()
def _evaluate(gm: fx.GraphModule, loader, dev) -> float | None:
    """Accuracy of the deterministic network (gates at theta); None unless classification."""
    gm.eval()
    correct = seen = 0
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            c = _correct(gm(x), y)
        if c is None:
            return None
        correct += c
        seen += len(y)
    return correct / seen if seen else None


def kept_params(gm: fx.GraphModule) -> int:
    """Parameters of the network, gates excluded."""
    return sum(p.numel() for p in _split_params(gm)[0])


def kept_macs(gm: fx.GraphModule) -> int:
    """Conv/linear multiply-accumulates per example."""
    return int(sum(m * gm.get_submodule(name).weight.numel() for name, m in macs_per_weight_entry(gm).items()))


def _epoch_record(state: _State, epoch: int, stats: dict, val_acc, seconds: float) -> dict:
    gates = getattr(state.gm, GATES, {})
    thetas = [g.theta.detach().float().cpu() for g in gates.values()]
    theta = torch.cat(thetas) if thetas else torch.zeros(0)
    removed_units, removed_sections = _removed(state)
    seen = max(stats["seen"], 1)
    return {
        "epoch": epoch,
        "loss": stats["loss"] / seen,
        "objective": stats["objective"] / seen,
        "train_acc": stats["correct"] / seen if stats["classified"] else None,
        "val_acc": val_acc,
        "params": kept_params(state.gm),
        "macs": kept_macs(state.gm),
        "theta_at_0": int((theta <= AT_END).sum()),
        "theta_at_1": int((theta >= 1 - AT_END).sum()),
        "theta_between": int(((theta > AT_END) & (theta < 1 - AT_END)).sum()),
        "hard_gates": _is_hard(state.gm),
        "decided_before_hardening": state.gm.meta.get("vpsurgery.train.decided_before_hardening"),
        "units_removed": len(removed_units),
        "sections_removed": len(removed_sections),
        "theta_mean": {name: float(g.theta.detach().float().mean()) for name, g in gates.items()},
        "width": {name: g.theta.numel() for name, g in gates.items() if g.kind == "channel"},
        "epoch_time_s": seconds,
    }


def _log_line(r: dict, epochs: int) -> str:
    acc = lambda a: "-" if a is None else f"{100 * a:.2f}%"
    return (f"epoch {r['epoch']}/{epochs}  loss {r['loss']:.4f}  acc {acc(r['train_acc'])}  "
            f"val {acc(r['val_acc'])}  params {r['params']:,}  MACs {r['macs']:,}  "
            f"theta 0/1/between {r['theta_at_0']}/{r['theta_at_1']}/{r['theta_between']}  "
            f"removed {r['units_removed']} units {r['sections_removed']} sections  {r['epoch_time_s']:.1f}s")


# ---------------------------------------------------------------------------------- checkpoints
_CHECKPOINT_KEYS = ("format", "config", "fingerprint", "epoch", "removed_units", "removed_sections", "kept_anyway",
                    "hard", "decided_before_hardening", "model", "optimizer", "theta_optimizer", "scheduler",
                    "history")


def _fingerprint(gm: fx.GraphModule) -> dict:
    """What identifies the model fit was given: its gate groups and sections with their sizes and
    the shapes of its state. A checkpoint is only resumed onto the model it was written for."""
    plan = plan_of(gm)
    return {"groups": {name: len(g.units) for name, g in plan.groups.items()},
            "sections": sorted(plan.sections),
            "state": {k: list(v.shape) for k, v in gm.state_dict().items()}}


def _fingerprint_difference(stored: dict, now: dict) -> str:
    problems = []
    for key, what in (("groups", "channel group"), ("sections", "residual section"), ("state", "tensor")):
        a, b = stored.get(key), now[key]
        if a == b:
            continue
        if isinstance(b, list):
            a, b = dict.fromkeys(a or []), dict.fromkeys(b)
        a = a or {}
        only_ckpt, only_now = [k for k in a if k not in b], [k for k in b if k not in a]
        changed = [f"{k} {a[k]} vs {b[k]}" for k in b if k in a and a[k] != b[k]]
        if only_ckpt:
            problems.append(f"{what}s only in the checkpoint: {_few(only_ckpt)}")
        if only_now:
            problems.append(f"{what}s only in this model: {_few(only_now)}")
        if changed:
            problems.append(f"{what} sizes (checkpoint vs this model): {_few(changed)}")
    return "; ".join(problems)


def _few(items: list[str], shown: int = 3) -> str:
    more = len(items) - shown
    return ", ".join(map(str, items[:shown])) + (f" and {more} more" if more > 0 else "")


def _save(state: _State, config: FitConfig, fingerprint: dict, history: list, epoch: int, path: Path,
          rank0: bool) -> None:
    if rank0:
        removed_units, removed_sections = _removed(state)
        atomic_save({
            "format": CHECKPOINT_FORMAT,
            "config": asdict(config),
            "fingerprint": fingerprint,
            "epoch": epoch,
            "removed_units": sorted(removed_units),
            "removed_sections": sorted(removed_sections),
            "kept_anyway": sorted(_kept_anyway(state.gm)),
            "hard": _is_hard(state.gm),
            "decided_before_hardening": state.gm.meta.get("vpsurgery.train.decided_before_hardening"),
            "model": state.gm.state_dict(),
            "optimizer": state.opt.state_dict(),
            "theta_optimizer": state.theta_opt.state_dict() if state.theta_opt is not None else None,
            "scheduler": state.sched.state_dict(),
            "history": history,
            # Not needed to replay (every epoch reseeds from (seed, epoch)), kept for inspection.
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }, path)
    if dist.is_initialized():
        dist.barrier()


def _cannot_resume(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"cannot resume: {path} {why}; delete it or start without resume")


def _load_training_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load reports a bad file through many types (see vpsurgery.io)
        code = _pickled_code(exc, path)
        if code is not None:
            raise CheckpointError(
                f"cannot resume from {path}: refused: not a weights-only checkpoint (loading it would run "
                f"pickled code{': ' + code if code else ''}); delete it or start without resume") from None
        raise _cannot_resume(path, "is truncated or corrupt") from exc
    if not isinstance(ckpt, dict):
        raise _cannot_resume(path, f"holds a {type(ckpt).__name__}, not a training checkpoint of vpsurgery.fit")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        older = "format" not in ckpt and "config" in ckpt
        raise _cannot_resume(path, "was written by an older vpsurgery (it lacks " + _few(missing) + ")" if older
                             else "is not a training checkpoint of vpsurgery.fit (it lacks " + _few(missing) + ")")
    return ckpt


_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _pickled_code(exc: Exception, path: Path) -> str | None:
    """The callable a refused pickle names ('' if unknown), or None when the file is just broken.

    The weights-only unpickler names the global it refused; pickles it cannot even parse (a plain
    pickle.dump of protocol >= 4) are read with pickletools, which decodes without executing."""
    if not isinstance(exc, pickle.UnpicklingError):
        return None
    found = re.search(r"GLOBAL (\S+)", str(exc))
    if found:
        return found.group(1)
    if zipfile.is_zipfile(path):
        return None
    try:
        ops = [op.name for op, _, _ in pickletools.genops(path.read_bytes())]
    except Exception:  # truncated or not a pickle at all
        return None
    return "" if _CODE_OPCODES & set(ops) else None


def _resume(state: _State, config: FitConfig, fingerprint: dict, path: Path | None, dev, steps_per_epoch: int,
            log):
    if path is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if not path.is_file():
        if path.parent.is_dir() and not path.exists():  # killed before the end of the first epoch
            if log is not None:
                log(f"resume: no checkpoint in {path.parent} yet; starting at epoch 1")
            return state, [], 0
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {path}; run without resume first")
    ckpt = _load_training_checkpoint(path)
    difference = _fingerprint_difference(ckpt["fingerprint"], fingerprint)
    if difference:
        raise _cannot_resume(path, f"was written for another model ({difference})")
    stored = ckpt["config"]
    diff = {k: (stored.get(k), v) for k, v in asdict(config).items() if stored.get(k) != v}
    if diff:
        raise ValueError(f"checkpoint {path} was written with other settings (checkpoint, now): {diff}; "
                         "resume with the same fit arguments")
    plan = plan_of(state.gm)
    gm = shrink_exact(state.gm, keep_gates=True, removed_units=set(ckpt["removed_units"]),
                      removed_sections=set(ckpt["removed_sections"]) & set(plan.sections))
    gm.meta["vpsurgery.train.kept_anyway"] = set(ckpt["kept_anyway"])
    gm.meta["vpsurgery.train.hard"] = bool(ckpt["hard"])
    if ckpt["decided_before_hardening"] is not None:
        gm.meta["vpsurgery.train.decided_before_hardening"] = ckpt["decided_before_hardening"]
    try:
        gm.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise _cannot_resume(path, f"does not fit the model it was written for ({' '.join(str(exc).split())[:300]})")
    state = _new_state(gm, config, steps_per_epoch, state.all_sections)
    state.opt.load_state_dict(ckpt["optimizer"])
    if (state.theta_opt is None) != (ckpt["theta_optimizer"] is None):
        raise _cannot_resume(path, "does not fit the model it was written for (gates left)")
    if state.theta_opt is not None:
        state.theta_opt.load_state_dict(ckpt["theta_optimizer"])
    state.sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return state, ckpt["history"], ckpt["epoch"]
