"""Step 1's logic: choose tensors from a model folder and export them, one tensor at a time.

Selection: a callable on the name (NAME_FILTER), a regex (--filter, re.search), and a layer
prefix (--layer, matched at a dot boundary: `model.layers.1` takes `model.layers.1.*`, never
`model.layers.12.*`). With an index the names come from it, so only the shards that hold
selected tensors are ever opened; every tensor is then read on its own (memory follows the
largest selected tensor and its float32 copy, never the shard or the model).

Files: csv/txt/npy/ckpt/safetensors, one per tensor, `<OUT_DIR>/<name>.<ext>` with the name
sanitised (see safe_file_name). With --layer and ckpt/safetensors: one file `<PREFIX>.<ext>`
whose keys have the prefix stripped. Every file is written atomically and recorded in
manifest.json (common/files/manifest.py); a rerun skips files that still match their source.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from common.cli import InputError, Interrupted, interrupts_deferred
from common.files import manifest
from common.files.atomic import atomic_file, clean_stale_temps, sha256_stream
from common.files.csv_io import write_numbers
from common.files.safetensors_io import (TORCH_DTYPE, TensorInfo, head_is_tied, index_weight_map,
                                   list_tensors, read_tensor, shard_signature,
                                   write_safetensors_streaming)

FORMATS = {"csv": ".csv", "txt": ".txt", "npy": ".npy", "safetensors": ".safetensors", "ckpt": ".ckpt"}
TEXT_FORMATS = ("csv", "txt")
LAYER_FILE_FORMATS = ("ckpt", "safetensors")  # with --layer: one file for the whole prefix
# None keeps the float32 values of the source; "source" keeps the stored dtype as it is.
DTYPES = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "source": "source"}
UNSAFE_CHARS = set('/\\%:*?"<>|')
MAX_NAME_BYTES = 200  # file systems allow 255; leave room for the extension and the temp prefix

NameFilter = Callable[[str], bool]


# --- selection -------------------------------------------------------------------------------


def regex_filter(pattern: str) -> NameFilter:
    """--filter REGEX: keep the names the regex matches anywhere (re.search)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise InputError(f"--filter {pattern!r} is not a valid regular expression ({e})") from None

    def keep(name: str) -> bool:
        return rx.search(name) is not None
    keep.description = f"regex {pattern!r}"
    return keep


def layer_matches(name: str, prefix: str) -> bool:
    """`name` lies under `prefix` at a dot boundary: model.layers.1 never takes model.layers.12.*."""
    return name.startswith(prefix.rstrip(".") + ".")


def describe_filter(name_filter: NameFilter | None) -> str:
    if name_filter is None:
        return "None (all tensors)"
    return getattr(name_filter, "description", f"NAME_FILTER callable {getattr(name_filter, '__name__', '')}")


def check_choices(fmt: str, dtype: str | None, layer: str | None) -> None:
    """Reject an unknown format or dtype, or a dtype a format cannot hold, before anything is read."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: use one of float16, bfloat16, float32, source")
    if fmt in TEXT_FORMATS and dtype not in (None, "float32"):
        raise InputError(f"--dtype {dtype} does not apply to {fmt}: text files always hold the exact "
                         "float32 values; use --format npy, safetensors or ckpt to convert")
    if fmt == "npy" and dtype == "bfloat16":
        raise InputError("numpy has no bfloat16: use --dtype float16/float32 with npy, or --format safetensors/ckpt")
    if layer is not None and not layer.strip("."):
        raise InputError(f"--layer {layer!r} is empty: give a prefix such as model.layers.8")


def select_tensors(model_dir: Path, name_filter: NameFilter | None, layer: str | None) -> list[TensorInfo]:
    """The selected tensors in file order; only the shards that hold them are opened (with an index)."""
    def wanted(name: str) -> bool:
        return (layer is None or layer_matches(name, layer)) and (name_filter is None or name_filter(name))

    weight_map = index_weight_map(model_dir)
    if weight_map is not None:
        names = {n for n in weight_map if wanted(n)}
        infos = list_tensors(model_dir, names=names) if names else {}
        missing = sorted(names - infos.keys())
        if missing:
            raise InputError(f"{model_dir}: the index puts {missing[0]!r} in {weight_map[missing[0]]}, "
                             "which does not hold it: download the model again")
    else:
        infos = list_tensors(model_dir)
        names = {n for n in infos if wanted(n)}
    selected = [info for name, info in infos.items() if name in names]
    if not selected:
        what = " and ".join(x for x in (layer and f"--layer {layer}",
                                        name_filter and f"filter {describe_filter(name_filter)}") if x)
        hint = ""
        if wanted("lm_head.weight") and head_is_tied(dict.fromkeys(weight_map or infos)):
            hint = " (the head is tied: its weights are model.embed_tokens.weight)"
        raise InputError(f"no tensor in {model_dir} matches {what or 'the selection'}{hint}: "
                         "run with --list to see the names")
    return selected


def listing(model_dir: Path, infos: list[TensorInfo], tied: bool) -> str:
    """--list: one line per tensor (name, shape, dtype, shard), then totals and the head's status."""
    lines = []
    width = max(len(repr(i.name)) for i in infos)
    for i in infos:
        shown = i.name if i.name.isprintable() else repr(i.name)
        lines.append(f"{shown:<{width}}  {str(list(i.shape)):<16} {i.dtype:<5} {i.shard.name}")
    values = sum(i.numel for i in infos)
    lines.append(f"{len(infos)} tensors, {values:,} values, {sum(i.nbytes for i in infos) / 1e9:.2f} GB "
                 f"in {len({i.shard for i in infos})} shard(s)")
    lines.append("head: tied to model.embed_tokens.weight (no lm_head.weight in the files)" if tied
                 else "head: lm_head.weight is stored" if any(i.name == "lm_head.weight" for i in infos)
                 else "head: not in this selection")
    return "\n".join(lines)


