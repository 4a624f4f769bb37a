"""File plumbing: atomic writes (a file appears under its final name complete, or not at all),
the output-folder guard every script calls, JSON reads that fail with one clear line, and a sha256.

Temporary files are created by tempfile.mkstemp (O_CREAT | O_EXCL | O_NOFOLLOW, a random name),
so a link planted in a shared folder is never written through; the finished file is renamed over
its final name, which replaces a link found there instead of following it. While it is being
written, a temporary file is flock()ed: a temporary file nobody holds a lock on is the leftover of
a killed run, and clean_stale_temps (called by output_folder) removes it on the next run.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from common.cli import FS_FAULTS, InputError, interrupts_deferred

TEMP_SUFFIX = ".tmp"  # temp names: .<final name>.<random><TEMP_SUFFIX> (files) or ...<TEMP_SUFFIX>d (folders)
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmpd?")  # what mkstemp/mkdtemp make with our prefix and suffix
FILE_MODE = 0o644  # mkstemp creates 0600; finished outputs are readable like any other file
# Write faults a user can fix (disk full, read-only, permissions, a folder or file in the way).
WRITE_FAULTS = FS_FAULTS


def write_fault(e: OSError, path: str | os.PathLike) -> InputError:
    """One line for a write that failed for a reason the user can fix."""
    return InputError(f"cannot write {path}: {os.strerror(e.errno)}: free some space, fix the folder's "
                      "permissions, or choose another output folder")


def _locked_temp(make, flags: int) -> tuple[int, str]:
    """A new temporary file or folder (make() -> (fd or None, name)), flock()ed, and still under its name.

    Between its creation and the lock, a cleaner may take it for a leftover and remove it (it removes
    only what it could lock, while holding the lock): then the name no longer leads to it, and we
    make another.
    """
    while True:
        fd, name = make()
        if fd is None:
            fd = os.open(name, flags | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks it as being written
        try:
            if os.stat(name, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd, name
        except FileNotFoundError:
            pass
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Lock fd's file unless another process holds it; True when we now hold the lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_unless_locked(p: Path) -> bool:
    """Remove a temporary file or folder nobody holds a lock on (its writer is gone); True if removed."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not _try_lock(fd):
            return False  # its writer still runs
        _remove(p)  # while holding its lock: see _locked_temp
        return True
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a new, exclusively created binary file (read-write) beside `path`; rename it over `path`
    only if the block succeeds. A write fault becomes an InputError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with interrupts_deferred():  # a Ctrl-C between the temp file's creation and `tmp`: left behind
                fd, tmp = _locked_temp(lambda: tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                                                suffix=TEMP_SUFFIX), os.O_RDWR)
        except OSError as e:
            if e.errno in WRITE_FAULTS:
                raise write_fault(e, path) from None
            raise
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.replace(tmp, path)
    except OSError as e:
        # Only faults of this file (a write names no file; the rename names the temp file). A fault
        # naming another file (a source read inside the block) is left to cli.run, which names it.
        if e.errno in WRITE_FAULTS and e.filename in (None, tmp, str(path)):
            raise write_fault(e, path) from None
        raise
    finally:
        with interrupts_deferred():
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)


