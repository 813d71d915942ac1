"""``python -m pystrands server [options]``: run the broker (same options as ``pystrands-broker``)."""

from __future__ import annotations

import sys


def _main(argv: list[str]) -> int:
    if not argv or argv[0] != "server":
        sys.stderr.write("usage: python -m pystrands server [options]   (see: python -m pystrands server --help)\n")
        return 2
    from .cli import main

    return main(argv[1:], prog="python -m pystrands server")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
