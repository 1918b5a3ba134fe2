"""Test models that torchvision does not have: layers written functionally, a YOLO-style detector
built from a list of layers (torch.fx cannot trace its head), and a model neither capture path takes."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm + activation in one layer, calling F.batch_norm with its own parameters (the
    style of a popular model zoo)."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class FunctionalConv(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, 3, 3) * (2 / (9 * cin / groups)) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.stride, self.groups = stride, groups

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, 1, 1, self.groups)


class FunctionalNet(nn.Module):
    """Every layer functional: conv, grouped conv, BN+act, a residual, group norm, layer norm, linear."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem, self.bn0 = FunctionalConv(3, width), BatchNormAct(width)
        self.conv1, self.bn1 = FunctionalConv(width, width), BatchNormAct(width)
        self.conv2, self.bn2 = FunctionalConv(width, 2 * width, stride=2), BatchNormAct(2 * width)
        self.dw, self.gn_w, self.gn_b = FunctionalConv(2 * width, 2 * width, groups=2 * width), \
            nn.Parameter(torch.ones(2 * width)), nn.Parameter(torch.zeros(2 * width))
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(2 * width)), nn.Parameter(torch.zeros(2 * width))
        self.fc_w = nn.Parameter(torch.randn(classes, 2 * width) * 0.1)
        self.fc_b = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = x + self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x))
        x = F.relu(F.group_norm(self.dw(x), 4, self.gn_w, self.gn_b))
        x = F.instance_norm(x, weight=self.gn_w, bias=self.gn_b) + x
        x = x.mean((2, 3))
        x = F.layer_norm(x, (x.shape[-1],), self.ln_w, self.ln_b)
        x = F.dropout(x, 0.1, self.training)
        return F.linear(x, self.fc_w, self.fc_b)


