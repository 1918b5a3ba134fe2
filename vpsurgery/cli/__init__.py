"""The ``vpsurgery`` command line (also ``python -m vpsurgery``).

* `parser.py`: the arguments and every check that runs while parsing (nothing is read or written
  before they pass); compress's method options are generated from vpsurgery.config.FitConfig;
* `commands.py`: compress / export / verify / inspect / demo: each loads what it needs, calls
  wrap / fit / shrink / export, and reports;
* `rundir.py`: the run directory: its files, the typed report (report.json), how it is built
  (DIR.partial, resume, the final rename) and read back;
* `errors.py`: exit codes.

Errors in what the user passed end the program with one line on stderr (exit code 2); a failed
check, or a compression that missed its goal, exits with 1; ``--debug`` shows the full traceback
instead.
"""
from __future__ import annotations

import sys

from vpsurgery.cli.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CheckFailed, CLIError,
                                  CompressionFailed, one_line, user_errors)

__all__ = ["main", "run", "CLIError", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: sys.argv[1:]) and return its exit code."""
    from vpsurgery.cli.commands import COMMANDS
    from vpsurgery.cli.parser import parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = parse_args(argv)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("vpsurgery: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, CheckFailed):
            print(f"vpsurgery: check failed: {one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, CompressionFailed):
            print(f"vpsurgery: compression failed: {one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, user_errors()):
            print(f"vpsurgery: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"vpsurgery: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED


def run() -> None:
    sys.exit(main())
