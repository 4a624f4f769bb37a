"""Golden vectors: float32 tensors as the numbers hardware and provers read, and back.

An encoding turns float32 values into integer words ("codes"):
  float32                the IEEE bit pattern (exact)
  bfloat16, float16      the bit pattern rounded to nearest, ties to even
  fixed (BITS, FRAC)     two's complement round(x * 2^FRAC), ties to even, in BITS = 8/16/32 bits
A container holds the codes of one tensor (npz: of one layer):
  bin   raw little-endian words, row-major
  hex   one word per line, fixed width (BITS/4 hex digits), two's complement: Verilog $readmemh
  mem   hex with a `// shape, encoding, scale` comment header ($readmemh skips // comments)
  npy   the codes as a numpy array (bfloat16 as its uint16 bit pattern: numpy has no bfloat16)
  npz   one archive per layer (layerN.npz; files of no layer in model.npz), members named without
        the layer (ref_q, xnorm; step 1's weights: self_attn.q_proj.weight)

Speed: hex text is made by table lookup (65536 four-digit strings) in cache-sized chunks, so nothing
is formatted number by number; every file is hashed as it is written.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import layout, nodes
from common.files.atomic import (WRITE_FAULTS, atomic_file, clean_stale_temps, read_json, sha256_file, sha256_stream,
                           temp_folder, write_fault, write_json)
from common.cli import InputError
from common.files.csv_io import read_csv

ENCODINGS = ("float32", "bfloat16", "float16", "fixed")
FORMATS = ("bin", "hex", "mem", "npy", "npz")
FIXED_BITS = (8, 16, 32)
ON_OVERFLOW = ("saturate", "error")
MANIFEST = layout.GOLDEN_MANIFEST
HEX_CHUNK = 1 << 16  # words formatted at once: the temporaries stay in the CPU cache
ENCODE_CHUNK = 1 << 16  # values encoded at once, for the same reason
ROUNDING = {"float32": "none (exact)", "bfloat16": "nearest, ties to even", "float16": "nearest, ties to even",
            "fixed": "nearest, ties to even: round(x * 2^FRAC_BITS)"}


@dataclass(frozen=True)
class Encoding:
    name: str
    bits: int = 32
    frac_bits: int = 0

    @property
    def dtype(self) -> np.dtype:
        """How the codes are stored (npy/npz arrays, bin words), little-endian."""
        return np.dtype({"float32": "<f4", "bfloat16": "<u2", "float16": "<f2"}.get(self.name)
                        or f"<i{self.bits // 8}")

    @property
    def scale(self) -> float:
        """value = code / scale (fixed); 1 for the float encodings."""
        return float(2 ** self.frac_bits) if self.name == "fixed" else 1.0

    @property
    def step(self) -> float:
        """Fixed point's quantisation step 2^-FRAC_BITS; 0 for the float encodings."""
        return 1.0 / self.scale if self.name == "fixed" else 0.0

    def describe(self) -> str:
        if self.name != "fixed":
            return self.name
        return f"fixed Q{self.bits - self.frac_bits}.{self.frac_bits} ({self.bits}-bit two's complement, scale 2^{self.frac_bits})"

    def as_dict(self) -> dict:
        return {"encoding": self.name, "bits": self.bits, "frac_bits": self.frac_bits if self.name == "fixed" else None,
                "scale": self.scale, "rounding": ROUNDING[self.name], "storage_dtype": self.dtype.str}


def make_encoding(name: str, bits: int | None = None, frac_bits: int | None = None) -> Encoding:
    """Check an encoding's name and sizes; bad ones are an InputError."""
    if name not in ENCODINGS:
        raise InputError(f"--encoding {name!r}: choose one of {', '.join(ENCODINGS)}")
    if name != "fixed":
        return Encoding(name, 32 if name == "float32" else 16, 0)
    if bits not in FIXED_BITS:
        raise InputError(f"--bits {bits}: fixed point takes {', '.join(map(str, FIXED_BITS))}")
    if frac_bits is None or not 0 <= frac_bits < bits:
        raise InputError(f"--frac-bits {frac_bits}: give 0..{bits - 1} for {bits}-bit fixed point "
                         "(Q16.16: --bits 32 --frac-bits 16)")
    return Encoding(name, bits, frac_bits)


