"""The vpsurgery command line, end to end: compress a tiny LeNet-5 on digits once (subprocess), then
export / verify / inspect it, load model.pt2 without vpsurgery, and every bad-input case."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from vpsurgery import cli
from vpsurgery.models import get_model

MODEL = "vpsurgery:lenet5:width=0.25"
FAST = ["--epochs", "1", "--batch-size", "256", "--repeats", "3", "--no-progress"]
RUN_FILES = ("model.pt2", "model.onnx", "dense.onnx", "weights.pt", "kept_map.json", "report.json", "report.md",
             "plots/theta.png", "plots/widths.png", "plots/accuracy_flops.png", "checkpoints/last.pt")


def vps(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m vpsurgery ARGS` as a separate process."""
    proc = subprocess.run([sys.executable, "-m", "vpsurgery", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dense_checkpoint(path: Path, **kw) -> Path:
    torch.manual_seed(1)
    torch.save({"model": get_model("lenet5", width=0.25, **kw).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One compress run from a dense checkpoint: (run dir, checkpoint, checkpoint hash before, process)."""
    tmp = tmp_path_factory.mktemp("cli")
    checkpoint = dense_checkpoint(tmp / "dense.pt")
    before = digest(checkpoint)
    out = tmp / "run"
    proc = vps("compress", MODEL, "--data", "digits", "--checkpoint", str(checkpoint), "--out", str(out),
               "--show-layers", *FAST)
    return out, checkpoint, before, proc


# ------------------------------------------------------------------ the happy path

def test_compress_writes_the_run_dir(run):
    out, checkpoint, before, proc = run
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]  # every file went through temp + rename
    assert digest(checkpoint) == before  # the input file is never modified
    report = json.loads((out / "report.json").read_text())
    assert report["input_shape"] == [1, 1, 28, 28]
    assert report["model"]["kwargs"] == {"num_classes": 10, "in_channels": 1, "width": 0.25}
    assert report["checkpoint_sha256"] == before
    assert report["verification"]["passed"] and report["verification"]["max_abs_error"] < 1e-4
    assert report["latency"]["dense_ms"] > 0 and len(report["history"]) == 1
    assert report["totals"]["compressed"]["params"] <= report["totals"]["dense"]["params"]
    assert "onnxruntime check PASSED" in proc.stdout and "conv1" in proc.stdout  # summary + --show-layers


def test_pt2_loads_in_a_process_without_vpsurgery(run, tmp_path):
    out = run[0]
    site = sysconfig.get_paths()["purelib"]
    # -S skips site.py, so neither the editable install's .pth hook nor the repo is on sys.path;
    # only site-packages (for torch) is added by hand.
    code = f"""
import sys
sys.path.append({site!r})
try:
    import vpsurgery
except ImportError:
    pass
else:
    raise SystemExit("vpsurgery is importable: the test is not isolated")
import torch
program = torch.export.load({str(out / 'model.pt2')!r})
for batch in (1, 5):
    y = program.module()(torch.randn(batch, 1, 28, 28))
    assert y.shape == (batch, 10), y.shape
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_export_from_a_weights_file(run, tmp_path):
    out = run[0]
    proc = vps("export", str(out / "weights.pt"), "--out", str(tmp_path / "b"))
    assert (tmp_path / "b" / "model.pt2").is_file() and (tmp_path / "b" / "model.onnx").is_file()
    assert "PASSED" in proc.stdout
    # the exported file verifies against the run it came from
    proc = vps("verify", str(tmp_path / "b" / "model.onnx"), "--reference", str(out), "--repeats", "2")
    assert "PASSED" in proc.stdout


def test_verify_reports_errors_latency_and_flops(run):
    proc = vps("verify", str(run[0] / "model.onnx"), "--repeats", "3")
    assert "onnxruntime check PASSED" in proc.stdout
    assert "speedup" in proc.stdout and "FLOPs: compressed / dense" in proc.stdout


def test_verify_fails_on_a_different_model(run):
    # dense.onnx has the same input/output shapes but other weights and channels
    proc = vps("verify", str(run[0] / "dense.onnx"), "--reference", str(run[0]), "--repeats", "0", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("vpsurgery: check failed:")
    assert "Traceback" not in proc.stderr


def test_inspect_run_and_model(run):
    proc = vps("inspect", str(run[0]))
    assert "->" in proc.stdout and "parameters" in proc.stdout and "channel groups" in proc.stdout
    proc = vps("inspect", "vpsurgery:resnet20:width=0.25")
    assert "residual sections" in proc.stdout and "layer3.2.conv2" in proc.stdout and "FLOPs" in proc.stdout
    assert "unprunable" in proc.stdout and "reaches the model output" in proc.stdout


def test_resume(run, tmp_path, capsys):
    out, checkpoint = tmp_path / "run", run[1]
    shutil.copytree(run[0], out)
    args = ["compress", MODEL, "--data", "digits", "--checkpoint", str(checkpoint), "--out", str(out), *FAST]
    # other settings than the interrupted run: refused before any work
    assert "repeat the original arguments" in fails(capsys, *args, "--epochs", "3", "--resume")
    (out / "report.json").unlink()
    # same settings: training continues after the last checkpointed epoch (here: none left)
    proc = vps(*args, "--resume", "--repeats", "0")
    history = json.loads((out / "report.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1] and "epoch 1/1" not in proc.stderr


# ------------------------------------------------------------------ bad input (in-process: fast)

def fails(capsys, *argv: str, code: int = 2) -> str:
    """Run the CLI in-process; assert the exit code and a one-line reason without a traceback."""
    assert cli.main(list(argv)) == code
    err = capsys.readouterr().err.strip().splitlines()
    reason = [line for line in err if line.startswith("vpsurgery:")]
    assert len(reason) == 1 and "Traceback" not in "\n".join(err), err
    return reason[0]


def compress_args(tmp_path, *extra, model=MODEL, data="digits"):
    return ("compress", model, "--data", data, "--out", str(tmp_path / "out"), *FAST, *extra)


@pytest.mark.parametrize("model, message", [
    ("vpsurgery:resnet99", "unknown vpsurgery model"),
    ("torchvision:resnet99", "unknown torchvision model"),
    ("resnet18", "not of the form"),
    ("not_a_module_xyz:build", "cannot import module"),
    ("vpsurgery.models:no_such_factory", "has no attribute"),
    ("vpsurgery:lenet5:bogus=1", "cannot build"),
])
def test_unknown_model_spec(capsys, tmp_path, model, message):
    assert message in fails(capsys, *compress_args(tmp_path, model=model))
    assert not (tmp_path / "out").exists()


def test_checkpoint_missing(capsys, tmp_path):
    assert "does not exist" in fails(capsys, *compress_args(tmp_path, "--checkpoint", str(tmp_path / "nope.pt")))


def test_checkpoint_truncated(capsys, tmp_path):
    full = dense_checkpoint(tmp_path / "full.pt").read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(full[: len(full) // 2])
    before = digest(bad)
    assert "truncated or corrupt" in fails(capsys, *compress_args(tmp_path, "--checkpoint", str(bad)))
    assert digest(bad) == before


def test_checkpoint_not_a_checkpoint(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    assert "checkpoint" in fails(capsys, *compress_args(tmp_path, "--checkpoint", str(text)))
    assert text.read_text() == "these are not weights\n"


def test_checkpoint_of_another_architecture(capsys, tmp_path):
    other = tmp_path / "resnet.pt"
    torch.save(get_model("resnet20", width=0.25).state_dict(), other)
    reason = fails(capsys, *compress_args(tmp_path, "--checkpoint", str(other)))
    assert "does not match the architecture" in reason and "missing keys" in reason and "conv1.bias" in reason


def test_checkpoint_with_other_shapes(capsys, tmp_path):
    other = dense_checkpoint(tmp_path / "seven.pt", num_classes=7)
    assert "shape mismatches [fc2.weight" in fails(capsys, *compress_args(tmp_path, "--checkpoint", str(other)))


@pytest.mark.parametrize("data, message", [
    ("mnist:{tmp}/missing", "does not exist; pass --download"),
    ("imagefolder:{tmp}/missing", "does not exist"),
    ("imagefolder:{tmp}", "no images found"),
    ("cifar10:{tmp}", "no CIFAR-10 python batches"),
    ("svhn:{tmp}", "unknown dataset spec"),
])
def test_bad_dataset(capsys, tmp_path, data, message):
    assert message in fails(capsys, *compress_args(tmp_path, data=data.format(tmp=tmp_path)))


def test_output_dir_exists(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert "--force" in fails(capsys, *compress_args(tmp_path))
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


def test_resume_without_a_run(capsys, tmp_path):
    assert "nothing to resume" in fails(capsys, *compress_args(tmp_path, "--resume"))


def test_verify_and_export_bad_inputs(capsys, tmp_path):
    assert "does not exist" in fails(capsys, "verify", str(tmp_path / "none.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    assert "not a readable ONNX model" in fails(capsys, "verify", str(junk))
    (tmp_path / "model.onnx").write_bytes(b"")
    assert "not a run directory" in fails(capsys, "export", str(tmp_path), "--out", str(tmp_path / "x"))
    assert "does not exist" in fails(capsys, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))


def test_usage_errors_exit_2(capsys):
    assert cli.main(["compress", MODEL]) == 2  # --data and --out are required
    assert cli.main(["inspect", MODEL, "--input-shape", "1,x"]) == 2
    assert cli.main([]) == 2
    capsys.readouterr()


def test_one_line_error_and_debug_traceback(tmp_path):
    proc = vps("inspect", "vpsurgery:nope", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = vps("inspect", "vpsurgery:nope", "--debug", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "SpecError" in proc.stderr
