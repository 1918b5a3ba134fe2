"""He et al. (2016) CIFAR ResNets: depth 6n+2, three stages of 16/32/64 channels.

Shortcuts are option B: a 1x1 conv + BN projection where the shape changes, identity elsewhere.
"""

import torch
from torch import nn

from .registry import register


def _scaled(n: int, width: float) -> int:
    """Channel count `n` times the width multiplier, rounded, never below 1."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(1, round(n * width))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        # Decided at construction, so the traced graph has no branch: either a projection
        # module or no shortcut node at all.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (_scaled(c, width) for c in (16, 32, 64))
        self.conv1 = conv3x3(3, c1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(c1, c1, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(c1, c2, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(c2, c3, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


_cifar = register(input_shape=(1, 3, 32, 32), dataset="CIFAR-10", reference="He et al. 2016")


def _resnet(depth: int, num_classes: int, width: float) -> CifarResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, width=width)


@_cifar
def resnet20(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return _resnet(20, num_classes, width)


@_cifar
def resnet32(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return _resnet(32, num_classes, width)


@_cifar
def resnet44(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return _resnet(44, num_classes, width)


@_cifar
def resnet56(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return _resnet(56, num_classes, width)


@_cifar
def resnet110(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return _resnet(110, num_classes, width)