# --- encoding ----------------------------------------------------------------------------------


@dataclass
class Encoded:
    codes: np.ndarray  # enc.dtype, the source's shape
    rounded: int  # values the encoding changed (rounding)
    saturated: int  # values out of range: clipped (fixed) or turned into inf (bfloat16/float16)
    worst: float | None  # the saturated source value farthest out
    worst_at: tuple[int, ...] | None  # its index


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even; NaN stays a (quiet) NaN."""
    u = x.view(np.uint32)
    out = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def encode(x: np.ndarray, enc: Encoding, name: str) -> Encoded:
    """float32 array -> codes in enc.dtype, with how many values rounding and saturation changed.

    Done in chunks of ENCODE_CHUNK values, so that the temporaries stay in the CPU cache."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if enc.name == "float32":
        return Encoded(x, 0, 0, None, None)  # the bits as they are: no copy
    if enc.name == "fixed" and np.isnan(x).any():
        at = tuple(int(i) for i in np.argwhere(np.isnan(x))[0])
        raise InputError(f"{name} has NaN at {at}: fixed point has no NaN; check that file")
    flat = x.reshape(-1)
    codes = np.empty(flat.size, enc.dtype)
    rounded = saturated = 0
    worst_i = None
    for i in range(0, flat.size, ENCODE_CHUNK):
        part = flat[i:i + ENCODE_CHUNK]
        codes[i:i + ENCODE_CHUNK], n_rounded, over = _encode_chunk(part, enc)
        rounded += n_rounded
        if n := int(np.count_nonzero(over)):
            saturated += n
            j = i + int(np.argmax(np.where(over, np.abs(part), -1.0)))
            if worst_i is None or abs(flat[j]) > abs(flat[worst_i]):
                worst_i = j
    codes = codes.reshape(x.shape)
    if worst_i is None:
        return Encoded(codes, rounded, 0, None, None)
    at = tuple(int(j) for j in np.unravel_index(worst_i, x.shape))
    return Encoded(codes, rounded, saturated, float(flat[worst_i]), at)


def _encode_chunk(x: np.ndarray, enc: Encoding) -> tuple[np.ndarray, int, np.ndarray]:
    """(codes, how many values rounding changed, mask of the values out of range) of a flat float32 chunk."""
    if enc.name in ("bfloat16", "float16"):
        if enc.name == "bfloat16":
            codes = _bfloat16_bits(x)
            back = (codes.astype(np.uint32) << 16).view(np.float32)
        else:
            with np.errstate(over="ignore"):
                codes = x.astype(np.float16)
            back = codes.astype(np.float32)
        finite = np.isfinite(x)
        over = finite & ~np.isfinite(back)  # overflowed to inf
        return codes, int(np.count_nonzero(finite & (back != x))), over
    # float32 * 2^FRAC_BITS is exact (or inf, which saturates); so is rint of a float32.
    with np.errstate(over="ignore"):
        scaled = x * np.float32(enc.scale)
    k = np.rint(scaled)
    lo, hi = -(1 << (enc.bits - 1)), (1 << (enc.bits - 1)) - 1
    # Saturated: more than half a step from the nearest word (a tie just past an end is as close as
    # rounding). The limits are float64 scalars, so the comparison is exact even where hi + 0.5 is no float32.
    over_hi, over_lo = scaled > np.float64(hi + 0.5), scaled < np.float64(lo - 0.5)
    over = over_hi | over_lo
    rounded = int(np.count_nonzero(k != scaled)) - int(np.count_nonzero(over))
    hi32 = np.float32(hi) if float(np.float32(hi)) <= hi else np.nextafter(np.float32(hi), np.float32(0))
    codes = np.clip(k, np.float32(lo), hi32).astype(enc.dtype)  # 2^31 - 1 is no float32: set it in integers
    codes[over_hi] = hi
    return codes, rounded, over


