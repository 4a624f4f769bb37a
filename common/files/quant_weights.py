"""Steps 3 and 4 on a quantized capture: which step-1 files they read, the scheme checked, the weights loaded.

A capture names its scheme in meta_layerN.json / meta_model.json ("quant": Scheme.record, absent for a
float capture). Its quantized linears are read from step 1 --quant's <name>.q.csv and
<name>.scale.csv (common/files/quant_export.py) as common.quant.linear.QuantWeight, every other
tensor as a float CSV. The scheme of the capture and of the weights must agree, as step 1's
manifest.json records it; a quantized capture read with float weights, a float capture with
quantized ones, or two schemes: one InputError, before anything is written.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from common.cli import InputError
from common.files import layout, manifest
from common.files.csv_io import read_csv
from common.files.int_csv import write_csv_exact  # integers as integers, float32 exact
from common.quant.linear import QuantWeight
from common.quant.schemes import HEAD, Scheme, get_scheme, quantized_module


def scheme_of(meta: dict, path: Path, asked: Scheme | None = None) -> tuple[Scheme | None, bool]:
    """(the capture's scheme or None, quant_head) from a meta file's "quant" record; InputError when
    --quant `asked` names another."""
    quant = meta.get("quant")
    try:
        scheme = None if quant is None else get_scheme(quant["scheme"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: its \"quant\" record is not a scheme ({e}): run 2_get_x.py again") from None
    if asked is not None and (scheme is None or asked.name != scheme.name):
        raise InputError(f"--quant {asked.name}: the capture {path.parent} is {scheme.name if scheme else 'float'}: "
                         f"{'--quant ' + scheme.name if scheme else 'drop --quant'}, or choose another --acts-dir")
    return scheme, bool(quant and quant.get("quant_head", False))


def is_quantized(name: str, quant_head: bool) -> bool:
    """Is the tensor called `name` a weight the scheme quantizes (model.layers.3.mlp.up_proj.weight)?"""
    return name.endswith(".weight") and quantized_module(name.removesuffix(".weight"), quant_head)


def files(paths: list[Path], scheme: Scheme | None, quant_head: bool) -> list[Path]:
    """The step-1 files actually read for these tensors' float paths (<name>.csv): a quantized weight's
    two files in place of its one."""
    if scheme is None:
        return list(paths)
    out = []
    for p in paths:
        name = p.name.removesuffix(".csv")
        out += [p.with_name(f) for f in layout.quant_weight_files(name)] if is_quantized(name, quant_head) else [p]
    return out


def step1_quant_command(model_dir, weights_dir: Path, scheme: Scheme | None, quant_head: bool) -> str:
    q = f" --quant {scheme.name}" + (" --quant-head" if quant_head else "") if scheme else ""
    return (f"python 1_model_weights.py --model-dir {shlex.quote(str(model_dir))} "
            f"--out-dir {shlex.quote(str(weights_dir))}{q}")


def check(weights_dir: Path, paths: list[Path], scheme: Scheme | None, quant_head: bool, model_dir,
          capture: Path) -> None:
    """Every file exists and says the capture's scheme (step 1's manifest), or one InputError naming
    both folders and the step-1 command that makes the right weights. `paths`: the float paths."""
    fix = step1_quant_command(model_dir, weights_dir, scheme, quant_head)
    what = f"the capture {capture} is {scheme.name if scheme else 'float'}"
    recorded = manifest.read_manifest(weights_dir) if weights_dir.is_dir() else {}
    for p in paths:
        name = p.name.removesuffix(".csv")
        q_file, _ = layout.quant_weight_files(name)
        quantized = (weights_dir / q_file).is_file()
        if scheme is None or not is_quantized(name, quant_head):
            if not p.is_file() and quantized:
                theirs = (recorded.get(q_file) or {}).get("quant", {}).get("scheme", "quantized")
                raise InputError(f"{weights_dir} holds {name} as {theirs} integers, {what}: run {fix}")
            continue
        if not quantized:
            how = "as floats" if p.is_file() else "not at all"
            raise InputError(f"{weights_dir} holds {name} {how}, {what}: run {fix}")
        theirs = (recorded.get(q_file) or {}).get("quant") or {}
        if theirs.get("scheme") != scheme.name and theirs.get("scheme") != scheme.head().name:
            raise InputError(f"{weights_dir / q_file} is {theirs.get('scheme', 'of no recorded scheme')}, "
                             f"{what}: run {fix}")
        for f in (weights_dir / f for f in layout.quant_weight_files(name)):
            if not f.is_file():
                raise InputError(f"{f} is missing: run {fix}")


def read_quant_weight(path: Path, shape: tuple[int, int], scheme: Scheme) -> QuantWeight:
    """<name>.q.csv (integers in the scheme's range) and <name>.scale.csv (positive finite float32)."""
    q_name, s_name = layout.quant_weight_files(path.name.removesuffix(".csv"))
    q = read_csv(path.with_name(q_name), shape)  # float32 holds every int8 exactly
    if q.size and (not np.array_equal(q, np.rint(q)) or q.min() < scheme.qmin or q.max() > scheme.qmax):
        raise InputError(f"{path.with_name(q_name)}: not integers in [{scheme.qmin}, {scheme.qmax}] "
                         f"({scheme.name}): re-export it with step 1 --quant {scheme.name}")
    groups = 1 if scheme.group_size is None else shape[1] // scheme.group_size
    scale = read_csv(path.with_name(s_name), (shape[0], groups))
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise InputError(f"{path.with_name(s_name)}: a scale is not a positive finite number: re-export it")
    return QuantWeight(q.astype(np.int8), scale, scheme)


def read_weight(path: Path, shape: tuple[int, ...], scheme: Scheme | None, quant_head: bool = False):
    """A step-1 tensor given its float path: a QuantWeight for a quantized linear, else float32."""
    name = path.name.removesuffix(".csv")
    if scheme is None or not is_quantized(name, quant_head):
        return read_csv(path, shape)
    return read_quant_weight(path, shape, scheme.head() if name == f"{HEAD}.weight" else scheme)


def write_tapes(out_dir: Path, n: int, weights: dict[str, object]) -> list[str]:
    """xq/xscale/xzero/acc_P_layerN.csv of every quantized linear P (its last call); returns the names."""
    names = []
    for proj, w in weights.items():
        for what, a in getattr(w, "tape", {}).items():
            names.append(layout.quant_file(proj, n, what))
            write_csv_exact(out_dir / names[-1], a)
    return names


def head_as_read(paths: list[Path], meta: dict, quant_head: bool) -> list[Path]:
    """With --quant-head a tied model's head is read as lm_head.weight (step 1 quantized it from the
    embedding), not as the embedding."""
    if not quant_head:
        return paths
    return [p.with_name(layout.weight_file(layout.LM_HEAD)) if p.name == layout.weight_file(layout.EMBEDDING) else p
            for p in paths]


def head_reader(weights_dir: Path, meta: dict, scheme: Scheme):
    """--quant-head: () -> the head's QuantWeight (V, d), int8 per output channel."""
    path = weights_dir / layout.weight_file(layout.LM_HEAD)
    return lambda: read_quant_weight(path, (meta["vocab_size"], meta["d_model"]), scheme.head())
