"""LeNet-300-100 and LeNet-5 (Caffe variant), the MNIST baselines of the pruning papers."""

import torch
from torch import nn

from .registry import register


def _scaled(n: int, width: float) -> int:
    """Channel/feature count `n` times the width multiplier, rounded, never below 1."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(1, round(n * width))


@register(name="lenet300_100", input_shape=(1, 784), dataset="MNIST", reference="LeCun et al. 1998")
class LeNet300100(nn.Module):
    """Fully connected 784-300-100-classes with ReLU.

    Accepts (N, 784) or image batches (N, 1, 28, 28); images are flattened first.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784, width: float = 1.0) -> None:
        super().__init__()
        h1, h2 = _scaled(300, width), _scaled(100, width)
        self.fc1 = nn.Linear(in_features, h1)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(h1, h2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # no-op on (N, 784)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


@register(name="lenet5", input_shape=(1, 1, 28, 28), dataset="MNIST", reference="LeCun et al. 1998 (Caffe variant)")
class LeNet5(nn.Module):
    """Caffe's LeNet: conv20 5x5 - pool - conv50 5x5 - pool - fc500 - ReLU - fc.

    As in Caffe's MNIST example (and the pruning papers that use it) the convolutions have
    no nonlinearity of their own. Input is 28x28, so the flattened features are 50*4*4.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, h = _scaled(20, width), _scaled(50, width), _scaled(500, width)
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 4 * 4, h)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(h, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)