# --- file names ------------------------------------------------------------------------------


def _escape(c: str) -> str:
    if c in UNSAFE_CHARS or not c.isprintable() or "\ud800" <= c <= "\udfff":
        return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
    return c


def safe_file_name(name: str) -> str:
    """A file name for a tensor name that can never leave OUT_DIR, and tells names apart.

    Ordinary names are kept as they are. `/`, `\\`, `%`, control characters and a few
    characters Windows rejects are %-escaped (so `a/b` -> `a%2Fb`, and `%` itself -> `%25`,
    which keeps different names different), leading dots too (no `..`, no hidden files), and
    an over-long name is cut and given a hash of the whole name.
    """
    out = "".join(map(_escape, name))
    stripped = out.lstrip(".")
    out = "%2E" * (len(out) - len(stripped)) + stripped
    if not out:
        out = "%"  # the empty name; `%` alone never comes out of the escaping above
    if len(out.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        out = out.encode()[:MAX_NAME_BYTES - 17].decode(errors="ignore") + "~" + digest
    return out


def _inside(out_dir: Path, file_name: str) -> Path:
    """A guard that safe_file_name did its job: one plain, visible name directly in out_dir."""
    if "/" in file_name or os.sep in file_name or "\0" in file_name or file_name.startswith("."):
        raise InputError(f"refusing to write {file_name!r}: not a plain file name inside {out_dir}")
    return out_dir / file_name


# --- planning --------------------------------------------------------------------------------


@dataclass
class Job:
    """One output file and the tensors it holds, as (key in the file, source tensor)."""
    file_name: str
    members: list[tuple[str, TensorInfo]]
    entry: dict = field(default_factory=dict)  # the manifest entry it will have (less bytes/sha256)

    @property
    def values(self) -> int:
        return sum(info.numel for _, info in self.members)

    @property
    def source_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.members)


def written_dtype(info: TensorInfo, dtype: str | None, fmt: str) -> torch.dtype:
    source = TORCH_DTYPE.get(info.dtype)
    if source is None:
        raise InputError(f"{info.shard}: tensor {info.name!r} has dtype {info.dtype}, which torch cannot read")
    if fmt in TEXT_FORMATS or dtype is None:
        return torch.float32 if source.is_floating_point or fmt in TEXT_FORMATS else source
    return source if dtype == "source" else DTYPES[dtype]


def plan(model_dir: Path, infos: list[TensorInfo], fmt: str, dtype: str | None, layer: str | None) -> list[Job]:
    ext = FORMATS[fmt]
    if layer is not None and fmt in LAYER_FILE_FORMATS:
        prefix = layer.rstrip(".")
        jobs = [Job(safe_file_name(prefix) + ext, [(i.name[len(prefix) + 1:], i) for i in infos])]
    else:
        jobs = [Job(safe_file_name(i.name) + ext, [(i.name, i)]) for i in infos]
    seen: dict[str, str] = {}
    for job in jobs:  # the escaping keeps names apart; only the hash of a cut name could collide
        first = job.members[0][1].name
        if seen.setdefault(job.file_name, first) != first:
            raise InputError(f"tensors {seen[job.file_name]!r} and {first!r} would share the file {job.file_name}")
    for job in jobs:
        shards = dict.fromkeys(info.shard for _, info in job.members)
        dtypes = {str(written_dtype(info, dtype, fmt)).removeprefix("torch.") for _, info in job.members}
        job.entry = {
            "format": fmt,
            "dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
            "tensors": [{"name": info.name, "key": key, "shape": list(info.shape), "source_dtype": info.dtype,
                         "shard": info.shard.name, "offsets": [info.start, info.start + info.nbytes]}
                        for key, info in job.members],
            "sources": shard_signature(shards),
            "model_dir": str(model_dir.resolve()),
        }
    return jobs


# --- writing ---------------------------------------------------------------------------------


