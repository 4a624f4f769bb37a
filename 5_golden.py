"""Step 5: golden vectors: write references in the formats hardware testbenches and provers read.

Reads the CSV files of IN_DIR (any step 1/2/3/4 folder) whose name SELECT matches, and writes to
OUT_DIR one file per tensor in FORMAT and ENCODING, and golden_manifest.json (each file's source,
shape, layout, encoding, rounding, saturation counts, sha256). --integer writes the quantized path's
integer CSVs as int8/int4/int32 words, the scales beside them; --rtl writes examples/rtl's $readmemh
vectors of one w8a8 linear. Nothing is written unless everything succeeds. Files: docs/step5_golden.md.
Exit code: 0 done, 2 bad input (or, with --on-overflow error, a value that does not fit).

    python 5_golden.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1          # float32 .bin of step 2
    python 5_golden.py --select '_layer0\\.csv$' --format hex --encoding fixed --bits 32 --frac-bits 16
    python 5_golden.py --in-dir outputs/M/qkv --format npz --encoding bfloat16 --out-dir golden_bf16
    python 5_golden.py --integer --in-dir outputs/M/qkv-w8a8 --select '_layer0\\.csv$' --format hex
    python 5_golden.py --rtl --in-dir outputs/M/qkv-w8a8 --weights-dir outputs/M/weights-w8a8
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import cli, paths
from common.check import golden, golden_int, golden_rtl
from common.cli import InputError, path_arg, print_settings, run
from common.files import layout
from common.files.atomic import output_folder

# --- constants (each has a flag of the same name: IN_DIR -> --in-dir) ---------------------------
MODEL_DIR = paths.MODEL_DIR  # only used to derive the two folders below when they are None
IN_DIR = None  # any step 1/2/3/4 output folder; None -> outputs/<model folder>/x_all_layers (step 2)
SELECT = None  # a regex searched in the CSV file names (as step 1's --filter); None = every CSV
OUT_DIR = None  # None -> outputs/<model folder>/golden (--integer: golden-<scheme>; --rtl: golden_rtl-w8a8)
FORMAT = "bin"  # bin (raw little-endian) | hex | mem ($readmemh; mem with a comment header) | npy | npz
ENCODING = "float32"  # float32 | bfloat16 | float16 (bit patterns, round to nearest even) | fixed
BITS = 32  # fixed point: word size, 8 | 16 | 32
FRAC_BITS = 16  # fixed point: value = word / 2^FRAC_BITS (Q16.16: --bits 32 --frac-bits 16)
ON_OVERFLOW = "saturate"  # saturate (counted and reported) | error (exit 2, nothing written)
INTEGER = False  # the quantized path's integer CSVs (xq_, acc_, xzero_, *.q.csv) as int8/int4/int32 words
RTL = False  # examples/rtl's $readmemh vectors of one linear from a quantized (w8a8) step 3/4 folder
RTL_LAYER = 0  # --rtl: the layer of the linear
RTL_LINEAR = "q_proj"  # --rtl: which linear of that layer
RTL_ROWS = 8  # --rtl: the linear's first RTL_ROWS rows (tokens)
WEIGHTS_DIR = None  # --rtl: step 1 --quant's folder; None -> outputs/<model folder>/weights-<scheme>
# -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = cli.Parser(globals())
    p.shared("--model-dir")
    p.flag("--in-dir", type=path_arg)
    p.flag("--select")
    p.shared("--out-dir")
    p.flag("--format", choices=golden.FORMATS)
    p.flag("--encoding", choices=golden.ENCODINGS)
    p.flag("--bits", type=int)
    p.flag("--frac-bits", type=int)
    p.flag("--on-overflow", choices=golden.ON_OVERFLOW)
    p.flag("--integer", action="store_true")
    p.flag("--rtl", action="store_true")
    p.flag("--rtl-layer", type=int)
    p.flag("--rtl-linear", choices=golden_rtl.LINEARS)
    p.flag("--rtl-rows", type=int)
    p.shared("--weights-dir")
    return p.parse_args(argv)


def select_sources(in_dir: Path, select: str | None) -> list[Path]:
    if not in_dir.is_dir():
        raise InputError(f"input folder {in_dir} does not exist: run the step that writes it, or pass --in-dir")
    try:
        pattern = re.compile(select or "")
    except re.error as e:
        raise InputError(f"--select {select!r} is not a regex ({e})") from None
    sources = sorted(p for p in in_dir.glob("*.csv") if pattern.search(p.name))
    if not sources:
        raise InputError(f"no CSV file in {in_dir} matches --select {select!r}: check the folder and the regex")
    return sources


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rtl:
        return golden_rtl.main(args)
    in_dir = args.in_dir or layout.default_dir(args.model_dir, layout.ACTS)
    out_dir = args.out_dir or layout.default_dir(args.model_dir, layout.GOLDEN)
    if args.integer and args.out_dir is None:  # golden-<scheme>, beside the float golden folder
        rec = golden_int.scheme_record(in_dir, golden_int.file_records(in_dir)) if in_dir.is_dir() else None
        out_dir = layout.default_dir(args.model_dir, layout.quant_folder(layout.GOLDEN, (rec or {}).get("scheme", "int")))
    enc = golden.make_encoding(args.encoding, args.bits, args.frac_bits)
    settings = {"MODEL_DIR": str(args.model_dir), "IN_DIR": str(in_dir), "SELECT": args.select or "(all)",
                "OUT_DIR": str(out_dir), "FORMAT": args.format,
                "ENCODING": "integer words (int8/int4/int32, float32 scales)" if args.integer else enc.describe(),
                "ON_OVERFLOW": args.on_overflow}
    print("5_golden.py: golden vectors in hardware formats")
    print_settings(settings)
    output_folder(out_dir, inputs=[in_dir], create=False)  # never into (or around) what is read

    t0 = time.perf_counter()
    sources = select_sources(in_dir, args.select)
    if args.integer:
        return golden_int.write_and_report(sources, in_dir, out_dir, args.format, settings, t0)
    bar = tqdm(total=len(sources), desc="files", unit="file", disable=len(sources) < 8, file=sys.stdout)
    manifest, stats = golden.write_golden(sources, out_dir, args.format, enc, args.on_overflow, golden.layer_metas(in_dir),
                                          settings, on_file=bar.update)
    bar.close()
    dt = time.perf_counter() - t0

    print(f"wrote {stats.files} tensors ({stats.values:,} values, {stats.bytes / 1e6:.1f} MB of {args.format}) "
          f"and {golden.MANIFEST} to {out_dir} in {dt:.2f} s")
    if enc.name != "float32":
        print(f"rounding ({golden.ROUNDING[enc.name]}) changed {stats.rounded:,} of {stats.values:,} values")
    if stats.saturated:
        verb = "were clipped to the largest word" if enc.name == "fixed" else "became inf"
        print(f"warning: {stats.saturated:,} values do not fit {enc.describe()} and {verb} (worst {stats.worst[0]:g} "
              f"in {stats.worst[1]}); the manifest counts them per file. --on-overflow error refuses instead")
    else:
        print(f"saturation: none (every value fits {enc.describe()})")
    return 0


if __name__ == "__main__":
    run(main)