# ----------------------------------------------------------------------------- YOLO-style detector
class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k=3, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = ConvBNAct(c, c, 1), ConvBNAct(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class CSP(nn.Module):
    """Split-and-concat block: chunk in two, run bottlenecks on one half, concat all."""

    def __init__(self, cin, cout, n=1):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBNAct(cin, 2 * self.c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.c, cout, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class Detect(nn.Module):
    """Per-level box/class convs, and a grid cached by feature-map size: comparing shapes in Python
    is what torch.fx cannot trace."""

    def __init__(self, channels, classes=3):
        super().__init__()
        self.no = classes + 4
        self.heads = nn.ModuleList(nn.Sequential(ConvBNAct(c, c, 3), nn.Conv2d(c, self.no, 1)) for c in channels)
        self.grids = [torch.zeros(0)] * len(channels)

    def forward(self, xs):
        out = []
        for i, (x, head) in enumerate(zip(xs, self.heads)):
            y = head(x)
            n, _, h, w = y.shape
            if self.grids[i].shape[2:4] != y.shape[2:4]:
                gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                self.grids[i] = torch.stack((gx, gy), 0).view(1, 2, h, w).float()
            box = y[:, :2].sigmoid() * 2 - 0.5 + self.grids[i].to(y.dtype)
            out.append(torch.cat((box, y[:, 2:]), 1).flatten(2))
        return torch.cat(out, 2)


class TinyYolo(nn.Module):
    """Layers in a list, each reading the outputs named by its `f` (-1: the previous layer)."""

    def __init__(self, w=8, classes=3):
        super().__init__()
        spec = [  # (from, module)
            (-1, ConvBNAct(3, w, 3, 2)),  # 0
            (-1, ConvBNAct(w, 2 * w, 3, 2)),  # 1
            (-1, CSP(2 * w, 2 * w)),  # 2  stride 4
            (-1, ConvBNAct(2 * w, 4 * w, 3, 2)),  # 3
            (-1, CSP(4 * w, 4 * w)),  # 4  stride 8
            (-1, nn.Upsample(scale_factor=2.0, mode="nearest")),  # 5
            ([-1, 2], Concat()),  # 6
            (-1, CSP(6 * w, 2 * w)),  # 7  P1
            ([7, 4], None),  # 8  Detect on (P1, stride-8 map)
        ]
        spec[8] = ([7, 4], Detect([2 * w, 4 * w], classes))
        self.layers = nn.ModuleList(m for _, m in spec)
        self.froms = [f for f, _ in spec]

    def forward(self, x):
        saved = []
        for f, m in zip(self.froms, self.layers):
            if f != -1:
                x = [saved[j] if j != -1 else x for j in f] if isinstance(f, list) else saved[f]
            x = m(x)
            saved.append(x)
        return x


class DataDependent(nn.Module):
    """Branches on a tensor's values: neither torch.fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.mean() > 0:  # the construct both capture paths refuse
            return self.a(x)
        return self.b(x)


class TinyYoloClassifier(nn.Module):
    """The detector's classifier variant: its layer list, then a head that pools only maps larger
    than 1x1 (a Python branch on a shape: fx cannot trace it, torch.export can)."""

    def __init__(self, w=8, classes=10):
        super().__init__()
        self.layers = nn.ModuleList([ConvBNAct(3, w, 3, 2), CSP(w, 2 * w), ConvBNAct(2 * w, 4 * w, 3, 2),
                                     CSP(4 * w, 4 * w), nn.Dropout(0.1)])
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        if x.shape[-1] > 1:
            x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.flatten(1))


def branchy(x):
    """Data-dependent inside: fx keeps it whole (wrapped), torch.export cannot capture it."""
    return x * 2 if x.mean() > 0 else x


torch.fx.wrap("branchy")


class HiddenBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(branchy(self.a(x)))


def windowed_mix(x, weight, bias, window: int):
    """Python control flow on sizes (fx keeps it whole; torch.export sees into it): pad the width
    to a multiple of `window`, mix channels per window position with a functional 1x1 conv, and
    return the mixed map with its per-window mean."""
    w = x.shape[-1]
    if w % window:
        x = F.pad(x, (0, window - w % window))
    mixed = F.conv2d(x, weight, bias)[..., :w]
    return mixed, mixed.mean(-1, keepdim=True)


torch.fx.wrap("windowed_mix")


class WrappedHelperNet(nn.Module):
    """A net that calls a user's fx-wrapped helper with its own parameters, twice with one
    signature (the capture is reused) and once with another."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix_w = nn.Parameter(torch.randn(16, 16, 1, 1) * 0.3)
        self.mix_b = nn.Parameter(torch.randn(16) * 0.1)
        self.mix2_w = nn.Parameter(torch.randn(16, 16, 1, 1) * 0.3)
        self.mix2_b = nn.Parameter(torch.randn(16) * 0.1)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.mix3_w = nn.Parameter(torch.randn(24, 24, 1, 1) * 0.3)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y, m = windowed_mix(x, self.mix_w, self.mix_b, 3)
        x = torch.relu(self.bn(y + m)) + x
        y, _ = windowed_mix(x, self.mix2_w, self.mix2_b, 3)
        x = torch.relu(self.out(y))
        y, m = windowed_mix(x, self.mix3_w, None, 5)
        return self.fc((y * m).mean((2, 3)))


class ComputedBiasNet(nn.Module):
    """Layers whose bias is computed in forward: a conv's bias scaled, and a BEiT-style q/k/v
    projection whose k bias is fixed at zero (cat of q bias, zeros_like(v bias), v bias)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(12) * 0.1)
        self.q_bias = nn.Parameter(torch.randn(12) * 0.1)
        self.v_bias = nn.Parameter(torch.randn(12) * 0.1)
        self.qkv = nn.Linear(12, 36, bias=False)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(36, 10)

    def forward(self, x):
        x = torch.relu(F.conv2d(x, self.w, self.b * 2, padding=1))
        t = self.norm(x.flatten(2).transpose(1, 2))
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        t = torch.relu(F.linear(t, self.qkv.weight, bias))
        return self.fc(t.mean(1))


class BatchOfOneHelperNet(nn.Module):
    """Calls the wrapped helper, then flattens with a literal batch of 1: the graph runs at batch 1
    only, so neither the call alone nor the whole model can be exported with a free batch dim."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix_w = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        y, _ = windowed_mix(torch.relu(self.stem(x)), self.mix_w, None, 4)
        return self.fc(y.reshape(1, -1))


def window_for(size: list, window: list) -> list:
    """Shrinks `window` in place to fit `size`, as torchvision's Swin3d `_get_window_and_shift_size`
    does with its lists: generated code passes it plain lists, fx.Interpreter immutable ones."""
    for i in range(len(window)):
        if size[i] <= window[i]:
            window[i] = size[i]
    return window


torch.fx.wrap("window_for")


class MutatingHelperNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        k = window_for([x.shape[2], x.shape[3]], [3, 100])
        return self.b(F.avg_pool2d(torch.relu(self.a(x)), k, stride=1))
