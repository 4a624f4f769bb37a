"""Shard and index reading: which tensors a model folder holds, where, and one tensor at a time.

Headers are parsed by hand (8-byte little-endian length, then JSON) so that a truncated or
malformed file is caught with a clear message before any data is read; tensors are then read
one by one through safetensors' memory map, so peak memory follows one tensor, never a shard.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.cli import InputError

INDEX_NAME = "model.safetensors.index.json"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
               "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
               "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: Path
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    nbytes: int
    start: int  # absolute offset of the tensor's first byte in the shard

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one .safetensors header; raise InputError naming the file if it is broken."""
    redo = f"download or export {path.name} again"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: truncated safetensors file ({size} bytes): {redo}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(f"{path}: malformed or truncated safetensors header: {redo}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}: malformed safetensors header (not JSON): {redo}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: malformed safetensors header: {redo}")
    data_size = size - 8 - n
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            expected = math.prod(shape) * ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: malformed entry for tensor {name!r}: {redo}") from None
        if end - begin != expected or begin < 0:
            raise InputError(f"{path}: tensor {name!r} has inconsistent offsets: {redo}")
        if end > data_size:
            raise InputError(
                f"{path}: truncated (tensor {name!r} needs bytes up to {end}, file holds {data_size}): {redo}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, expected, 8 + n + begin)
    return infos


def shard_files(model_dir: str | Path) -> list[Path]:
    """The shard files a model folder uses: those the index names, else every *.safetensors."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model folder {model_dir} does not exist: run 0_download_models.py first")
    weight_map = index_weight_map(model_dir)
    if weight_map is not None:
        shards = [model_dir / s for s in dict.fromkeys(weight_map.values())]
        for s in shards:
            if not s.is_file():
                raise InputError(f"{model_dir / INDEX_NAME} names {s.name}, which is missing: "
                                 "download the model again")
        return shards
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise InputError(f"no .safetensors files in {model_dir}: download the model (0_download_models.py) "
                         "or convert it (convert_to_safetensors.py)")
    return shards


def list_tensors(model_dir: str | Path, names: set[str] | None = None) -> dict[str, TensorInfo]:
    """Every tensor of a model folder, name -> TensorInfo, in file order.

    With an index and `names`, only the shards that hold those names are opened.
    """
    model_dir = Path(model_dir)
    shards = shard_files(model_dir)
    weight_map = index_weight_map(model_dir)
    if names is not None and weight_map is not None:
        wanted = {model_dir / weight_map[n] for n in names if n in weight_map}
        shards = [s for s in shards if s in wanted]
    infos: dict[str, TensorInfo] = {}
    for shard in shards:
        infos.update(read_header(shard))
    return infos


def shard_signature(shards) -> dict[str, dict[str, int]]:
    """file name -> {size, mtime_ns}: changes whenever a shard is replaced or rewritten."""
    return {s.name: {"size": (st := s.stat()).st_size, "mtime_ns": st.st_mtime_ns} for s in shards}


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor (memory-mapped; only its bytes are touched), in its stored dtype."""
    with safe_open(str(info.shard), framework="pt") as f:
        return f.get_tensor(info.name)


def head_is_tied(infos: dict[str, TensorInfo]) -> bool:
    """True when the files hold no lm_head.weight: the head reuses model.embed_tokens.weight."""
    return "lm_head.weight" not in infos and "model.embed_tokens.weight" in infos


def index_weight_map(model_dir: str | Path) -> dict[str, str] | None:
    """name -> shard file name from model.safetensors.index.json, or None without an index.

    Lets a caller choose tensors by name before opening any shard.
    """
    index = Path(model_dir) / INDEX_NAME
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise InputError(f"{index}: malformed index (no weight_map): download the model again") from None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: malformed index (weight_map is not a mapping): download the model again")
    return weight_map


SAFETENSORS_DTYPE = {v: k for k, v in TORCH_DTYPE.items()}  # torch.bfloat16 -> "BF16", ...


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's raw little-endian bytes (numpy has no bfloat16: go through int16)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def write_safetensors_streaming(f, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors,
                                metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file to the open binary file `f`, one tensor at a time.

    `entries` gives (key, dtype, shape) of every tensor up front (the header comes first);
    `tensors` then yields the tensors in the same order, so only one is in memory at a time.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * ITEMSIZE[SAFETENSORS_DTYPE[dtype]]
        header[key] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors itself writes
    f.write(struct.pack("<Q", len(head)) + head)
    for (key, dtype, shape), t in zip(entries, tensors, strict=True):
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, the header says {dtype} {shape}")
        f.write(tensor_bytes(t))
