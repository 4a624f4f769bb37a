"""Loading PyTorch checkpoints safely, and telling what kind of checkpoint a file holds.

torch.load is only ever called with weights_only=True: its unpickler rebuilds tensors and plain
containers (dict, list, tuple, str, int, float, bool, None) and refuses every other global, so a
file that needs arbitrary code to unpickle is refused before any of that code runs. Zip-format
files (torch.save since 1.6) are memory-mapped (mmap=True): the tensors stay in the page cache,
backed by the file, and only the tensor being converted is ever copied into memory.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import InputError

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Containers that wrap a state dict: Lightning .ckpt files, many training scripts.
STATE_DICT_KEYS = ("state_dict", "model_state_dict")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since PyTorch 1.6 is a zip archive
PICKLE_PROTO = b"\x80"  # first byte of a pickle of protocol >= 2, which torch.save's legacy format writes
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
NANOGPT_LAYER = re.compile(r"^(?:_orig_mod\.|module\.)*transformer\.h\.(\d+)\.")  # wrapper prefixes allowed


@dataclass
class Checkpoint:
    """What a checkpoint file holds: `kind` is "nanogpt" or "state_dict"."""

    path: Path
    kind: str
    state_dict: dict[str, torch.Tensor]
    model_args: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # nanoGPT's iter_num, best_val_loss, config
    mmapped: bool = False


def load_checkpoint(path: str | Path) -> Checkpoint:
    """torch.load (weights_only, mmap where the format allows) and classify; InputError on bad input."""
    path = Path(path)
    obj, mmapped = load_weights_only(path)
    ckpt = classify(path, obj)
    ckpt.mmapped = mmapped
    return ckpt


def load_weights_only(path: Path) -> tuple[object, bool]:
    """The unpickled object and whether it is memory-mapped. Never runs code from the file."""
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist: give the path to a .pt/.pth/.bin/.ckpt file")
    if path.is_dir():
        raise InputError(f"{path} is a folder: give the checkpoint file inside it (e.g. {path}/ckpt.pt)")
    if path.suffix == ".safetensors":
        raise InputError(f"{path} is already safetensors: put it in a model folder and use it directly")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes): save or copy the checkpoint again")
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format; legacy files are read into memory
    if not mmap:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == ZIP_MAGIC:
            raise InputError(f"{path}: truncated or corrupt (a zip checkpoint without its central directory): "
                             "save or copy it again")
        if head[:1] != PICKLE_PROTO:
            raise InputError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle): "
                             "give the .pt/.pth/.bin/.ckpt file that torch.save wrote")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), mmap
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise InputError(
                f"{path}: refused: unpickling it needs code beyond tensors and plain containers "
                f"({_unpickler_reason(e)}); torch.load(weights_only=True) never runs code from an untrusted "
                "file: if you trust it, re-save its state dict with torch.save(model.state_dict(), ...), "
                "else check the file is a complete checkpoint"
            ) from None
        raise InputError(f"{path}: not a PyTorch checkpoint or truncated ({_one_line(e)}): save or copy it again") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a PyTorch checkpoint or truncated ({_one_line(e)}): save or copy it again") from None


def classify(path: Path, obj: object) -> Checkpoint:
    """nanoGPT ({"model", "model_args", ...}) or a plain state dict ({name: tensor}, maybe wrapped)."""
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a dict of tensors: save model.state_dict() instead")
    if "model" in obj and isinstance(obj["model"], dict):
        if not isinstance(obj.get("model_args"), dict):
            raise InputError(f"{path} looks like a nanoGPT checkpoint (has 'model') but has no 'model_args' dict: "
                             "save it with nanoGPT's train.py, or save the bare state dict to convert it as one")
        args = obj["model_args"]
        missing = [a for a in NANOGPT_ARGS if a not in args]
        if missing:
            raise InputError(f"{path}: nanoGPT model_args lacks {', '.join(missing)}: add them to model_args and save again")
        extras = {k: obj[k] for k in ("iter_num", "best_val_loss", "config") if k in obj}
        sd = _tensors_only(path, obj["model"], "['model']")
        check_model_args(path, args, sd)
        return Checkpoint(path, "nanogpt", sd, dict(args), extras)
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], dict):
            return Checkpoint(path, "state_dict", _tensors_only(path, obj[key], f"[{key!r}]"))
    return Checkpoint(path, "state_dict", _tensors_only(path, obj, ""))


def _tensors_only(path: Path, sd: dict, where: str) -> dict[str, torch.Tensor]:
    bad = [k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not sd or bad:
        what = f"non-tensor entries {bad[:5]}" if bad else "no tensors"
        raise InputError(f"{path}{where} is not a state dict ({what}): expected {{name: tensor}}, a nanoGPT "
                         f"checkpoint or a dict with one of {', '.join(STATE_DICT_KEYS)}")
    # Only dense tensors have bytes to write as they are; a sparse or quantized layout would need converting.
    odd = [f"{k} ({v.layout})" for k, v in sd.items() if v.layout != torch.strided or v.is_quantized or v.is_meta]
    if odd:
        raise InputError(f"{path}{where}: {odd[0]} is not a dense tensor"
                         f"{f' (and {len(odd) - 1} more)' if len(odd) > 1 else ''}: save it with .to_dense() "
                         "(or dequantized) and convert again")
    return sd


def check_model_args(path: Path, args: dict, sd: dict[str, torch.Tensor]) -> None:
    """nanoGPT's model_args: positive integers, n_embd a multiple of n_head, n_layer the layers the state
    dict holds. Checked before any plan is made (n_layer = 10**9 would otherwise plan 10**9 layers)."""
    for key in NANOGPT_ARGS:
        v = args[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{path}: nanoGPT model_args {key}={v!r} is not a positive integer: fix model_args")
    if args["n_embd"] % args["n_head"]:
        raise InputError(f"{path}: model_args n_embd={args['n_embd']} is not a multiple of n_head={args['n_head']}")
    if not isinstance(args.get("bias", True), bool):
        raise InputError(f"{path}: nanoGPT model_args bias={args['bias']!r} is not true or false: fix model_args")
    layers = {int(m.group(1)) for k in sd if (m := NANOGPT_LAYER.match(k))}
    if len(layers) != args["n_layer"] or (layers and (min(layers), max(layers)) != (0, args["n_layer"] - 1)):
        held = f"layers 0..{max(layers)}" if layers else "no layers"
        raise InputError(f"{path}: model_args n_layer={args['n_layer']} but the state dict holds {held}: "
                         "fix model_args or the checkpoint")


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's long weights_only message that names the refused global or opcode."""
    for line in str(e).splitlines():
        line = line.strip()
        if "unsupported" in line.lower():
            return line.split("WeightsUnpickler error: ")[-1].split(" was not an allowed")[0].rstrip(".")[:200]
    return "an object that is not a tensor or plain container"


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]
