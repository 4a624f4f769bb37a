"""Shard and index reading: which tensors a model folder holds, where, and one tensor at a time.

Headers are parsed by hand (8-byte little-endian length, then JSON) so that a truncated or
malformed file is caught with a clear message before any data is read; tensors are then read
one by one through safetensors' memory map, so peak memory follows one tensor, never a shard.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.cli import InputError, interrupts_deferred
from common.files.atomic import check_regular_file

INDEX_NAME = "model.safetensors.index.json"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
               "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
               "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024
MAX_RANK = 8  # no weight has more dimensions
MAX_DIM = 2**31 - 1  # a dimension past this is a broken header, even on an empty tensor (CSV writes a line per row)


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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a key written twice is an error, not "the last one wins"."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise InputError(f"{dup!r} appears twice")
    return out


def parse_json_bytes(data: bytes, path: Path, what: str, redo: str):
    """JSON from bytes: UTF-8, no key twice, not absurdly nested; else one InputError naming `path`."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: malformed {what} (not UTF-8 JSON): {redo}") from None
    except RecursionError:
        raise InputError(f"{path}: malformed {what} (nested too deeply): {redo}") from None
    except InputError as e:
        raise InputError(f"{path}: malformed {what} ({e}): {redo}") from None


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_name(name: str, path: Path, redo: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{path}: tensor name {name!r} is not valid UTF-8: {redo}") from None


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one .safetensors header; raise InputError naming the file if it is broken.

    Checked as safetensors itself requires: every entry a known dtype, a shape of counts and two
    offsets whose span is the shape's size; the entries tile the data area exactly (no overlap,
    no gap, no trailing bytes); no name twice. The file must be a regular file (a FIFO would block).
    """
    redo = f"download or export {path.name} again"
    check_regular_file(path, redo)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: truncated safetensors file ({size} bytes): {redo}")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise InputError(f"{path}: malformed or truncated safetensors header: {redo}")
        header = parse_json_bytes(f.read(n), path, "safetensors header", redo)
    if not isinstance(header, dict):
        raise InputError(f"{path}: malformed safetensors header (not a JSON object): {redo}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(f"{path}: malformed __metadata__ (must map names to strings): {redo}")
    data_size = size - 8 - n
    infos = {}
    for name, meta in header.items():
        _check_name(name, path, redo)
        bad = InputError(f"{path}: malformed entry for tensor {name!r}: {redo}")
        if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and meta["dtype"] in ITEMSIZE
                and isinstance(meta.get("shape"), list) and isinstance(meta.get("data_offsets"), list)
                and len(meta["data_offsets"]) == 2):
            raise bad
        dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        if not all(_is_count(x) for x in (*shape, begin, end)) or len(shape) > MAX_RANK:
            raise bad
        if any(x > MAX_DIM for x in shape):
            raise InputError(f"{path}: tensor {name!r} has shape {list(shape)}, a dimension past {MAX_DIM}: {redo}")
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise InputError(f"{path}: tensor {name!r} has inconsistent offsets: {redo}")
        if end > data_size:
            raise InputError(
                f"{path}: truncated (tensor {name!r} needs bytes up to {end}, file holds {data_size}): {redo}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, expected, 8 + n + begin)
    at = 0
    for info in sorted(infos.values(), key=lambda i: (i.start, i.nbytes)):
        if info.start - 8 - n != at:
            what = "overlaps another" if info.start - 8 - n < at else "leaves a gap before it"
            raise InputError(f"{path}: tensor {info.name!r} {what} (offsets must tile the data): {redo}")
        at += info.nbytes
    if at != data_size:
        raise InputError(f"{path}: {data_size - at} bytes after the last tensor (a safetensors file has none): {redo}")
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
            if not s.exists():
                raise InputError(f"{model_dir / INDEX_NAME} names {s.name}, which is missing: "
                                 "download the model again")
            check_regular_file(s, "download the model again")
        return shards
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise InputError(f"no .safetensors files in {model_dir}: download the model (0_download_models.py) "
                         "or convert it (convert_to_safetensors.py)")
    return shards


def list_tensors(model_dir: str | Path, names: set[str] | None = None) -> dict[str, TensorInfo]:
    """Every tensor of a model folder, name -> TensorInfo, in file order.

    With an index and `names`, only the shards that hold those names are opened. A name held by
    two shards is an InputError (which one is meant cannot be told).
    """
    model_dir = Path(model_dir)
    shards = shard_files(model_dir)
    weight_map = index_weight_map(model_dir)
    if names is not None and weight_map is not None:
        wanted = {model_dir / weight_map[n] for n in names if n in weight_map}
        shards = [s for s in shards if s in wanted]
    return merge_headers({shard: read_header(shard) for shard in shards})


def merge_headers(headers: dict[Path, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """One name -> TensorInfo over several shards' headers; a tensor in two shards is an InputError."""
    infos: dict[str, TensorInfo] = {}
    for shard, header in headers.items():
        for name, info in header.items():
            if name in infos:
                raise InputError(f"tensor {name!r} is in both {infos[name].shard} and {shard}: "
                                 "which one is meant cannot be told; download the model again")
            infos[name] = info
    return infos


