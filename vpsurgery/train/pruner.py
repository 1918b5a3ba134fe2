"""Pruner: the pruning half of training, as one object that fit is built on and that your own
loop (or the Lightning callback) uses the same way.

It owns theta's optimizer and everything that acts on theta between the weights' steps:

* `loss()`: the regulariser (vpsurgery.objective) at the current price, to add to the mean
  minibatch loss;
* `step()`: after the weights' optimizer step: theta's step, projection onto [0, 1], the
  annealing of theta's step size (the weights' cosine schedule, computed here in closed form), and
  with a `target` the price controller; returns True every `prune_every` steps;
* `clip_gradients()`: between backward and the weights' step: a gradient norm above
  SPIKE_FACTOR times its running mean is scaled down to that (gates that start to sample 0
  make loss spikes, which a net without normalisation layers can turn into divergence at
  ordinary learning rates);
* `prune(optimizer)`: physical removal of the structures whose theta is <= prune_threshold, with
  the optimizer's state sliced to the smaller parameters (the optimizer object is updated in
  place, so a learning-rate scheduler built on it keeps working); returns (model, optimizer);
* `harden()`: round theta to 0/1 (theta >= 0.5, or with a target the rounding that meets it
  exactly, vpsurgery.train.budget.round_to_budget) and freeze it;
* `state_dict()` / `load_state_dict()`: the training state that is not in the model's tensors
  (step, hardened flag, the share decided before hardening, the units a shrink had to keep, the
  dense cost, the price and its controller, theta's optimizer, the structure removed so far).

Budget mode (`target=...`, docs/budget.md): the dense cost C_dense (params or MACs, theta = 1) is
measured once, when the Pruner is made. Each step the expected share s = E[C(theta)] / C_dense is
compared with the goal g = scheduled_target(target, step / ramp_steps), and the price follows
log c += rate * clip((s - g) / g, -1, 1) (dual ascent on the constraint s <= g).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.fx as fx

from vpsurgery.config import FitConfig, make_config
from vpsurgery.surgery import gates as gates_of
from vpsurgery.surgery import plan as plan_of
from vpsurgery.train.budget import PriceController, round_to_budget, scheduled_target
from vpsurgery.train.objective import cost_without, expected_cost, flat_theta, objective_and_cost, set_flat_theta
# The two things training needs from shrink beyond the public surgery API: removing an explicit set
# of structures (the Pruner's decision, not shrink's threshold rule) and how each parameter was sliced
# (to slice optimizer state the same way).
from vpsurgery.passes.attach import set_plan
from vpsurgery.passes.shrink import Decision, ShrinkResult, shrink_to

# theta within this distance of 0 or 1 counts as "at" that end (history, decided_before_hardening)
AT_END = 0.01

# Budget mode, chosen by measurement (docs/budget.md, bench/budget_sweep.py).
RAMP = 0.5  # the goal runs from 1 to the target over this share of the stochastic phase, then holds
PRICE_RATE = 0.05  # largest change of log(price) in one step
INITIAL_LOAD = 0.1  # initial price: the cost term is this many nats per example at theta = 1
THETA_TRAVEL = 2.0  # Adam on theta: the annealed step sizes of the stochastic phase sum to at least this
THETA_LR_CAP = 0.02  # ... but theta's step never exceeds this (larger steps made small nets collapse)
# DisARM's gradient is unbiased and far smaller than straight-through's, which with the steps above
# left theta near 1 until the rounding (docs/budget.md); it gets a longer travel and a larger cap.
DISARM_THETA_TRAVEL = 6.0
DISARM_THETA_LR_CAP = 0.1
THETA_WARMUP = 0.2  # theta stays at 1 for at least this share of the stochastic phase, so the weights learn first,
WARMUP_LOSS = 0.5  # ... and, when step() is given the loss, until its running mean is this share of its start,
WARMUP_MAX = 0.5  # ... but at most this share of the stochastic phase
LOSS_DECAY = 0.9  # the loss's running mean (an exponential moving average); its start: the first 10 steps' mean
HARDEN_TARGET = 0.5  # default harden with a target: ResNet-20 at 25% of the FLOPs, 94.7% (0.2) -> 97.8% (0.5)
HARDEN_PRICE = 0.2  # default harden with a price: theta needs the longer stochastic phase to decide by itself
SPIKE_FACTOR = 3.0  # clip_gradients: a weights' gradient norm above this many running means is clipped to it
SPIKE_DECAY = 0.95  # ... the running mean: an exponential moving average of the (clipped) norms


def hardening_epoch(config: FitConfig) -> int:
    """The number of epochs with stochastic gates; the later ones train the rounded network."""
    return config.epochs - int(round(harden_share(config) * config.epochs))


def harden_share(config: FitConfig) -> float:
    """config.harden, or its default: HARDEN_TARGET with a target, HARDEN_PRICE without."""
    if config.harden is not None:
        return config.harden
    return HARDEN_TARGET if config.target is not None else HARDEN_PRICE


def prunes_sections(config: FitConfig) -> bool:
    """config.prune_sections, or its default: not with a target, yes with a price."""
    if config.prune_sections is not None:
        return config.prune_sections
    return config.target is None


@dataclass
class PrunerState:
    """What a Pruner has done so far, apart from the model's tensors (typed; saved by state_dict)."""

    step: int = 0  # theta steps taken (one per call of step())
    hard: bool = False  # theta rounded and frozen
    decided_before_hardening: float | None = None  # share of theta at 0 or 1 when hardening started
    share_before_hardening: float | None = None  # expected cost share just before the rounding
    dense_cost: float = 0.0  # cost (per `per`) of the model the Pruner was made with, every theta at 1
    price: float = 0.0  # the price in use (controlled when a target is set)
    share: float = 1.0  # expected cost share at the last step
    grad_norm: float | None = None  # running mean of the weights' gradient norm (clip_gradients)
    theta_start: int | None = None  # the step at which theta began to move (budget mode; None: still waiting)
    loss_start: float | None = None  # mean training loss of the first steps (the warm-up's reference)
    loss_mean: float | None = None  # running mean of the training loss
    loss_seen: int = 0  # losses given to step()
    removed_cost: list[tuple[int, float]] = field(default_factory=list)  # (step, cost share removed) per shrink


