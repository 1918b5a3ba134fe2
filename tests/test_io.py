import os
import stat

import pytest
import torch
from torch import nn

from vpsurgery.io import (
    CheckpointError,
    OutputExistsError,
    atomic_path,
    atomic_save,
    atomic_write_bytes,
    check_state_dict,
    load_checkpoint,
    prepare_out_dir,
)


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# --- atomic writes -----------------------------------------------------------------------


def test_atomic_save_keeps_old_file_when_torch_save_fails_midway(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(3)}, target)

    def save_half_then_fail(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.zeros(3)}, target)
    monkeypatch.undo()

    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the partial temp file is gone


def test_atomic_path_keeps_old_file_and_removes_temp_when_block_raises(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="exporter crashed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-written")
            raise RuntimeError("exporter crashed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_atomic_path_temp_is_beside_target_and_keeps_suffix(tmp_path):
    target = tmp_path / "sub" / "program.pt2"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent  # same filesystem, so the final rename is atomic
        assert tmp.name.endswith(".pt2")  # torch.export.save checks the extension
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["program.pt2"]


def test_atomic_write_bytes_replaces_content_with_normal_permissions(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600


# --- output directory ----------------------------------------------------------------------


def test_prepare_out_dir_creates_missing_and_accepts_empty(tmp_path):
    out = prepare_out_dir(tmp_path / "a" / "b")
    assert out.is_dir()
    assert prepare_out_dir(out) == out  # empty: fine without force


def test_prepare_out_dir_refuses_non_empty_without_force_and_never_deletes(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError) as info:
        prepare_out_dir(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileExistsError)
    assert "\n" not in message and "--force" in message and str(tmp_path) in message

    assert prepare_out_dir(tmp_path, force=True) == tmp_path
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_prepare_out_dir_rejects_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        prepare_out_dir(tmp_path / "out", force=True)


# --- checkpoints ---------------------------------------------------------------------------


@pytest.fixture
def state_dict():
    return _small_model().state_dict()


def _write_good(path, obj):
    torch.save(obj, path)
    return path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d, sd: d / "absent.pt", "does not exist"),
        (lambda d, sd: d, "is a directory"),
        (lambda d, sd: _truncate(_write_good(d / "t.pt", sd)), "truncated or corrupt"),
        (lambda d, sd: _write_bytes(d / "empty.pt", b""), "truncated or corrupt"),
        (lambda d, sd: _write_bytes(d / "garbage.pt", b"\x00\x01garbage" * 64), "truncated or corrupt"),
        (lambda d, sd: _write_bytes(d / "notes.pt", b"hello world\n"), "truncated or corrupt"),
        (lambda d, sd: _write_good(d / "whole_module.pt", _small_model()), "pickled Python objects"),
        (lambda d, sd: _write_good(d / "list.pt", [torch.ones(1)]), "holds a list, not a dict"),
        (lambda d, sd: _write_good(d / "empty_dict.pt", {}), "is empty"),
        (lambda d, sd: _write_good(d / "meta.pt", {"epoch": 3, "optimizer": {"lr": 0.1}}), "2 entries are not named tensors"),
        (lambda d, sd: _write_good(d / "mixed.pt", {**sd, "step": 7}), "1 entries are not named tensors"),
    ],
    ids=["missing", "directory", "truncated", "empty-file", "garbage", "text", "pickled-module", "not-a-dict", "empty-dict", "no-model-entry", "non-tensor-value"],
)
def test_load_checkpoint_errors_name_the_problem(tmp_path, state_dict, make, fragment):
    path = make(tmp_path, state_dict)
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd, "epoch": 4, "optimizer": {"lr": 0.1}}, lambda sd: {"state_dict": sd}], ids=["plain", "model-entry", "state_dict-entry"])
def test_load_checkpoint_accepts_plain_and_training_checkpoints(tmp_path, state_dict, wrap):
    path = _write_good(tmp_path / "ckpt.pt", wrap(state_dict))
    loaded = load_checkpoint(path)
    assert list(loaded) == list(state_dict)
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())


def test_check_state_dict_accepts_matching_weights(state_dict):
    check_state_dict(_small_model(), state_dict)


def test_check_state_dict_lists_missing_unexpected_and_shape_clashes(state_dict):
    del state_dict["1.running_var"]
    state_dict["head.weight"] = torch.zeros(1)
    state_dict["4.weight"] = torch.zeros(1000, 4 * 6 * 6)
    with pytest.raises(CheckpointError) as info:
        check_state_dict(_small_model(), state_dict)
    message = str(info.value)
    assert message.startswith("checkpoint does not match the architecture:")
    assert "1 missing keys [1.running_var]" in message
    assert "1 unexpected keys [head.weight]" in message
    assert "1 shape mismatches [4.weight: checkpoint (1000, 144) vs model (10, 144)]" in message


def test_check_state_dict_summarises_long_lists_and_spots_dataparallel_prefix(state_dict):
    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(_small_model(), prefixed)
    message = str(info.value)
    n = len(state_dict)
    assert f"{n} missing keys" in message and f"... and {n - 5} more" in message
    assert f"{n} unexpected keys" in message
    assert "'module.' prefix" in message
