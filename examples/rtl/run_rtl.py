"""Run the int8 dot-product/requantization RTL against golden vectors in Icarus Verilog.

Writes one folder of $readmemh files per case into OUT_DIR (examples/rtl/README.md has the contract):
`random/` (a seeded integer case with ties, negative ties, saturation and shifts 0, 6 and 31) and,
when the demo model is there, `demo_q_proj/` (layer 0's q_proj of the demo model, quantized here:
see demo_case). Then compiles RTL with the testbench and simulates every case, which checks every
int32 accumulator and int8 output bit for bit. Exit code: 0 all PASS, 1 a FAIL, 2 bad input.

    python examples/rtl/run_rtl.py                   # what `make rtl` runs
    python examples/rtl/run_rtl.py --no-demo --rtl my_unit.v
    python examples/rtl/run_rtl.py --vectors outputs/M/golden_rtl-w8a8   # also 5_golden.py --rtl's real vectors
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from common import paths  # noqa: E402
from common.files.atomic import output_folder  # noqa: E402
from common.files.safetensors_io import list_tensors  # noqa: E402
from common.llama.norm import rms_norm  # noqa: E402
from common.cli import InputError, path_arg, print_settings, run  # noqa: E402
from common.quant.requant import M_MAX, M_MIN, quantize_multiplier  # noqa: E402
from common.check.rtl_vectors import write_vectors  # noqa: E402

# --- constants (each has a flag of the same name: OUT_DIR -> --out-dir) ---------------------------
OUT_DIR = paths.OUTPUTS / "rtl"
RTL = HERE / "int8_dot_requant.v"  # the design under test (a module int8_dot_requant)
TESTBENCH = HERE / "tb_int8_dot_requant.v"
SEED = 0  # the random case
DEMO = True  # also layer 0's q_proj of the demo model, when MODEL_DIR holds it
MODEL_DIR = paths.DEMO_MODEL_DIR
DEMO_TOKENS = (1, 42, 1000, 20000)  # token ids whose embeddings make the demo case's activations
# -------------------------------------------------------------------------------------------------


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x int8 [8 x 37], w int8 [12 x 37], M and shift per channel. Channels 0 and 1 output x[:, 0] / 2
    (ties and negative ties: x[:, 0] is odd) at shifts 0 and 6, channel 2 saturates both ways, channel 3
    uses shift 31, the rest are random at shifts 8..12."""
    rng = np.random.default_rng(seed)
    T, K, N = 8, 37, 12
    x = rng.integers(-128, 128, (T, K))
    w = rng.integers(-128, 128, (N, K))
    M = rng.integers(M_MIN, M_MAX + 1, N)
    shift = rng.integers(8, 13, N)
    x[:, 0] = [1, -1, 3, -3, 5, -5, 127, -127]
    x[0, 1:], x[1, 1:] = 127, -128  # channel 2: acc = +-127 * 4572 ...
    w[0], w[1], w[2] = 0, 0, 127
    w[0, 0], w[1, 0] = 1, 64  # acc = x[:, 0] and 64 x[:, 0]
    M[:4], shift[:4] = [2**30, 2**30, M_MAX, M_MAX], [0, 6, 0, 31]  # x/2, 64x/128, saturate, tiny
    return x, w, M, shift


def demo_case(model_dir: Path, tokens: tuple[int, ...] = DEMO_TOKENS) -> tuple[np.ndarray, ...]:
    """Layer 0's q_proj of a model: x = rms_norm(embeddings of `tokens`) quantized per tensor, w per
    output channel (symmetric int8, round half even: calibration in float); the output scale from the
    float output's range; M and shift per channel from s_x * s_w[n] / s_y."""
    names = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.0.self_attn.q_proj.weight"]
    infos = list_tensors(model_dir, set(names))
    vocab = infos[names[0]].shape[0]
    if max(tokens) >= vocab:
        raise InputError(f"--demo-tokens {','.join(map(str, tokens))}: the model has token ids 0..{vocab - 1}")
    t = {}
    for name in names:
        with safe_open(str(infos[name].shard), framework="numpy") as f:
            if name.endswith("embed_tokens.weight"):  # only the rows of `tokens`
                t[name] = np.concatenate([f.get_slice(name)[i:i + 1] for i in tokens])
            else:
                t[name] = f.get_tensor(name)
    eps = json.loads((model_dir / "config.json").read_text())["rms_norm_eps"]
    xf = rms_norm(np.asarray(t[names[0]], np.float32), t[names[1]].astype(np.float32), eps)  # (T, K)
    wf = t[names[2]].astype(np.float32)  # (N, K)
    s_x = np.abs(xf).max() / 127
    s_w = np.abs(wf).max(axis=1) / 127  # (N,)
    x = np.clip(np.rint(xf / s_x), -128, 127).astype(np.int64)
    w = np.clip(np.rint(wf / s_w[:, None]), -128, 127).astype(np.int64)
    s_y = np.abs(xf @ wf.T).max() / 127
    M, shift = np.array([quantize_multiplier(float(s_x * s / s_y)) for s in s_w]).T
    return x, w, M, shift


