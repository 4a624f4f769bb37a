"""Command-line plumbing shared by the numbered scripts: exit codes, one-line errors, flag types, and
the flags themselves (default and help from the script's constants)."""
from __future__ import annotations

import argparse
import ast
import errno
import io
import math
import os
import signal
import sys
import threading
import tokenize
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


EXIT_OK, EXIT_USAGE = 0, 2  # 1: a script's own failure (a FAIL in step 3)
MAX_LAYERS = 100_000  # no model has more; a --layers range past it is a typo, refused before expanding
# File-system faults a user can fix (disk full, read-only, permissions, a folder or file in the way).
FS_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
             errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY)


class InputError(Exception):
    """Bad input or usage: the message is one line that names the file and says what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a line saying what was written before it (cli.run prints "interrupted: <line>")."""


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C back for a short block that must not be cut in two (a rename and its manifest entry,
    a native call that would turn KeyboardInterrupt into another error); one that came meanwhile is
    raised as KeyboardInterrupt on leaving the block.

    A handler of our own rather than a blocked signal: any thread (torch's, tqdm's) may receive the
    signal, and Python then runs the main thread's handler wherever it is."""
    if threading.current_thread() is not threading.main_thread():  # handlers are set there only
        yield
        return
    came = []
    outer = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, outer)
        if came and callable(outer):  # Python's default handler raises KeyboardInterrupt
            outer(signal.SIGINT, None)


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main(); an InputError (or a file-system fault the user can fix) becomes one line
    on stderr and exit code 2."""
    try:
        code = main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as e:
        if e.errno not in FS_FAULTS:
            raise
        where = e.filename if e.filename is not None else "a file"
        print(f"error: {where}: {os.strerror(e.errno)}: free some space, fix the permissions, or choose "
              "another folder", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if isinstance(e, Interrupted) and str(e) else "interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or EXIT_OK)


def print_settings(settings: dict) -> None:
    """Print the resolved settings, one per line, so a run says what it did."""
    width = max(len(k) for k in settings)
    for k, v in settings.items():
        print(f"  {k:<{width}} = {v}")


def path_arg(text: str) -> Path:
    """argparse type for a folder or file flag: an empty value (an unset shell variable) is refused,
    where Path('') would silently mean the current folder."""
    if not text.strip():
        raise InputError("an empty path was given (an unset variable?): give a folder or file")
    return Path(text)


def tolerance(text: str) -> float:
    """argparse type for --atol/--rtol: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InputError(f"--atol/--rtol {text!r}: give a finite number >= 0")
    return value


def parse_layers(spec: str | list[int] | None, num_layers: int | None = None,
                 holder: str = "the model") -> list[int] | None:
    """"0,3-5" (or a list) -> [0, 3, 4, 5]; None, "" or "all" -> None (every layer).

    Ranges are checked before they are expanded: numbers outside 0..num_layers-1 (or past
    MAX_LAYERS without num_layers) are an InputError saying that `holder` has layers 0..num_layers-1.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    limit = MAX_LAYERS if num_layers is None else num_layers
    bad = InputError(f"--layers {spec!r}: {holder} has layers 0..{limit - 1}")
    ranges: list[tuple[int, int]] = []
    if isinstance(spec, str):
        try:
            for part in spec.split(","):
                lo, _, hi = part.strip().partition("-")
                ranges.append((int(lo), int(hi or lo)))
        except ValueError:
            raise InputError(f"--layers {spec!r}: write layer numbers like 0,3-5") from None
    else:
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in spec):
            raise InputError(f"--layers {spec!r}: layer numbers must be integers")
        ranges = [(n, n) for n in spec]
    if not ranges or any(lo > hi for lo, hi in ranges):
        raise InputError(f"--layers {spec!r}: write ranges low-high, like 0,3-5")
    if not all(0 <= lo and hi < limit for lo, hi in ranges):
        raise bad
    return sorted({n for lo, hi in ranges for n in range(lo, hi + 1)})
# --- flags: a setting in one place ---------------------------------------------------------------
# A script's constant (ACTS_DIR = None  # step 2's folder ...) is its flag's default (--acts-dir), and
# the comment beside it (or the comment lines right above it) is the flag's --help. The flags that
# several steps share are declared here once: their type or action, and the old spellings kept.
SHARED = {
    "--model-dir": {"type": path_arg},
    "--acts-dir": {"type": path_arg},
    "--weights-dir": {"type": path_arg},
    "--out-dir": {"type": path_arg, "aliases": ("--output-dir",)},
    "--layers": {"type": str},  # parsed against the model or capture once known (parse_layers)
    "--atol": {"type": tolerance},
    "--rtol": {"type": tolerance},
    "--verify-hashes": {"action": argparse.BooleanOptionalAction},
}


def constant_comments(source: str) -> dict[str, str]:
    """NAME -> its comment, for every top-level `NAME = ...` of a script: the comment on the line (of a
    one-line assignment), else the comment lines right above it."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name, text = node.targets[0].id, comments.get(node.lineno)
        if text is None or node.end_lineno != node.lineno:
            above, i = [], node.lineno - 1
            while i >= 1 and lines[i - 1].lstrip().startswith("#") and i in comments:
                above.insert(0, comments[i])
                i -= 1
            text = " ".join(above) or None
        if name.isupper() and text:
            out[name] = text
    return out


class Parser(argparse.ArgumentParser):
    """argparse for a numbered script: a flag's default is the script's constant of the same name
    (--acts-dir: ACTS_DIR) and its help the comment beside that constant; a flag with neither a
    constant's comment nor a help= is refused when it is declared."""

    def __init__(self, script: dict, **kwargs):
        super().__init__(description=script["__doc__"].split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.constants = script
        self.comments = constant_comments(Path(script["__file__"]).read_text())

    def flag(self, name: str, *aliases: str, constant: str | None = None, **kwargs) -> argparse.Action:
        """Declare --name (and its aliases); default and help from the constant (NAME, or `constant`)."""
        shared = dict(SHARED.get(name, {}))
        aliases = (*aliases, *shared.pop("aliases", ()))
        kwargs = {**shared, **kwargs}
        constant = constant or kwargs.get("dest", name.lstrip("-").replace("-", "_")).upper()
        if constant in self.constants and "default" not in kwargs:
            kwargs["default"] = self.constants[constant]
        if "help" not in kwargs:
            if constant not in self.comments:
                raise TypeError(f"{name}: no help= and no comment beside a constant {constant}")
            kwargs["help"] = self.comments[constant].replace("%", "%%")
        return self.add_argument(name, *aliases, **kwargs)

    def shared(self, *names: str) -> None:
        """The shared flags (SHARED) in the order given."""
        for name in names:
            self.flag(name)


def settings(args: argparse.Namespace, **resolved) -> dict:
    """The settings a run prints and saves, from the parsed arguments: NAME -> value in the flags' order
    (a --layers of None is "all"), with `resolved` (a default folder made real) in place of the given."""
    out = {dest.upper(): value for dest, value in vars(args).items()}
    if "LAYERS" in out and out["LAYERS"] is None:
        out["LAYERS"] = "all"
    out.update(resolved)
    return out
