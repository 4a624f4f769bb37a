"""convert_to_safetensors.py: nanoGPT -> GPT2LMHeadModel with the same logits; plain state dicts
bit-exact, sharded; untrusted pickles refused without running them; bad input -> exit 2, no folder.

The nanoGPT model below is written out after karpathy/nanoGPT model.py (LayerNorm with optional
bias, CausalSelfAttention with the flash path or the causal-mask buffer, MLP with exact GELU,
tied wte/lm_head), and checkpoints are saved the way its train.py saves them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from conftest import ROOT, load_script, run_script

from common.cli import InputError
from common.files.safetensors_io import list_tensors

convert_to_safetensors = load_script("convert_to_safetensors.py")


# ---------------------------------------------------------------------------------------------
# nanoGPT's GPT, written out (model.py).

class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, a, flash):
        super().__init__()
        self.c_attn = nn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])
        self.n_head, self.n_embd, self.flash = a["n_head"], a["n_embd"], flash
        if not flash:  # nanoGPT registers the causal mask when scaled_dot_product_attention is missing
            T = a["block_size"]
            self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.c_fc = nn.Linear(a["n_embd"], 4 * a["n_embd"], bias=a["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * a["n_embd"], a["n_embd"], bias=a["bias"])

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, a, flash):
        super().__init__()
        self.ln_1 = LayerNorm(a["n_embd"], bias=a["bias"])
        self.attn = CausalSelfAttention(a, flash)
        self.ln_2 = LayerNorm(a["n_embd"], bias=a["bias"])
        self.mlp = MLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, a, flash=True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a["vocab_size"], a["n_embd"]),
            wpe=nn.Embedding(a["block_size"], a["n_embd"]),
            h=nn.ModuleList([Block(a, flash) for _ in range(a["n_layer"])]),
            ln_f=LayerNorm(a["n_embd"], bias=a["bias"]),
        ))
        self.lm_head = nn.Linear(a["n_embd"], a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx):
        """Logits at every position (nanoGPT's training branch; its inference branch keeps the last)."""
        pos = torch.arange(idx.size(1))
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=128, dropout=0.0)
# name -> (model_args changes, flash attention, torch.compile prefix, legacy (non-zip) torch.save)
VARIANTS = {
    "compiled": ({}, True, True, False),
    "mask_legacy": ({}, False, False, True),
    "nobias": ({"bias": False}, True, False, False),
}


def save_nanogpt(path: Path, variant: str, seed: int = 0) -> GPT:
    """Train one step and save as nanoGPT's train.py does; return the model (eval mode)."""
    changes, flash, compiled, legacy = VARIANTS[variant]
    args = {**ARGS, **changes}
    torch.manual_seed(seed)
    model = GPT(args, flash)
    with torch.no_grad():  # LayerNorm starts at exactly 1 and 0; make it matter
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, args["vocab_size"], (2, 16))
    F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    opt.step()
    sd = model.state_dict()
    if compiled:  # torch.compile(model).state_dict() prefixes every key
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    ckpt = {"model": sd, "optimizer": opt.state_dict(), "model_args": args, "iter_num": 1,
            "best_val_loss": torch.tensor(4.5),
            "config": {"dataset": "shakespeare", "batch_size": 12, "learning_rate": 6e-4, "compile": compiled}}
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return model.eval()


def convert(*args) -> None:
    """Run the script's main() in-process (InputError propagates)."""
    assert convert_to_safetensors.main(list(map(str, args))) == 0


def hf_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel
    hf, info = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    with torch.no_grad():
        return hf.eval()(idx).logits


@pytest.fixture(scope="module")
def nanogpt(tmp_path_factory) -> dict[str, tuple[Path, GPT]]:
    base = tmp_path_factory.mktemp("nanogpt")
    return {v: (base / f"{v}.pt", save_nanogpt(base / f"{v}.pt", v, seed=i)) for i, v in enumerate(VARIANTS)}