def shard_signature(shards) -> dict[str, dict[str, int]]:
    """file name -> {size, mtime_ns}: changes whenever a shard is replaced or rewritten."""
    return {s.name: {"size": (st := s.stat()).st_size, "mtime_ns": st.st_mtime_ns} for s in shards}


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor (memory-mapped; only its bytes are touched), in its stored dtype."""
    # A SIGINT inside safetensors' native code can come out as ValueError ("could not determine the shape
    # of object type 'torch.storage.UntypedStorage'"): it waits until the call returns (it maps, not reads).
    with interrupts_deferred(), safe_open(str(info.shard), framework="pt") as f:
        return f.get_tensor(info.name)


def head_is_tied(infos: dict[str, TensorInfo]) -> bool:
    """True when the files hold no lm_head.weight: the head reuses model.embed_tokens.weight."""
    return "lm_head.weight" not in infos and "model.embed_tokens.weight" in infos


def index_weight_map(model_dir: str | Path) -> dict[str, str] | None:
    """name -> shard file name from model.safetensors.index.json, or None without an index.

    Lets a caller choose tensors by name before opening any shard. Checked: a JSON object whose
    weight_map maps names to file names inside the model folder (links there are followed).
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if not os.path.lexists(index):
        return None
    redo = "download the model again"
    check_regular_file(index, redo)
    data = parse_json_bytes(index.read_bytes(), index, "index", redo)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: malformed index (no weight_map mapping names to shard files): {redo}")
    for name, shard in weight_map.items():
        _check_name(name, index, redo)
        if not isinstance(shard, str) or not shard:
            raise InputError(f"{index}: weight_map gives {name!r} the shard {shard!r}, not a file name: {redo}")
        _check_inside(model_dir, shard, index)
    return weight_map


def _check_inside(model_dir: Path, shard: str, where: Path) -> None:
    """A shard named by the index must be a path inside the model folder. The file there may be a link
    that leads elsewhere (a snapshot of the HF cache links every file into ../../blobs/): reading follows it."""
    if Path(shard).is_absolute() or ".." in Path(shard).parts or "\\" in shard:
        raise InputError(f"{where}: shard {shard!r} lies outside the model folder {model_dir}: refusing to read it")


# The writer's table (torch -> safetensors name): every dtype safetensors stores that torch has.
SAFETENSORS_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                     torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                     torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's raw little-endian bytes, C order (viewed as uint8: numpy lacks bf16 and fp8)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def write_safetensors_streaming(f, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors,
                                metadata: dict[str, str] | None = None) -> int:
    """Write a .safetensors file to the open binary file `f`, one tensor at a time; return its size.

    `entries` gives (key, dtype, shape) of every tensor up front (the header comes first);
    `tensors` then yields the tensors in the same order, so only one is in memory at a time.
    Data is laid out in the order given (put the widest dtypes first to keep every tensor aligned
    to its item size, as safetensors itself does).
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format allows trailing spaces; the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(head)) + head)
    for (key, dtype, shape), t in zip(entries, tensors, strict=True):
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, the header says {dtype} {shape}")
        f.write(tensor_bytes(t))
        del t  # before the next tensor is made: one in memory at a time
    return 8 + len(head) + offset
