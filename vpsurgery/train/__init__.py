"""Training with pruning.

* `fit` (fit.py): the epoch loop, loaders, logging, evaluation, checkpoints, DDP; built on
* `Pruner` (pruner.py): theta's optimizer, annealing, projection, the price or budget controller,
  the prune decision, physical shrinking with the optimizers' state carried, hardening, its state;
* `objective` (objective.py): the variational regulariser; `budget.py`: the price controller and
  the exact rounding to a budget; `batchnorm.py`: BatchNorm statistics re-estimated for the final
  network; `checkpoint.py`: fit's checkpoints; `precision.py`: autocast.
"""
from vpsurgery.config import FitConfig
from vpsurgery.train.batchnorm import recalibrate_batchnorm
from vpsurgery.train.checkpoint import CHECKPOINT, CheckpointError
from vpsurgery.train.fit import (FitResult, NonFiniteInput, TrainingDiverged, evaluate, fit, kept_macs, kept_params,
                                 seed_epoch)
from vpsurgery.train.objective import expected_cost, objective
from vpsurgery.train.precision import autocast
from vpsurgery.train.pruner import AT_END, Pruner, PrunerState, hardening_epoch

__all__ = ["fit", "FitResult", "FitConfig", "TrainingDiverged", "NonFiniteInput", "Pruner", "PrunerState",
           "objective", "expected_cost", "autocast", "seed_epoch", "evaluate", "kept_params", "kept_macs",
           "hardening_epoch", "recalibrate_batchnorm", "CHECKPOINT", "CheckpointError", "AT_END"]