def decode(codes: np.ndarray, enc: Encoding) -> np.ndarray:
    """codes -> values: float32 for the float encodings, float64 for fixed (exact: code / 2^FRAC)."""
    if enc.name == "float32":
        return codes.view(np.float32) if codes.dtype.kind == "u" else codes.astype(np.float32)
    if enc.name == "bfloat16":
        return (codes.astype(np.uint32) << 16).view(np.float32)
    if enc.name == "float16":
        return codes.view(np.float16).astype(np.float32)
    return codes.astype(np.float64) / enc.scale


# --- words and hex text ------------------------------------------------------------------------

_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_i = np.arange(1 << 16)
_HEX4 = np.ascontiguousarray(_DIGITS[np.stack([(_i >> 12) & 15, (_i >> 8) & 15, (_i >> 4) & 15, _i & 15], axis=1)])
_HEX4_WORD = _HEX4.view("<u4").reshape(-1)  # 16-bit value -> its 4 hex digits as one 32-bit word (in memory order)
_HEX2_WORD = np.ascontiguousarray(_HEX4[:256, 2:]).view("<u2").reshape(-1)  # 8-bit value -> 2 digits
# One line of each word size as a packed record: the digits, then "\n"
_LINE = {n: np.dtype([("digits", f"<u{2 * n}"), ("newline", "u1")]) for n in (1, 2, 4)}
_VALUE = np.full(256, 255, np.uint8)  # hex digit (either case) -> its value; anything else -> 255
for _c, _v in zip(b"0123456789abcdef", range(16)):
    _VALUE[_c] = _VALUE[bytes([_c]).upper()[0]] = _v
del _i, _c, _v


def words(codes: np.ndarray) -> np.ndarray:
    """The codes' bit patterns as unsigned words (two's complement for fixed), flat."""
    return codes.reshape(-1).view(f"<u{codes.dtype.itemsize}")


def hex_text(w: np.ndarray) -> np.ndarray:
    """Unsigned words -> one fixed-width lowercase hex word per line (2, 4 or 8 digits), as records
    whose bytes are the text: a table lookup per 16 bits, no number formatting."""
    out = np.empty(w.size, _LINE[w.itemsize])
    digits = out["digits"]
    if w.itemsize == 4:  # 8 digits: the high half's 4 first in memory, so they sit in the low 32 bits
        digits[...] = _HEX4_WORD[w & 0xFFFF]
        digits <<= 32
        digits |= _HEX4_WORD[w >> 16]
    elif w.itemsize == 2:
        digits[...] = _HEX4_WORD[w]
    else:
        digits[...] = _HEX2_WORD[w]
    out["newline"] = 10
    return out


def parse_hex(text: bytes, nbytes: int, path: Path) -> np.ndarray:
    """Fixed-width hex lines (// comment lines skipped) -> unsigned words of `nbytes` bytes each."""
    lines = text.split(b"\n") if text.startswith(b"//") else None
    if lines is not None:  # a mem header: drop the comment lines, keep the words
        text = b"\n".join(line for line in lines if not line.startswith(b"//"))
        if text.startswith(b"\n"):
            text = text[1:]
    if text and not text.endswith(b"\n"):
        text += b"\n"  # a last line without its newline
    width = 2 * nbytes
    if len(text) % (width + 1):
        raise InputError(f"{path}: not {width}-digit hex words, one per line: write it as 5_golden.py does")
    a = np.frombuffer(text, np.uint8).reshape(-1, width + 1)
    digits = _VALUE[a[:, :width]]
    if (a[:, width] != 10).any() or (digits == 255).any():
        raise InputError(f"{path}: not {width}-digit hex words, one per line: write it as 5_golden.py does")
    out = np.zeros(a.shape[0], f"<u{nbytes}")
    for j in range(width):
        out = (out << 4) | digits[:, j]
    return out


def header(shape: tuple[int, ...], enc: Encoding, tensor: str) -> bytes:
    return (f"// {tensor}: shape {list(shape)} row-major, {enc.describe()}, "
            f"value = word / {enc.scale:g}, {enc.bits}-bit words\n").encode()


# --- files -------------------------------------------------------------------------------------


def write_chunks(path: Path, chunks) -> str:
    """Write buffers to `path` atomically, hashing them on the way; returns the file's sha256."""
    sha = hashlib.sha256()
    with atomic_file(path) as f:
        for chunk in chunks:
            sha.update(chunk)
            f.write(chunk)
    return sha.hexdigest()