IDX = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nanogpt_fp32_logits_match(nanogpt, tmp_path, variant):
    path, model = nanogpt[variant]
    out = tmp_path / "hf"
    extra = ["--vocab-size", 100] if variant == "compiled" else []  # crop a padded vocabulary
    convert(path, "--output-dir", out, "--dtype", "float32", *extra)
    with torch.no_grad():
        ref = model(IDX)
    V = 100 if extra else ARGS["vocab_size"]
    got = hf_logits(out, IDX)
    assert got.shape == (2, 32, V)
    torch.testing.assert_close(got, ref[..., :V], atol=1e-5, rtol=1e-5)

    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["activation_function"], cfg["n_positions"], cfg["vocab_size"]) == \
        ("gpt2", "gelu", 32, V)
    assert cfg["tie_word_embeddings"] is True
    names = set(list_tensors(out))
    assert "lm_head.weight" in names and not any(n.endswith(".attn.bias") for n in names)
    assert {"README.md", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left beside it


def test_nanogpt_bf16_default_is_rounding_only(nanogpt, tmp_path):
    """Default dtype: bf16 files whose logits equal nanoGPT's with its weights rounded to bf16."""
    path, model = nanogpt["nobias"]
    out = tmp_path / "hf"
    convert(path, "--output-dir", out)
    assert {i.dtype for i in list_tensors(out).values()} == {"BF16"}
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
        ref = rounded(IDX)
        coarse = model(IDX)
    got = hf_logits(out, IDX)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - coarse).abs().max() > 1e-4  # it really is bf16 (else the check above proves nothing)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_converted_folder_goes_through_step_1(nanogpt, tmp_path):
    if not (ROOT / "1_model_weights.py").is_file():
        pytest.skip("1_model_weights.py has not landed yet")
    path, model = nanogpt["compiled"]
    out, csv_dir = tmp_path / "hf", tmp_path / "weights"
    convert(path, "--output-dir", out, "--dtype", "float32")
    r = run_script("1_model_weights.py", "--model-dir", out, "--out-dir", csv_dir, "--format", "csv",
                   "--filter", r"^transformer\.h\.1\.attn\.c_attn\.")
    assert r.returncode == 0, r.stderr
    w = np.loadtxt(csv_dir / "transformer.h.1.attn.c_attn.weight.csv", delimiter=",", dtype=np.float32)
    b = np.loadtxt(csv_dir / "transformer.h.1.attn.c_attn.bias.csv", delimiter=",", dtype=np.float32)
    attn = model.transformer.h[1].attn.c_attn
    np.testing.assert_array_equal(w, attn.weight.detach().T.numpy())  # Conv1D layout (in, out)
    np.testing.assert_array_equal(b, attn.bias.detach().numpy())


# ---------------------------------------------------------------------------------------------
# Plain state dicts.

