"""Resume is the same run (issue #8): a run interrupted anywhere and resumed ends with the same
structure, weights and history as the uninterrupted run with the same seed; a checkpoint that is
broken, unsafe or written for another model is refused with a message that names the file and the fix.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import vpsurgery
from vpsurgery.data import load_data
from vpsurgery.io import CheckpointError
from vpsurgery.train import CHECKPOINT, fit

from test_fit import loader as toy_loader
from test_fit import student


# ------------------------------------------------------------------ in process: a gated CNN on digits
class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """Two residual sections, three channel groups: ~2.5k parameters, 0.1 s per epoch here."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.blocks(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


def gated_cnn():
    torch.manual_seed(0)
    return vpsurgery.wrap(SmallResNet(), torch.randn(2, 1, 8, 8))


STEPS = 8  # per epoch: 512 examples, batch 64
# Measured with seed 4: a unit and a residual section go in epoch 1, a unit and the other section in
# epoch 2, more units at hardening (epoch 3 of 4); so resuming replays in-epoch shrinks, a smaller
# model and the hardened phase.
FIT = {"epochs": 4, "optimizer": "adam", "lr": 0.03, "price": 0.001, "theta_lr": 0.15, "prune_every": 3,
       "harden": 0.5, "seed": 4, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def loaders():
    """Shared by every run of this module, like one process's loaders: the train loader has its own
    generator (as the CLI's), whose state each run leaves somewhere else."""
    data = load_data("digits")
    train = DataLoader(Subset(data.train, range(STEPS * 64)), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return train, DataLoader(Subset(data.val, range(128)), batch_size=128)


@pytest.fixture(scope="module")
def reference(loaders):
    return fit(gated_cnn(), *loaders, **FIT, log=lambda line: None)


class Interrupted(Exception):
    pass


def after_epoch(epoch: int):
    def log(line):
        if line.startswith(f"epoch {epoch}/"):
            raise Interrupted  # the checkpoint of `epoch` is written, nothing of the next epoch ran
    return log


def killed_at_step(step: int):
    """A loss that interrupts the run at global step `step` (mid-epoch, after in-epoch shrinks)."""
    calls = []

    def loss(out, y):
        calls.append(1)
        if len(calls) == step:
            raise Interrupted
        return F.cross_entropy(out, y)
    return loss


def comparable(history):
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


def assert_same_run(resumed, full):
    assert comparable(resumed.history) == comparable(full.history)
    assert resumed.removed_units == full.removed_units
    assert resumed.removed_sections == full.removed_sections
    a, b = resumed.model.state_dict(), full.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_the_reference_run_prunes_while_it_trains(reference):
    units = [h["units_removed"] for h in reference.history]
    sections = [h["sections_removed"] for h in reference.history]
    assert 0 < units[0] < units[1] < units[2], units  # in each stochastic epoch, and at hardening
    assert sections[1] > 0, sections
    assert [h["hard_gates"] for h in reference.history] == [False, False, True, True]


@pytest.mark.parametrize("interrupt, resumed_from", [
    pytest.param({"loss_fn": killed_at_step(5)}, 0, id="mid-epoch-1"),  # before any checkpoint
    pytest.param({"log": after_epoch(1)}, 1, id="between-epochs"),
    pytest.param({"loss_fn": killed_at_step(STEPS + 5)}, 1, id="mid-epoch-2"),  # after two in-epoch shrinks
    pytest.param({"log": after_epoch(3)}, 3, id="after-hardening"),
])
def test_interrupted_and_resumed_is_the_uninterrupted_run(interrupt, resumed_from, loaders, reference, tmp_path):
    with pytest.raises(Interrupted):
        fit(gated_cnn(), *loaders, **FIT, checkpoint_dir=tmp_path, **{"log": lambda line: None, **interrupt})
    if resumed_from:
        check_theta_optimizer_state(torch.load(tmp_path / CHECKPOINT, weights_only=True), resumed_from)
    else:  # the directory fit made is there, empty
        assert tmp_path.is_dir() and not (tmp_path / CHECKPOINT).exists()
    lines = []
    resumed = fit(gated_cnn(), *loaders, **FIT, checkpoint_dir=tmp_path, resume=True, log=lines.append)
    assert_same_run(resumed, reference)
    assert [line.split()[1] for line in lines if line.startswith("epoch")] == \
        [f"{e}/4" for e in range(resumed_from + 1, 5)]
    assert ("no checkpoint" in lines[0]) == (resumed_from == 0)
    # the hardened state came back from the checkpoint: hardening is not redone (nor re-measured)
    assert any(line.startswith("hardening") for line in lines) == (resumed_from < 3)
    done = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert done["pruner"]["hard"]
    assert done["pruner"]["decided_before_hardening"] == reference.history[-1]["decided_before_hardening"]


def check_theta_optimizer_state(ckpt, epoch):
    """Adam's state of theta is in the checkpoint, sliced like theta by the shrinks, and its step
    count is every step so far (not restarted by a shrink)."""
    thetas = [v for k, v in ckpt["model"].items() if k.startswith("vps_gates.")]
    state = ckpt["pruner"]["theta_optimizer"]["state"]
    assert len(state) == len(thetas)
    assert sorted(s["exp_avg"].shape for s in state.values()) == sorted(t.shape for t in thetas)
    assert {float(s["step"]) for s in state.values()} == {min(epoch, 2) * STEPS}  # theta is frozen once hard


def test_a_run_that_removes_every_gate_finishes_and_resumes(loaders, tmp_path):
    """Sections only, both removed in epoch 1: no theta is left to optimise, and that resumes too."""
    torch.manual_seed(0)
    sections_only = vpsurgery.wrap(SmallResNet(), torch.randn(2, 1, 8, 8), channels=False)
    args = {**FIT, "epochs": 2, "price": 1.0, "theta_lr": 0.5}
    with pytest.raises(Interrupted):
        fit(sections_only, loaders[0], **args, checkpoint_dir=tmp_path, log=after_epoch(1))
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["pruner"]["theta_optimizer"] is None
    result = fit(sections_only, loaders[0], **args, checkpoint_dir=tmp_path, resume=True, log=lambda line: None)
    assert result.removed_sections == {"sec_add", "sec_add_1"} and not vpsurgery.gates(result.model)


# ------------------------------------------------------------------ checkpoints that are refused
TOY = {"epochs": 2, "price": 3.0, "theta_lr": 2.0, "progress": False, "loss_fn": F.mse_loss, "log": lambda l: None}


@pytest.fixture
def written(tmp_path):
    """A checkpoint dir with the last.pt of a finished 2-epoch toy run."""
    fit(student(), toy_loader(256), **TOY, checkpoint_dir=tmp_path)
    return tmp_path


def resume_toy(directory, model=None):
    return fit(model or student(), toy_loader(256), **TOY, checkpoint_dir=directory, resume=True)


@pytest.mark.parametrize("damage", ["half", "empty", "garbage"])
def test_a_truncated_or_corrupt_checkpoint_names_the_file(written, damage):
    path = written / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes({"half": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])
    with pytest.raises(CheckpointError) as info:
        resume_toy(written)
    assert str(info.value) == f"cannot resume: {path} is truncated or corrupt; delete it or start without resume"


class Payload:
    """Unpickling runs builtins.exec, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_checkpoint_carrying_code_is_refused_unrun(written, writer):
    path, marker = written / CHECKPOINT, written / "ran"
    ckpt = {"model": {}, "payload": Payload(marker)}
    if writer == "torch.save":
        torch.save(ckpt, path)
    else:
        path.write_bytes(pickle.dumps(ckpt, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(CheckpointError, match="refused: not a weights-only checkpoint") as info:
        resume_toy(written)
    assert str(path) in str(info.value) and "delete it or start without resume" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("other, words", [
    (lambda: student(width=16), "channel group sizes (checkpoint vs this model): 0 32 vs 16"),
    (lambda: vpsurgery.wrap(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2)), torch.randn(2, 10)),
     "tensor sizes (checkpoint vs this model): 2.weight [1, 32] vs [2, 32]"),
])
def test_a_checkpoint_of_another_model_is_refused_before_replaying(written, other, words):
    with pytest.raises(CheckpointError) as info:
        resume_toy(written, other())
    message = str(info.value)
    assert message.startswith(f"cannot resume: {written / CHECKPOINT} was written for another model (")
    assert words in message and message.endswith("delete it or start without resume")


def test_a_file_that_is_not_a_fit_checkpoint_is_named(written):
    torch.save({"model": student().state_dict()}, written / CHECKPOINT)
    with pytest.raises(CheckpointError, match="is not a training checkpoint of vpsurgery.fit"):
        resume_toy(written)


# ------------------------------------------------------------------ the command line, killed with SIGKILL
# An MLP: each run is ~25 s here, most of it start-up and the exports (a 20-layer ResNet takes 60 s).
# Measured: units go in epoch 1, in epoch 2 (after the kill) and at hardening (epoch 4).
CLI_MODEL = "vpsurgery:lenet300_100:width=0.2"
CLI_EPOCHS = 4
CLI_ARGS = ["--data", "digits", "--image-size", "8", "--epochs", str(CLI_EPOCHS), "--batch-size", "128",
            "--optimizer", "adam", "--lr", "0.01", "--price", "0.05", "--theta-lr", "0.1", "--prune-every", "4",
            "--seed", "5", "--repeats", "0", "--no-progress"]


def compress(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vpsurgery", "compress", CLI_MODEL, *CLI_ARGS, "--out", str(out),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return err


def run_outputs(out: Path):
    report = json.loads((out / "report.json").read_text())
    weights = torch.load(out / "weights.pt", weights_only=True)
    return json.loads((out / "kept_map.json").read_text()), weights, comparable(report["history"])


def test_cli_killed_mid_training_and_resumed_is_the_uninterrupted_run(tmp_path):
    full_out, cut_out = tmp_path / "full" / "run", tmp_path / "cut" / "run"
    full = compress(full_out)  # runs beside the one that gets killed
    cut = compress(cut_out)
    killed_after = None
    for line in cut.stderr:  # each epoch's line comes after its checkpoint is written
        if line.startswith("[vpsurgery] epoch 1/"):
            # at once: an epoch of this MLP takes tens of milliseconds on an idle machine, so any
            # wait could let the run finish; the kill lands in epoch 2 (or between epochs 1 and 2)
            cut.send_signal(signal.SIGKILL)
            killed_after = line
            break
    cut.communicate(timeout=60)
    assert killed_after is not None and cut.returncode == -signal.SIGKILL
    assert not (cut_out / "report.json").exists()
    # killed in training, not after it (wherever the CLI keeps the checkpoint of an unfinished run)
    checkpoints = list(cut_out.parent.rglob(CHECKPOINT))
    assert checkpoints and all(torch.load(p, weights_only=True)["epoch"] < CLI_EPOCHS for p in checkpoints)
    err = finish(compress(cut_out, "--resume"))
    assert "epoch 1/" not in err and f"epoch {CLI_EPOCHS}/{CLI_EPOCHS}" in err
    finish(full)
    kept_a, weights_a, history_a = run_outputs(cut_out)
    kept_b, weights_b, history_b = run_outputs(full_out)
    assert kept_a == kept_b
    assert history_a == history_b
    assert 0 < history_a[0]["units_removed"] < history_a[1]["units_removed"] < history_a[-1]["units_removed"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
