"""Step 5 --integer: the integer tensors of the quantized path as the words hardware reads, and back.

Which CSV becomes which word (names: common/files/layout.py, common/files/quant_export.py):

    xq_P_layerN, xzero_P_layerN            int8    [-128, 127]
    acc_P_layerN                           int32   [-2^31, 2^31 - 1]
    <weight>.q.csv (step 1 --quant)        int8, or int4 [-8, 7] when its scheme's weights are 4-bit
    xscale_P_layerN, <weight>.scale.csv    float32 (its IEEE bits), beside the integers they scale

int4 is packed two to a byte over the tensor's flat row-major sequence: element 2i in the LOW nibble,
element 2i + 1 in the HIGH nibble, each a 4-bit two's complement; an odd count leaves the last
byte's high nibble 0 (ExecuTorch's and llama.cpp's order, common.quant.quantize.pack_int4). So the
byte 0x7f holds (-1, 7) and the hex line `7f` reads: element 2i = f = -1, element 2i + 1 = 7.

The containers are step 5's (common/check/golden.py): bin (little-endian words), hex (one word a
line, two's complement, 2 digits for int8/int4 bytes, 8 for int32/float32), mem (hex with a `//`
header), npy (the words: int8, packed uint8, int32, float32), npz (one archive per layer, members
named by the tensor). A value outside its word's range is an InputError: nothing is saturated here,
these are the exact integers a bit-exact design must reproduce.
"""
from __future__ import annotations

import json
import re
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from common.check import golden
from common.cli import InputError
from common.files import layout
from common.files.atomic import clean_stale_temps, read_json, sha256_file, temp_folder, write_json
from common.files.csv_io import read_csv, read_int_csv
from common.quant.quantize import pack_int4, unpack_int4

ENCODING = "integer"  # golden_manifest.json's "encoding" for a folder written by this module
# word -> (storage dtype, lowest value, highest value); int4 is stored packed, two to a uint8
WORDS = {"int8": (np.dtype("<i1"), -128, 127), "int4": (np.dtype("<u1"), -8, 7),
         "int32": (np.dtype("<i4"), -2**31, 2**31 - 1), "float32": (np.dtype("<f4"), None, None)}
INT_WORDS = ("int8", "int4", "int32")
KIND_WORDS = {"xq": "int8", "xzero": "int8", "acc": "int32", "xscale": "float32"}
INT4_PACKING = ("two per byte over the flat row-major sequence: element 2i in the low nibble, 2i+1 in the "
                "high nibble, 4-bit two's complement; an odd count pads the last high nibble with 0")
_WEIGHT_LAYER = re.compile(r"model\.layers\.(\d+)\.")
Q_STEM, SCALE_STEM = ".q", ".scale"  # step 1's <weight>.q.csv and <weight>.scale.csv, as stems


def is_integer_source(stem: str) -> bool:
    """A CSV this mode writes: a quantized tensor or the scales beside one."""
    return layout.parse_quant_file(stem) is not None or stem.endswith((Q_STEM, SCALE_STEM))


def word_of(stem: str, weight_bits: int | None) -> str:
    """The word a CSV (by its stem) is written in; weight_bits from the file's scheme (4: int4)."""
    if parsed := layout.parse_quant_file(stem):
        return KIND_WORDS[parsed[0]]
    if stem.endswith(Q_STEM):
        return "int4" if weight_bits == 4 else "int8"
    return "float32"


def layer_of(stem: str) -> int | None:
    if parsed := layout.parse_quant_file(stem):
        return parsed[2]
    m = _WEIGHT_LAYER.match(stem)
    return int(m[1]) if m else None


# --- int4 packing: a plain-Python-int reference beside the vectorised one ----------------------


def pack_int4_ref(values: list[int]) -> bytes:
    """The definition: byte i = (v[2i] & 15) | (v[2i+1] & 15) << 4 (Python ints, two's complement nibbles)."""
    v = list(values) + [0] * (len(values) % 2)
    return bytes((v[i] & 15) | ((v[i + 1] & 15) << 4) for i in range(0, len(v), 2))


def pack_int4_words(values: np.ndarray) -> np.ndarray:
    """int values in [-8, 7], any shape -> uint8 (ceil(n / 2),): pack_int4 over the flat sequence."""
    flat = np.asarray(values).reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    return pack_int4(flat)


