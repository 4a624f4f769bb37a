"""Helpers for the hostile-input tests: run a script in-process as a user would, check the one-line
error, and fingerprint folders so a test can tell that no input was touched and nothing was written."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import cli
from conftest import load_script

_MODULES: dict[str, object] = {}


@dataclass
class Result:
    code: int
    out: str
    err: str


def script(name: str):
    """A numbered script as a module (loaded once)."""
    if name not in _MODULES:
        _MODULES[name] = load_script(name)
    return _MODULES[name]


def run_main(name: str, *args, cwd: Path | None = None) -> Result:
    """Run `name`'s main() through cli.run in this process, with sys.argv set: (exit code, stdout, stderr)."""
    mod = script(name)
    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = [name, *map(str, args)]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.run(mod.main)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        os.chdir(here)
    return Result(code, out.getvalue(), err.getvalue())


def one_line(r: Result, *words: str) -> str:
    """Exit 2, one `error:` line, last on stderr (progress bars may come before it), holding every word given."""
    assert r.code == 2, (r.code, r.out[-2000:], r.err[-3000:])
    lines = [l for l in r.err.replace("\r", "\n").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in r.err, r.err[-3000:]
    assert all("it/s]" in l or "%|" in l for l in lines[:-1]), r.err[-3000:]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def fingerprint(*folders: Path) -> dict[str, str]:
    """Every entry under the folders (links not followed): path -> sha256 of a file, link target, or 'dir'."""
    out = {}
    for folder in folders:
        if not os.path.lexists(folder):
            continue
        for root, dirs, files in os.walk(folder):
            for n in dirs + files:
                p = Path(root) / n
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_dir():
                    out[str(p)] = "dir"
                elif p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
                else:
                    out[str(p)] = "special"
    return out


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "64k", read_only: bool = False):
    """A tmpfs mount (disk full past `size`, or read-only); skips without the right to mount."""
    mnt = tmp_path / ("ro_disk" if read_only else "small_disk")
    mnt.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