def _binary_chunks(codes: np.ndarray, head: bytes = b"", chunk_bytes: int = 1 << 22):
    if head:
        yield head
    data = memoryview(np.ascontiguousarray(codes)).cast("B")
    for i in range(0, len(data), chunk_bytes):
        yield data[i:i + chunk_bytes]


def _text_chunks(codes: np.ndarray, head: bytes):
    if head:
        yield head
    w = words(codes)
    for i in range(0, w.size, HEX_CHUNK):
        yield memoryview(hex_text(w[i:i + HEX_CHUNK])).cast("B")


def npy_header(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(codes))
    return buf.getvalue()


def write_tensor(path: Path, codes: np.ndarray, fmt: str, enc: Encoding, tensor: str) -> str:
    """One tensor's file in bin/hex/mem/npy, atomically; returns its sha256."""
    if fmt in ("bin", "npy"):
        return write_chunks(path, _binary_chunks(codes, npy_header(codes) if fmt == "npy" else b""))
    return write_chunks(path, _text_chunks(codes, header(codes.shape, enc, tensor) if fmt == "mem" else b""))


def write_archive(path: Path, members: dict[str, np.ndarray]) -> str:
    """One npz (uncompressed) of several tensors, atomically; returns its sha256."""
    with atomic_file(path) as f:
        np.savez(f, **members)
        f.seek(0)
        return sha256_stream(f)


def read_tensor(path: Path, fmt: str, enc: Encoding, shape: tuple[int, ...], key: str | None = None) -> np.ndarray:
    """The codes of one tensor from its file (as write_tensor / write_archive wrote it), checked against shape."""
    n = math.prod(shape)
    if fmt in ("npy", "npz"):
        try:
            if fmt == "npz":
                with np.load(path, allow_pickle=False) as z:
                    if key not in z.files:
                        raise InputError(f"{path} has no member {key!r} (it has {', '.join(z.files)})")
                    a = z[key]
            else:
                a = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable {fmt} file ({e})") from None
        if (a.dtype.kind, a.dtype.itemsize) != (enc.dtype.kind, enc.dtype.itemsize):
            raise InputError(f"{path} holds {a.dtype}, but {enc.describe()} is stored as {enc.dtype}")
        a = a.astype(enc.dtype, copy=False)
    elif fmt == "bin":
        data = path.read_bytes()
        if len(data) != n * enc.dtype.itemsize:
            raise InputError(f"{path} has {len(data)} bytes, expected {n * enc.dtype.itemsize} for shape "
                             f"{list(shape)} of {enc.describe()}")
        a = np.frombuffer(data, enc.dtype)
    else:
        a = parse_hex(path.read_bytes(), enc.dtype.itemsize, path).view(enc.dtype)
    if a.size != n:
        raise InputError(f"{path} holds {a.size} values, its manifest says shape {list(shape)}")
    return a.reshape(shape)


def member_name(tensor: str, layer: int | None) -> str:
    """Inside layerN.npz a tensor is named without its layer: ref_q, xnorm; self_attn.q_proj.weight."""
    if layer is None:
        return tensor
    parsed = layout.parse_layer_file(tensor + ".csv")
    return parsed[0] if parsed else _WEIGHT_PREFIX.sub("", tensor)


# --- a whole folder: golden_manifest.json ------------------------------------------------------

_WEIGHT_PREFIX = re.compile(r"^model\.layers\.(\d+)\.")  # step 1 files: model.layers.3.self_attn.q_proj.weight


def layer_of(tensor: str) -> int | None:
    """The layer of a step 2/3/4 file (q_layer3) or of a step 1 weight (model.layers.3.*); None for others."""
    if parsed := layout.parse_layer_file(tensor + ".csv"):
        return parsed[1]
    m = _WEIGHT_PREFIX.search(tensor)
    return int(m.group(1)) if m else None


def node_of(tensor: str) -> str | None:
    """The forward-pass node (or model input) a file name stands for; None for anything else."""
    if tensor in nodes.INPUTS:
        return tensor
    parsed = nodes.parse(tensor)
    return parsed[1] if parsed else None