class Pruner:
    """Prune a gated model (vpsurgery.wrap) while you train it; see the module docstring.

    `Pruner(gated, n_train, steps_per_epoch=len(loader), epochs=10, target=0.3, per="flops")`:
    n_train is the number of training examples (the regulariser is per example); steps_per_epoch
    (optimizer steps per epoch) and the `epochs` setting fix the annealing, the budget ramp and the
    hardening epoch. Settings are FitConfig's fields, as a `config` and/or keyword overrides. The
    Pruner trains `gated` itself (not a copy); after a `prune` the model is `pruner.model`.

    The weights' optimizer must not hold theta: build it on `pruner.weights()`.
    """

    def __init__(self, gated: fx.GraphModule, n_train: int | None = None, *, steps_per_epoch: int,
                 config: FitConfig | None = None, **settings):
        config = make_config(config, settings)
        if n_train is not None:
            config = make_config(config, {"n_train": n_train})
        if config.n_train is None:
            raise ValueError("Pruner needs n_train, the number of training examples (the regulariser is per example)")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be the number of optimizer steps per epoch (>= 1), "
                             f"got {steps_per_epoch!r}")
        check_gated(gated)
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.model = gated
        self.last_shrink: ShrinkResult | None = None  # the latest mid-training shrink (slices, plan)
        self.all_sections = set(plan_of(gated).sections)  # removed_sections: those removed by this Pruner
        self.state = PrunerState()
        with torch.no_grad():
            if not self.prunes_sections:  # the sections stay: their gates pass everything
                for g in gates_of(gated).values():
                    if g.kind == "section":
                        g.theta.fill_(1.0)
            ones = torch.ones_like(flat_theta(gated).detach())
            self.state.dense_cost = float(expected_cost(gated, config.per, ones))
            self.state.share = float(expected_cost(gated, config.per)) / self.state.dense_cost
        self.controller: PriceController | None = None
        if config.target is not None:
            self._check_reachable()
            self.controller = PriceController(INITIAL_LOAD * config.n_train / self.state.dense_cost, PRICE_RATE)
            self.state.price = self.controller.price
        else:
            self.state.price = config.price
        self.theta_lr = self._theta_lr()
        self.theta_optimizer = self._make_theta_optimizer()
        self._cost: torch.Tensor | None = None

    # ------------------------------------------------------------------ schedules
    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def hardening_epoch(self) -> int:
        """Epochs (0-based: the index of the first hardened epoch) trained with stochastic gates."""
        return hardening_epoch(self.config)

    @property
    def stochastic_steps(self) -> int:
        return self.hardening_epoch * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        """The fewest steps (budget mode) before theta moves: with random weights the loss gradient
        itself pushes every gate down (smaller activations lower the loss of a net that has learnt
        nothing), which no price can hold back, and Adam turns that small bias into full-size steps.
        Given the loss, step() waits longer, until the net has learnt something (WARMUP_LOSS)."""
        if self.config.target is None:
            return 0
        return round(THETA_WARMUP * (self.stochastic_steps or self.total_steps))

    @property
    def warmup_max_steps(self) -> int:
        return max(self.warmup_steps, round(WARMUP_MAX * (self.stochastic_steps or self.total_steps)))

    @property
    def ramp_steps(self) -> int:
        """The goal's ramp: RAMP of the stochastic phase, ending by hardening however late theta started."""
        steps = self.stochastic_steps or self.total_steps
        start = self.state.theta_start if self.state.theta_start is not None else self.warmup_steps
        return max(1, min(round(RAMP * steps), steps - start))

    def _waiting(self) -> bool:
        """Whether theta still waits (budget mode); decides the end of the warm-up once."""
        s = self.state
        if self.config.target is None or s.theta_start is not None:
            return False
        if s.step < self.warmup_steps:
            return True
        learnt = s.loss_mean is None or s.loss_mean <= WARMUP_LOSS * s.loss_start
        if learnt or s.step >= self.warmup_max_steps:
            s.theta_start = s.step
            return False
        return True

    def _observe(self, loss) -> None:
        value = loss.detach().float().reshape(-1)[:1] if torch.is_tensor(loss) else torch.tensor([float(loss)])
        if dist.is_available() and dist.is_initialized():  # every rank decides the warm-up alike
            value = value.to(next(iter(self.weights()), torch.zeros(())).device)
            dist.all_reduce(value)
            value = value / dist.get_world_size()
        v = float(value)
        if not math.isfinite(v):
            return
        s = self.state
        s.loss_seen += 1
        if s.loss_seen <= 10:
            s.loss_start = v if s.loss_start is None else s.loss_start + (v - s.loss_start) / s.loss_seen
        s.loss_mean = v if s.loss_mean is None else LOSS_DECAY * s.loss_mean + (1 - LOSS_DECAY) * v

    def anneal(self, step: int) -> float:
        """The weights' cosine schedule at `step`, relative to its start (what theta's step follows:
        projected stochastic approximation converges to a vertex only with a decaying step)."""
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def _theta_lr(self) -> float:
        config = self.config
        if config.target is None or config.theta_optimizer != "adam":
            return config.theta_lr
        steps = self.stochastic_steps or self.total_steps
        travel = sum(self.anneal(t) for t in range(self.warmup_steps, steps))  # Adam's reach at theta_lr = 1
        reach, cap = ((DISARM_THETA_TRAVEL, DISARM_THETA_LR_CAP) if config.estimator == "disarm"
                      else (THETA_TRAVEL, THETA_LR_CAP))
        return max(config.theta_lr, min(reach / travel, cap))

    @property
    def prunes_sections(self) -> bool:
        return prunes_sections(self.config)

    @property
    def goal(self) -> float | None:
        """The share of the dense cost aimed at now (None without a target)."""
        if self.config.target is None:
            return None
        if self.state.theta_start is None:
            return 1.0
        return scheduled_target(self.config.target, (self.state.step - self.state.theta_start) / self.ramp_steps)

    @property
    def price(self) -> float:
        return self.state.price

    @property
    def hard(self) -> bool:
        return self.state.hard

    # ------------------------------------------------------------------ parameters
    def thetas(self) -> list[torch.nn.Parameter]:
        return [g.theta for g in gates_of(self.model).values()]

    def moving_thetas(self) -> list[torch.nn.Parameter]:
        """The theta that theta's optimizer steps: every gate's, or the channel gates' only when
        sections are not pruned (prune_sections)."""
        return [g.theta for g in gates_of(self.model).values() if self.prunes_sections or g.kind != "section"]

    def weights(self) -> list[torch.nn.Parameter]:
        """The model's parameters apart from the gates' theta: what the weights' optimizer trains."""
        theta_ids = {id(t) for t in self.thetas()}
        return [p for p in self.model.parameters() if id(p) not in theta_ids]

    def _make_theta_optimizer(self) -> torch.optim.Optimizer | None:
        thetas = self.moving_thetas()
        if not thetas:
            return None
        lr = self.theta_lr * self.anneal(self.state.step)
        if self.config.theta_optimizer == "adam":  # sign-like, noise-averaged steps toward a vertex
            return torch.optim.Adam(thetas, lr=lr)
        return torch.optim.SGD(thetas, lr=lr)  # the papers' plain projected SGD

    # ------------------------------------------------------------------ each step
    def loss(self) -> torch.Tensor:
        """The regulariser per training example at the current price; add it to the mean minibatch loss."""
        c = self.config
        reg, cost = objective_and_cost(self.model, c.n_train, price=self.state.price, sigma1=c.sigma1, per=c.per,
                                       prior=c.prior, sigma0=c.sigma0)
        self._cost = cost
        return reg

    def step(self, loss=None) -> bool:
        """Call after the weights' optimizer step: theta's step (unless hardened), projection onto
        [0, 1], theta's annealing and the price controller. True when a `prune` is due. `loss`: the
        minibatch's training loss (without the regulariser); with a target, theta then waits until
        the net has learnt something (else for THETA_WARMUP of the stochastic phase only)."""
        if loss is not None and self.config.target is not None and self.state.theta_start is None:
            self._observe(loss)
        moving = not self.state.hard and not self._waiting()
        if self.theta_optimizer is not None and moving:
            self.theta_optimizer.step()
        self.state.step += 1
        if self.theta_optimizer is not None:
            for group in self.theta_optimizer.param_groups:
                group["lr"] = self.theta_lr * self.anneal(self.state.step)
            self.theta_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for t in self.thetas():
                t.clamp_(0.0, 1.0)
                t.grad = None  # also the fixed ones' (their gradient is never used)
        if not self.state.hard:
            cost = self._cost if self._cost is not None else expected_cost(self.model, self.config.per).detach()
            self.state.share = float(cost) / self.state.dense_cost
            if self.controller is not None and moving:
                goal = scheduled_target(self.config.target,
                                        (self.state.step - 1 - self.state.theta_start) / self.ramp_steps)
                self.state.price = self.controller.update(self.state.share, goal)
        self._cost = None
        return self.state.step % self.config.prune_every == 0

    @torch.no_grad()
    def clip_gradients(self) -> float:
        """Call between backward and the weights' step: scales the weights' gradients down when their
        norm exceeds SPIKE_FACTOR times its running mean (a spike, not a trend: the mean follows the
        norm). Returns the norm before clipping."""
        grads = [p.grad for p in self.weights() if p.grad is not None]
        if not grads:
            return 0.0
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        mean = self.state.grad_norm
        if not math.isfinite(norm):
            return norm  # the caller's finiteness check reports it
        if mean is not None and norm > SPIKE_FACTOR * mean:
            for g in grads:
                g.mul_(SPIKE_FACTOR * mean / norm)
        kept = norm if mean is None else min(norm, SPIKE_FACTOR * mean)
        self.state.grad_norm = kept if mean is None else SPIKE_DECAY * mean + (1 - SPIKE_DECAY) * kept
        return norm

    # ------------------------------------------------------------------ removal
    def decision(self) -> Decision:
        """What prune() would remove now: the structures at theta <= prune_threshold that no shrink
        has handled yet; with a target, nothing while the stochastic phase runs if removing them
        would leave less than the target (removal cannot be undone, and the rounding at hardening
        can still put a structure back while it is there)."""
        decision = Decision.below(self.model, self.config.prune_threshold, inclusive=True, new_only=True)
        if decision and self.config.target is not None and not self.state.hard:
            left = cost_without(self.model, self.config.per, decision.units, decision.sections)
            if left < self.config.target * self.state.dense_cost:
                return Decision()
        return decision

    def prune(self, optimizer=None):
        """Remove physically what prune_threshold decides; returns (model, optimizer).

        The optimizer (the weights'; or a list of optimizers) is updated in place: its parameter
        groups point to the new, smaller parameters and its state (momenta, Adam's moments) is
        sliced like them, so a scheduler built on it keeps working."""
        optimizers = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) \
            else [optimizer]
        for opt in optimizers:
            self._check_optimizer(opt)
        self._sync_theta()
        decision = self.decision()
        if not decision:
            return self.model, optimizer
        old = self.model
        self.last_shrink = result = shrink_to(old, decision, keep_gates=True)
        new = result.model
        for opt in optimizers:
            carry_optimizer(opt, old, result)
        if self.theta_optimizer is not None:
            if gates_of(new):
                carry_optimizer(self.theta_optimizer, old, result)
            else:
                self.theta_optimizer = None  # every gate is gone (all sections removed)
        self.model = new
        with torch.no_grad():
            kept = float(expected_cost(new, self.config.per, torch.ones_like(flat_theta(new).detach())))
        self.state.removed_cost.append((self.state.step, 1.0 - kept / self.state.dense_cost))
        return new, optimizer

    def _check_optimizer(self, optimizer) -> None:
        theta_ids = {id(t) for t in self.thetas()}
        if any(id(p) in theta_ids for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the weights' optimizer also holds the gates' theta, which the Pruner steps itself; "
                             "build it on pruner.weights()")

    def _sync_theta(self) -> None:
        """Under torch.distributed every rank takes rank 0's theta, so that all decide alike."""
        if dist.is_available() and dist.is_initialized():
            for t in self.thetas():
                dist.broadcast(t.data, src=0)

    @torch.no_grad()
    def harden(self) -> None:
        """Round theta to 0/1 and freeze it (the next prune removes what went to 0): theta >= 0.5
        is kept, or with a target the rounding of round_to_budget, whose cost is the largest that
        fits target * dense cost. Records the share of theta decided before it."""
        if self.state.hard:
            return
        self._sync_theta()
        thetas = self.thetas()
        flat = torch.cat([t.detach().flatten().float().cpu() for t in thetas]) if thetas else torch.zeros(0)
        self.state.decided_before_hardening = (float(((flat <= AT_END) | (flat >= 1 - AT_END)).float().mean())
                                               if len(flat) else 1.0)
        self.state.share_before_hardening = float(expected_cost(self.model, self.config.per)) / self.state.dense_cost
        if self.config.target is not None:
            hard, _ = round_to_budget(self.model, self.config.target * self.state.dense_cost, self.config.per,
                                      sections=self.prunes_sections)
            set_flat_theta(self.model, hard)
        else:
            for t in thetas:
                t.copy_((t >= 0.5).to(t.dtype))
        self.state.share = float(expected_cost(self.model, self.config.per)) / self.state.dense_cost
        self.state.hard = True

    def _check_reachable(self) -> None:
        """A target below the least the rounding can keep (what no gate governs: pinned channels,
        unprunable layers; a unit of every channel group; the sections it may not remove) is refused."""
        _, least = round_to_budget(self.model, 0.0, self.config.per, sections=self.prunes_sections)
        floor = least / self.state.dense_cost
        if self.config.target < floor:
            raise ValueError(f"target {self.config.target:g} is out of reach: what no gate governs already costs "
                             f"{floor:.3f} of the dense {self.config.per} (see vpsurgery.report(gated)); "
                             f"use a target >= {math.ceil(floor * 1000) / 1000:g}")

    # ------------------------------------------------------------------ summaries
    @property
    def removed_units(self) -> set[int]:
        return set(plan_of(self.model).removed_units)

    @property
    def removed_sections(self) -> set[str]:
        return self.all_sections - set(plan_of(self.model).sections)

    def removal_done_by(self, share: float = 0.9) -> int | None:
        """The step by which `share` of the removal so far (in cost) had been done physically."""
        if not self.state.removed_cost:
            return None
        final = self.state.removed_cost[-1][1]
        return next(step for step, removed in self.state.removed_cost if removed >= share * final - 1e-12)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        s = self.state
        return {
            "step": s.step, "hard": s.hard, "decided_before_hardening": s.decided_before_hardening,
            "share_before_hardening": s.share_before_hardening,
            "kept_anyway": sorted(int(u) for u in plan_of(self.model).kept_anyway),
            "dense_cost": s.dense_cost, "price": s.price, "share": s.share, "grad_norm": s.grad_norm,
            "theta_start": s.theta_start, "loss_start": s.loss_start, "loss_mean": s.loss_mean,
            "loss_seen": s.loss_seen,
            "removed_cost": [list(x) for x in s.removed_cost],
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "theta_optimizer": self.theta_optimizer.state_dict() if self.theta_optimizer is not None else None,
            "removed_units": sorted(int(u) for u in self.removed_units),
            "removed_sections": sorted(self.removed_sections),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (state_dict of a Pruner made with the same model and settings):
        the structures it had removed are removed from this Pruner's model (a new model:
        `pruner.model`; load the weights into it afterwards, then build the weights' optimizer)."""
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"the Pruner state was saved with {state['steps_per_epoch']} steps per epoch, "
                             f"this one has {self.steps_per_epoch}")
        plan = plan_of(self.model)
        units, sections = set(state["removed_units"]), set(state["removed_sections"]) & set(plan.sections)
        if units != set(plan.removed_units) or sections:
            self.model = shrink_to(self.model, Decision(frozenset(units), frozenset(sections)), keep_gates=True).model
        # units the run had to keep so that no tensor went empty: not decided again
        set_plan(self.model, replace(plan_of(self.model), kept_anyway=frozenset(state["kept_anyway"])))
        s = self.state
        s.step, s.hard = int(state["step"]), bool(state["hard"])
        s.decided_before_hardening, s.share_before_hardening = (state["decided_before_hardening"],
                                                                state["share_before_hardening"])
        s.dense_cost, s.price, s.share = float(state["dense_cost"]), float(state["price"]), float(state["share"])
        s.removed_cost = [(int(a), float(b)) for a, b in state["removed_cost"]]
        s.grad_norm = state.get("grad_norm")  # absent in checkpoints written before clip_gradients
        s.theta_start, s.loss_start, s.loss_mean = state.get("theta_start"), state.get("loss_start"), state.get("loss_mean")
        s.loss_seen = int(state.get("loss_seen", 0))
        if s.theta_start is None and "theta_start" not in state and self.config.target is not None:
            s.theta_start = 0 if s.step else None  # a checkpoint from before the warm-up: theta was moving
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        self.theta_optimizer = self._make_theta_optimizer()
        if (self.theta_optimizer is None) != (state["theta_optimizer"] is None):
            raise ValueError("the Pruner state does not fit this model (gates left)")
        if self.theta_optimizer is not None:
            self.theta_optimizer.load_state_dict(state["theta_optimizer"])


