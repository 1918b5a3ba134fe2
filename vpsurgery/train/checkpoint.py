"""fit's training checkpoints: written atomically at the end of every epoch, read back only as
weights (never code), and only onto the model and settings they were written for.

A checkpoint (format 3) holds the settings (FitConfig), a fingerprint of the model fit was given,
the epoch, the Pruner's state (Pruner.state_dict: structure removed so far, hardened flag, price,
theta's optimizer...), the model's and the weights' optimizer's and scheduler's state, and the
history. Every epoch reseeds from (seed, epoch), so the RNG states are kept for inspection only.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx

from vpsurgery.io import CheckpointError, CodeInCheckpoint, CorruptCheckpoint, atomic_save, load_weights_only, summarise
from vpsurgery.surgery import plan as plan_of

__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "CheckpointError", "fingerprint", "fingerprint_difference",
           "save_checkpoint", "load_checkpoint", "cannot_resume"]

CHECKPOINT = "last.pt"
CHECKPOINT_FORMAT = 3
_KEYS = ("format", "config", "fingerprint", "epoch", "pruner", "model", "optimizer", "scheduler", "history")


def fingerprint(gm: fx.GraphModule) -> dict:
    """What identifies the model fit was given: its gate groups and sections with their sizes and
    the shapes of its state. A checkpoint is only resumed onto the model it was written for."""
    plan = plan_of(gm)
    return {"groups": {name: len(g.units) for name, g in plan.groups.items()},
            "sections": sorted(plan.sections),
            "state": {k: list(v.shape) for k, v in gm.state_dict().items()}}


def fingerprint_difference(stored: dict, now: dict) -> str:
    """'' when the fingerprints agree, else what differs, in words."""
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
            problems.append(f"{what}s only in the checkpoint: {summarise(only_ckpt)}")
        if only_now:
            problems.append(f"{what}s only in this model: {summarise(only_now)}")
        if changed:
            problems.append(f"{what} sizes (checkpoint vs this model): {summarise(changed)}")
    return "; ".join(problems)


def save_checkpoint(path: Path, *, config: dict, fingerprint: dict, epoch: int, pruner: dict, model: dict,
                    optimizer: dict, scheduler: dict, history: list, rank0: bool = True) -> None:
    """Write (on rank 0; every rank waits for it) the checkpoint of the end of `epoch`."""
    if rank0:
        atomic_save({
            "format": CHECKPOINT_FORMAT, "config": config, "fingerprint": fingerprint, "epoch": epoch,
            "pruner": pruner, "model": model, "optimizer": optimizer, "scheduler": scheduler, "history": history,
            # Not needed to replay (every epoch reseeds from (seed, epoch)), kept for inspection.
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }, path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cannot_resume(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"cannot resume: {path} {why}; delete it or start without resume")


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, loaded weights-only; CheckpointError naming the file when it is
    truncated, corrupt, carries code, or is not (this version's) fit checkpoint."""
    try:
        ckpt = load_weights_only(path, path)
    except CodeInCheckpoint as exc:
        raise CheckpointError(
            f"cannot resume from {path}: refused: not a weights-only checkpoint (loading it would run "
            f"pickled code: {summarise(exc.imports)}); delete it or start without resume") from None
    except CorruptCheckpoint as exc:
        raise cannot_resume(path, "is truncated or corrupt") from exc
    if not isinstance(ckpt, dict):
        raise cannot_resume(path, f"holds a {type(ckpt).__name__}, not a training checkpoint of vpsurgery.fit")
    if "format" in ckpt and ckpt["format"] != CHECKPOINT_FORMAT:
        raise cannot_resume(path, f"was written by another version of vpsurgery (checkpoint format "
                                  f"{ckpt['format']}, this one reads {CHECKPOINT_FORMAT})")
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        older = "format" not in ckpt and "config" in ckpt
        raise cannot_resume(path, "was written by an older vpsurgery (it lacks " + summarise(missing) + ")" if older
                            else "is not a training checkpoint of vpsurgery.fit (it lacks " + summarise(missing) + ")")
    return ckpt
