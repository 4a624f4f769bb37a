"""model.safetensors.index.json and shards that lie: a weight_map that leaves the model folder (.., an
absolute path, a link), values that are not file names, a tensor in two shards or twice in the index.
Each is one line naming the index or shard, exit 2, and nothing outside the folder is ever read."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import save_file
import torch

from hostile import fingerprint, one_line, run_main

INDEX = "model.safetensors.index.json"


@pytest.fixture
def model(tmp_path):
    """Two shards and an index: a.weight in the first, b.weight in the second; a secret file beside the folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a.weight": torch.ones(2, 2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.zeros(3)}, folder / "model-00002-of-00002.safetensors")
    write_index(folder, {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"})
    (tmp_path / "elsewhere").mkdir()
    save_file({"secret": torch.full((2,), 7.0)}, tmp_path / "elsewhere" / "x.safetensors")
    return folder


def write_index(folder, weight_map, raw: bytes | None = None) -> None:
    (folder / INDEX).write_bytes(raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode())


def edit_map(folder, **changes) -> None:
    wm = json.loads((folder / INDEX).read_text())["weight_map"]
    write_index(folder, {**wm, **changes})


def setup(case: str, folder) -> str:
    """Plant the fault; return a word the error line must hold."""
    other = folder.parent / "elsewhere" / "x.safetensors"
    if case == "dotdot":
        edit_map(folder, secret="../elsewhere/x.safetensors")
        return "outside the model folder"
    if case == "absolute":
        edit_map(folder, secret=str(other))
        return "outside the model folder"
    if case == "value int":
        edit_map(folder, secret=3)
        return "not a file name"
    if case == "value null":
        edit_map(folder, secret=None)
        return "not a file name"
    if case == "value list":
        edit_map(folder, secret=["model-00001-of-00002.safetensors"])
        return "not a file name"
    if case == "no weight_map":
        write_index(folder, None, raw=b'{"metadata": {}}')
        return "weight_map"
    if case == "index is a list":
        write_index(folder, None, raw=b'["model-00001-of-00002.safetensors"]')
        return "weight_map"
    if case == "weight_map a list":
        write_index(folder, None, raw=b'{"weight_map": ["a.weight"]}')
        return "weight_map"
    if case == "index not UTF-8":
        write_index(folder, None, raw=b'{"weight_map": {"a.weight": "\xff"}}')
        return "not UTF-8"
    if case == "a name twice in the index":
        write_index(folder, None, raw=b'{"weight_map": {"a.weight": "model-00001-of-00002.safetensors", '
                                      b'"a.weight": "model-00002-of-00002.safetensors"}}')
        return "appears twice"
    if case == "a tensor in two shards":
        save_file({"b.weight": torch.zeros(3), "a.weight": torch.ones(2, 2)}, folder / "model-00002-of-00002.safetensors")
        return "is in both"
    if case == "shard is a folder":
        (folder / "model-00002-of-00002.safetensors").unlink()
        (folder / "model-00002-of-00002.safetensors").mkdir()
        return "folder"
    if case == "index is a folder":
        (folder / INDEX).unlink()
        (folder / INDEX).mkdir()
        return "folder"
    raise AssertionError(case)


CASES = ["dotdot", "absolute", "value int", "value null", "value list", "no weight_map",
         "index is a list", "weight_map a list", "index not UTF-8", "a name twice in the index",
         "a tensor in two shards", "shard is a folder", "index is a folder"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("how", ["export", "list"])
def test_lying_index_is_one_line_and_nothing_outside_is_read(model, tmp_path, case, how):
    word = setup(case, model)
    before = fingerprint(tmp_path)
    args = ["--list"] if how == "list" else ["--out-dir", tmp_path / "out"]
    r = run_main("1_model_weights.py", "--model-dir", model, *args)
    line = one_line(r, word)
    assert str(model) in line and "secret" not in r.out and "7.0" not in r.out
    assert fingerprint(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_link_leaving_the_folder_is_followed_as_in_the_hf_cache(model, tmp_path):
    """A snapshot folder of the HF cache links every file into ../../blobs/: reading follows links."""
    shard = model / "model-00002-of-00002.safetensors"
    (tmp_path / "blobs").mkdir()
    shard.rename(tmp_path / "blobs" / "x")
    shard.symlink_to(tmp_path / "blobs" / "x")
    r = run_main("1_model_weights.py", "--model-dir", model, "--out-dir", tmp_path / "out")
    assert r.code == 0 and (tmp_path / "out" / "b.weight.csv").is_file(), r.err


def test_the_good_index_of_these_tests_is_accepted(model, tmp_path):
    r = run_main("1_model_weights.py", "--model-dir", model, "--out-dir", tmp_path / "out")
    assert r.code == 0, r.err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.csv")) == ["a.weight.csv", "b.weight.csv"]


@pytest.mark.parametrize("case", ["dotdot", "a tensor in two shards", "value null"])
def test_step_2_refuses_the_same_index(llama32, tmp_path, case):
    folder = tmp_path / "model"
    shutil.copytree(llama32, folder)
    wm = json.loads((folder / INDEX).read_text())["weight_map"]
    first = sorted(set(wm.values()))[0]
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(folder / first, tmp_path / "elsewhere" / "x.safetensors")
    if case == "dotdot":
        wm = {k: ("../elsewhere/x.safetensors" if v == first else v) for k, v in wm.items()}
    elif case == "value null":
        wm[next(iter(wm))] = None
    else:  # the first shard's tensors, also in a second copy the index names for one of them
        shutil.copy(folder / first, folder / "copy.safetensors")
        wm[next(k for k, v in wm.items() if v == first)] = "copy.safetensors"
    write_index(folder, wm)
    before = fingerprint(tmp_path)
    r = run_main("2_get_x.py", "--model-dir", folder, "--out-dir", tmp_path / "out", "--prompt", "Hi")
    one_line(r, str(folder))
    assert fingerprint(tmp_path) == before and not (tmp_path / "out").exists()