def unpack_int4_words(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 words -> the first n int4 values, int64."""
    return unpack_int4(np.asarray(packed, np.uint8).reshape(-1))[:n].astype(np.int64)


# --- values <-> words ----------------------------------------------------------------------------


def to_words(values: np.ndarray, word: str, src: Path) -> np.ndarray:
    """Exact integers (or float32 scales) -> the words that store them; out of range: InputError."""
    dtype, lo, hi = WORDS[word]
    if word == "float32":
        return np.ascontiguousarray(values, dtype)
    bad = (values < lo) | (values > hi)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{src}: value {int(values[at])} at {at} is outside {word} [{lo}, {hi}]: "
                         "that file is not a quantized tensor of its scheme; rerun the step that wrote it")
    return pack_int4_words(values) if word == "int4" else values.astype(dtype)


def from_words(words: np.ndarray, word: str, shape: tuple[int, ...]) -> np.ndarray:
    """Words -> the values: int64 for the integer words, float32 for the scales."""
    n = int(np.prod(shape))
    if word == "int4":
        return unpack_int4_words(words, n).reshape(shape)
    a = np.asarray(words).reshape(shape)
    return a.astype(np.int64) if word in INT_WORDS else a.astype(np.float32)


def stored_size(word: str, shape) -> int:
    """How many words hold a tensor of `shape` (int4: two values a word)."""
    n = int(np.prod(shape))
    return (n + 1) // 2 if word == "int4" else n


def mem_header(tensor: str, shape, word: str) -> bytes:
    bits = 8 if word == "int4" else WORDS[word][0].itemsize * 8
    packed = f", packed: {INT4_PACKING}" if word == "int4" else ""
    return f"// {tensor}: shape {list(shape)} row-major, {word}{packed}, {bits}-bit words\n".encode()


# --- the scheme ------------------------------------------------------------------------------------


def file_records(in_dir: Path) -> dict[str, dict]:
    """file name -> its scheme record, from a step-1 folder's manifest.json (entries' "quant")."""
    path = in_dir / layout.MANIFEST
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v["quant"] for k, v in files.items() if isinstance(v, dict) and isinstance(v.get("quant"), dict)}


def scheme_record(in_dir: Path, records: dict[str, dict]) -> dict | None:
    """The run's scheme: step 1's manifest, a step-2 folder's meta files, or for a step 3/4 folder the
    meta files of the step-2 folder its report.json names (ACTS_DIR). None when nothing says."""
    for rec in records.values():
        if "/" not in rec.get("scheme", "/"):  # the head's record is "<scheme>/head"
            return {k: v for k, v in rec.items() if k != "role"}
    folders = [in_dir]
    if (in_dir / layout.REPORT_JSON).is_file():
        acts = read_json(in_dir / layout.REPORT_JSON, "rerun that step").get("settings", {}).get("ACTS_DIR")
        if isinstance(acts, str):
            folders.append(Path(acts))
    for folder in folders:
        for meta in [folder / layout.META_MODEL, *sorted(folder.glob(layout.meta_file("*")))]:
            if meta.is_file() and isinstance(q := read_json(meta, layout.rerun_step2()).get("quant"), dict):
                return q
    return None


# --- writing ---------------------------------------------------------------------------------------


def write_integer_golden(sources: list[Path], in_dir: Path, out_dir: Path, fmt: str, settings: dict) -> tuple[dict, int]:
    """Write every source (integer CSVs and the scales beside them) as words in `fmt` under out_dir,
    with golden_manifest.json; all of it staged first and moved in only when everything succeeded.
    Returns (manifest, bytes written)."""
    records = file_records(in_dir)
    scheme = scheme_record(in_dir, records)
    weight_bits = scheme.get("weight_bits") if scheme else None
    order = sorted(sources, key=lambda p: (layer_of(p.stem) is None, layer_of(p.stem) or 0, p.name))
    with ExitStack() as stack:
        with golden._write_faults(out_dir):
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(out_dir.parent, final=out_dir.name)
            staging = stack.enter_context(temp_folder(out_dir))
        entries, nbytes, archive = [], 0, {}
        for i, src in enumerate(order):
            tensor, layer = src.stem, layer_of(src.stem)
            bits = records.get(src.name, {}).get("weight_bits", weight_bits)
            word = word_of(tensor, bits)
            values = read_csv(src) if word == "float32" else read_int_csv(src)
            codes = to_words(values, word, src)
            name = layout.golden_file(tensor, fmt, layer)
            entry = {"tensor": tensor, "file": name, "key": tensor if fmt == "npz" else None, "source": src.name,
                     "source_sha256": sha256_file(src), "shape": list(values.shape), "word": word,
                     "dtype": WORDS[word][0].str, "words": int(codes.size), "layer": layer, "sha256": None}
            entries.append(entry)
            if fmt == "npz":
                archive[tensor] = codes
                nxt = order[i + 1] if i + 1 < len(order) else None
                if nxt is None or layout.golden_file(nxt.stem, fmt, layer_of(nxt.stem)) != name:
                    sha = golden.write_archive(staging / name, archive)
                    nbytes += (staging / name).stat().st_size
                    for e in entries:
                        e["sha256"] = e["sha256"] or (sha if e["file"] == name else None)
                    archive = {}
                continue
            if fmt in ("bin", "npy"):
                head = golden.npy_header(codes) if fmt == "npy" else b""
                entry["sha256"] = golden.write_chunks(staging / name, golden._binary_chunks(codes, head))
            else:
                head = mem_header(tensor, values.shape, word) if fmt == "mem" else b""
                entry["sha256"] = golden.write_chunks(staging / name, golden._text_chunks(codes, head))
            nbytes += (staging / name).stat().st_size
        manifest = {"format": fmt, "encoding": ENCODING, "byte_order": "little", "quant": scheme,
                    "int4_packing": INT4_PACKING, "words": {w: WORDS[w][0].str for w in WORDS},
                    "value": "the integer itself (int8/int4/int32); float32: the IEEE bits of the scale",
                    "on_overflow": "error", "settings": settings, "files": entries}
        write_json(staging / golden.MANIFEST, manifest)
        with golden._write_faults(out_dir):
            golden._move_in(staging, out_dir, sorted({e["file"] for e in entries}) + [golden.MANIFEST])
    return manifest, nbytes


# --- reading back ------------------------------------------------------------------------------------


def is_integer_manifest(folder: Path) -> bool:
    path = folder / golden.MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("encoding") == ENCODING
    except (OSError, ValueError, AttributeError):
        return False


def load_manifest(folder: Path) -> dict:
    """An integer golden_manifest.json, every file present with its sha256; else InputError."""
    path = folder / golden.MANIFEST
    fix = "write the folder again with 5_golden.py --integer"
    manifest = read_json(path, fix)
    try:
        if manifest["encoding"] != ENCODING or manifest["format"] not in golden.FORMATS:
            raise InputError(f"{path}: not an integer golden manifest: {fix}")
        checked: dict[str, str] = {}
        for e in manifest["files"]:
            name = e["file"]
            if e["word"] not in WORDS or not isinstance(name, str) or Path(name).name != name:
                raise InputError(f"{path}: entry {e.get('tensor')!r} is malformed: {fix}")
            if name not in checked:
                if not (folder / name).is_file():
                    raise InputError(f"{folder / name} is missing, {path} lists it: {fix}")
                checked[name] = sha256_file(folder / name)
            if checked[name] != e["sha256"]:
                raise InputError(f"{folder / name}: sha256 differs from {path}'s (changed after it was written): {fix}")
    except (KeyError, TypeError) as err:
        raise InputError(f"{path} is not a golden manifest (missing or malformed {err}): {fix}") from None
    return manifest


def read_entry(folder: Path, fmt: str, e: dict) -> np.ndarray:
    """One tensor's values from an integer golden folder (int64, or float32 for scales)."""
    path, word, shape = folder / e["file"], e["word"], tuple(e["shape"])
    dtype, n = WORDS[word][0], stored_size(word, shape)
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            w = z[e["key"]]
    elif fmt == "npy":
        w = np.load(path, allow_pickle=False)
    elif fmt == "bin":
        w = np.frombuffer(path.read_bytes(), dtype)
    else:
        w = golden.parse_hex(path.read_bytes(), dtype.itemsize, path).view(dtype)
    if w.dtype != dtype or w.size != n:
        raise InputError(f"{path}: {w.size} words of {w.dtype}, its manifest says {n} of {dtype} ({word})")
    return from_words(w, word, shape)


def write_and_report(sources: list[Path], in_dir: Path, out_dir: Path, fmt: str, settings: dict, t0: float) -> int:
    """Step 5 --integer: the integer CSVs among `sources` as words, and the line saying what was written."""
    sources = [p for p in sources if is_integer_source(p.stem)]
    if not sources:
        raise InputError(f"no integer CSV (xq_/acc_/xzero_/xscale_ files of a quantized step 3/4 run, step 1 "
                         f"--quant's .q.csv/.scale.csv) in {in_dir} matches --select: check the folder")
    manifest, nbytes = write_integer_golden(sources, in_dir, out_dir, fmt, settings)
    words = {}
    for e in manifest["files"]:
        words[e["word"]] = words.get(e["word"], 0) + 1
    scheme = (manifest["quant"] or {}).get("scheme", "none recorded")
    print(f"wrote {len(sources)} tensors ({', '.join(f'{n} {w}' for w, n in words.items())}; {nbytes / 1e6:.1f} MB "
          f"of {fmt}) and {golden.MANIFEST} to {out_dir} in {time.perf_counter() - t0:.2f} s; scheme {scheme}")
    return 0
