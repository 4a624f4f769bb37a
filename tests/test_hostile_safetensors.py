"""Safetensors files built by hand to be wrong: every one is refused at the header, one line naming the
file, exit 2, before any tensor is read, nothing written. A FIFO never blocks; a huge shape never allocates."""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from hostile import fingerprint, one_line, run_main

A = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
B = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}
DATA = bytes(range(32))


def shard(header, data: bytes = DATA) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(**changes):
    return {**A, **changes}


CASES = {
    # offsets
    "overlapping offsets": (shard({"a": A, "b": {**B, "data_offsets": [8, 24]}}, DATA[:24]), "overlaps"),
    "a gap between tensors": (shard({"a": A, "b": {**B, "data_offsets": [20, 36]}}, DATA + bytes(4)), "gap"),
    "trailing bytes": (shard({"a": A, "b": B}, DATA + b"junk"), "after the last tensor"),
    "offsets are strings": (shard({"a": entry(data_offsets=["0", "16"]), "b": B}), "malformed entry"),
    "offsets are floats": (shard({"a": entry(data_offsets=[0.0, 16.0]), "b": B}), "malformed entry"),
    "one offset": (shard({"a": entry(data_offsets=[16]), "b": B}), "malformed entry"),
    "offsets past the end": (shard({"a": A, "b": {**B, "data_offsets": [16, 48], "shape": [8]}}), "truncated"),
    # shapes and dtypes
    "negative shape": (shard({"a": entry(shape=[-2, -2]), "b": B}), "malformed entry"),
    "float shape": (shard({"a": entry(shape=[2.0, 2]), "b": B}), "malformed entry"),
    "bool shape": (shard({"a": entry(shape=[True, 4]), "b": B}), "malformed entry"),
    "shape [2**40, 0]": (shard({"a": A, "b": B, "e": {"dtype": "F32", "shape": [2**40, 0],
                                                      "data_offsets": [32, 32]}}), "2147483647"),
    "rank 9": (shard({"a": entry(shape=[1] * 7 + [2, 2]), "b": B}), "malformed entry"),
    "unknown dtype": (shard({"a": entry(dtype="F4"), "b": B}), "malformed entry"),
    "entry is a list": (shard({"a": [0, 16], "b": B}), "malformed entry"),
    "shape and size disagree": (shard({"a": entry(shape=[3, 2]), "b": B}), "inconsistent offsets"),
    # the header itself
    "header is a list": (shard([A, B], b""), "not a JSON object"),
    "header nested 200000 deep": (shard(b"[" * 200000 + b"]" * 200000, b""), "nested too deeply"),
    "header not UTF-8": (shard(b'{"\xff": 1}', b""), "not UTF-8"),
    "lone surrogate name": (shard(b'{"\\ud800": ' + json.dumps(A).encode() + b', "b": ' + json.dumps(B).encode() + b"}"),
                            "not valid UTF-8"),
    "a name twice": (shard(b'{"a": ' + json.dumps(A).encode() + b', "a": ' + json.dumps(B).encode() + b"}"),
                     "appears twice"),
    "metadata not strings": (shard({"__metadata__": {"format": 1}, "a": A, "b": B}), "__metadata__"),
    "header length past the file": (struct.pack("<Q", 10**6) + b"{}", "truncated"),
    "header length zero": (struct.pack("<Q", 0) + DATA, "malformed"),
    "shorter than 8 bytes": (b"\x10\x00", "truncated"),
}


def model_with(tmp_path, content) -> object:
    model = tmp_path / "model"
    model.mkdir()
    path = model / "model.safetensors"
    if content == "fifo":
        os.mkfifo(path)
    elif content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content)
    return model


@pytest.mark.parametrize("case", [*CASES, "fifo", "folder"])
def test_broken_shard_is_one_line_and_nothing_is_written(tmp_path, case):
    content, word = CASES.get(case, (case, "regular file" if case == "fifo" else "folder"))
    model = model_with(tmp_path, content)
    before = fingerprint(model)
    line = one_line(run_main("1_model_weights.py", "--model-dir", model, "--out-dir", tmp_path / "out"), word)
    assert "model.safetensors" in line
    assert fingerprint(model) == before and not (tmp_path / "out").exists()


def test_the_good_shard_of_these_tests_is_accepted(tmp_path):
    """The cases above differ from this one by the fault alone."""
    model = model_with(tmp_path, shard({"a": A, "b": B}))
    r = run_main("1_model_weights.py", "--model-dir", model, "--out-dir", tmp_path / "out")
    assert r.code == 0, r.err
    assert (tmp_path / "out" / "a.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("case", ["overlapping offsets", "trailing bytes", "lone surrogate name", "fifo"])
def test_step_2_refuses_the_same_shards_before_loading(tiny_models, tmp_path, case):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["fp16_single"], model)
    (model / "model.safetensors").unlink()
    if case == "fifo":
        os.mkfifo(model / "model.safetensors")
    else:
        (model / "model.safetensors").write_bytes(CASES[case][0])
    before = fingerprint(model)
    r = run_main("2_get_x.py", "--model-dir", model, "--out-dir", tmp_path / "out", "--prompt", "Hi")
    assert "model.safetensors" in one_line(r)
    assert fingerprint(model) == before and not (tmp_path / "out").exists()
