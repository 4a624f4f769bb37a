"""Step 1's --quant: each quantized linear's weight as its integers and scales, computed in numpy.

    <name>.q.csv       int8 values (int4 schemes: in [-8, 7]) as plain integers, shape (N, K)
    <name>.scale.csv   float32 scales, exact (the CSV format of every other tensor), (N, 1) or (N, K/group)

`name` is the linear's weight (`model.layers.0.self_attn.q_proj.weight`; with --quant-head on a tied
model `lm_head.weight`, quantized from model.embed_tokens.weight, which is still written as float).
Every other selected tensor (norms, biases, the embedding) is written as without --quant. The
values are bit-identical to torchao's qdata and scale (common/quant/quantize.py); each file's
manifest entry carries the scheme under "quant" (scheme, bits, granularity, group size, range,
rounding, quant_head, torchao config, role q|scale).
"""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


from common.files import manifest
from common.files.atomic import clean_stale_temps
from common.cli import InputError
from common.files.csv_io import cpu_workers
from common.files.int_csv import Q_SUFFIX, SCALE_SUFFIX, write_csv_exact
from common.files.export import Summary, _inside, safe_file_name
from common.quant.quantize import quantize_weight
from common.quant.schemes import HEAD, Scheme, check_group, quantized_module
from common.files.safetensors_io import TensorInfo, read_tensor, shard_signature


def weight_name(module: str) -> str:
    return f"{module}.weight"


def split(infos: list[TensorInfo], scheme: Scheme, quant_head: bool, tied: bool) -> tuple[list[TensorInfo], dict[str, TensorInfo]]:
    """(tensors written as floats, {quantized weight name: its source tensor}), the group size checked
    against every quantized tensor before anything is read or written."""
    floats, quantized = [], {}
    for info in infos:
        module = info.name.removesuffix(".weight")
        if info.name.endswith(".weight") and quantized_module(module, quant_head):
            quantized[info.name] = info
        else:
            floats.append(info)
            if quant_head and tied and info.name == "model.embed_tokens.weight":
                quantized[weight_name(HEAD)] = info  # the tied head: quantized from the embedding
    for name, info in quantized.items():
        if len(info.shape) != 2:
            raise InputError(f"{info.shard}: {info.name} has shape {list(info.shape)}, not a linear's (out, in)")
        try:
            check_group(scheme.head() if name == weight_name(HEAD) else scheme, info.shape[1], name)
        except ValueError as e:
            raise InputError(f"--quant {e}") from None
    return floats, quantized


def _entry(model_dir: Path, name: str, info: TensorInfo, dtype: str, quant: dict) -> dict:
    return {"format": "csv", "dtype": dtype,
            "tensors": [{"name": name, "key": name, "shape": list(info.shape), "source_name": info.name,
                         "source_dtype": info.dtype, "shard": info.shard.name,
                         "offsets": [info.start, info.start + info.nbytes]}],
            "sources": shard_signature([info.shard]), "model_dir": str(model_dir.resolve()), "quant": quant}


def _write_one(task: tuple[Path, TensorInfo, Scheme, str]) -> tuple[int, int, str, int, str]:
    """Read one weight, quantize it, write its two files: (values, q bytes, q sha256, scale bytes, scale sha256)."""
    out_dir, info, scheme, base = task
    w = read_tensor(info)
    if not w.dtype.is_floating_point:
        raise InputError(f"{info.shard}: {info.name} is {info.dtype}, not a float weight: it cannot be quantized")
    q, scale = quantize_weight(w.float().numpy(), scheme)  # int8 (N, K), float32 (N, G)
    nq, sha_q = write_csv_exact(_inside(out_dir, base + Q_SUFFIX), q)
    ns, sha_s = write_csv_exact(_inside(out_dir, base + SCALE_SUFFIX), scale)
    return q.size, nq, sha_q, ns, sha_s


def _pool(n_tasks: int) -> ProcessPoolExecutor | None:
    """Forked workers, one per core (tensors are independent; torch and the shards are shared pages)."""
    workers = min(cpu_workers(), n_tasks)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) if workers > 1 else None


def export_quantized(model_dir: Path, out_dir: Path, quantized: dict[str, TensorInfo], scheme: Scheme,
                     quant_head: bool, force: bool = False) -> Summary:
    """Write <name>.q.csv and <name>.scale.csv for every quantized weight; record both in the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)
    recorded = manifest.read_manifest(out_dir)
    summary = Summary()
    start = time.perf_counter()
    todo = []
    for name, info in quantized.items():
        sch = scheme.head() if name == weight_name(HEAD) else scheme
        base = safe_file_name(name)
        record = sch.record(quant_head)
        entries = {base + Q_SUFFIX: _entry(model_dir, name, info, "int8", {**record, "role": "q"}),
                   base + SCALE_SUFFIX: _entry(model_dir, name, info, "float32", {**record, "role": "scale"})}
        if not force and all(manifest.still_matches(out_dir, f, e, recorded.get(f)) for f, e in entries.items()):
            summary.skipped.extend(entries)
        else:
            todo.append(((out_dir, info, sch, base), entries))
    done: dict[str, dict] = {}
    pool = _pool(len(todo))
    try:
        tasks = [task for task, _ in todo]
        for (_, entries), (values, nq, sha_q, ns, sha_s) in zip(todo, pool.map(_write_one, tasks) if pool
                                                                  else map(_write_one, tasks)):
            (fq, eq), (fs, es) = entries.items()
            eq.update(bytes=nq, sha256=sha_q)
            es.update(bytes=ns, sha256=sha_s)
            done.update(entries)
            summary.tensors, summary.values, summary.bytes = summary.tensors + 1, summary.values + values, \
                summary.bytes + nq + ns
            summary.files += [fq, fs]
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        if done:  # one manifest write for the run (one per file cost more than the files); an
            manifest.record(out_dir, done)  # interrupted run still records what it finished
    summary.seconds = time.perf_counter() - start
    return summary
