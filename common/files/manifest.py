"""manifest.json: what each exported file holds, and whether it still matches its source.

One entry per file written, keyed by the file's name inside OUT_DIR:

    "model.layers.0.self_attn.q_proj.weight.csv": {
        "format": "csv", "dtype": "float32", "bytes": 1234, "sha256": "...",
        "tensors": [{"name": "model.layers.0.self_attn.q_proj.weight", "key": "...", "shape": [64, 64],
                     "source_dtype": "BF16", "shard": "model-00001-of-00002.safetensors",
                     "offsets": [1024, 9216]}],
        "sources": {"model-00001-of-00002.safetensors": {"size": 123456, "mtime_ns": 1700000000000000000}},
        "model_dir": "/abs/path/to/model"}

`key` is the tensor's key inside the file (the name with a --layer prefix stripped, for the
one-file formats); `offsets` are the tensor's absolute byte range in its shard. A rerun skips a
file whose entry says the same thing as the planned export and whose shards have the same size
and mtime, and whose file is still there with the recorded size (it does not re-hash the file).
Entries of other files are kept, so reruns with different filters add up.

Step 2 writes one too (write_step_manifest), last, over the whole run: every file it wrote, keyed by
its path inside OUT_DIR (so files in subfolders are covered), with its shape (CSV), bytes and sha256,
and the inputs it read (input_signature). Steps 3 and 4 check every file they will read against
the manifest of its folder before computing anything (verify_files; 6_grade.py its references): a
change below the verification tolerance (one digit of a weight, rope_theta in a meta file, a
padding row that no check looks at) is invisible to the numbers, never to a sha256.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from common.cli import InputError
from common.files import layout
from common.files.atomic import json_bytes, open_lock, read_json, sha256_file, write_bytes, write_json
from common.files.csv_io import write_numbers

MANIFEST_NAME = layout.MANIFEST
# What a planned export and a recorded entry must agree on for the file to be reused.
IDENTITY_KEYS = ("format", "dtype", "tensors", "sources", "model_dir", "quant")


def read_manifest(out_dir: Path) -> dict:
    """The manifest's `files` mapping; an unreadable manifest counts as empty (everything is redone)."""
    try:
        data = json.loads((Path(out_dir) / MANIFEST_NAME).read_text())
        files = data.get("files", {})
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Serialise read-merge-write of the manifest between exports sharing OUT_DIR."""
    fd = open_lock(Path(out_dir) / f".{MANIFEST_NAME}.lock")  # never follows a planted link
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(out_dir: Path, entries: dict[str, dict]) -> None:
    """Merge `entries` (file name -> entry) into OUT_DIR/manifest.json, atomically."""
    out_dir = Path(out_dir)
    with _locked(out_dir):
        files = read_manifest(out_dir)
        files.update(entries)
        write_json(out_dir / MANIFEST_NAME, {"files": dict(sorted(files.items()))})


def forget(out_dir: Path, file_name: str) -> None:
    """Remove a file and its manifest entry (a write cut short by Ctrl-C: neither is vouched for)."""
    out_dir = Path(out_dir)
    with _locked(out_dir):
        files = read_manifest(out_dir)
        if files.pop(file_name, None) is not None:
            write_json(out_dir / MANIFEST_NAME, {"files": dict(sorted(files.items()))})
        (out_dir / file_name).unlink(missing_ok=True)


def still_matches(out_dir: Path, file_name: str, planned: dict, recorded: dict | None) -> bool:
    """True when `file_name` can be kept: its entry describes the planned export and its size is right."""
    if not recorded or any(recorded.get(k) != planned.get(k) for k in IDENTITY_KEYS):
        return False
    try:
        return os.stat(Path(out_dir) / file_name).st_size == recorded.get("bytes")
    except OSError:
        return False


# --- step 2's manifest, and the check of a step's inputs against their folders' manifests --------

HASHED_INPUT_BYTES = 64 << 20  # model-folder files up to this size are hashed; larger (the weights): size + mtime


def save_csv(folder: Path, name: str, x) -> dict[str, dict]:
    """Write folder/name (a path inside folder) as CSV; {name: its manifest entry}: shape, bytes, sha256.

    The sha256 is taken as the file is written (csv_io.write_numbers), not by reading it back."""
    nbytes, sha = write_numbers(Path(folder) / name, x, ",", sha256=True)
    return {name: {"shape": list(x.shape), "bytes": nbytes, "sha256": sha}}


def save_json(folder: Path, name: str, obj) -> dict[str, dict]:
    """Write folder/name as JSON (atomic.write_json's bytes); {name: its manifest entry}: bytes, sha256."""
    data = json_bytes(obj)
    write_bytes(Path(folder) / name, data)
    return {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}


def input_signature(model_dir: Path) -> dict:
    """What a capture read from the model folder: its small files (config.json, the tokenizer, the
    safetensors index) by sha256, its large ones (the weights) by size and mtime, as step 1 records
    shards: hashing gigabytes of weights would cost more than many captures."""
    files = {}
    for p in sorted(Path(model_dir).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        st = p.stat()
        files[p.name] = ({"bytes": st.st_size, "sha256": sha256_file(p)} if st.st_size <= HASHED_INPUT_BYTES
                         else {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"model_dir": str(Path(model_dir).resolve()), "files": files}


def remove_manifest(folder: Path, step: int) -> None:
    """Before a step rewrites a folder: from then until its new manifest, nothing vouches for the files.
    Another step's manifest (step 1's, in a weights folder given as OUT_DIR) is refused, never removed."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        owner = json.loads(path.read_bytes()).get("step", 1)  # step 1's record has no "step"
    except (ValueError, AttributeError):
        owner = step  # unreadable: no record worth keeping
    if owner != step:
        raise InputError(f"{folder} holds the {MANIFEST_NAME} of step {owner}: give step {step} a folder of "
                         "its own (--out-dir)")
    path.unlink()


def write_step_manifest(folder: Path, step: int, files: dict[str, dict], inputs: dict) -> None:
    """folder/manifest.json for a step that writes its whole folder in one run. Call it last, after
    every file is in place: a run killed before it leaves no manifest vouching for partial files."""
    write_json(Path(folder) / MANIFEST_NAME, {"step": step, "files": dict(sorted(files.items())), "inputs": inputs})


def verify_files(folder: Path, names: Iterable[str], step: str, fix: str) -> tuple[int, int]:
    """Check the named files (paths inside `folder`) against folder/manifest.json before a step reads
    them; returns (files hashed, bytes hashed).

    A file that is there must be listed with its sha256 and match it; a listed file must be there.
    A file neither there nor listed is left to the reading step (an optional file). Anything else is
    an InputError naming the file: `step` ("step 2") wrote the folder, `fix` says how to redo it.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    anyway = "; --no-verify-hashes reads the files unchecked"
    data = read_json(path, f"{step} records every file it writes there; {fix}{anyway}")
    listed = data.get("files")
    if not isinstance(listed, dict):
        raise InputError(f"{path} has no 'files' mapping: {fix}{anyway}")
    count = nbytes = 0
    for name in dict.fromkeys(names):
        file, entry = folder / name, listed.get(name)
        there = file.is_file()
        if entry is None and not there:
            continue
        if entry is None:
            raise InputError(f"{file} is not listed in {path}: {step} did not write it; {fix}{anyway}")
        if not there:
            raise InputError(f"{file} is listed in {path} but is gone (deleted after {step} wrote it?): "
                             f"{fix}{anyway}")
        size = file.stat().st_size
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise InputError(f"{path} has no sha256 for {name}: {fix}{anyway}")
        if size != entry.get("bytes", size) or sha256_file(file) != entry["sha256"]:
            raise InputError(f"{file} was modified after {step} wrote it (its sha256 differs from {path}): "
                             f"{fix}{anyway}")
        count, nbytes = count + 1, nbytes + size
    return count, nbytes


class HashCheck:
    """A step's verify_files calls over its input folders, tallied for the line its run prints and
    reports; with `enabled` False (--no-verify-hashes) each call is skipped and the line says so."""

    def __init__(self, enabled: bool):
        self.enabled, self.files, self.bytes, self.seconds = enabled, 0, 0, 0.0
        self.checked: set[Path] = set()  # each file is hashed once, however often it is named

    def folder(self, folder: Path, names: Iterable[str], step: str, fix: str) -> None:
        if self.enabled:
            t0 = time.perf_counter()
            todo = [n for n in names if Path(folder) / n not in self.checked]
            self.checked.update(Path(folder) / n for n in todo)
            files, nbytes = verify_files(folder, todo, step, fix)
            self.files, self.bytes = self.files + files, self.bytes + nbytes
            self.seconds += time.perf_counter() - t0

    def line(self) -> str:
        if not self.enabled:
            return ("NOT verified (--no-verify-hashes): the input files were not checked against their folders' "
                    f"{MANIFEST_NAME}, so an edit below the tolerance would pass unseen")
        return (f"the sha256 of all {self.files} input files ({self.bytes / 1e6:.1f} MB) match their folders' "
                f"{MANIFEST_NAME} ({self.seconds:.2f} s)")
