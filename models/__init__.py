"""Reference networks of the pruning papers, by name.

ReLUs are out-of-place throughout, so activations captured by hooks or an fx Interpreter
are never overwritten later in the forward pass.
"""

from collections.abc import Callable

from torch import nn

from .lenet import LeNet5, LeNet300100
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from .vgg import VGG, vgg16

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300_100": LeNet300100,
    "lenet5": LeNet5,
    "vgg16": vgg16,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
}

_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "lenet300_100": (1, 784),
    "lenet5": (1, 1, 28, 28),
}
_CIFAR_INPUT_SHAPE = (1, 3, 32, 32)


def list_models() -> list[str]:
    return list(MODELS)


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; kwargs go to its builder (num_classes, width, ...)."""
    _check_name(name)
    return MODELS[name](**kwargs)


def default_input_shape(name: str) -> tuple[int, ...]:
    """A batch-of-one input shape the model was designed for."""
    _check_name(name)
    return _INPUT_SHAPES.get(name, _CIFAR_INPUT_SHAPE)


__all__ = [
    "MODELS",
    "get_model",
    "list_models",
    "default_input_shape",
    "LeNet300100",
    "LeNet5",
    "VGG",
    "vgg16",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]