@contextmanager
def temp_folder(final: Path) -> Iterator[Path]:
    """A new private folder beside `final` (mkdtemp), locked while in use, removed afterwards unless renamed."""
    fd, tmp = None, None
    try:
        with interrupts_deferred():  # as in atomic_file: a Ctrl-C here would leave it behind
            fd, name = _locked_temp(lambda: (None, tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.",
                                                                    suffix=TEMP_SUFFIX + "d")),
                                    os.O_RDONLY | os.O_DIRECTORY)
            tmp = Path(name)
        yield tmp
    finally:
        with interrupts_deferred():
            if fd is not None:
                os.close(fd)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(folder: Path, final: str | None = None) -> list[Path]:
    """Remove the temporary files and folders that killed runs left in `folder` (no lock held on them);
    with `final`, only those of that one final name."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        name = p.name
        if final is not None and not name.startswith(f".{final}."):
            continue
        ours = TEMP_NAME.fullmatch(name) is not None
        legacy = name.startswith(".") and ".tmp-" in name and name.rsplit(".tmp-", 1)[1].isdigit()
        if not (ours or legacy):
            continue
        if p.is_symlink():  # planted: drop the link itself, never what it points at
            p.unlink()
        elif legacy:
            if _pid_alive(int(name.rsplit(".tmp-", 1)[1])):
                continue
            _remove(p)
        elif not _remove_unless_locked(p):
            continue
        removed.append(p)
    return removed


def open_lock(path: Path) -> int:
    """Open (create) a lock file without following a link planted at its name; returns the descriptor."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{path} is a symbolic link: remove it (a lock file is never followed)") from None
        if e.errno in WRITE_FAULTS:
            raise write_fault(e, path) from None
        raise


def _related(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def output_folder(path: str | os.PathLike, inputs: list = (), input_files: list = (), flag: str = "--out-dir",
                  create: bool = True, clean: bool = True) -> Path:
    """Check (and with `create`, create) an output folder before anything is written; remove the leftovers
    of killed runs (unless not `clean`). Without `create` the folder appears with the first file written into it.

    Refused: an empty path; a path that is a file, or lies under one; a folder that is, contains or
    lies inside one of `inputs` (folders read by the step: writing there could replace what is read);
    a folder that would hold one of `input_files`.
    """
    if path is None or not str(path).strip():
        raise InputError(f"{flag} is empty (an unset variable?): give a folder")
    path = Path(path)
    real = path.resolve()
    for folder in inputs:
        if folder is not None and Path(folder).exists() and _related(real, Path(folder).resolve()):
            raise InputError(f"{flag} {path} is, contains or lies inside the input folder {folder}: "
                             "choose a folder apart from what this step reads")
    for file in input_files:
        if file is not None and Path(file).resolve().is_relative_to(real):
            raise InputError(f"{flag} {path} contains the input file {file}: choose another folder")
    # The nearest existing ancestor must be a folder (no file in the way).
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        raise InputError(f"{flag} {path}: {probe} is a file, not a folder: choose a folder")
    if path.is_dir():  # a link in it that leads to an input: a final name that resolves to an input file
        guarded = [Path(f).resolve() for f in inputs if f is not None and Path(f).exists()]
        guarded_files = [Path(f).resolve() for f in input_files if f is not None]
        for entry in os.scandir(path):
            if entry.is_symlink():
                target = Path(entry.path).resolve()
                if target in guarded_files or any(target.is_relative_to(g) for g in guarded):
                    raise InputError(f"{entry.path} is a link to the input {target}: remove it (a step never "
                                     "writes where it reads)")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in WRITE_FAULTS:
                raise InputError(f"cannot create {flag} {path}: {os.strerror(e.errno)}: choose another folder") from None
            raise
    if clean:
        clean_stale_temps(path)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_bytes(obj) -> bytes:
    """What write_json writes: indented JSON, UTF-8, one final newline."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes(path, json_bytes(obj))


def check_regular_file(path: Path, fix: str) -> None:
    """A regular file (after links), never a folder, FIFO or device that would block or mislead a read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path} is missing: {fix}") from None
    except OSError as e:
        raise InputError(f"{path}: {os.strerror(e.errno)}: {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise InputError(f"{path} is {kind}: {fix}")


def read_json(path: str | os.PathLike, fix: str, kind: type | None = dict):
    """Parse a JSON file; a missing, broken or (with `kind`) wrongly typed one is an InputError that says `fix`."""
    path = Path(path)
    check_regular_file(path, fix)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}): {fix}") from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply to be a real file: {fix}") from None
    if kind is not None and not isinstance(obj, kind):
        raise InputError(f"{path} holds a JSON {type(obj).__name__}, not an object: {fix}")
    return obj


def sha256_stream(f: BinaryIO, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)
