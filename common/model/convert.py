"""Checkpoint -> Hugging Face safetensors folder: nanoGPT -> GPT2LMHeadModel, or a plain state dict.

Memory: the output is planned first as a list of OutTensor (name, shape, dtype and a function
that makes the tensor), so every safetensors header is known before any data is written. The
writer then makes one tensor, streams its bytes to the file and drops it: peak memory is the
checkpoint (memory-mapped when it is a zip-format file) plus one converted tensor, whatever the
shard size. The producers pop their source tensors from the state dict, so a checkpoint that had
to be read into memory (legacy format) shrinks as it is written.

Layout (nanoGPT model.py vs transformers' GPT2): nanoGPT's c_attn, c_proj and c_fc are nn.Linear,
weight (out, in); GPT-2's are Conv1D, weight (in, out): they are transposed. nanoGPT with
bias=False has no biases; GPT2 always has them: they are written as zeros, which computes the
same function. nanoGPT's GELU is exact (erf): config.json says activation_function="gelu", not
GPT-2's default "gelu_new" (tanh approximation).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from common.cli import FS_FAULTS, InputError
from common.files.atomic import clean_stale_temps, output_folder, temp_folder
from common.files.safetensors_io import INDEX_NAME, SAFETENSORS_DTYPE, write_safetensors_streaming
from common.model.checkpoint import Checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "keep": None}
SINGLE_NAME = "model.safetensors"
# HF files that make a converted .bin folder usable; copied when they sit beside the checkpoint.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# nanoGPT's prefixes: torch.compile wraps the model (_orig_mod.), DDP wraps it (module.).
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
NANOGPT_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")  # causal masks, not weights
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_EOS = 50256  # <|endoftext|> in the GPT-2 BPE vocabulary nanoGPT trains with (tiktoken "gpt2")


@dataclass
class OutTensor:
    """One tensor of the output, known before it exists: make() returns it, contiguous, in `dtype`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str | int) -> int:
    """Bytes from 123, "500MB", "2GB" (powers of 1000, as transformers) or "1GiB" (powers of 1024)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units or float(m.group(1)) <= 0:
        raise InputError(f"--max-shard-size {text!r} is not a size: use bytes or e.g. 500MB, 2GB, 1GiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def target_dtype(name: str) -> torch.dtype | None:
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def converted(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` contiguous and, if floating, in `dtype`: at most one new tensor (none if it already is)."""
    out_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    if t.dtype == out_dtype and t.is_contiguous():
        return t
    return torch.empty(t.shape, dtype=out_dtype).copy_(t)  # one allocation: cast and layout at once