@dataclass
class Stats:
    files: int = 0
    values: int = 0
    bytes: int = 0
    rounded: int = 0
    saturated: int = 0
    worst: tuple[float, str] | None = None  # (value, tensor) of the saturated value farthest out


def write_golden(sources: list[Path], out_dir: Path, fmt: str, enc: Encoding, on_overflow: str,
                 metas: dict[int | None, dict], settings: dict, on_file=None) -> tuple[dict, Stats]:
    """Encode every source CSV into `fmt` under out_dir, plus golden_manifest.json.

    metas: meta_layerN.json by layer (None: any layer's, for the files of no layer), for the layouts.

    Everything is written into a fresh locked folder beside out_dir first (common.files.atomic.temp_folder)
    and moved in only once all of it succeeded, so a failure (an overflow with on_overflow "error", a
    bad CSV) leaves out_dir as it was. Files an earlier manifest listed that this run did not write
    are removed.
    """
    with ExitStack() as stack:
        with _write_faults(out_dir):
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(out_dir.parent, final=out_dir.name)  # staging folders of killed runs
            staging = stack.enter_context(temp_folder(out_dir))
        entries, stats = _encode_all(sources, staging, fmt, enc, on_overflow, metas, on_file)
        manifest = {"format": fmt, **enc.as_dict(), "byte_order": "little",
                    "word": f"{enc.bits}-bit two's complement" if enc.name == "fixed" else f"{enc.name} bit pattern",
                    "value": "word / scale" if enc.name == "fixed" else f"the {enc.name} whose bits the word is",
                    "on_overflow": on_overflow, "settings": settings, "files": entries}
        write_json(staging / MANIFEST, manifest)
        with _write_faults(out_dir):
            _move_in(staging, out_dir, sorted({e["file"] for e in entries}) + [MANIFEST])
        return manifest, stats


@contextmanager
def _write_faults(out_dir: Path):
    """A fault the user can fix (disk full, read-only, permissions) while making or filling out_dir: one line."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_FAULTS:
            raise write_fault(e, out_dir) from None
        raise


def _move_in(staging: Path, out_dir: Path, written: list[str]) -> None:
    """Rename the finished files into out_dir; remove those an earlier manifest listed and this run did not write."""
    old = out_dir / MANIFEST
    stale = set()
    if old.is_file():
        try:
            stale = {e["file"] for e in json.loads(old.read_text()).get("files", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            stale = set()  # an unreadable old manifest: leave its files alone
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in written:
        os.replace(staging / name, out_dir / name)
    for name in stale - set(written):
        if isinstance(name, str) and Path(name).name == name and (out_dir / name).is_file():
            (out_dir / name).unlink()


def _encode_all(sources, staging, fmt, enc, on_overflow, metas, on_file) -> tuple[list[dict], Stats]:
    stats = Stats()
    entries: list[dict] = []
    archive: dict[str, np.ndarray] = {}  # npz: the members of the archive being filled
    pending: list[dict] = []  # and their manifest entries, which get the archive's sha256
    # npz: one archive per layer, so take the files layer by layer
    order = sorted(sources, key=lambda p: (layer_of(p.stem) is None, layer_of(p.stem) or 0, p.name))
    for i, src in enumerate(order):
        tensor, layer = src.stem, layer_of(src.stem)
        x = read_csv(src)
        e = encode(x, enc, str(src))
        if e.saturated and on_overflow == "error":
            raise InputError(f"{src}: {e.saturated} values do not fit {enc.describe()} (worst {e.worst:g} at "
                             f"{e.worst_at}): choose more --bits or fewer --frac-bits, or --on-overflow saturate")
        name = layout.golden_file(tensor, fmt, layer)
        entry = _entry(src, x.shape, e, enc, name, member_name(tensor, layer) if fmt == "npz" else None,
                       metas.get(layer))
        stats.files += 1
        stats.values += x.size
        stats.rounded += e.rounded
        stats.saturated += e.saturated
        if e.saturated and (stats.worst is None or abs(e.worst) > abs(stats.worst[0])):
            stats.worst = (e.worst, tensor)
        if fmt == "npz":
            archive[entry["key"]] = e.codes
            pending.append(entry)
            last = i + 1 == len(order) or layout.golden_file(order[i + 1].stem, fmt, layer_of(order[i + 1].stem)) != name
            if last:
                sha = write_archive(staging / name, archive)
                stats.bytes += (staging / name).stat().st_size
                for p in pending:
                    p["sha256"] = sha
                archive, pending = {}, []
        else:
            entry["sha256"] = write_tensor(staging / name, e.codes, fmt, enc, tensor)
            stats.bytes += (staging / name).stat().st_size
        entries.append(entry)
        if on_file:
            on_file()
    return entries, stats


def _entry(src: Path, shape: tuple[int, ...], e: Encoded, enc: Encoding, name: str, key: str | None,
           meta: dict | None) -> dict:
    """One tensor's manifest entry (its sha256 is filled in once its file is written)."""
    node = node_of(src.stem)
    return {"tensor": src.stem, "file": name, "key": key, "source": src.name, "source_sha256": sha256_file(src),
            "shape": list(shape), "dtype": enc.dtype.str,
            "layout": nodes.describe_layout(node, meta) if node else {"order": nodes.ROW_MAJOR},
            **{k: v for k, v in enc.as_dict().items() if k in ("encoding", "scale", "rounding")},
            "rounded": e.rounded, "saturated": e.saturated, "worst_saturated": e.worst,
            "worst_saturated_at": list(e.worst_at) if e.worst_at else None, "sha256": None}


