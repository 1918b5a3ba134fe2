"""The one source of the training settings: `FitConfig`.

`fit`, `Pruner`, `objective`, the Lightning callback, checkpoints (compared on resume) and the
command line (`compress --price ...`, generated from these fields) all read their defaults and
their checks from here, so a default is written once; `make_config` applies keyword overrides. Each field's metadata holds its help text, its choices or
its valid range; `FitConfig(...)` refuses a bad value with a message that names the setting.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

PRIORS = ("slab", "spike_and_slab")
PER = ("params", "flops")
ESTIMATORS = ("straight_through", "disarm")
OPTIMIZERS = ("sgd", "adam")


def setting(default, help: str, *, kind: type | None = None, choices: tuple[str, ...] | None = None,
            low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A FitConfig field: its default, help text, type (`kind`, default: the default's) and valid
    values (choices or a range)."""
    return field(default=default, metadata={"help": help, "kind": kind or type(default), "choices": choices,
                                            "low": low, "high": high, "low_open": low_open, "high_open": high_open})


@dataclass
class FitConfig:
    epochs: int = setting(10, "training epochs", low=1)
    lr: float = setting(0.05, "learning rate of the weights (cosine-annealed per step)", low=0, low_open=True)
    optimizer: str = setting("sgd", "optimizer of the weights", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "SGD momentum of the weights", low=0, high=1, high_open=True)
    theta_lr: float = setting(0.01, "step size of the gate probabilities theta, annealed with the weights' cosine "
                                    "schedule (with target and theta_optimizer=adam it is raised, if needed, so "
                                    "that theta can travel from 1 to 0 within the run; docs/budget.md)",
                              low=0, low_open=True)
    theta_optimizer: str = setting("adam", "optimizer of theta: adam (scale-free steps, the default) or plain sgd; "
                                           "theta is projected onto [0, 1] after each step", choices=OPTIMIZERS)
    estimator: str = setting("straight_through", "theta's gradient estimator: straight_through (one pass) or "
                                                 "disarm (unbiased, two passes; fit only, with (inputs, targets) "
                                                 "batches and a loss_fn taking reduction=; docs/budget.md)",
                             choices=ESTIMATORS)
    price: float = setting(0.01, "regulariser price in nats of total training loss per kept parameter "
                                 "(per=params) or per kept MAC per example (per=flops); ignored when target "
                                 "is set (the price is then found during training)", low=0)
    target: float | None = setting(None, "share of the dense model's cost (what per counts) that the final model "
                                         "keeps, in (0, 1], e.g. 0.3; the price is then found during training and "
                                         "the last rounding meets it exactly; unset: prune at the given price",
                                   kind=float, low=0, high=1, low_open=True)
    per: str = setting("params", "what price and target count: params (kept parameters) or flops (kept "
                                 "conv/linear and attention multiply-accumulates per example)", choices=PER)
    sigma1: float = setting(1.0, "slab standard deviation of the weight prior (weight decay 1/(n_train "
                                 "sigma1^2) on active weights)", low=0, low_open=True)
    prior: str = setting("slab", "reading of the weight prior: slab or spike_and_slab (docs/method.md)",
                         choices=PRIORS)
    sigma0: float = setting(0.01, "spike standard deviation (prior=spike_and_slab only)", low=0, low_open=True)
    harden: float | None = setting(None, "share of the epochs, at the end, that train the rounded network with theta "
                                         "frozen (theta >= 0.5 kept, or with target the rounding that meets it); "
                                         "unset: 0.5 with a target (the rounding decides, and the network it "
                                         "keeps trains for half the run), 0.2 with a price (theta has to reach "
                                         "0 or 1 by itself)", kind=float, low=0, high=1, high_open=True)
    prune_sections: bool | None = setting(None, "let residual sections' gates move (remove whole blocks); unset: "
                                                "yes with a price, no with a target (a short budgeted run "
                                                "rounded away too many sections: docs/budget.md)", kind=bool)
    prune_every: int = setting(20, "optimizer steps between physical removals of the structures whose theta is "
                                   "<= prune_threshold (also at the end of each epoch)", low=1)
    prune_threshold: float = setting(0.0, "theta at or below which a structure is removed during training "
                                          "(0: theta reached 0 under the projection)",
                                     low=0, high=1, high_open=True)
    bn_recalibration_batches: int = setting(100, "training batches over which every BatchNorm's statistics are "
                                                 "re-estimated at the end (an exact average, the rest of the "
                                                 "network in eval mode: the running averages describe the "
                                                 "networks of the whole run); 0: keep the running averages",
                                            low=0)
    n_train: int | None = setting(None, "training examples the regulariser is divided by (default: the "
                                        "training set's length)", kind=int, low=1)
    seed: int = setting(0, "seed of each epoch's data order, gate samples and dropout (derived from seed and "
                           "epoch, so a resumed run is the same run)")

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, check_value(f.name, getattr(self, f.name)))

    def objective_kwargs(self) -> dict[str, Any]:
        return {"price": self.price, "sigma1": self.sigma1, "per": self.per, "prior": self.prior,
                "sigma0": self.sigma0}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fit setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)


def make_config(config: "FitConfig | None" = None, settings: dict[str, Any] | None = None) -> FitConfig:
    """`config` (default: FitConfig()) with `settings` overriding the fields of the same names;
    ValueError naming an unknown setting and listing the valid ones, or naming a bad value."""
    if config is None:
        config = FitConfig()
    elif not isinstance(config, FitConfig):
        raise ValueError(f"config must be a vpsurgery.config.FitConfig, got a {type(config).__name__}")
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown fit setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(_FIELDS))}")
    return replace(config, **settings) if settings else config


def default(name: str):
    """The default of one FitConfig setting."""
    f = _FIELDS[name]
    return f.default if f.default is not MISSING else None


def check_value(name: str, value):
    """`value` as that setting's type (an int given for a float becomes a float); ValueError naming
    `name` when it is not valid for the setting."""
    f = _FIELDS[name]
    meta, kind = f.metadata, f.metadata["kind"]
    if value is None and f.default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{name} must be {_KIND_NAMES[kind]}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        low, high = meta["low"], meta["high"]
        if low is not None and (value < low or (meta["low_open"] and value == low)) or \
                high is not None and (value > high or (meta["high_open"] and value == high)):
            raise ValueError(f"{name} must be {_range_text(meta)}, got {value!r}")
    return value


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _range_text(meta) -> str:
    low, high = meta["low"], meta["high"]
    left = "(" if meta["low_open"] else "["
    right = ")" if meta["high_open"] else "]"
    if high is None:
        return f"{'>' if meta['low_open'] else '>='} {low:g}"
    return f"in {left}{low:g}, {high:g}{right}"


_FIELDS = {f.name: f for f in fields(FitConfig)}
