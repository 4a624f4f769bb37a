"""Command-line plumbing shared by the numbered scripts: exit codes and one-line errors."""
from __future__ import annotations

import sys
from typing import Callable

EXIT_OK, EXIT_USAGE = 0, 2  # 1: a script's own failure (a FAIL in step 3)


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


def parse_layers(spec: str | list[int] | None, num_layers: int | None = None) -> list[int] | None:
    """"0,3-5" (or a list) -> [0, 3, 4, 5]; None, "" or "all" -> None (every layer).

    With num_layers, numbers outside 0..num_layers-1 are an InputError.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    out: set[int] = set()
    if isinstance(spec, str):
        try:
            for part in spec.split(","):
                lo, _, hi = part.strip().partition("-")
                out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise InputError(f"--layers {spec!r}: write layer numbers like 0,3-5") from None
    else:
        out.update(int(n) for n in spec)
    if not out or (num_layers is not None and not all(0 <= n < num_layers for n in out)):
        raise InputError(f"--layers {spec!r}: the model has layers 0..{(num_layers or 1) - 1}")
    return sorted(out)
