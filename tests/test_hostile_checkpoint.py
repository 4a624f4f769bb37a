"""Checkpoints that lie about themselves: nanoGPT model_args that are not positive integers or disagree with
the state dict (n_layer = 10**9 must not plan 10**9 layers), tensors that are not dense. Each is refused
before the output is planned: one line naming the file, exit 2, the checkpoint untouched, nothing written."""
from __future__ import annotations

import pytest
import torch

import test_convert
from hostile import fingerprint, one_line, run_main


@pytest.fixture(scope="module")
def nanogpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile_ckpt") / "ckpt.pt"
    test_convert.save_nanogpt(path, "compiled")
    return torch.load(path, weights_only=True)


ARG_CASES = {
    "n_head 0": ({"n_head": 0}, "n_head"),
    "n_head negative": ({"n_head": -2}, "n_head"),
    "n_layer a string": ({"n_layer": "2"}, "n_layer"),
    "n_layer a float": ({"n_layer": 2.0}, "n_layer"),
    "n_layer 10**9": ({"n_layer": 10**9}, "n_layer"),
    "n_layer past the state dict": ({"n_layer": 3}, "n_layer"),
    "n_layer short of the state dict": ({"n_layer": 1}, "n_layer"),
    "n_embd not a multiple of n_head": ({"n_head": 3}, "n_head"),
    "vocab_size a bool": ({"vocab_size": True}, "vocab_size"),
    "block_size None": ({"block_size": None}, "block_size"),
    "bias a string": ({"bias": "yes"}, "bias"),
}


def save(tmp_path, obj):
    path = tmp_path / "in" / "ckpt.pt"
    path.parent.mkdir()
    torch.save(obj, path)
    return path


def check_refused(tmp_path, path, *words):
    before = fingerprint(path.parent)
    r = run_main("convert_to_safetensors.py", path, "--output-dir", tmp_path / "out")
    line = one_line(r, *words)
    assert str(path) in line
    assert fingerprint(path.parent) == before and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no temporary folder either


@pytest.mark.parametrize("case", list(ARG_CASES))
def test_model_args_are_checked_before_planning(nanogpt, tmp_path, case):
    changes, word = ARG_CASES[case]
    ckpt = {**nanogpt, "model_args": {**nanogpt["model_args"], **changes}}
    check_refused(tmp_path, save(tmp_path, ckpt), word)


@pytest.mark.parametrize("where", ["plain", "nanogpt", "lightning"])
def test_a_sparse_tensor_is_refused(nanogpt, tmp_path, where):
    sparse = torch.eye(4).to_sparse()
    if where == "plain":
        obj = {"w": torch.ones(2), "s": sparse}
    elif where == "nanogpt":
        wte = next(k for k in nanogpt["model"] if k.endswith("transformer.wte.weight"))
        obj = {**nanogpt, "model": {**nanogpt["model"], wte: nanogpt["model"][wte].to_sparse()}}
    else:
        obj = {"state_dict": {"w": torch.ones(2), "s": torch.eye(3).to_sparse_csr()}}
    check_refused(tmp_path, save(tmp_path, obj), "not a dense tensor")


def test_the_good_checkpoint_of_these_tests_converts(nanogpt, tmp_path):
    r = run_main("convert_to_safetensors.py", save(tmp_path, nanogpt), "--output-dir", tmp_path / "out")
    assert r.code == 0, r.err
    assert (tmp_path / "out" / "model.safetensors").is_file()