def odd_state_dict() -> dict[str, torch.Tensor]:
    """Mixed dtypes, shared storage, a non-contiguous tensor, a slice view, a scalar, an empty tensor."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 48, generator=g)
    big = torch.randn(40, 100, generator=g)
    return {
        "embed.weight": emb,
        "head.weight": emb,  # tied: same storage
        "proj.weight": big.t(),  # non-contiguous (100, 40)
        "half.weight": torch.randn(30, 20, generator=g).half(),
        "bf.weight": torch.randn(50, 20, generator=g).bfloat16(),
        "slice.weight": big[:3],  # a view into a larger storage
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(5, 7, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
    }


def test_state_dict_sharded_round_trip_bit_exact(tmp_path):
    sd = odd_state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    out = tmp_path / "out"
    convert(tmp_path / "pytorch_model.bin", "--output-dir", out, "--dtype", "keep", "--max-shard-size", "12KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    from safetensors.torch import load_file
    loaded = {}
    for s in shards:
        part = load_file(s)
        assert all(index["weight_map"][k] == s.name for k in part)
        assert os.path.getsize(s) <= 12_000 + 1024 or len(part) == 1  # header aside, within the limit
        loaded |= part
    assert set(loaded) == set(sd)
    for k, t in sd.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape, k
        assert torch.equal(loaded[k], t), k


def test_lightning_ckpt_float32_and_side_files(tmp_path):
    sd = {k: v for k, v in odd_state_dict().items() if v.is_floating_point()}
    src = tmp_path / "run"
    src.mkdir()
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, src / "last.ckpt")
    (src / "config.json").write_text('{"model_type": "llama"}\n')
    out = tmp_path / "out"
    convert(src / "last.ckpt", "--output-dir", out, "--dtype", "float32")
    assert (out / "config.json").read_text() == '{"model_type": "llama"}\n'
    from safetensors.torch import load_file
    loaded = load_file(out / "model.safetensors")
    for k, t in sd.items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], t.float()), k  # fp16/bf16 -> fp32 widening is exact


# ---------------------------------------------------------------------------------------------
# Untrusted and bad input.

class Payload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_malicious_pickle_refused_not_run(tmp_path, how):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    obj = {"x": Payload(marker), "w": torch.zeros(3) if how == "torch_save" else [1.0, 2.0]}
    if how == "torch_save":
        torch.save(obj, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    out = tmp_path / "out"
    r = run_script("convert_to_safetensors.py", evil, "--output-dir", out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "weights_only" in lines[0], r.stderr
    assert "system" in lines[0]  # names the global it refused
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]  # no output, no temporary folder


def test_bad_inputs_exit_2_one_line(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.randn(100, 100)}, ok)
    (tmp_path / "truncated.pt").write_bytes(ok.read_bytes()[:20000])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"model": {"w": torch.zeros(2)}, "iter_num": 5}, tmp_path / "no_args.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    cases = {"missing.pt": "does not exist", "truncated.pt": "truncated", "garbage.pt": "not a PyTorch checkpoint",
             "no_args.pt": "model_args", "list.pt": "not a dict of tensors"}
    for name, words in cases.items():
        with pytest.raises(InputError, match=words):
            convert(tmp_path / name, "--output-dir", tmp_path / f"out_{name}")
    r = run_script("convert_to_safetensors.py", tmp_path / "truncated.pt", "--output-dir", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_existing_output_dir_kept_unless_force(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "a.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="--force"):
        convert(tmp_path / "a.pt", "--output-dir", out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    convert(tmp_path / "a.pt", "--output-dir", out, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    torch.save({"w": torch.ones(4)}, out / "b.pt")  # --force must never delete the checkpoint itself
    with pytest.raises(InputError, match="contains the input file"):
        convert(out / "b.pt", "--output-dir", out, "--force")
    assert (out / "b.pt").is_file()


def pinned_state_dict() -> dict[str, torch.Tensor]:
    """Values from arange (the same on every torch), every dtype the writer takes, in an order its
    widest-first sort has to change."""
    ramp = torch.arange(-600, 600, dtype=torch.float64) / 7
    return {
        "a.bool": ramp[:11] > 0,
        "b.bf16": ramp[:120].reshape(12, 10).bfloat16(),
        "c.f8": ramp[:9].to(torch.float8_e4m3fn),
        "d.f64": ramp[:33],
        "e.f16": ramp[:64].reshape(8, 8).half().t(),  # non-contiguous
        "f.i8": torch.arange(-5, 5, dtype=torch.int8),
        "g.u16": torch.arange(0, 40000, 1000, dtype=torch.int32).to(torch.uint16),
        "h.f32": ramp[:1200].reshape(30, 40).float(),
        "i.scalar": torch.tensor(7, dtype=torch.int64),
        "j.empty": torch.zeros(0, 4),
    }


# sha256 of every file written for pinned_state_dict(): a change to the writer must not change a byte.
PINNED = {
    "single": {"model.safetensors": "4539772f69de32402f0722fa36357fe2a0464c42813a0e6cb675efe862720774"},
    "sharded": {"model-00001-of-00003.safetensors": "4d4680805e456ca490a9d70691f62d13f71c3907e324aaaa0626ccb5d5b05300",
                "model-00002-of-00003.safetensors": "32d9777fff366556be3bc4c631ee9b528453c873070e53bcbc889dc62f70f322",
                "model-00003-of-00003.safetensors": "57b1e4d6e58719de93b18a217788cff23e9a094bbb6d46bd530a2b8b68779fe9",
                "model.safetensors.index.json": "15d979a1da1db93bda7d5199bb99b30a65dde2e98a61360e05571a31512b0a07"},
}


@pytest.mark.parametrize("layout", list(PINNED))
def test_output_bytes_are_pinned(tmp_path, layout):
    torch.save(pinned_state_dict(), tmp_path / "pytorch_model.bin")
    out = tmp_path / "out"
    convert(tmp_path / "pytorch_model.bin", "--output-dir", out, "--dtype", "keep",
            *(["--max-shard-size", "4KB"] if layout == "sharded" else []))
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
           if p.name.startswith("model")}
    assert got == PINNED[layout]
