"""Exit codes and the errors the command line turns into them (one line on stderr each)."""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """A problem with what the user passed; the message names it and the fix (exit code 2)."""


class CheckFailed(Exception):
    """The work ran but its check failed (exit code 1): `vpsurgery: check failed: ...`."""


class CompressionFailed(Exception):
    """compress finished and wrote its run directory, but the compressed model misses what was asked
    (its target, or it learnt nothing): exit code 1, `vpsurgery: compression failed: ...`."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (exit code 2), wherever they are raised."""
    from vpsurgery import ExampleInputError, TraceError
    from vpsurgery.data import DataError
    from vpsurgery.io import CheckpointError, OutputExistsError, RunDirError
    from vpsurgery.specs import SpecError

    return (CLIError, SpecError, DataError, CheckpointError, OutputExistsError, NotADirectoryError,
            TraceError, ExampleInputError, RunDirError)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's message
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].replace(".", "").isidentifier() \
            else last
    return " ".join(text.split()) or type(exc).__name__
