"""Gate modules: learnable Bernoulli probabilities theta, and the masks that apply them.

A gate is called once per forward pass and returns z: in train mode a Bernoulli(theta) sample
(with a surrogate gradient for theta, chosen by `estimator`), in eval mode theta itself. Samples are
drawn per example, like dropout masks (one row per example, shape (N, size)), when wrap found the
batch dim at every place the gate acts; otherwise one sample per minibatch. So with
every theta at exactly 0 or 1 the gated model in eval mode is a deterministic network, the one
`shrink` builds. Set gates by hand with `gate.set(values)` (probabilities or a hard 0/1 mask).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..rules import MODULE_RULES


def straight_through(theta: torch.Tensor) -> torch.Tensor:
    """z ~ Bernoulli(theta) forward; d z / d theta = 1 backward (biased, one pass, low variance)."""
    z = torch.bernoulli(theta.detach())
    return z + theta - theta.detach()


ESTIMATORS = {"straight_through": straight_through}


class Gate(nn.Module):
    kind = "channel"

    def __init__(self, size: int, init: float = 1.0, estimator: str = "straight_through",
                 per_example: bool = True, name: str | None = None):
        super().__init__()
        self.name = name  # the gate's key in vpsurgery.gates(gated), for messages
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"{self._what()}: init must be a probability in [0, 1], got {init}")
        self.theta = nn.Parameter(torch.full((size,), float(init)))
        self.estimator = estimator
        self.per_example = per_example
        self.fixed_sample: torch.Tensor | None = None  # set by two-pass estimators (ARM/DisARM)

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """`x`: the model's first input, whose dim 0 is the batch (per-example samples)."""
        if self.fixed_sample is not None:
            return self.fixed_sample
        if self.training:
            theta = self.theta
            if self.per_example and x is not None:
                theta = theta.expand(x.shape[0], -1)
            return ESTIMATORS[self.estimator](theta)
        return self.theta

    def _what(self) -> str:
        name = getattr(self, "name", None)  # gates pickled before gates had names have none
        return f"{self.kind} gate {name!r}" if name else f"{self.kind} gate"

    @torch.no_grad()
    def set(self, values) -> "Gate":
        """Set theta to probabilities (a float, or one per entry); 0/1 values make a hard mask."""
        size = self.theta.numel()
        what = f"{self._what()} (size {size})"
        try:
            values = torch.as_tensor(values, dtype=self.theta.dtype).to(self.theta.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what}: cannot set it to {values!r}: {e}") from None
        if values.numel() not in (1, size):
            raise ValueError(f"{what}: got {values.numel()} value(s) of shape {tuple(values.shape)}; "
                             f"give one value for the whole gate or {size}, one per unit")
        values = values.reshape(-1).expand(size) if values.numel() == 1 else values.reshape(size)
        if not torch.isfinite(values).all():
            raise ValueError(f"{what}: values must be finite probabilities in [0, 1], got NaN or inf")
        if (values < 0).any() or (values > 1).any():
            raise ValueError(f"{what}: values must lie in [0, 1], got min {float(values.min()):g}, "
                             f"max {float(values.max()):g}")
        self.theta.copy_(values)
        return self

    def extra_repr(self):
        name = getattr(self, "name", None)
        return f"{self.kind}, size={self.theta.numel()}" + (f", name={name!r}" if name else "")


class ChannelGate(Gate):
    """One theta per unit of a channel group."""

    kind = "channel"


class SectionGate(Gate):
    """One theta for a whole residual section."""

    kind = "section"

    def __init__(self, init: float = 1.0, estimator: str = "straight_through", per_example: bool = True,
                 branch_ndim: int = 4, name: str | None = None):
        super().__init__(1, init, estimator, per_example, name)
        self.branch_ndim = branch_ndim

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        z = super().forward(x)
        if z.ndim == 2:  # per example: (N, 1) -> (N, 1, ..., 1) against the branch
            return z.reshape(z.shape[0], *[1] * (self.branch_ndim - 1))
        return z.reshape(())