def load_manifest(folder: Path) -> tuple[dict, Encoding]:
    """Read and check golden_manifest.json against the files beside it: every file present with its
    sha256, a known format and encoding, shapes of whole numbers. Any mismatch is an InputError."""
    path = folder / MANIFEST
    fix = "write the folder again with 5_golden.py"
    manifest = read_json(path, fix)
    try:
        fmt = manifest["format"]
        enc = make_encoding(manifest["encoding"], manifest.get("bits"), manifest.get("frac_bits"))
        entries = manifest["files"]
        if fmt not in FORMATS:
            raise InputError(f"{path}: unknown format {fmt!r} (known: {', '.join(FORMATS)}): {fix}")
        if not isinstance(entries, list) or not entries:
            raise InputError(f"{path} lists no files: {fix}")
        checked: dict[str, str] = {}
        for e in entries:
            name, shape = e["file"], e["shape"]
            if not isinstance(e["tensor"], str):
                raise InputError(f"{path}: tensor name {e['tensor']!r} is not a string: {fix}")
            if not isinstance(name, str) or Path(name).name != name:
                raise InputError(f"{path}: file {name!r} is not a plain file name in that folder: {fix}")
            if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
                raise InputError(f"{path}: {e['tensor']} has shape {shape!r}, not a list of sizes: {fix}")
            if e.get("encoding", enc.name) != enc.name:
                raise InputError(f"{path}: {e['tensor']} says encoding {e['encoding']!r}, the manifest "
                                 f"{enc.name!r}: {fix}")
            if name not in checked:
                if not (folder / name).is_file():
                    raise InputError(f"{folder / name} is missing, {path} lists it: {fix}")
                checked[name] = sha256_file(folder / name)
            if checked[name] != e["sha256"]:
                raise InputError(f"{folder / name}: sha256 {checked[name][:12]}... differs from {path}'s "
                                 f"{str(e['sha256'])[:12]}... (changed after the manifest was written): {fix}")
    except (KeyError, TypeError) as err:
        raise InputError(f"{path} is not a golden manifest (missing or malformed {err}): {fix}") from None
    return manifest, enc


def layer_metas(in_dir: Path) -> dict[int | None, dict]:
    """meta_layerN.json by layer (step 2 folders have them), and None -> any one of them."""
    metas: dict[int | None, dict] = {}
    for path in sorted(in_dir.glob(layout.meta_file("*"))):
        if (parsed := layout.parse_layer_file(path.name)) and parsed[0] == "meta":
            metas[parsed[1]] = read_json(path, layout.rerun_step2())
    if metas:
        metas[None] = metas[min(k for k in metas if k is not None)]
    return metas