def token_ids(text: str) -> tuple[int, ...]:
    """argparse type for --demo-tokens: "1,42" -> (1, 42)."""
    try:
        ids = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--demo-tokens {text!r}: give token ids like 1,42,1000") from None
    if not ids or min(ids) < 0:
        raise InputError(f"--demo-tokens {text!r}: give token ids >= 0")
    return ids


def simulate(rtl: Path, vectors: Path, build: Path) -> tuple[bool, str]:
    """Compile rtl with the testbench (once per build folder) and run it on one case: (passed, output)."""
    vvp = build / "tb.vvp"
    if not vvp.is_file():
        c = subprocess.run(["iverilog", "-g2005", "-o", str(vvp), str(rtl), str(TESTBENCH)],
                           capture_output=True, text=True)
        if c.returncode:
            raise InputError(f"{rtl}: iverilog could not compile it: {c.stderr.strip().splitlines()[0]}")
    r = subprocess.run(["vvp", "-n", str(vvp), f"+vectors={vectors}"], capture_output=True, text=True)
    out = r.stdout.strip()
    # iverilog only warns about a vector file of the wrong length: a WARNING is a FAIL here
    return r.returncode == 0 and "PASS" in out and "FAIL" not in out and "WARNING" not in out, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=path_arg, default=OUT_DIR, help="where the cases' vector folders go")
    p.add_argument("--rtl", type=path_arg, default=RTL, help="the Verilog design under test")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the random case")
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=DEMO,
                   help="also the demo model's layer-0 q_proj (when --model-dir holds it)")
    p.add_argument("--model-dir", type=path_arg, default=MODEL_DIR, help="the model of the demo case")
    p.add_argument("--demo-tokens", type=token_ids, default=DEMO_TOKENS,
                   help="comma-separated token ids: the demo case's T rows")
    p.add_argument("--vectors", type=path_arg, action="append", default=[],
                   help="also simulate this folder of vector files (5_golden.py --rtl writes one); repeatable")
    args = p.parse_args(argv)
    print_settings(vars(args))
    if shutil.which("iverilog") is None or shutil.which("vvp") is None:
        raise InputError("iverilog/vvp not found: install Icarus Verilog (apt-get install -y iverilog)")
    if not args.rtl.is_file():
        raise InputError(f"--rtl {args.rtl}: no such Verilog file")
    cases = {"random": random_case(args.seed)}
    if args.demo and (args.model_dir / "config.json").is_file():
        cases["demo_q_proj"] = demo_case(args.model_dir, args.demo_tokens)
    elif args.demo:
        print(f"  (no model in {args.model_dir}: the demo case is skipped)")
    for folder in args.vectors:
        if not (folder / "dims.hex").is_file():
            raise InputError(f"--vectors {folder}: no dims.hex there: write it with 5_golden.py --rtl")
    output_folder(args.out_dir, inputs=[args.model_dir, HERE, *args.vectors])  # never where the model or the RTL is read
    build = args.out_dir / "build"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    ok = True
    for name, (x, w, M, shift) in cases.items():
        write_vectors(args.out_dir / name, x, w, M, shift)
        passed, out = simulate(args.rtl, args.out_dir / name, build)
        print(f"== {name}: T={x.shape[0]} K={x.shape[1]} N={w.shape[0]}\n{out}")
        ok &= passed
    for folder in args.vectors:  # written elsewhere (5_golden.py --rtl): simulated where they are
        passed, out = simulate(args.rtl, folder, build)
        print(f"== {folder}\n{out}")
        ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    run(main)
