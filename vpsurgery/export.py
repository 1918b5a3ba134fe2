"""Export a (compressed) model to PT2 and ONNX, check the ONNX file against torch, time it.

Models arrive as plain ``nn.Module`` or as ``torch.fx.GraphModule``; both export the same way.
Exports always run in eval mode (the caller's train/eval flags are restored afterwards) and, by
default, with a dynamic batch dimension named ``"batch"``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from vpsurgery.io import atomic_path

BATCH_DIM = "batch"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class VerificationError(RuntimeError):
    """The exported model's outputs differ from the torch model's beyond tolerance."""


@dataclass(frozen=True)
class VerifyResult:
    passed: bool
    max_abs_error: float
    max_rel_error: float  # max_abs_error / reference_max
    reference_max: float  # max |torch output| over all checked batches
    batch_sizes: tuple[int, ...]
    detail: str  # one line: the numbers, or why the comparison could not be made


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    # Export/compare must see inference behaviour (BatchNorm running stats, no dropout),
    # but the caller may be mid-training, so each submodule's flag is put back afterwards.
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags.items():
            module.train(training)


def _tracing_inputs(example_inputs: tuple, dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    if not isinstance(example_inputs, tuple) or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise TypeError("example_inputs must be a tuple of tensors, e.g. (torch.randn(2, 3, 64, 64),)")
    if not dynamic_batch:
        return example_inputs
    # torch.export treats a size-1 dimension as the constant 1 and then rejects it as dynamic;
    # tracing with a batch of 2 gives the same program, which still accepts batch 1 at run time.
    return tuple(x.expand(2, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x for x in example_inputs)


def _batch_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, torch.export.Dim], ...]:
    batch = torch.export.Dim(BATCH_DIM)
    return tuple({0: batch} for _ in inputs)


def _single_input(example_inputs: tuple) -> torch.Tensor:
    if not (isinstance(example_inputs, tuple) and len(example_inputs) == 1 and isinstance(example_inputs[0], torch.Tensor)):
        raise ValueError(
            "example_inputs must be a 1-tuple holding one input batch, e.g. (torch.randn(2, 3, 64, 64),); "
            "ONNX export and verification support single-input models only"
        )
    return example_inputs[0]


def export_pt2(model: torch.nn.Module, example_inputs: tuple, path: str | os.PathLike, dynamic_batch: bool = True) -> Path:
    """Save ``model`` as a ``torch.export`` program, loadable with plain ``torch.export.load``.

    The file holds ATen-level graph and weights only, so loading it needs torch but not
    vpsurgery or the code that defined the model. Dimension 0 of every input is the shared
    dynamic batch size when ``dynamic_batch``.
    """
    inputs = _tracing_inputs(example_inputs, dynamic_batch)
    with _eval_mode(model):
        program = torch.export.export(model, inputs, dynamic_shapes=_batch_shapes(inputs) if dynamic_batch else None)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)
    return path


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> Path:
    """Write ``model`` as one self-contained ``.onnx`` file with input "input" and output "logits".

    ``opset=None`` takes the exporter's default opset.
    """
    _single_input(example_inputs)
    inputs = _tracing_inputs(example_inputs, dynamic_batch)
    path = Path(path)
    # Exporter choice: the torch.export-based ("dynamo") exporter. Both it and the legacy
    # TorchScript exporter (dynamo=False) export fx.symbolic_trace'd resnet18, mobilenet_v3_small,
    # efficientnet_b0, densenet121 and shufflenet_v2_x0_5 at 64x64 with a dynamic batch, and
    # onnxruntime matches torch on both within 2e-6 at batch 1 and 3; both run fully offline.
    # The legacy one is 10-20x faster (0.4-1.4 s vs 5-23 s per model on 2 cores) but is deprecated
    # and warns that it will be removed, and pyproject does not cap torch, so it could vanish
    # under a fresh install. The dynamo exporter is torch's default and maintained path.
    # external_data=False because its default writes weights to a side file "<name>.data"
    # even for small models, and that name would be the temporary one from atomic_path.
    # (Models over protobuf's 2 GiB limit cannot be written this way; ours are far smaller.)
    with _eval_mode(model), atomic_path(path) as tmp:
        torch.onnx.export(
            model,
            inputs,
            tmp,
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=_batch_shapes(inputs) if dynamic_batch else None,
            opset_version=opset,
            verbose=False,
        )
    return path


def _ort_session(onnx_path: str | os.PathLike) -> ort.InferenceSession:
    return ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])


def verify_onnx(
    onnx_path: str | os.PathLike,
    torch_model: torch.nn.Module,
    example_inputs: tuple,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    batch_sizes: Sequence[int] = (1, 3),
    strict: bool = True,
    seed: int = 0,
) -> VerifyResult:
    """Compare onnxruntime on ``onnx_path`` with ``torch_model`` (in eval mode) on random inputs.

    Inputs have the example's shape with each of ``batch_sizes`` as batch, which also proves the
    batch axis is dynamic. Passes when the largest absolute difference over all outputs is at most
    ``atol + rtol * max|reference|``. With ``strict`` a failure raises :class:`VerificationError`.
    """
    example = _single_input(example_inputs)
    session = _ort_session(onnx_path)
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    max_abs = reference_max = 0.0
    problem = None
    with _eval_mode(torch_model), torch.no_grad():
        for batch in batch_sizes:
            x = torch.randn((batch, *example.shape[1:]), generator=generator, dtype=example.dtype)
            expected = torch_model(x).numpy()
            try:
                actual = session.run(None, {input_name: x.numpy()})[0]
            except InvalidArgument as exc:
                problem = f"onnxruntime rejected batch size {batch} (was it exported with dynamic_batch=True?): {exc}"
                break
            if actual.shape != expected.shape:
                problem = f"output shape {actual.shape} differs from the torch model's {expected.shape} at batch size {batch}"
                break
            max_abs = max(max_abs, float(np.abs(actual - expected).max()))
            reference_max = max(reference_max, float(np.abs(expected).max()))
    max_rel = max_abs / reference_max if reference_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    if problem:
        result = VerifyResult(False, float("inf"), float("inf"), reference_max, tuple(batch_sizes), problem)
    else:
        allowed = atol + rtol * reference_max
        result = VerifyResult(
            passed=max_abs <= allowed,
            max_abs_error=max_abs,
            max_rel_error=max_rel,
            reference_max=reference_max,
            batch_sizes=tuple(batch_sizes),
            detail=(
                f"max abs error {max_abs:.3g} (allowed {allowed:.3g} = atol {atol:g} + rtol {rtol:g} * max|ref| "
                f"{reference_max:.3g}), max rel error {max_rel:.3g}, batch sizes {tuple(batch_sizes)}"
            ),
        )
    if strict and not result.passed:
        raise VerificationError(f"ONNX model {onnx_path} does not match the torch model: {result.detail}")
    return result


def _random_feed(session: ort.InferenceSession, input_shape: Sequence[int]) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal(tuple(input_shape), dtype=np.float32)
    return {session.get_inputs()[0].name: x}


def _timed_run_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return (time.perf_counter() - start) * 1e3


def ort_latency(onnx_path: str | os.PathLike, input_shape: Sequence[int], *, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds per onnxruntime CPU run of one float32 input of ``input_shape``."""
    session = _ort_session(onnx_path)
    feed = _random_feed(session, input_shape)
    for _ in range(warmup):
        session.run(None, feed)
    return statistics.median(_timed_run_ms(session, feed) for _ in range(repeats))


def compare_latency(
    dense_onnx: str | os.PathLike,
    small_onnx: str | os.PathLike,
    input_shape: Sequence[int],
    repeats: int = 30,
    *,
    warmup: int = 5,
) -> dict[str, float]:
    """Median CPU latency of both models and ``speedup = dense_ms / small_ms``.

    Runs alternate between the models, swapping which goes first each round, so clock/thermal
    drift and cache state affect both alike instead of biasing whichever was timed second.
    """
    sessions = {"dense": _ort_session(dense_onnx), "small": _ort_session(small_onnx)}
    feeds = {name: _random_feed(session, input_shape) for name, session in sessions.items()}
    for _ in range(warmup):
        for name, session in sessions.items():
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {"dense": [], "small": []}
    for i in range(repeats):
        order = ("dense", "small") if i % 2 == 0 else ("small", "dense")
        for name in order:
            times[name].append(_timed_run_ms(sessions[name], feeds[name]))
    dense_ms = statistics.median(times["dense"])
    small_ms = statistics.median(times["small"])
    return {"dense_ms": dense_ms, "small_ms": small_ms, "speedup": dense_ms / small_ms}
