"""The registry of reference networks: each builder is registered beside its own definition,
with the facts about it (the input it was designed for, the paper and data set it comes from),
so nothing is kept in sync by hand elsewhere."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # a batch-of-one input the network was designed for
    dataset: str  # the data set of the paper that used it
    reference: str  # where the architecture comes from

    def __call__(self, **kwargs) -> nn.Module:
        return self.builder(**kwargs)


MODELS: dict[str, ModelInfo] = {}


def register(*, input_shape: tuple[int, ...], dataset: str, reference: str, name: str | None = None):
    """Decorator: add a builder to the registry under `name` (default: the function's name)."""
    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in MODELS:
            raise ValueError(f"model {key!r} is registered twice")
        MODELS[key] = ModelInfo(key, builder, tuple(input_shape), dataset, reference)
        return builder
    return add


def model_info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None


def list_models() -> list[str]:
    return list(MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; kwargs go to its builder (num_classes, width, ...)."""
    return model_info(name).builder(**kwargs)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    return model_info(name).builder


def default_input_shape(name: str) -> tuple[int, ...]:
    """A batch-of-one input shape the model was designed for."""
    return model_info(name).input_shape
