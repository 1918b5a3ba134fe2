"""VGG-16 with BatchNorm for CIFAR, as used in CIFAR channel-pruning work."""

import torch
from torch import nn

from .registry import register

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _scaled(n: int, width: float) -> int:
    """Channel/feature count `n` times the width multiplier, rounded, never below 1."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(1, round(n * width))


def make_features(cfg: list[int | str], in_channels: int = 3, width: float = 1.0) -> nn.Sequential:
    """Conv3x3-BN-ReLU stack following `cfg`."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = _scaled(v, width)
        # No conv bias: the BatchNorm right after it has its own shift.
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """`features` - AdaptiveAvgPool2d(1) - flatten - Linear-ReLU-Linear classifier.

    `width` scales every conv and the hidden linear layer. At 32x32 input the five pools
    already leave 1x1 maps, so the average pool is the identity there; it lets larger inputs
    reach the same classifier.
    """

    def __init__(self, cfg: list[int | str], num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        self.features = make_features(cfg, width=width)
        last_channels = _scaled([v for v in cfg if v != "M"][-1], width)
        hidden = _scaled(512, width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register(input_shape=(1, 3, 32, 32), dataset="CIFAR-10", reference="Simonyan & Zisserman 2015 (CIFAR variant)")
def vgg16(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-16-BN for 32x32 inputs (13 convs, 2 linear layers)."""
    return VGG(VGG16_CFG, num_classes=num_classes, width=width)
