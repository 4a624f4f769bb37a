"""The RTL (examples/rtl/) in Icarus Verilog against golden vectors, bit for bit, and planted one-bit
changes in its rounding and saturation that must make the testbench FAIL. Skipped without iverilog."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from common.cli import InputError
from common.check import rtl_vectors
from common.quant.requant import requantize_single_ref

RUNNER = ROOT / "examples" / "rtl" / "run_rtl.py"
RTL = ROOT / "examples" / "rtl" / "int8_dot_requant.v"
needs_iverilog = pytest.mark.skipif(shutil.which("iverilog") is None or shutil.which("vvp") is None,
                                    reason="Icarus Verilog (iverilog, vvp) is not installed: "
                                           "apt-get install -y iverilog")


def _run(tmp_path, rtl=RTL) -> subprocess.CompletedProcess:
    args = ["--no-demo", "--out-dir", str(tmp_path / "rtl"), "--rtl", str(rtl)]
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True)


def _planted(tmp_path, old: str, new: str):
    text = RTL.read_text()
    assert text.count(old) == 1
    path = tmp_path / "planted.v"
    path.write_text(text.replace(old, new))
    return path


@needs_iverilog
def test_rtl_matches_golden_bit_for_bit(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: 96 accumulators and 96 int8 outputs" in r.stdout
    # the vectors are the plain-Python definition's
    d = tmp_path / "rtl" / "random"
    acc, out = rtl_vectors.read_hex_words(d / "acc.hex", 32), rtl_vectors.read_hex_words(d / "out.hex", 8)
    M, shift = rtl_vectors.read_hex_words(d / "m.hex", 32), rtl_vectors.read_hex_words(d / "shift.hex", 8)
    N = len(M)
    assert [requantize_single_ref(int(a), int(M[i % N]), int(shift[i % N])) for i, a in enumerate(acc)] == out.tolist()
    assert {-1, 0, 1, 2, 3, -2, 64, -63} <= set(out[0::N].tolist())  # channel 0: ties and negative ties
    assert {127, -128} <= set(out[2::N].tolist())  # channel 2 saturates both ways


@needs_iverilog
def test_rtl_on_the_demo_models_layer0_q_proj(demo_model, tmp_path):
    """A real linear: layer 0's q_proj of the demo model (576 x 576), one token's row."""
    r = subprocess.run([sys.executable, str(RUNNER), "--model-dir", str(demo_model), "--demo-tokens", "42",
                        "--out-dir", str(tmp_path / "rtl")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: 576 accumulators and 576 int8 outputs bit for bit (T=1 K=576 N=576)" in r.stdout


@needs_iverilog
def test_planted_rounding_constant_fails(tmp_path):
    """One bit of the rounding: + 2^(s-1) - 1 (ties down) instead of + 2^(s-1)."""
    rtl = _planted(tmp_path, "(64'sd1 <<< (s - 6'd1))", "((64'sd1 <<< (s - 6'd1)) - 64'sd1)")
    r = _run(tmp_path, rtl)
    assert r.returncode == 1
    assert "FAIL: first mismatch out[0] (t=0, n=0): expected 1, got 0" in r.stdout


@needs_iverilog
def test_planted_missing_saturation_fails(tmp_path):
    rtl = _planted(tmp_path, "assign out = (q > 64'sd127) ? 8'sd127 : (q < -64'sd128) ? -8'sd128 : q[7:0];",
                   "assign out = q[7:0];")
    r = _run(tmp_path, rtl)
    assert r.returncode == 1 and "FAIL: first mismatch out[" in r.stdout


@needs_iverilog
def test_planted_shift_off_by_one_fails(tmp_path):
    rtl = _planted(tmp_path, "6'd31 + {1'b0, shift}", "6'd32 + {1'b0, shift}")
    r = _run(tmp_path, rtl)
    assert r.returncode == 1 and "FAIL" in r.stdout


@needs_iverilog
def test_planted_accumulator_never_cleared_fails(tmp_path):
    rtl = _planted(tmp_path, "(clear ? 32'sd0 : acc) + a * b", "acc + a * b")
    r = _run(tmp_path, rtl)
    assert r.returncode == 1 and "FAIL: first mismatch acc[1] (t=0, n=1)" in r.stdout


@needs_iverilog
def test_bad_rtl_is_one_line_exit_2(tmp_path):
    r = _run(tmp_path, tmp_path / "missing.v")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--rtl" in r.stderr
    broken = tmp_path / "broken.v"
    broken.write_text("module int8_dot_requant(; endmodule\n")
    r = _run(tmp_path, broken)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "iverilog could not compile" in r.stderr


def test_hex_words_two_complement():
    assert rtl_vectors.hex_words(np.array([0, 1, -1, 127, -128]), 8) == "00\n01\nff\n7f\n80\n"
    assert rtl_vectors.hex_words(np.array([-2**31, 2**31 - 1]), 32) == "80000000\n7fffffff\n"
    with pytest.raises(InputError):
        rtl_vectors.hex_words(np.array([300]), 8)


def test_golden_refuses_bad_input():
    x, w = np.ones((2, 3), dtype=np.int64), np.ones((4, 3), dtype=np.int64)
    for bad in ((x, w, 2**29, 0), (x, w, 2**30, 32), (x, np.ones((4, 5), dtype=np.int64), 2**30, 0),
                (x * 200, w, 2**30, 0), (x, w, np.full(3, 2**30), 0)):
        with pytest.raises(InputError) as e:
            rtl_vectors.int8_linear_golden(*bad)
        assert "\n" not in str(e.value)
