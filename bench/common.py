"""Shared helpers for the benchmark scripts: model zoo with sensible small inputs, parameter and
FLOP counting, machine description, atomic writes, and marker-delimited sections of BENCHMARKS.md."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from vpsurgery.io import atomic_write_bytes

import torch

REPO = Path(__file__).resolve().parent.parent

VPS_MODELS = ["lenet300_100", "lenet5", "vgg16", "resnet56", "resnet110"]
BATCH = 2


def torchvision_models() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def video_models() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models.video))


def all_models() -> list[str]:
    """Every image and video classification builder of torchvision, then vpsurgery's reference nets
    (prefixed vps:)."""
    return torchvision_models() + video_models() + [f"vps:{n}" for n in VPS_MODELS]


def input_spec(name: str) -> tuple[tuple[int, ...], dict]:
    """(input shape without batch, extra builder kwargs): the smallest sensible input."""
    if name.startswith("vps:"):
        from vpsurgery.models import default_input_shape
        return tuple(default_input_shape(name[4:])[1:]), {}
    if name in ("s3d", "mvit_v1_b", "mvit_v2_s"):
        return (3, 16, 224, 224), {}  # s3d's last pool needs 7x7 maps; MViT's positions are 16x224x224
    if name in ("r3d_18", "mc3_18", "r2plus1d_18") or name.startswith("swin3d"):
        return (3, 8, 64, 64), {}  # clips of 8 frames
    if name.startswith("vit_"):
        size = 56 if name.endswith("_14") else 64  # must be divisible by the patch size
        return (3, size, size), {"image_size": size}
    if name.startswith(("swin", "maxvit")):
        return (3, 224, 224), {}  # maxvit: 224 is the smallest the 7x7 partitions allow
    if name.startswith("inception"):
        return (3, 96, 96), {}  # needs >= 75
    return (3, 64, 64), {}


def build(name: str, seed: int = 0, batch: int = BATCH) -> tuple[torch.nn.Module, torch.Tensor]:
    """Seeded, eval-mode model (weights=None, num_classes=10) and a seeded input batch."""
    shape, kw = input_spec(name)
    torch.manual_seed(seed)
    if name.startswith("vps:"):
        from vpsurgery.models import get_model
        model = get_model(name[4:], num_classes=10)
    else:
        import torchvision
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((batch, *shape), generator=g)
    return model, x


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def out_widths(model: torch.nn.Module) -> list[int]:
    """Output width of every Conv2d/Linear, in module order."""
    return [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
            for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (vpsurgery's report counts them the same way)."""
    from vpsurgery.reporting import count_flops as counted
    return counted(model, x)[0]


def human(n: float, unit: str = "") -> str:
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suf}{unit}"
    return f"{n:.3g}{unit}"


class Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int | None):
    """Raise Timeout in the main thread after `seconds` (checked between Python bytecodes)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise Timeout(f"timed out after {seconds}s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def wait_for_memory(need_bytes: int, max_wait_s: float = 600.0, poll_s: float = 5.0) -> bool:
    """Block until `need_bytes` are available (other jobs share the machine); False if it never happened."""
    t0 = time.monotonic()
    while True:
        avail = available_memory_bytes()
        if avail is None or avail >= need_bytes:
            return True
        if time.monotonic() - t0 > max_wait_s:
            return False
        time.sleep(poll_s)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torchvision
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{cpu_name()}, {cores} cores{mem}, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), torchvision {torchvision.__version__}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def today() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def write_atomic(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())


def replace_section(path: Path | str, key: str, heading: str, body: str) -> None:
    """Put `body` between <!-- key:begin --> / <!-- key:end --> in `path`, touching nothing else.
    If the markers are missing, append `heading` and a marked block at the end of the file."""
    path = Path(path)
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nOne section per benchmark; each is regenerated by its script between its own markers.\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    write_atomic(path, text)


def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def zero_channel_units(gates: dict, ratio: float, generator) -> tuple[int, int]:
    """Hard-zero ceil(ratio * n) random units of every channel gate, at most n - 1 (a group never
    vanishes, so the output stays a function of the input). Returns (units zeroed, units)."""
    import math

    import torch

    zeroed = total = 0
    for gate in gates.values():
        if gate.kind != "channel":
            continue
        n = gate.theta.numel()
        k = min(math.ceil(ratio * n), n - 1)
        mask = torch.ones(n)
        mask[torch.randperm(n, generator=generator)[:k]] = 0.0
        gate.set(mask)
        zeroed, total = zeroed + k, total + n
    return zeroed, total
