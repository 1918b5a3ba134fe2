"""Pruning inside a Lightning run: `PruningCallback`, built on vpsurgery.Pruner (optional extra:
`pip install 'vpsurgery[lightning]'`).

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = vpsurgery.wrap(net, example)       # the gated GraphModule, at attribute `model`
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)        # the callback adds the regulariser
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    trainer = lightning.Trainer(max_epochs=10, callbacks=[PruningCallback(target=0.3, per="flops")])
    trainer.fit(Module(), train_loader)
    small = vpsurgery.shrink(module.model)

What the callback does, at Lightning's hooks:

* on_train_start: makes a Pruner on the module's gated submodule (`attr`, default "model"), with
  n_train = len(train dataloader's dataset) and steps_per_epoch = optimizer steps per epoch unless
  given, epochs = trainer.max_epochs unless given; takes the gates' theta out of the module's
  optimizers (the Pruner steps theta with its own); and wraps the module's training_step so that
  the loss it returns (a tensor, or a dict's "loss") gets pruner.loss() added;
* before every optimizer step: pruner.clip_gradients() (a gradient spike, norm > 3x its running
  mean, is cut, as in fit);
* after every optimizer step: pruner.step(loss) (with the training_step's own loss: the warm-up; theta's step, projection, schedules, price); every
  `prune_every` steps and at each epoch's end, physical removal: the module's submodule is
  replaced by the smaller model and the trainer's optimizers are updated in place (state sliced),
  so their schedulers keep working;
* at the start of the last `harden` share of the epochs: hardening (and with a target, the exact
  rounding; at the end of training if no epoch is left for it).

Limits: automatic optimization only (with manual optimization use Pruner directly); a single
process (DDP strategies cannot follow a model whose parameters change shape: use vpsurgery.fit,
which rebuilds DDP); resuming a Lightning checkpoint of a pruned run is not supported.
"""
from __future__ import annotations

import functools
import math

from vpsurgery.config import FitConfig, make_config
from vpsurgery.train.batchnorm import recalibrate_batchnorm
from vpsurgery.train.pruner import Pruner

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("vpsurgery.lightning needs Lightning: pip install 'vpsurgery[lightning]' "
                      f"(or pip install lightning) ({exc})") from exc

__all__ = ["PruningCallback"]


class PruningCallback(pl.Callback):
    """Prune the LightningModule's gated submodule `attr` while Lightning trains it.

    n_train / steps_per_epoch: default from the train dataloader; target / per and any other
    setting (FitConfig field) as keywords or in `config`; `epochs` defaults to trainer.max_epochs.
    After training, `callback.pruner` holds the state (price, share, decided_before_hardening)."""

    def __init__(self, n_train: int | None = None, target: float | None = None, per: str | None = None, *,
                 attr: str = "model", steps_per_epoch: int | None = None, config: FitConfig | None = None,
                 **settings):
        super().__init__()
        if target is not None:
            settings["target"] = target
        if per is not None:
            settings["per"] = per
        make_config(config, settings)  # unknown or bad settings are refused now, not at the first epoch
        self.n_train, self.attr, self.steps_per_epoch = n_train, attr, steps_per_epoch
        self.config, self.settings = config, settings
        self.pruner: Pruner | None = None
        self._global_step = 0

    # ------------------------------------------------------------------ set-up
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("PruningCallback shrinks the model during training, which a multi-process strategy "
                               "(DDP) cannot follow; train on one device or use vpsurgery.fit (it rebuilds DDP)")
        if not pl_module.automatic_optimization:
            raise RuntimeError("PruningCallback needs automatic optimization; with manual optimization use "
                               "vpsurgery.Pruner in training_step (loss(), step(), prune(optimizer))")
        gated = getattr(pl_module, self.attr, None)
        if gated is None:
            raise ValueError(f"PruningCallback: the LightningModule has no attribute {self.attr!r}; keep the gated "
                             f"model (vpsurgery.wrap(...)) there or pass attr=NAME")
        settings = dict(self.settings)
        if "epochs" not in settings and (self.config is None or self.config.epochs == FitConfig().epochs):
            if not trainer.max_epochs or trainer.max_epochs < 1:
                raise ValueError("PruningCallback needs the number of epochs: set Trainer(max_epochs=...) or "
                                 "pass epochs=...")
            settings["epochs"] = trainer.max_epochs
        self.pruner = Pruner(gated, self.n_train or _dataset_length(trainer),
                             steps_per_epoch=self.steps_per_epoch or _steps_per_epoch(trainer),
                             config=self.config, **settings)
        theta_ids = {id(t) for t in self.pruner.thetas()}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in theta_ids]
        self._wrap_training_step(pl_module)
        self._global_step = trainer.global_step

    def _wrap_training_step(self, pl_module) -> None:
        original = pl_module.training_step
        if getattr(original, "_vpsurgery_wrapped", False):
            return

        @functools.wraps(original)
        def training_step(*args, **kwargs):
            out = original(*args, **kwargs)
            if out is None or self.pruner is None:
                return out
            self._loss = (out["loss"] if isinstance(out, dict) else out).detach()  # for the warm-up
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] + self.pruner.loss()}
            return out + self.pruner.loss()

        training_step._vpsurgery_wrapped = True
        pl_module.training_step = training_step

    # ------------------------------------------------------------------ during training
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.pruner is not None and trainer.current_epoch >= self.pruner.hardening_epoch and not self.pruner.hard:
            self.pruner.harden()
            self._prune(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.pruner is not None:
            self.pruner.clip_gradients()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.pruner is None or trainer.global_step == self._global_step:
            return  # no optimizer step (gradient accumulation)
        self._global_step = trainer.global_step
        if self.pruner.step(getattr(self, "_loss", None)):
            self._prune(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.pruner is not None:
            self._prune(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.pruner is None:
            return
        if self.pruner.config.target is not None and not self.pruner.hard:
            self.pruner.harden()  # no hardened epoch was left: round to the budget at the end
            self._prune(trainer, pl_module)
        # as fit ends: BatchNorm statistics of the final network (vpsurgery.train.batchnorm)
        recalibrate_batchnorm(self.pruner.model, trainer.train_dataloader,
                              batches=self.pruner.config.bn_recalibration_batches, device=pl_module.device)

    def _prune(self, trainer, pl_module) -> None:
        before = self.pruner.model
        self.pruner.prune(list(trainer.optimizers))
        if self.pruner.model is not before:
            setattr(pl_module, self.attr, self.pruner.model)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"pruner": self.pruner.state_dict()} if self.pruner is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            raise NotImplementedError("PruningCallback cannot resume a Lightning checkpoint of a pruned run yet (the "
                                      "module's structure changed); use vpsurgery.fit(..., resume=True) to resume")


def _dataset_length(trainer) -> int:
    loader = trainer.train_dataloader
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        raise ValueError("PruningCallback needs n_train (the number of training examples): the train dataloader "
                         "has no dataset with a length; pass n_train=...") from None


def _steps_per_epoch(trainer) -> int:
    batches = trainer.num_training_batches
    if not isinstance(batches, int) and not (isinstance(batches, float) and math.isfinite(batches)):
        raise ValueError("PruningCallback needs steps_per_epoch: the train dataloader has no length")
    return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))
