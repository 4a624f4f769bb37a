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
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.atomic import open_lock, write_json

MANIFEST_NAME = "manifest.json"
# What a planned export and a recorded entry must agree on for the file to be reused.
IDENTITY_KEYS = ("format", "dtype", "tensors", "sources", "model_dir")


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


def still_matches(out_dir: Path, file_name: str, planned: dict, recorded: dict | None) -> bool:
    """True when `file_name` can be kept: its entry describes the planned export and its size is right."""
    if not recorded or any(recorded.get(k) != planned.get(k) for k in IDENTITY_KEYS):
        return False
    try:
        return os.stat(Path(out_dir) / file_name).st_size == recorded.get("bytes")
    except OSError:
        return False
