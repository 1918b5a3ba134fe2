import os
import pickle
import stat

import pytest
import torch
from torch import nn

from vpsurgery.io import (
    CheckpointError,
    OutputExistsError,
    RunDirError,
    atomic_path,
    atomic_save,
    atomic_write_bytes,
    check_kept_map,
    check_manifest,
    check_state_dict,
    load_checkpoint,
    prepare_out_dir,
    remove_temp_files,
    replace_dir,
    temp_dir_beside,
    writable_parent,
    write_manifest,
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
        (lambda d, sd: _write_good(d / "whole_module.pt", _small_model()), "refused: not a weights-only checkpoint.*pickled Python objects"),
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


# --- checkpoints that carry code --------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plain_pickle(path, obj, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("write", [
    lambda p, obj: torch.save({"model": obj}, p),
    lambda p, obj: _plain_pickle(p, {"model": obj}, 2),
    lambda p, obj: _plain_pickle(p, obj, 4),  # protocol 4: torch fails on an opcode before reaching the global
], ids=["torch-save", "pickle-2", "pickle-4"])
def test_a_pickle_that_runs_code_is_refused_and_says_so(tmp_path, write):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    write(path, _RunsCode(marker))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"refused: not a weights-only checkpoint: {path}")
    assert "system" in message and "could run code" in message and "truncated" not in message
    assert not marker.exists()


# --- manifests, directories built whole ---------------------------------------------------------


def _tree(root):
    (root / "plots").mkdir(parents=True)
    (root / "a.json").write_text("{}")
    (root / "plots" / "p.png").write_bytes(b"png")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.pt").write_bytes(b"ckpt")
    return root


def test_manifest_round_trip_and_every_failure_names_the_file(tmp_path):
    root = _tree(tmp_path / "run")
    files = write_manifest(root, exclude=("checkpoints",))
    assert sorted(files) == ["a.json", "plots/p.png"]
    assert check_manifest(root, required=("a.json",)) == files
    with pytest.raises(RunDirError, match="does not list b.json"):
        check_manifest(root, required=("b.json",))
    (root / "checkpoints" / "last.pt").write_bytes(b"other")  # not listed: not checked
    check_manifest(root)
    (root / "plots" / "p.png").write_bytes(b"PNG")
    with pytest.raises(RunDirError, match=r"p\.png was changed or comes from another run"):
        check_manifest(root)
    (root / "plots" / "p.png").unlink()
    with pytest.raises(RunDirError, match=r"p\.png is missing"):
        check_manifest(root)
    (root / "manifest.json").write_text('{"files": {"../outside": "0"}}')
    with pytest.raises(RunDirError, match="outside"):
        check_manifest(root)
    (root / "manifest.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="not a vpsurgery manifest"):
        check_manifest(root)
    (root / "manifest.json").unlink()
    with pytest.raises(RunDirError, match="has no manifest.json"):
        check_manifest(root)


def test_replace_dir_swaps_whole_directories(tmp_path):
    old, new = tmp_path / "run", tmp_path / "run.partial"
    old.mkdir()
    (old / "report.json").write_text("old")
    (old / "stale.onnx").write_text("old")
    new.mkdir()
    (new / "report.json").write_text("new")
    replace_dir(new, old)
    assert sorted(os.listdir(tmp_path)) == ["run"] and sorted(os.listdir(old)) == ["report.json"]
    assert (old / "report.json").read_text() == "new"
    # an interrupted swap (old renamed aside, new not yet in place) is finished by the next one
    (tmp_path / "run.replaced").mkdir()
    again = tmp_path / "again"
    again.mkdir()
    replace_dir(again, old)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_remove_temp_files_only_removes_atomic_path_leftovers(tmp_path):
    (tmp_path / "sub").mkdir()
    leftovers = [tmp_path / ".model.onnx.abc123.tmp.onnx", tmp_path / "sub" / ".report.json.x1.tmp.json",
                 tmp_path / ".weights.pt.q.tmp.pt"]
    keep = [tmp_path / "model.onnx", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in leftovers + keep:
        path.write_bytes(b"x")
    assert sorted(remove_temp_files(tmp_path)) == sorted(leftovers)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in leftovers)


def test_temp_dir_beside_has_normal_permissions(tmp_path):
    tmp = temp_dir_beside(tmp_path / "out")
    assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and tmp.name.endswith(".tmp")
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o777 & ~_umask()


def test_writable_parent(tmp_path):
    assert writable_parent(tmp_path / "a" / "b" / "out") == tmp_path  # nearest existing ancestor
    assert os.listdir(tmp_path) == []  # the probe is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        writable_parent(tmp_path / "file" / "out")


# --- kept maps ------------------------------------------------------------------------------


_KEPT = {"format": 1, "example": [[[1, 3, 8, 8], "float32"]], "removed_units": [3], "removed_sections": ["sec_add"],
         "modules": {"conv": {"out": [0, 1]}, "fc": {"in": [0, 1]}}}


def test_check_kept_map_accepts_what_kept_map_writes():
    assert check_kept_map(_KEPT, "k.json", modules={"conv", "fc"}, units={3, 4}, sections={"sec_add"}) is _KEPT


@pytest.mark.parametrize("kept, fragment", [
    ([_KEPT], "holds a JSON list, not an object"),
    ({**_KEPT, "format": 2}, "format is 2"),
    ({k: v for k, v in _KEPT.items() if k != "modules"}, "has no 'modules' entry"),
    ({**_KEPT, "modules": [1]}, "'modules' is a list, not a dict"),
    ({**_KEPT, "modules": {"conv": {"out": [-1]}}}, "module 'conv' is not"),
    ({**_KEPT, "removed_units": ["3"]}, "'removed_units' holds something other than unit numbers"),
    ({**_KEPT, "removed_sections": [1]}, "'removed_sections' holds something other than section names"),
    ({**_KEPT, "example": [[[1, 3], "float32", 1]]}, "'example' is not"),
    ({**_KEPT, "modules": {"nope": {"out": [0]}}}, "names 1 modules the model does not have [nope]"),
    ({**_KEPT, "removed_units": [3, 99]}, "names 1 units the model does not have [99]"),
    ({**_KEPT, "removed_sections": ["sec_x"]}, "names 1 sections the model does not have [sec_x]"),
])
def test_check_kept_map_names_the_problem(kept, fragment):
    with pytest.raises(RunDirError) as info:
        check_kept_map(kept, "RUN/kept_map.json", modules={"conv", "fc"}, units={3, 4}, sections={"sec_add"})
    assert str(info.value).startswith("RUN/kept_map.json: ") and fragment in str(info.value)
