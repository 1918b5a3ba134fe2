"""Safe file output and checkpoint loading.

Every file the project writes goes through :func:`atomic_path`, so a crash or an exception
mid-write leaves either the previous file or nothing, never a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

# How many offending keys an error message names before summarising the rest as a count.
_SHOWN_KEYS = 5


class OutputExistsError(FileExistsError):
    """The output directory already holds files and overwriting was not requested."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def _default_file_mode() -> int:
    # mkstemp creates files 0600; give the final file the mode a plain open() would have.
    # os.umask can only be read by setting it, so set it and put it straight back.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success it is renamed onto ``path``.

    For writers that insist on a file name (torch.onnx.export, torch.export.save). If the block
    raises, the temporary file is removed and an existing ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is an atomic rename, not a cross-device copy; the final
    # suffix is kept because some writers check it (torch.export.save warns unless ".pt2").
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old content or all of the new content."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` without ever leaving a partial file at ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def prepare_out_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Create the output directory; refuse a non-empty one unless ``force``.

    Even with ``force`` nothing is deleted: files the run writes replace their namesakes and
    everything else stays.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"output directory {out} exists and is not empty; pass --force to write into it "
            "(existing files are only replaced, never deleted)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _summarise(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    more = len(items) - _SHOWN_KEYS
    return f"{shown}, ... and {more} more" if more > 0 else shown


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a dict; expected a state_dict "
            "or a training checkpoint with a 'model' or 'state_dict' entry"
        )
    where = f"checkpoint {path}"
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj, where = obj[key], f"the '{key}' entry of checkpoint {path}"
            break
    if not obj:
        raise CheckpointError(f"{where} is empty; expected the model's state_dict")
    not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise CheckpointError(
            f"{where} is not a state_dict: {len(not_tensors)} entries are not named tensors "
            f"[{_summarise(not_tensors)}]; expected model.state_dict() or a training checkpoint "
            "whose 'model' or 'state_dict' entry holds it"
        )
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state_dict, safely (``weights_only=True``) and onto the CPU.

    Accepts a plain state_dict or a training checkpoint dict whose ``"model"`` (or
    ``"state_dict"``) entry is the state_dict, and returns the state_dict.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; pass the path of a file written by torch.save")
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    try:
        with file:
            obj = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:
        # Once the file is open, every failure is about its content, and torch.load reports that
        # through many types (RuntimeError or OSError from the zip reader, EOFError,
        # UnpicklingError, even KeyError for a text file), so all of them land here.
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects ({unsafe.group(1)}) that safe "
                "loading refuses; re-save it as torch.save(model.state_dict(), path) or as a dict "
                "of tensors and plain values"
            ) from exc
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}); re-create or re-download it"
        ) from exc
    return _state_dict_from(obj, path)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    clashes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or clashes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys [{_summarise(missing)}]")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys [{_summarise(unexpected)}]")
    if clashes:
        problems.append(f"{len(clashes)} shape mismatches [{_summarise(clashes)}]")
    hint = "check that the checkpoint was trained for this architecture and number of classes"
    if unexpected and all(k.startswith("module.") for k in unexpected):
        hint = "its keys carry the 'module.' prefix of DataParallel/DDP; save model.module.state_dict() instead"
    raise CheckpointError(f"checkpoint does not match the architecture: {'; '.join(problems)}; {hint}")