def out_dtype_of(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if (dtype is not None and t.is_floating_point()) else t.dtype


# ---------------------------------------------------------------------------------------------
# Plans: the output tensors, in order, before any is made.

def plan_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> list[OutTensor]:
    """Every tensor under its own name; tensors sharing storage get their own bytes each."""
    plan = []
    for name, t in sd.items():
        plan.append(OutTensor(name, tuple(t.shape), out_dtype_of(t, dtype),
                              lambda name=name: converted(sd.pop(name), dtype)))
    return plan


def nanogpt_state_dict(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's tensors under nanoGPT's own names: wrapper prefixes stripped, mask buffers dropped."""
    sd, dropped = {}, []
    for key in list(ckpt.state_dict):
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if NANOGPT_BUFFER.match(name):
            dropped.append(key)
            ckpt.state_dict.pop(key)
            continue
        if name in sd:
            raise InputError(f"{ckpt.path}: tensor {name} appears twice (as {key} too): the checkpoint is inconsistent")
        sd[name] = ckpt.state_dict.pop(key)
    return sd, dropped


def plan_nanogpt(ckpt: Checkpoint, dtype: torch.dtype | None, vocab_size: int | None) -> tuple[list[OutTensor], dict]:
    """GPT2LMHeadModel tensors in transformers' order, and facts for config.json / README."""
    sd, dropped = nanogpt_state_dict(ckpt)
    a = ckpt.model_args
    L, d, V, P = int(a["n_layer"]), int(a["n_embd"]), int(a["vocab_size"]), int(a["block_size"])
    if d % int(a["n_head"]):
        raise InputError(f"{ckpt.path}: model_args n_embd={d} is not a multiple of n_head={a['n_head']}")
    V_out = V if vocab_size is None else vocab_size
    if not 0 < V_out <= V:
        raise InputError(f"--vocab-size {vocab_size} must be between 1 and the checkpoint's vocab_size {V} "
                         "(it crops nanoGPT's padded vocabulary, e.g. 50304 -> 50257)")
    # nanoGPT name -> expected shape (nanoGPT layout). Biases only exist with bias=True.
    expect = {"transformer.wte.weight": (V, d), "transformer.wpe.weight": (P, d), "lm_head.weight": (V, d),
              "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    for i in range(L):
        h = f"transformer.h.{i}."
        expect |= {h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
                   h + "attn.c_attn.weight": (3 * d, d), h + "attn.c_attn.bias": (3 * d,),
                   h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
                   h + "mlp.c_fc.weight": (4 * d, d), h + "mlp.c_fc.bias": (4 * d,),
                   h + "mlp.c_proj.weight": (d, 4 * d), h + "mlp.c_proj.bias": (d,)}
    unknown = [k for k in sd if k not in expect]
    if unknown:
        raise InputError(f"{ckpt.path}: {unknown[0]} (and {len(unknown) - 1} more) is not a tensor of nanoGPT's GPT "
                         f"with n_layer={L}: a modified model needs its own conversion; convert its state dict "
                         "as a plain one instead")
    for name, shape in expect.items():
        if name in sd and tuple(sd[name].shape) != shape:
            raise InputError(f"{ckpt.path}: {name} has shape {tuple(sd[name].shape)}, model_args say {shape}: "
                             "fix model_args or the checkpoint")
        if name not in sd and not name.endswith(".bias"):
            raise InputError(f"{ckpt.path}: nanoGPT tensor {name} is missing: the checkpoint is incomplete")
    if "lm_head.weight" not in sd:  # nanoGPT always saves both; tolerate a deduplicated file
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    wte, head = sd["transformer.wte.weight"], sd["lm_head.weight"]
    tied = wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr() and wte.stride() == head.stride() \
        and wte.storage_offset() == head.storage_offset()
    tied = tied or bool(torch.equal(wte, head))
    ref_dtype = out_dtype_of(wte, dtype)

    def take(name: str, transpose: bool = False, rows: int | None = None) -> OutTensor:
        src = sd[name]
        shape = tuple(src.shape)
        if rows is not None:
            shape = (rows,) + shape[1:]
        if transpose:
            shape = shape[::-1]

        def make() -> torch.Tensor:
            t = sd.pop(name)
            t = t[:rows] if rows is not None else t  # crop the padded vocabulary (a view, no copy)
            return converted(t.t() if transpose else t, dtype)  # (out, in) -> (in, out): Conv1D
        return OutTensor(name, shape, out_dtype_of(src, dtype), make)

    def zeros_or_take(name: str, n: int) -> OutTensor:
        if name in sd:
            return take(name)
        return OutTensor(name, (n,), ref_dtype, lambda: torch.zeros(n, dtype=ref_dtype))

    plan = [take("transformer.wte.weight", rows=V_out), take("transformer.wpe.weight")]
    zero_biases = sum(1 for k, s in expect.items() if k.endswith(".bias") and k not in sd)
    for i in range(L):
        h = f"transformer.h.{i}."
        for part, n in (("ln_1", d), ("attn.c_attn", 3 * d), ("attn.c_proj", d), ("ln_2", d),
                        ("mlp.c_fc", 4 * d), ("mlp.c_proj", d)):
            plan.append(take(h + part + ".weight", transpose=(part + ".weight") in CONV1D))
            plan.append(zeros_or_take(h + part + ".bias", n))
    plan += [take("transformer.ln_f.weight"), zeros_or_take("transformer.ln_f.bias", d),
             take("lm_head.weight", rows=V_out)]
    facts = {"n_layer": L, "n_head": int(a["n_head"]), "n_embd": d, "vocab_size": V_out, "source_vocab_size": V,
             "block_size": P, "bias": bool(a.get("bias", True)), "dropout": float(a.get("dropout", 0.0)),
             "tied": tied, "dtype": str(ref_dtype).removeprefix("torch."), "dropped": dropped,
             "transposed": 4 * L, "zero_biases": zero_biases}
    return plan, facts


def gpt2_config(facts: dict) -> dict:
    """config.json of a GPT2LMHeadModel that computes what nanoGPT's GPT computes."""
    V = facts["vocab_size"]
    eos = GPT2_EOS if V > GPT2_EOS else None
    p = facts["dropout"]
    return {
        "activation_function": "gelu",  # nanoGPT: nn.GELU(), exact erf (GPT-2's default gelu_new is tanh)
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": p, "embd_pdrop": p, "resid_pdrop": p,
        "bos_token_id": eos, "eos_token_id": eos,
        "dtype": facts["dtype"],
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,  # nanoGPT's F.layer_norm eps
        "model_type": "gpt2",
        "n_embd": facts["n_embd"], "n_head": facts["n_head"], "n_inner": None,  # 4 * n_embd, as nanoGPT
        "n_layer": facts["n_layer"], "n_positions": facts["block_size"],
        "reorder_and_upcast_attn": False, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
        "tie_word_embeddings": facts["tied"],
        "use_cache": True,
        "vocab_size": V,
    }


def gpt2_tokenizer_config(facts: dict) -> dict:
    """GPT-2 BPE, as nanoGPT's prepare.py (tiktoken "gpt2"); vocab.json/merges.txt are not included."""
    cfg = {"model_max_length": facts["block_size"], "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
    if facts["vocab_size"] > GPT2_EOS:
        cfg |= {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return cfg


# ---------------------------------------------------------------------------------------------
# Writing: streamed safetensors files, shards + index, one folder renamed into place.

def shard_plan(plan: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Greedy, in order, as transformers shards: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[int], None] | None = None) -> None:
    """Write a .safetensors file tensor by tensor: the header from the plan, then each tensor's bytes."""
    for t in tensors:
        if t.dtype not in SAFETENSORS_DTYPE:
            raise InputError(f"tensor {t.name} has dtype {t.dtype}, which safetensors cannot store: "
                             "convert it to a float or integer dtype first")
    # Widest dtypes first, so every tensor's data starts aligned to its item size (as safetensors does).
    tensors = sorted(tensors, key=lambda t: -t.dtype.itemsize)

    def made():
        for t in tensors:
            x = t.make()
            yield x
            del x  # written: dropped before the next one is made
            if on_tensor:
                on_tensor(t.nbytes)
    with open(path, "wb") as f:
        size = write_safetensors_streaming(f, [(t.name, t.dtype, t.shape) for t in tensors], made(),
                                           metadata={"format": "pt", **(metadata or {})})
    if os.path.getsize(path) != size:
        raise AssertionError(f"{path}: wrote {os.path.getsize(path)} bytes, expected {size}")


def write_weights(folder: Path, plan: list[OutTensor], max_shard_size: int,
                  on_tensor: Callable[[int], None] | None = None) -> list[Path]:
    """model.safetensors, or model-0000K-of-0000N.safetensors + model.safetensors.index.json."""
    names = [t.name for t in plan]
    if len(set(names)) != len(names):
        raise AssertionError("duplicate tensor names in the plan")
    shards = shard_plan(plan, max_shard_size)
    if len(shards) == 1:
        path = folder / SINGLE_NAME
        write_safetensors(path, shards[0], on_tensor=on_tensor)
        return [path]
    n = len(shards)
    written, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        path = folder / f"model-{k:05d}-of-{n:05d}.safetensors"
        weight_map |= {t.name: path.name for t in shard}
        write_safetensors(path, shard, on_tensor=on_tensor)
        written.append(path)
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return written + [folder / INDEX_NAME]


def check_output_dir(output_dir: Path, checkpoint: Path, force: bool) -> None:
    """Refuse to touch a folder that holds files unless force; never a folder that holds the checkpoint."""
    output_folder(output_dir, input_files=[checkpoint], flag="--out-dir", create=False)
    if Path.cwd().is_relative_to(output_dir.resolve()):  # replacing it would leave the shell in a deleted folder
        raise InputError(f"--out-dir {output_dir} is (or contains) the current folder, which the converter "
                         "replaces as a whole: give the name of a new folder, e.g. --out-dir model")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise InputError(f"--out-dir {output_dir} already holds files: pass --force to replace the folder, "
                         "or choose another --out-dir")


def build_folder(output_dir: Path, fill: Callable[[Path], None], force: bool) -> None:
    """Build the folder under a temporary name beside output_dir; rename it into place only when complete.

    With force, an existing output_dir is moved aside first and deleted only after the rename. The
    temporary folders are mkdtemp's (random names); those of a killed run are removed here next time.
    """
    output_dir = output_dir.resolve()  # "." works too: its parent receives the temporary folder
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(output_dir.parent, output_dir.name)
        with temp_folder(output_dir) as tmp:
            fill(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp's private mode would outlive the rename
            if output_dir.is_dir() and not any(output_dir.iterdir()):
                output_dir.rmdir()
            elif output_dir.exists():
                if not force:  # appeared while we were writing
                    raise InputError(f"--out-dir {output_dir} appeared while converting: pass --force or choose another")
                with temp_folder(output_dir) as old:
                    os.replace(output_dir, old)
                    os.replace(tmp, output_dir)
                return
            os.replace(tmp, output_dir)
    except OSError as e:
        if e.errno in FS_FAULTS:
            raise InputError(f"cannot write {e.filename or output_dir}: {os.strerror(e.errno)}: free some space "
                             "or choose another --out-dir") from None
        raise


def copy_side_files(checkpoint: Path, folder: Path) -> list[str]:
    """config.json and tokenizer files beside a converted .bin/.pt (a Hugging Face folder), if any."""
    copied = []
    for name in SIDE_FILES:
        src = checkpoint.parent / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    return copied


def model_card(checkpoint: Path, output_dir: Path, kind: str, command: str, settings: dict, facts: dict | None,
               extras: dict) -> str:
    """README.md of the converted folder: where it came from and how it was converted."""
    lines = [f"# {output_dir.name}", "",
             f"Converted from `{checkpoint}` ({kind}) by llama-xray's convert_to_safetensors.py:", "",
             f"    {command}", ""]
    lines += [f"- {k}: `{v}`" for k, v in settings.items()]
    if facts is not None:
        lines += ["", "## nanoGPT -> GPT2LMHeadModel", "",
                  f"- n_layer {facts['n_layer']}, n_head {facts['n_head']}, n_embd {facts['n_embd']}, "
                  f"block_size {facts['block_size']} (n_positions), vocab_size {facts['vocab_size']}"
                  + (f" (cropped from {facts['source_vocab_size']})" if facts['vocab_size'] != facts['source_vocab_size'] else ""),
                  f"- c_attn, c_proj, c_fc weights transposed from nn.Linear (out, in) to Conv1D (in, out): {facts['transposed']}",
                  f"- bias={facts['bias']}: {facts['zero_biases']} zero biases written (GPT2 always has biases)",
                  f"- causal-mask buffers dropped: {len(facts['dropped'])}",
                  f"- lm_head tied to wte: {facts['tied']} (both are stored)",
                  "- activation_function gelu (exact erf, as nanoGPT's nn.GELU), layer_norm_epsilon 1e-5",
                  "", "Tokenizer: nanoGPT's GPT-2 BPE (tiktoken `gpt2`). vocab.json and merges.txt are not included: "
                  "copy them from `openai-community/gpt2`, e.g. "
                  f"`AutoTokenizer.from_pretrained('openai-community/gpt2').save_pretrained('{output_dir}')`. "
                  "A character-level model (shakespeare_char) has its own vocabulary in nanoGPT's meta.pkl."]
    if extras:
        lines += ["", "## Training state (from the checkpoint)", ""]
        for k in ("iter_num", "best_val_loss"):
            if k in extras:
                v = extras[k]
                lines.append(f"- {k}: {v.item() if isinstance(v, torch.Tensor) else v}")
        if isinstance(extras.get("config"), dict):
            lines += ["", "```json", json.dumps(extras["config"], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"
