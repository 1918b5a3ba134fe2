"""`python -m vpsurgery ...` is the `vpsurgery` command."""
import sys

from vpsurgery.cli import main

if __name__ == "__main__":
    sys.exit(main())
