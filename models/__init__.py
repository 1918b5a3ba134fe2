"""Reference networks of the pruning papers, by name.

Each builder registers itself beside its definition (`registry.register`), with the input shape
it was designed for, its data set and its source. ReLUs are out-of-place throughout, so
activations captured by hooks or an fx Interpreter are never overwritten later in the forward pass.
"""

# Import order is registry order (list_models): the MNIST nets, then the CIFAR ones.
from .lenet import LeNet5, LeNet300100
from .vgg import VGG, vgg16
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from .registry import MODELS, ModelInfo, default_input_shape, get_model, get_model_builder, list_models, model_info

__all__ = [
    "MODELS",
    "ModelInfo",
    "model_info",
    "get_model",
    "get_model_builder",
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