# ---------------------------------------------------------------------------------- helpers
def check_gated(gated) -> None:
    if not isinstance(gated, fx.GraphModule):
        raise ValueError(f"fit trains a gated model, got a {type(gated).__name__} that vpsurgery.wrap did not "
                         "make; call fit(vpsurgery.wrap(model), ...)")
    plan_of(gated)  # ValueError naming the fix when wrap did not make it
    if not gates_of(gated):
        raise ValueError("fit: the model has no gates, so there is nothing to prune or train theta for "
                         "(wrap was called with channels=False and sections=False, or found no prunable channel "
                         "group or residual section; see vpsurgery.report(gated)); wrap with channels=True "
                         "and/or sections=True, or train the model with an ordinary loop")


def carry_optimizer(optimizer: torch.optim.Optimizer, old_gm: fx.GraphModule, shrunk: ShrinkResult) -> None:
    """Point `optimizer` (in place) at the shrunk model's parameters, matched by name, with its
    per-parameter state sliced as shrink sliced the parameter (shrunk.slices); parameters of removed
    structures leave it; parameters that are not old_gm's stay as they are. A weight that shrink
    baked out of its parametrization (spectral_norm), or weight_norm'ed again (its new g and v),
    takes its originals' place, with fresh state."""
    new_gm, slices = shrunk.model, shrunk.slices
    added = set()
    old_names = {id(p): name for name, p in old_gm.named_parameters()}
    new_params = dict(new_gm.named_parameters())
    state = defaultdict(dict)
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = old_names.get(id(p))
            if name is None:  # not the model's (e.g. a loss module's parameter)
                params.append(p)
                if p in optimizer.state:
                    state[p] = optimizer.state[p]
                continue
            if name in shrunk.baked:  # a new parameter (even under the old name: weight_norm again)
                q = new_params.get(shrunk.baked[name])
                if q is not None and id(q) not in added:
                    added.add(id(q))
                    params.append(q)
                continue
            q = new_params.get(name)
            if q is None:
                continue  # removed with its structure
            params.append(q)
            if p in optimizer.state:
                state[q] = {k: _slice_like(v, p, slices.get(name, {})) for k, v in optimizer.state[p].items()}
        group["params"] = params
    optimizer.state = state


def _slice_like(value, param: torch.Tensor, dims: dict[int, torch.Tensor]):
    if not torch.is_tensor(value) or value.shape != param.shape:
        return value  # e.g. Adam's step count
    for d, keep in dims.items():
        value = value.index_select(d, keep.to(value.device))
    return value.clone()
