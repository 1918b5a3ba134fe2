import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from onnx.external_data_helper import uses_external_data
from torch import nn

from vpsurgery.export import (
    VerificationError,
    compare_latency,
    export_onnx,
    export_pt2,
    ort_latency,
    verify_onnx,
)

EXAMPLE = (torch.randn(2, 3, 64, 64),)


def _torchvision_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=10)
    # torchvision's init (unit BatchNorm, Linear ~ N(0, 0.01)) makes mobilenet_v3 logits ~1e-10,
    # small enough that any ONNX file would "match"; realistic statistics make the check bite.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
    return model.eval()


def _tiny_model(seed: int = 0, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)
    )


TINY_EXAMPLE = (torch.randn(2, 3, 8, 8),)


# Each test exports what it checks instead of sharing exports through a fixture: under
# `pytest -n 2` a shared fixture is rebuilt in every worker, doubling the slow exports.
@pytest.mark.parametrize("traced", [False, True], ids=["module", "fx"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_onnx_export_is_self_contained_and_matches_torch(tmp_path, arch, traced):
    model = _torchvision_model(arch)
    if traced:
        model = torch.fx.symbolic_trace(model)
    path = export_onnx(model, EXAMPLE, tmp_path / "model.onnx")

    assert os.listdir(tmp_path) == ["model.onnx"]  # no external-data side file, no temp file
    proto = onnx.load(path, load_external_data=False)
    assert not any(uses_external_data(t) for t in proto.graph.initializer)
    (graph_input,) = proto.graph.input
    (graph_output,) = proto.graph.output
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph_output.type.tensor_type.shape.dim[0].dim_param == "batch"

    result = verify_onnx(path, model, EXAMPLE)
    assert result.passed and result.batch_sizes == (1, 3)
    assert result.reference_max > 1e-2  # logits are not degenerate, so the comparison means something
    assert result.max_abs_error <= 1e-5 + 1e-4 * result.reference_max


def test_verification_fails_against_a_different_model(tmp_path):
    path = export_onnx(_tiny_model(seed=0), TINY_EXAMPLE, tmp_path / "m.onnx")
    other = _tiny_model(seed=1)

    result = verify_onnx(path, other, TINY_EXAMPLE, strict=False)
    assert not result.passed
    assert result.max_rel_error > 1e-2
    with pytest.raises(VerificationError, match="does not match the torch model: max abs error"):
        verify_onnx(path, other, TINY_EXAMPLE)


def test_verification_reports_wrong_output_shape(tmp_path):
    path = export_onnx(_tiny_model(), TINY_EXAMPLE, tmp_path / "m.onnx")
    wider = _tiny_model()
    wider[-1] = nn.Linear(4, 11)
    result = verify_onnx(path, wider, TINY_EXAMPLE, strict=False)
    assert not result.passed and "output shape (1, 10) differs from the torch model's (1, 11)" in result.detail


def test_static_batch_export_is_caught_by_verification(tmp_path):
    model = _tiny_model().train()
    path = export_onnx(model, TINY_EXAMPLE, tmp_path / "static.onnx", dynamic_batch=False)
    assert model.training  # export ran in eval mode and put the caller's flag back

    with pytest.raises(VerificationError, match="rejected batch size 1"):
        verify_onnx(path, model, TINY_EXAMPLE)
    assert verify_onnx(path, model, TINY_EXAMPLE, batch_sizes=(2,)).passed


def test_export_onnx_rejects_multiple_inputs(tmp_path):
    with pytest.raises(ValueError, match="single-input models only"):
        export_onnx(_tiny_model(), (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_latency_measurement(tmp_path):
    dense = export_onnx(_tiny_model(width=64), TINY_EXAMPLE, tmp_path / "dense.onnx")
    small = export_onnx(_tiny_model(width=4), TINY_EXAMPLE, tmp_path / "small.onnx")
    assert ort_latency(small, (1, 3, 8, 8), repeats=3, warmup=1) > 0

    timing = compare_latency(dense, small, (1, 3, 8, 8), repeats=3, warmup=1)
    assert set(timing) == {"dense_ms", "small_ms", "speedup"}
    assert timing["speedup"] == pytest.approx(timing["dense_ms"] / timing["small_ms"])


# The child sees torch's site-packages but processes no .pth files (-S), and the editable
# install of vpsurgery hooks in through a .pth file, so vpsurgery cannot be imported there.
_LOAD_IN_CLEAN_PROCESS = textwrap.dedent(
    """
    import sys
    sys.path.append(sys.argv[1])
    try:
        import vpsurgery
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("vpsurgery is importable, so this check proves nothing")
    import torch
    program = torch.export.load("model.pt2")
    x, expected = torch.load("expected.pt", weights_only=True)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-5)
    assert "vpsurgery" not in sys.modules and "torchvision" not in sys.modules
    print("loaded and matched")
    """
)


def test_pt2_round_trip_in_a_process_without_vpsurgery(tmp_path):
    model = torch.fx.symbolic_trace(_torchvision_model("resnet18"))
    # Batch 1 in the example, batch 3 in the check: the batch dimension must stay dynamic.
    export_pt2(model, (torch.randn(1, 3, 32, 32),), tmp_path / "model.pt2")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.save((x, model(x)), tmp_path / "expected.pt")

    site_packages = str(Path(torch.__file__).parents[1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _LOAD_IN_CLEAN_PROCESS, site_packages],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert "loaded and matched" in child.stdout
    assert sorted(os.listdir(tmp_path)) == ["expected.pt", "model.pt2"]
