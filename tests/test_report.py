"""Model-spec parsing (vpsurgery.specs), the measurements and text of vpsurgery.reporting and the
typed run report (vpsurgery.cli.rundir.Report: report.json), in-process."""
import json
import re

import pytest
import torch
from torch import nn

import vpsurgery
from vpsurgery import reporting
from vpsurgery.cli.rundir import Outcome, Report, read_report, write_report
from vpsurgery.io import RunDirError
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
    assert [r.layer for r in rows] == ["0", "2", "6"]
    assert rows[0].width_out == 8 and rows[0].width_out_after == 4
    assert rows[1].width_in_after == 4 and rows[1].width_out_after == 3
    assert all(r.params_after < r.params and r.flops_after < r.flops for r in rows[:2])
    totals = reporting.summary(dense, small, x)
    assert 0 < totals.ratio.params < 1 and 0 < totals.ratio.flops < 1
    table = reporting.layer_table(rows)
    assert "8 -> 4" in table and table.count("\n") == len(rows) + 1
    # the JSON of report format 1 ("in", "out", "in_after", ...), both ways
    assert rows[0].to_json()["out"] == 8 and rows[0].to_json()["out_after"] == 4
    assert [reporting.LayerRow.from_json(r.to_json()) for r in rows] == rows
    assert reporting.Totals.from_json(totals.to_json()) == totals


def test_layer_table_dense_only_and_human():
    dense, _, x = _small_pair()
    rows = reporting.layer_rows(dense, None, x)
    assert "FLOPs" in reporting.layer_table(rows) and not rows[0].compared and "out_after" not in rows[0].to_json()
    assert reporting.human(1234567) == "1.23M" and reporting.human(12) == "12"


def _format1_report(rows):
    """report.json as report format 1 (vpsurgery 0.1.0 before the outcome section) wrote it."""
    history = [{"epoch": e, "loss": 1.0 / e, "train_acc": 0.5 + e / 10, "val_acc": 0.4 + e / 10, "params": 100 - 10 * e,
                "macs": 1000 - 100 * e, "theta_at_0": e, "theta_at_1": 3, "theta_between": 5 - e,
                "epoch_time_s": 0.1, "theta_mean": {"g0": 1 - e / 4, "sec": 1.0}} for e in (1, 2, 3)]
    return {"format": 1, "vpsurgery_version": "0.1.0",
            "model": {"spec": "vpsurgery:lenet5", "source": "vpsurgery", "name": "lenet5", "kwargs": {"num_classes": 10}},
            "checkpoint": None, "checkpoint_sha256": None,
            "data": {"spec": "digits", "name": "digits", "num_classes": 10, "channels_repeated": False,
                     "mean": [0.5], "std": [0.25]},
            "input_shape": [1, 1, 28, 28],
            "training": {"epochs": 3, "batch_size": 64, "lr": 0.01, "optimizer": "adam", "seed": 0, "device": "cpu",
                         "hyperparameters": {"price": 0.01}, "seconds": 1.5},
            "history": history,
            "totals": {"dense": {"params": 100, "flops": 1000}, "compressed": {"params": 70, "flops": 700},
                       "ratio": {"params": 0.7, "flops": 0.7}},
            "structure": {"removed_sections": ["sec_add"], "sections_before": ["sec_add", "sec_add_1"],
                          "depth_before": 4, "depth_after": 2},
            "layers": [r.to_json() for r in rows],
            "verification": {"passed": True, "max_abs_error": 0.0, "max_rel_error": 0.0, "reference_max": 1.0,
                             "batch_sizes": [1, 3], "detail": "max abs error 0", "rtol": 1e-4, "atol": 1e-5},
            "latency": {"dense_ms": 1.0, "small_ms": 0.5, "speedup": 2.0, "batch": 1, "repeats": 5},
            "files": {"pt2": "model.pt2"}}


def _report(tmp_path, rows, **changes) -> Report:
    return Report.from_json({**_format1_report(rows), **changes}, tmp_path / "report.json")


def test_write_report_files(tmp_path):
    dense, small, x = _small_pair()
    report = _report(tmp_path, reporting.layer_rows(dense, small, x))
    write_report(tmp_path, report)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["plots"] == reporting.PLOTS
    for png in reporting.PLOTS.values():
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "speedup 2.00x" in md and "sec_add" in md and "![Gates](plots/theta.png)" in md
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # atomic writes leave no temp files


def test_write_report_without_history(tmp_path):
    dense, _, x = _small_pair()
    report = _report(tmp_path, reporting.layer_rows(dense, None, x), history=[], latency=None)
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["plots"] == {}
    assert "latency" not in (tmp_path / "report.md").read_text()


def test_a_format_1_report_reads_and_keeps_its_keys(tmp_path):
    dense, small, x = _small_pair()
    old = _format1_report(reporting.layer_rows(dense, small, x))
    report = Report.from_json(old, tmp_path / "report.json")
    assert report.format == 1 and report.outcome is None and report.val_acc == pytest.approx(0.7)
    assert report.totals.ratio.params == pytest.approx(0.7) and report.structure.removed_sections == ["sec_add"]
    written = report.to_json()
    assert {k: v for k, v in written.items() if k not in ("outcome", "plots")} == old  # nothing lost or renamed


def test_a_format_2_report_round_trips_with_its_outcome(tmp_path):
    dense, small, x = _small_pair()
    outcome = Outcome("flops", 0.5, 0.03, 0.49, 0.1, 0.91, 0.95, 0.15)
    report = _report(tmp_path, reporting.layer_rows(dense, small, x), format=2, outcome=outcome.to_json())
    write_report(tmp_path, report)
    again = read_report(tmp_path)
    assert again == report and again.outcome == outcome and again.val_acc == 0.91
    md = (tmp_path / "report.md").read_text()
    assert "kept 49.0% of the dense flops" in md and "95.00%" in md and "PASSED" in md
    failed = Outcome("flops", 0.5, 0.03, 0.2, 0.1, 0.1, None, 0.15, ("the compressed model keeps 20.0%",))
    assert not failed.ok and "COMPRESSION FAILED" in reporting.outcome_line(failed)
    assert "PASSED" not in reporting.verification_line(report.verification, None, failed)


@pytest.mark.parametrize("change, message", [
    (lambda r: [r], "holds a JSON list, not a run report"),
    (lambda r: {**r, "format": 9}, "is report format 9"),
    (lambda r: {k: v for k, v in r.items() if k != "totals"}, "no 'totals' entry"),
    (lambda r: {**r, "input_shape": [1, 0]}, "'input_shape' is [1, 0]"),
    (lambda r: {**r, "model": {"spec": "x"}}, "has no valid 'model' entry"),
])
def test_a_malformed_report_is_named(tmp_path, change, message):
    from vpsurgery.cli import CLIError

    dense, small, x = _small_pair()
    with pytest.raises((RunDirError, CLIError), match=re.escape(message)):
        Report.from_json(change(_format1_report(reporting.layer_rows(dense, small, x))), tmp_path / "report.json")