class ChannelMask(nn.Module):
    """Multiplies the channels a mixing consumer reads by their gates' z.

    `index[i]` picks, for channel position i, an entry of cat([1], z_a, z_b, ...): 0 for channels
    with no gate, else the unit's slot in the gates passed to forward.
    """

    def __init__(self, index: torch.Tensor, dim: int):
        super().__init__()
        self.register_buffer("index", index.long())
        self.dim = dim

    def forward(self, x: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        return x * channel_values(x, zs, self.index, self.dim).to(x.dtype)

    def extra_repr(self):
        return f"dim={self.dim}, channels={self.index.numel()}"


def channel_values(x: torch.Tensor, zs, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Per channel position of `x` along `dim`: 1 where no gate acts, else its unit's z; shaped to
    broadcast against x (one row per example for per-example samples)."""
    shape = [1] * x.ndim
    shape[dim] = -1
    if zs[0].ndim == 2:  # per-example samples: rows are the batch (dim 0 of x)
        table = torch.cat([zs[0].new_ones(zs[0].shape[0], 1), *zs], dim=1)
        shape[0] = x.shape[0]
        return table[:, index].view(shape)
    return torch.cat([zs[0].new_ones(1), *zs])[index].view(shape)


class _ActiveChannelNorm:
    """A LayerNorm/RMSNorm over the channel dim that takes its statistics over the active channels
    only: weighted by z in training (samples in {0, 1}; theta gets a gradient through them), over the
    channels with theta > 0 in eval. So it computes exactly what the norm computes on the channels
    that are kept, and removing the others changes nothing (rules.py, _layer_norm_analyse).

    The gated model's own norm module becomes this subclass in place (`gate_norm`), so its parameters
    keep their names; shrink turns it back (`ungate_norm`). With every z = 1 in eval mode it is the
    plain norm, bit for bit."""

    plain: type

    def forward(self, x: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        w = channel_values(x, zs, self.vps_index, x.ndim - 1)
        if not self.training:
            # eval: z is theta; a channel is in the statistics while it is there at all (theta > 0),
            # as in the model shrink makes (its consumers read it scaled by theta, folded in)
            if bool((w > 0).all()):
                return self.plain.forward(self, x)
            w = (w > 0).to(w.dtype)
        dtype = x.dtype
        x, w = x.float(), w.float()
        count = w.sum(-1, keepdim=True).clamp_min(1e-12)
        if self.plain is nn.LayerNorm:
            mean = (x * w).sum(-1, keepdim=True) / count
            y = (x - mean) * torch.rsqrt(((x - mean).square() * w).sum(-1, keepdim=True) / count + self.eps)
        else:
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            y = x * torch.rsqrt((x.square() * w).sum(-1, keepdim=True) / count + eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if getattr(self, "bias", None) is not None:
            y = y + self.bias.float()
        return y.to(dtype)


class ActiveLayerNorm(_ActiveChannelNorm, nn.LayerNorm):
    plain = nn.LayerNorm


class ActiveRMSNorm(_ActiveChannelNorm, nn.RMSNorm):
    plain = nn.RMSNorm


_ACTIVE = {nn.LayerNorm: ActiveLayerNorm, nn.RMSNorm: ActiveRMSNorm}
GATED_NORMS = tuple(_ACTIVE.values())
for _plain, _active in _ACTIVE.items():  # the same channel rule and facts as the norm itself
    MODULE_RULES[_active] = MODULE_RULES[_plain]


def gate_norm(norm: nn.Module, index: torch.Tensor) -> None:
    """Make `norm` (in place) take its statistics over the channels whose z `index` picks."""
    if type(norm) in _ACTIVE:
        norm.__class__ = _ACTIVE[type(norm)]
    norm.register_buffer("vps_index", index.long().to(_device_of(norm)), persistent=False)


def ungate_norm(norm: nn.Module) -> None:
    """The plain norm again (what a shrunk model holds)."""
    if isinstance(norm, _ActiveChannelNorm):
        norm.__class__ = norm.plain
    norm._buffers.pop("vps_index", None)


def _device_of(m: nn.Module) -> torch.device:
    t = next(iter(m.parameters()), None)
    return t.device if t is not None else torch.device("cpu")
