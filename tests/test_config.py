"""The one source of training settings: defaults agree everywhere, bad values are named."""
import inspect
import math

import pytest

from vpsurgery.config import FitConfig, default
from vpsurgery.train.objective import objective


def test_objective_defaults_are_fits():
    params = inspect.signature(objective).parameters
    for name in ("price", "sigma1", "per", "prior", "sigma0"):
        assert params[name].default == default(name), name
    assert FitConfig().objective_kwargs() == {n: default(n) for n in ("price", "sigma1", "per", "prior", "sigma0")}


@pytest.mark.parametrize("setting, value, words", [
    ("price", -1.0, "price must be >= 0"),
    ("prune_threshold", 2.0, "prune_threshold must be in [0, 1)"),
    ("n_train", "abc", "n_train must be an integer"),
    ("epochs", 0, "epochs must be >= 1"),
    ("per", "weights", "per must be one of params, flops"),
    ("lr", math.nan, "lr must be a finite number"),
    ("harden", 1.0, "harden must be in [0, 1)"),
    ("epochs", True, "epochs must be an integer"),
    ("theta_lr", 0.0, "theta_lr must be > 0"),
])
def test_bad_values_are_named(setting, value, words):
    with pytest.raises(ValueError) as info:
        FitConfig(**{setting: value})
    assert words in str(info.value)


def test_ints_become_floats_and_round_trip():
    config = FitConfig(lr=1, n_train=7)
    assert isinstance(config.lr, float) and config.n_train == 7
    assert FitConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fit setting"):
        FitConfig.from_dict({"learning_rate": 0.1})
