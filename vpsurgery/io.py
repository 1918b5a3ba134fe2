"""Safe file output and checkpoint loading.

Every file the project writes goes through :func:`atomic_path`, so a crash or an exception
mid-write leaves either the previous file or nothing, never a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import pickletools
import re
import shutil
import tempfile
import zipfile
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


class RunDirError(ValueError):
    """A run directory (or a file in it) is incomplete, altered or malformed."""


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


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON at ``path``, atomically (sets and tuples as lists, paths and numpy
    or torch scalars as their values)."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


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


# ---------------------------------------------------------------- directories built whole

MANIFEST = "manifest.json"
_TMP_FILE = re.compile(r"^\..+\.tmp(\.[^.]*)?$")  # what atomic_path names its temporary files


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_path` (left behind by a killed writer)."""
    return bool(_TMP_FILE.match(name))


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files atomic_path leaves behind when a process is killed mid-write."""
    removed = []
    for path in Path(directory).rglob(".*.tmp*"):
        if path.is_file() and _TMP_FILE.match(path.name):
            path.unlink()
            removed.append(path)
    return removed


def writable_parent(path: str | os.PathLike) -> Path:
    """The nearest existing ancestor of ``path``, after checking that a directory can be created in
    it (by creating and removing one, which also catches read-only filesystems and root's bypass of
    permission bits); raises OSError with the reason otherwise."""
    here = Path(path).absolute().parent
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise NotADirectoryError(f"{here} is a file, so {path} cannot be created under it")
    probe = tempfile.mkdtemp(prefix=".vpsurgery-probe-", dir=here)
    os.rmdir(probe)
    return here


def temp_dir_beside(target: str | os.PathLike) -> Path:
    """A new empty directory ``.TARGET.XXXX.tmp`` next to ``target`` (same filesystem, so it can be
    renamed onto it), with the permissions a plain mkdir would give (mkdtemp's are 0700)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_current_umask())
    return tmp


def _current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_manifest(directory: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Write DIR/manifest.json: {relative path: sha256} of every file under DIR except the manifest
    and the top-level entries named in ``exclude``. Returns the file table."""
    root = Path(directory)
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in (MANIFEST, *exclude):
            files[rel.as_posix()] = sha256_file(path)
    atomic_write_bytes(root / MANIFEST, (json.dumps({"format": 1, "files": files}, indent=2) + "\n").encode())
    return files


def check_manifest(directory: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, str]:
    """Check every file DIR/manifest.json lists against its sha256; raise :class:`RunDirError` naming
    the first file that is missing or differs (or a ``required`` file the manifest does not list)."""
    root = Path(directory)
    path = root / MANIFEST
    fix = "re-run `vpsurgery compress` (or `export`) to rebuild the directory"
    if not path.is_file():
        raise RunDirError(f"{root} has no {MANIFEST}, so its files cannot be checked (an unfinished run, or one "
                          f"written by an older vpsurgery); {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}; {fix}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise RunDirError(f"{path} is not a vpsurgery manifest (expected {{'files': {{path: sha256}}}}); {fix}")
    for name in required:
        if name not in files:
            raise RunDirError(f"{path} does not list {name}; {fix}")
    for name, expected in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise RunDirError(f"{path} names {name!r}, which is outside {root}; {fix}")
        target = root / rel
        if not target.is_file():
            raise RunDirError(f"{target} is missing (listed in {MANIFEST}); {fix}")
        if sha256_file(target) != expected:
            raise RunDirError(f"{target} was changed or comes from another run (its sha256 differs from {MANIFEST}); "
                              f"{fix}")
    return files


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory ``staging`` to ``target``, replacing what is there.

    Each step is one atomic rename, so ``target`` is always the old directory or the new one, never
    a mix: the old one is first renamed to ``TARGET.replaced`` (a fixed name, so an interrupted swap
    can be finished), then ``staging`` takes its place, then the old one is
    deleted.
    """
    staging, target = Path(staging), Path(target)
    old = replaced_name(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def replaced_name(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(target.name + ".replaced")


def summarise(items: list[str]) -> str:
    """The first few of ``items``, comma-separated, and how many more."""
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
            f"[{summarise(not_tensors)}]; expected model.state_dict() or a training checkpoint "
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
    with file:
        try:
            obj = load_weights_only(file, path)
        except CodeInCheckpoint as exc:
            raise CheckpointError(
                f"refused: not a weights-only checkpoint: {path} contains pickled Python objects "
                f"({summarise(exc.imports)}) that could run code when loaded, so it is not loaded; re-save it "
                "as torch.save(model.state_dict(), path) or as a dict of tensors and plain values"
            ) from exc
        except CorruptCheckpoint as exc:
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt ({exc.cause}); re-create or re-download it"
            ) from exc
    return _state_dict_from(obj, path)


class CodeInCheckpoint(CheckpointError):
    """The file is a pickle that names Python objects: loading it could run code."""

    def __init__(self, imports: list[str]):
        super().__init__(f"pickled Python objects: {summarise(imports)}")
        self.imports = imports


class CorruptCheckpoint(CheckpointError):
    """The file cannot be read as a torch.save file."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def load_weights_only(file, path: Path):
    """torch.load(weights_only=True) onto the CPU; every failure is CodeInCheckpoint (naming what
    the pickle would import; its opcodes are read, never run) or CorruptCheckpoint."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:
        # Every failure here is about the file's content, and torch.load reports that through many
        # types (RuntimeError or OSError from the zip reader, EOFError, UnpicklingError, even
        # KeyError for a text file), so all of them land here.
        imports = _refused_imports(exc, path)
        if imports:
            raise CodeInCheckpoint(imports) from exc
        raise CorruptCheckpoint(type(exc).__name__) from exc


def _refused_imports(exc: Exception, path: Path) -> list[str]:
    """The Python objects (module.name) a pickle names, when torch.load(weights_only=True)
    failed because of them; [] when the file is simply not a readable checkpoint.

    torch names the blocked global in its message for torch.save files; for other pickles (other
    protocols, or a failure before the global is reached) the pickle's opcodes are read, never
    executed, to find the imports it would make.
    """
    text = str(exc)
    named = re.findall(r"GLOBAL ([\w.]+)", text)
    if named:
        return list(dict.fromkeys(named))
    if "Weights only load failed" not in text and not isinstance(exc, pickle.UnpicklingError):
        return []
    try:
        data = _pickle_bytes(path)
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    return _pickle_imports(data) if data is not None else []


def _pickle_bytes(path: Path, limit: int = 64 << 20) -> bytes | None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return archive.read(names[0])[:limit] if names else None
    with open(path, "rb") as file:
        return file.read(limit)


def _pickle_imports(data: bytes) -> list[str]:
    """module.name of every GLOBAL / STACK_GLOBAL / INST in a pickle stream, read with pickletools
    (which parses opcodes and runs nothing); [] if the bytes are not a pickle."""
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if op.name == "STOP":
                break
    except Exception:  # not a pickle, or a truncated one: genops raises ValueError and friends
        return []
    return list(dict.fromkeys(found))


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load the state_dict in ``path`` (:func:`load_checkpoint`) into ``model`` after checking that it
    has exactly the model's keys and shapes (:func:`check_state_dict`)."""
    state = load_checkpoint(path)
    check_state_dict(model, state)
    model.load_state_dict(state)


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
        problems.append(f"{len(missing)} missing keys [{summarise(missing)}]")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys [{summarise(unexpected)}]")
    if clashes:
        problems.append(f"{len(clashes)} shape mismatches [{summarise(clashes)}]")
    hint = "check that the checkpoint was trained for this architecture and number of classes"
    if unexpected and all(k.startswith("module.") for k in unexpected):
        hint = "its keys carry the 'module.' prefix of DataParallel/DDP; save model.module.state_dict() instead"
    raise CheckpointError(f"checkpoint does not match the architecture: {'; '.join(problems)}; {hint}")


def check_kept_map(kept: Any, where: str | os.PathLike, *, modules: set[str] | None = None,
                   units: set[int] | None = None, sections: set[str] | None = None) -> dict[str, Any]:
    """Raise :class:`RunDirError` unless ``kept`` is a kept map as vpsurgery.kept_map writes it
    and (where the model's ``modules``, gated ``units`` and residual ``sections`` are given) names
    only what the model has. ``where`` names the file in the message."""
    fix = "use the kept_map.json that `vpsurgery compress` wrote for this run"

    def fail(problem: str):
        raise RunDirError(f"{where}: {problem}; {fix}")

    if not isinstance(kept, dict):
        fail(f"holds a JSON {type(kept).__name__}, not an object")
    if kept.get("format") != 1:
        fail(f"format is {kept.get('format')!r}, not 1 (not a vpsurgery kept map)")
    for key, kind in (("modules", dict), ("removed_units", list), ("removed_sections", list)):
        if key not in kept:
            fail(f"has no {key!r} entry")
        if not isinstance(kept[key], kind):
            fail(f"{key!r} is a {type(kept[key]).__name__}, not a {kind.__name__}")
    for name, axes in kept["modules"].items():
        if not isinstance(axes, dict) or not all(
                isinstance(axis, str) and isinstance(positions, list)
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in positions)
                for axis, positions in axes.items()):
            fail(f"module {name!r} is not {{axis: [kept positions]}}")
    if not all(isinstance(u, int) and not isinstance(u, bool) for u in kept["removed_units"]):
        fail("'removed_units' holds something other than unit numbers")
    if not all(isinstance(name, str) for name in kept["removed_sections"]):
        fail("'removed_sections' holds something other than section names")
    if "example" in kept and not (isinstance(kept["example"], list) and all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], list) and isinstance(e[1], str)
            and all(isinstance(d, int) and d >= 1 for d in e[0]) for e in kept["example"])):
        fail("'example' is not a list of [shape, dtype]")
    for label, named, known in (("modules", list(kept["modules"]), modules),
                                ("units", kept["removed_units"], units),
                                ("sections", kept["removed_sections"], sections)):
        if known is not None:
            unknown = [str(x) for x in named if x not in known]
            if unknown:
                fail(f"names {len(unknown)} {label} the model does not have [{summarise(unknown)}]")
    return kept