def _load(info: TensorInfo, dtype: str | None, fmt: str) -> torch.Tensor:
    """The tensor as it will be written; for csv/txt, bf16/fp16 stay as they are (the CSV writer
    widens them chunk by chunk, exactly, so no float32 copy of the whole tensor is made)."""
    t = read_tensor(info)
    target = written_dtype(info, dtype, fmt)
    if fmt in TEXT_FORMATS and t.dtype in (torch.bfloat16, torch.float16):
        return t
    if fmt in TEXT_FORMATS and not t.dtype.is_floating_point:
        widened = t.to(torch.float32)
        if not torch.equal(widened.to(t.dtype), t):
            raise InputError(f"{info.shard}: tensor {info.name!r} ({info.dtype}) has values float32 cannot hold "
                             "exactly: export it with --format npy, safetensors or ckpt")
        return widened
    return t if t.dtype == target else t.to(target)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """CSV holds at most 2-D: higher ranks become (shape[0], rest); the manifest keeps the shape."""
    return t.reshape(t.shape[0], -1) if t.dim() > 2 else t  # (d0, d1, ...) -> (d0, d1*...)


def write_job(path: Path, job: Job, fmt: str, dtype: str | None, on_values: Callable[[int], None]) -> tuple[int, str]:
    """Write one file atomically; return (bytes, sha256)."""
    if fmt in TEXT_FORMATS:
        (_, info), = job.members
        t = _as_matrix(_load(info, dtype, fmt))
        # As stored: the CSV workers map the values straight from the shard (no copy of the tensor).
        as_stored = t.dtype == TORCH_DTYPE[info.dtype]
        return write_numbers(path, t, "," if fmt == "csv" else " ", sha256=True, on_chunk=on_values,
                             file_slice=(info.shard, job.entry["tensors"][0]["offsets"][0]) if as_stored else None)
    with atomic_file(path) as f:
        if fmt == "npy":
            (_, info), = job.members
            np.save(f, _load(info, dtype, fmt).numpy(), allow_pickle=False)
            on_values(info.numel)
        elif fmt == "ckpt":  # torch.save needs the whole state dict at once
            state = {}
            for key, info in job.members:
                state[key] = _load(info, dtype, fmt)
                on_values(info.numel)
            torch.save(state, f)
            del state
        else:  # safetensors: header first, then tensor by tensor
            entries = [(key, written_dtype(info, dtype, fmt), info.shape) for key, info in job.members]

            def tensors():
                for _, info in job.members:
                    yield _load(info, dtype, fmt)
                    on_values(info.numel)
            write_safetensors_streaming(f, entries, tensors(), metadata={"format": "pt"})
        f.flush()
        f.seek(0)
        return os.fstat(f.fileno()).st_size, sha256_stream(f)


@dataclass
class Summary:
    tensors: int = 0
    values: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def line(self) -> str:
        rate = self.values / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return (f"exported {self.tensors} tensors, {self.values:,} values, {self.bytes / 1e9:.2f} GB "
                f"in {self.seconds:.2f} s ({rate:.1f} M values/s)")


def export(model_dir: Path, out_dir: Path, fmt: str, dtype: str | None, jobs: list[Job], force: bool = False,
           progress: bool | None = None) -> Summary:
    """Write every job's file into out_dir (skipping unchanged ones unless force), recording each in the manifest.
    Ctrl-C: Interrupted, saying how many files are in place; the file being written is dropped with its entry."""
    summary = Summary()
    current = None  # the job being written: after a Ctrl-C its file may be in place without its entry
    bar = None
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create {out_dir}: {e.strerror}: choose another --out-dir") from None
        clean_stale_temps(out_dir)
        recorded = manifest.read_manifest(out_dir)
        todo = []
        for job in jobs:
            if not force and manifest.still_matches(out_dir, job.file_name, job.entry, recorded.get(job.file_name)):
                summary.skipped.append(job.file_name)
            else:
                todo.append(job)
        n_tensors = sum(len(j.members) for j in todo)
        # progress None: a bar only on a terminal (tqdm's own rule); True/False force it on/off.
        bar = tqdm(total=sum(j.source_bytes for j in todo), unit="B", unit_scale=True, desc="export",
                   disable=None if progress is None else not progress, dynamic_ncols=True)
        start = time.perf_counter()
        for job in todo:
            current, path = job, _inside(out_dir, job.file_name)
            bytes_per_value = job.source_bytes / max(1, job.values)

            def on_values(n: int) -> None:
                bar.update(round(n * bytes_per_value))
            nbytes, sha = write_job(path, job, fmt, dtype, on_values)  # write faults: one line (common.files.atomic)
            with interrupts_deferred():  # the file and its entry, together
                manifest.record(out_dir, {job.file_name: {**job.entry, "bytes": nbytes, "sha256": sha}})
            current = None
            summary.tensors += len(job.members)
            summary.values += job.values
            summary.bytes += nbytes
            summary.files.append(job.file_name)
            bar.set_postfix_str(f"{summary.tensors}/{n_tensors} tensors")
    except KeyboardInterrupt:
        with interrupts_deferred():
            if current is not None:  # neither the file nor its entry is vouched for: drop both
                manifest.forget(out_dir, current.file_name)
        kept = len(summary.skipped) + len(summary.files)
        raise Interrupted(f"{kept} of {len(jobs)} file(s) are in {out_dir}, each listed in its manifest; "
                          "rerun to write the rest") from None
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
