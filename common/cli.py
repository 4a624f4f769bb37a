"""Command-line plumbing shared by the numbered scripts: exit codes and one-line errors."""
from __future__ import annotations

import sys
from typing import Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class InputError(Exception):
    """Bad input or usage: the message is one line that names the file and says what to do."""


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main(); an InputError becomes one line on stderr and exit code 2."""
    try:
        code = main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or EXIT_OK)


def print_settings(settings: dict) -> None:
    """Print the resolved settings, one per line, so a run says what it did."""
    width = max(len(k) for k in settings)
    for k, v in settings.items():
        print(f"  {k:<{width}} = {v}")
