"""Model-spec parsing (vpsurgery.specs) and the run report (vpsurgery.reporting), in-process."""
import json

import pytest
import torch
from torch import nn

import vpsurgery
from vpsurgery import reporting
from vpsurgery.specs import ModelSpec, SpecError, parse_kwargs, parse_spec, parse_value, spec_from_json


# ------------------------------------------------------------------ specs

@pytest.mark.parametrize("text, value", [("3", 3), ("0.5", 0.5), ("true", True), ("False", False), ("none", None),
                                         ("relu", "relu"), ("1e-3", 1e-3)])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_parse_kwargs_and_errors():
    assert parse_kwargs("num_classes=10, width_mult=0.5,flag=true") == {"num_classes": 10, "width_mult": 0.5, "flag": True}
    assert parse_kwargs("") == {}
    with pytest.raises(SpecError, match="key=value"):
        parse_kwargs("10")


def test_parse_spec_forms():
    spec = parse_spec("torchvision:resnet18:num_classes=7,width_per_group=32")
    assert (spec.source, spec.name, spec.kwargs) == ("torchvision", "resnet18", {"num_classes": 7, "width_per_group": 32})
    assert str(parse_spec("vpsurgery:lenet5")) == "vpsurgery:lenet5"
    assert parse_spec("torch.nn:Identity").factory() is nn.Identity


@pytest.mark.parametrize("text, message", [
    ("resnet18", "not of the form"),
    ("vpsurgery:nope", "unknown vpsurgery model 'nope'; choose one of: lenet300_100"),
    ("torchvision:nope", "unknown torchvision model 'nope'"),
    ("no_such_package_xyz.mod:build", "cannot import module 'no_such_package_xyz.mod'"),
    ("torch.nn:NoSuchThing", "has no attribute 'NoSuchThing'"),
    ("math:pi", "not a callable"),
])
def test_bad_specs(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


def test_build_defaults_yield_to_the_spec():
    spec = parse_spec("vpsurgery:lenet5:num_classes=3")
    assert spec.build_kwargs(num_classes=10, in_channels=1, unknown=5) == {"num_classes": 3, "in_channels": 1}
    model = spec.build(num_classes=10)
    assert model.fc2.out_features == 3
    # torchvision builders take num_classes through **kwargs but not in_channels
    assert parse_spec("torchvision:resnet18").build_kwargs(num_classes=4, in_channels=1) == {"num_classes": 4}


def test_build_errors_are_spec_errors():
    with pytest.raises(SpecError, match="cannot build"):
        parse_spec("vpsurgery:lenet5:depth=3").build()
    with pytest.raises(SpecError, match="not a torch.nn.Module"):
        parse_spec("builtins:dict").build()


def test_spec_json_round_trip():
    spec = parse_spec("vpsurgery:resnet20:width=0.5")
    assert spec_from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert isinstance(spec, ModelSpec)


# ------------------------------------------------------------------ reporting

def _small_pair():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3)).eval()
    x = torch.randn(2, 1, 10, 10)
    gated = vpsurgery.wrap(dense, (x,))
    for gate in vpsurgery.gates(gated).values():
        mask = torch.ones_like(gate.theta)
        mask[: len(mask) // 2] = 0
        gate.set(mask)
    return dense, vpsurgery.shrink(gated).eval(), x[:1]


def test_count_flops_matches_hand_count():
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False))
    total, per_module = reporting.count_flops(conv, torch.randn(1, 2, 5, 5))
    assert total == 2 * (4 * 3 * 3) * (2 * 3 * 3)  # 2 FLOPs per MAC, 3x3 output positions
    assert per_module["0"] == total


def test_layer_rows_and_summary_before_after():
    dense, small, x = _small_pair()
    rows = reporting.layer_rows(dense, small, x)
    assert [r["layer"] for r in rows] == ["0", "2", "6"]
    assert rows[0]["out"] == 8 and rows[0]["out_after"] == 4
    assert rows[1]["in_after"] == 4 and rows[1]["out_after"] == 3
    assert all(r["params_after"] < r["params"] and r["flops_after"] < r["flops"] for r in rows[:2])
    totals = reporting.summary(dense, small, x)
    assert 0 < totals["ratio"]["params"] < 1 and 0 < totals["ratio"]["flops"] < 1
    table = reporting.layer_table(rows)
    assert "8 -> 4" in table and table.count("\n") == len(rows) + 1


def test_layer_table_dense_only_and_human():
    dense, _, x = _small_pair()
    assert "FLOPs" in reporting.layer_table(reporting.layer_rows(dense, None, x))
    assert reporting.human(1234567) == "1.23M" and reporting.human(12) == "12"


def _fake_report(rows):
    history = [{"epoch": e, "loss": 1.0 / e, "train_acc": 0.5 + e / 10, "val_acc": 0.4 + e / 10, "params": 100 - 10 * e,
                "macs": 1000 - 100 * e, "theta_at_0": e, "theta_at_1": 3, "theta_between": 5 - e,
                "epoch_time_s": 0.1, "theta_mean": {"g0": 1 - e / 4, "sec": 1.0}} for e in (1, 2, 3)]
    return {"model": {"spec": "vpsurgery:lenet5"}, "data": {"spec": "digits", "num_classes": 10},
            "input_shape": [1, 1, 28, 28], "checkpoint": None, "training": {"epochs": 3, "seconds": 1.5},
            "structure": {"removed_sections": ["sec_add"], "depth_before": 4, "depth_after": 2},
            "totals": {"dense": {"params": 100, "flops": 1000}, "compressed": {"params": 70, "flops": 700},
                       "ratio": {"params": 0.7, "flops": 0.7}},
            "verification": {"passed": True, "detail": "max abs error 0"},
            "latency": {"dense_ms": 1.0, "small_ms": 0.5, "speedup": 2.0, "batch": 1, "repeats": 5},
            "history": history, "layers": rows}


def test_write_report_files(tmp_path):
    dense, small, x = _small_pair()
    report = _fake_report(reporting.layer_rows(dense, small, x))
    reporting.write_report(tmp_path, report)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["plots"] == reporting.PLOTS
    for png in reporting.PLOTS.values():
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "speedup 2.00x" in md and "sec_add" in md and "![Gates](plots/theta.png)" in md
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # atomic writes leave no temp files


def test_write_report_without_history(tmp_path):
    dense, _, x = _small_pair()
    report = {**_fake_report(reporting.layer_rows(dense, None, x)), "history": [], "latency": None}
    reporting.write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["plots"] == {}
    assert "latency" not in (tmp_path / "report.md").read_text()
