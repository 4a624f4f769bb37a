"""Steps 5 and 6 on the quantized path: integer words in every container (bytes pinned, int4 nibble
order), the RTL vectors of a real w8a8 capture in Icarus Verilog, exact integer grading, and the
quantization-error report of a torchao-quantized capture against the float capture of the same prompts."""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script, step2
from quant_capture import integer_files, quantized_capture

from common.check import golden_int
from common.files import layout
from common.files.csv_io import read_csv, read_int_csv
from common.files.quant_export import write_csv_exact
from common.check.rtl_vectors import read_hex_words
from common.quant.schemes import get_scheme

FORMATS = ("bin", "hex", "mem", "npy", "npz")
PROMPTS = ["the quick brown fox", "hi"]


@pytest.fixture(scope="module")
def quant_run(llama32, tmp_path_factory):
    """A float capture, its torchao w8a8 twin, step 1 --quant w8a8 and w4a8-g32, and the integer files of layer 0."""
    base = tmp_path_factory.mktemp("quant_run")
    acts = step2(llama32, base / "acts", prompts=PROMPTS)
    qacts = quantized_capture(llama32, acts, base / "acts-w8a8")
    step1 = load_script("1_model_weights.py")
    for scheme in ("w8a8", "w4a8-g32"):
        assert step1.main(["--model-dir", str(llama32), "--out-dir", str(base / f"weights-{scheme}"),
                           "--quant", scheme, "--filter", r"^model\.layers\.0\."]) == 0
    ints = integer_files(qacts, base / "weights-w8a8", base / "qkv-w8a8")
    return {"base": base, "acts": acts, "qacts": qacts, "ints": ints, "w8": base / "weights-w8a8",
            "w4": base / "weights-w4a8-g32"}


@pytest.fixture(scope="module")
def step5():
    return load_script("5_golden.py")


@pytest.fixture(scope="module")
def step6():
    return load_script("6_grade.py")


def run_main(module, argv, capsys) -> tuple[int, str, str]:
    """A script's main through common.cli.run's rules: (exit code, stdout, stderr)."""
    from common.cli import InputError
    try:
        code = module.main([str(a) for a in argv])
    except InputError as e:
        code, err = 2, str(e)
        out = capsys.readouterr().out
        return code, out, err
    out = capsys.readouterr().out
    return code, out, ""


# --- step 5: integer words ---------------------------------------------------------------------


def test_int4_nibble_order_low_first_and_planted_swap_fails():
    values = [-1, 7, -8, 0, 3]  # odd count: the last high nibble is padding 0
    pinned = bytes([0x7F, 0x08, 0x03])
    assert golden_int.pack_int4_ref(values) == pinned
    assert golden_int.pack_int4_words(np.array(values)).tobytes() == pinned
    assert golden_int.unpack_int4_words(np.frombuffer(pinned, np.uint8), 5).tolist() == values
    rng = np.random.default_rng(0)
    many = rng.integers(-8, 8, 1001)
    assert golden_int.pack_int4_words(many).tobytes() == golden_int.pack_int4_ref(many.tolist())

    def swapped(v):  # planted: element 2i in the HIGH nibble
        p = golden_int.pack_int4_words(v)
        return (p >> 4) | ((p & 0x0F) << 4)
    assert swapped(np.array(values)).tobytes() != pinned
    assert golden_int.unpack_int4_words(swapped(many), many.size).tolist() != many.tolist()


def small_int_folder(folder: Path, acc=((2**31 - 1, -2**31), (0, -2)), xq=((1, -1), (127, -128))) -> Path:
    folder.mkdir(parents=True)
    write_csv_exact(folder / layout.xq("q_proj", 0), np.array(xq, np.int64))
    write_csv_exact(folder / layout.acc("q_proj", 0), np.array(acc, np.int64))
    write_csv_exact(folder / layout.xscale("q_proj", 0), np.array([[0.5], [0.25]], np.float32))
    (folder / layout.META_MODEL).write_text(json.dumps({"quant": get_scheme("w8a8").record(False)}))
    return folder


def test_integer_words_bytes_pinned(tmp_path, step5, capsys):
    src = small_int_folder(tmp_path / "in")
    out = {}
    for fmt in ("bin", "hex"):
        code, _, err = run_main(step5, ["--integer", "--in-dir", src, "--format", fmt, "--out-dir", tmp_path / fmt], capsys)
        assert code == 0, err
        out[fmt] = tmp_path / fmt
    assert (out["bin"] / "xq_q_proj_layer0.bin").read_bytes() == bytes([0x01, 0xFF, 0x7F, 0x80])
    assert (out["bin"] / "acc_q_proj_layer0.bin").read_bytes() == bytes.fromhex("ffffff7f" "00000080" "00000000" "feffffff")
    assert (out["bin"] / "xscale_q_proj_layer0.bin").read_bytes() == struct.pack("<ff", 0.5, 0.25)
    assert (out["hex"] / "xq_q_proj_layer0.hex").read_text() == "01\nff\n7f\n80\n"
    assert (out["hex"] / "acc_q_proj_layer0.hex").read_text() == "7fffffff\n80000000\n00000000\nfffffffe\n"
    m = json.loads((out["hex"] / "golden_manifest.json").read_text())
    assert m["encoding"] == "integer" and m["quant"]["scheme"] == "w8a8"
    assert {e["tensor"]: e["word"] for e in m["files"]} == {
        "xq_q_proj_layer0": "int8", "acc_q_proj_layer0": "int32", "xscale_q_proj_layer0": "float32"}


@pytest.mark.parametrize("bad", [{"acc": ((2**31, 0), (0, 0))}, {"xq": ((128, 0), (0, 0))}, {"xq": ((1, 2.5), (0, 0))}])
def test_integer_out_of_range_is_one_line_exit_2_nothing_written(tmp_path, step5, capsys, bad):
    if "xq" in bad and isinstance(bad["xq"][0][1], float):
        src = small_int_folder(tmp_path / "in")
        (src / layout.xq("q_proj", 0)).write_text("1,2.5\n0,0\n")
    else:
        src = small_int_folder(tmp_path / "in", **bad)
    code, _, err = run_main(step5, ["--integer", "--in-dir", src, "--out-dir", tmp_path / "out"], capsys)
    assert code == 2 and "\n" not in err and ("xq_q_proj" in err or "acc_q_proj" in err)
    assert not (tmp_path / "out").exists()


def test_every_container_round_trips_and_grades_exact(quant_run, tmp_path, step5, step6, capsys):
    ints = quant_run["ints"]
    for fmt in FORMATS:
        out = tmp_path / fmt
        code, _, err = run_main(step5, ["--integer", "--in-dir", ints, "--format", fmt, "--out-dir", out], capsys)
        assert code == 0, err
        m = golden_int.load_manifest(out)
        assert m["quant"]["scheme"] == "w8a8" and len(m["files"]) == 15
        for e in m["files"]:
            back = golden_int.read_entry(out, fmt, e)
            src = ints / e["source"]
            if e["word"] == "float32":
                assert back.tobytes() == read_csv(src).tobytes()
            else:
                assert back.dtype == np.int64 and np.array_equal(back, read_int_csv(src)), (fmt, e["tensor"])
    # step 6: the words of one container against the CSVs: exact
    code, out, _ = run_main(step6, ["--candidate-dir", tmp_path / "npz", "--reference-dir", ints,
                                    "--out-dir", tmp_path / "grade"], capsys)
    assert code == 0 and out.strip().splitlines()[-1].startswith("EXACT: 10 integer tensors")


def test_int4_weights_in_every_container(quant_run, tmp_path, step5, capsys):
    w4 = quant_run["w4"]
    name = "model.layers.0.self_attn.q_proj.weight.q"
    q = read_int_csv(w4 / f"{name}.csv")
    assert q.min() >= -8 and q.max() <= 7 and q.min() < 0
    for fmt in FORMATS:
        out = tmp_path / fmt
        code, _, err = run_main(step5, ["--integer", "--in-dir", w4, "--select", r"q_proj\.weight", "--format", fmt,
                                        "--out-dir", out], capsys)
        assert code == 0, err
        m = golden_int.load_manifest(out)
        e = next(e for e in m["files"] if e["tensor"] == name)
        assert e["word"] == "int4" and e["words"] == q.size // 2 and m["quant"]["scheme"] == "w4a8-g32"
        assert np.array_equal(golden_int.read_entry(out, fmt, e), q)
    # the hex file's first byte holds elements 0 (low nibble) and 1 (high nibble)
    first = int((tmp_path / "hex" / f"{name}.hex").read_text().split()[0], 16)
    assert [(first & 15) - 16 * ((first & 15) > 7), (first >> 4) - 16 * ((first >> 4) > 7)] == q[0, :2].tolist()


# --- step 5 --rtl -------------------------------------------------------------------------------


def test_rtl_vectors_from_a_real_w8a8_capture(quant_run, tmp_path, step5, capsys):
    vec = tmp_path / "rtl"
    code, out, err = run_main(step5, ["--rtl", "--in-dir", quant_run["ints"], "--weights-dir", quant_run["w8"],
                                      "--out-dir", vec, "--rtl-rows", 5], capsys)
    assert code == 0, err
    T, K, N = read_hex_words(vec / "dims.hex", 32).tolist()
    acc = read_int_csv(quant_run["ints"] / layout.acc("q_proj", 0))
    assert (T, N) == (5, acc.shape[1])
    assert np.array_equal(read_hex_words(vec / "acc.hex", 32).reshape(T, N), acc[:5])  # the run's own accumulators
    assert np.array_equal(read_hex_words(vec / "x.hex", 8).reshape(T, K),
                          read_int_csv(quant_run["ints"] / layout.xq("q_proj", 0))[:5])
    outs = read_hex_words(vec / "out.hex", 8)
    assert outs.min() >= -128 and outs.max() <= 127 and np.abs(outs).max() > 32  # the int8 range is used
    if shutil.which("iverilog") is None:
        pytest.skip("iverilog not on PATH: the simulation is not run")
    rtl = load_script("examples/rtl/run_rtl.py")
    code, out, err = run_main(rtl, ["--no-demo", "--out-dir", tmp_path / "sim", "--vectors", vec], capsys)
    assert code == 0 and out.count("PASS") == 2, out
    bad = tmp_path / "bad"  # planted: one output word off by one
    shutil.copytree(vec, bad)
    words = (bad / "out.hex").read_text().split()
    words[3] = f"{(int(words[3], 16) + 1) & 0xFF:02x}"
    (bad / "out.hex").write_text("\n".join(words) + "\n")
    code, out, _ = run_main(rtl, ["--no-demo", "--out-dir", tmp_path / "sim2", "--vectors", bad], capsys)
    assert code == 1 and "FAIL: first mismatch out[3]" in out


def test_rtl_refuses_weights_of_another_run_and_non_w8a8(quant_run, tmp_path, step5, capsys):
    ints = tmp_path / "ints"
    shutil.copytree(quant_run["ints"], ints)
    code, _, err = run_main(step5, ["--rtl", "--in-dir", ints, "--weights-dir", quant_run["w4"],
                                    "--out-dir", tmp_path / "o1"], capsys)
    assert code == 2 and "use folders of one run" in err and not (tmp_path / "o1").exists()
    acc = read_int_csv(ints / layout.acc("q_proj", 0))
    acc[1, 2] += 1  # planted: one accumulator that is not xq @ wq.T
    write_csv_exact(ints / layout.acc("q_proj", 0), acc)
    code, _, err = run_main(step5, ["--rtl", "--in-dir", ints, "--weights-dir", quant_run["w8"],
                                    "--out-dir", tmp_path / "o1"], capsys)
    assert code == 2 and "differs from xq @ wq.T at (1, 2)" in err and not (tmp_path / "o1").exists()
    meta = json.loads((ints / layout.META_MODEL).read_text())
    (ints / layout.META_MODEL).write_text(json.dumps({**meta, "quant": get_scheme("w4a8-g32").record(False)}))
    code, _, err = run_main(step5, ["--rtl", "--in-dir", ints, "--weights-dir", quant_run["w8"],
                                    "--out-dir", tmp_path / "o2"], capsys)
    assert code == 2 and "needs a w8a8 run" in err and not (tmp_path / "o2").exists()


# --- step 6 -------------------------------------------------------------------------------------


def test_integer_grading_counts_off_by_one(quant_run, tmp_path, step6, capsys):
    cand = tmp_path / "cand"
    shutil.copytree(quant_run["ints"], cand)
    acc_k = read_int_csv(cand / layout.acc("k_proj", 0))
    acc_k[2, 3] += 1
    acc_k[0, 5] -= 1
    acc_k[1, 1] += 3  # not a rounding difference
    write_csv_exact(cand / layout.acc("k_proj", 0), acc_k)
    xq_up = read_int_csv(cand / layout.xq("up_proj", 0))
    xq_up[0, 0] = xq_up[0, 0] + 1 if xq_up[0, 0] < 127 else 126
    write_csv_exact(cand / layout.xq("up_proj", 0), xq_up)
    code, out, _ = run_main(step6, ["--candidate-dir", cand, "--reference-dir", quant_run["ints"],
                                    "--out-dir", tmp_path / "grade"], capsys)
    assert code == 1
    r = json.loads((tmp_path / "grade" / layout.REPORT_JSON).read_text())
    assert (r["mismatches"], r["off_by_one"], r["max_lsb"]) == (4, 3, 3)
    assert r["first"]["tensor"] == "acc_k_proj_layer0" and r["first"]["index"] == [0, 5]  # forward order: k before up
    assert out.strip().splitlines()[-1].startswith("MISMATCH: 4 of")


def test_quantized_capture_against_float(quant_run, tmp_path, step6, capsys):
    code, out, _ = run_main(step6, ["--candidate-dir", quant_run["qacts"], "--reference-dir", quant_run["acts"],
                                    "--out-dir", tmp_path / "qe"], capsys)
    assert code == 0
    r = json.loads((tmp_path / "qe" / layout.REPORT_JSON).read_text())
    by = {(n["layer"], n["node"]): n for n in r["nodes"]}
    assert r["mode"] == "quantization_error" and r["scheme"]["scheme"] == "w8a8"
    assert by[0, "x"]["sqnr_db"] == "inf"  # the embedding is not quantized: layer 0's input is identical
    q0 = by[0, "q"]
    assert 25 < q0["sqnr_db"] < 60 and 0.99 < q0["cosine"] < 1 and q0["max_abs"] > 0
    assert math.isclose(q0["nmse"], 10 ** (-q0["sqnr_db"] / 10), rel_tol=1e-9)
    last = max(n for n, _ in by if n is not None)
    assert by[last, "out"]["sqnr_db"] < by[0, "out"]["sqnr_db"]  # error grows through the layers
    lg = r["logits"]
    assert 0 < lg["kl"] < 0.05 and 0 <= lg["top1_agreement"] <= 1 and 0 < lg["top5_overlap"] <= 1
    assert (tmp_path / "qe" / "quant_errors.png").stat().st_size > 10_000
    assert out.strip().splitlines()[-1].startswith("logits (")  # top-1 and KL printed last


def test_identical_and_perturbed_candidates(quant_run, tmp_path, step6, capsys):
    acts = quant_run["acts"]
    code, out, _ = run_main(step6, ["--candidate-dir", acts, "--reference-dir", acts, "--quant-error",
                                    "--out-dir", tmp_path / "same"], capsys)
    r = json.loads((tmp_path / "same" / layout.REPORT_JSON).read_text())
    assert code == 0 and all(n["sqnr_db"] == "inf" and n["max_abs"] == 0 for n in r["nodes"])
    assert (r["logits"]["kl"], r["logits"]["top1_agreement"], r["logits"]["top5_overlap"]) == (0.0, 1.0, 1.0)
    cand = tmp_path / "perturbed"  # planted: one node 1% off, and the logits' top-1 flipped on one row
    shutil.copytree(acts, cand)
    mlp = read_csv(cand / "ref_mlp_layer1.csv")
    np.savetxt(cand / "ref_mlp_layer1.csv", mlp * np.float32(1.01), delimiter=",", fmt="%.9g")
    logits = read_csv(cand / layout.REF_LOGITS)
    mask = read_csv(acts / layout.ATTENTION_MASK).reshape(-1) > 0
    row = int(np.flatnonzero(mask)[0]) if logits.shape[0] == mask.size else 0
    logits[row, np.argmin(logits[row])] = logits[row].max() + 5
    np.savetxt(cand / layout.REF_LOGITS, logits, delimiter=",", fmt="%.9g")
    code, _, err = run_main(step6, ["--candidate-dir", cand, "--reference-dir", acts, "--quant-error",
                                    "--out-dir", tmp_path / "pert"], capsys)
    assert code == 2 and "ref_mlp_layer1.csv" in err and not (tmp_path / "pert").exists()  # its sha256 says so
    code, _, _ = run_main(step6, ["--candidate-dir", cand, "--reference-dir", acts, "--quant-error",
                                  "--no-verify-hashes", "--out-dir", tmp_path / "pert"], capsys)
    r = json.loads((tmp_path / "pert" / layout.REPORT_JSON).read_text())
    by = {(n["layer"], n["node"]): n for n in r["nodes"]}
    assert 39 < by[1, "mlp"]["sqnr_db"] < 41  # 1% relative error: 40 dB
    assert by[0, "q"]["sqnr_db"] == "inf" and by[1, "out"]["sqnr_db"] == "inf"
    assert r["logits"]["kl"] > 0.01 and r["logits"]["top1_agreement"] < 1


def test_quant_error_refuses_other_prompts(quant_run, tmp_path, step6, capsys):
    cand = tmp_path / "other"
    shutil.copytree(quant_run["qacts"], cand)
    mask = read_csv(cand / layout.ATTENTION_MASK)
    mask[-1, 0] = 1 - mask[-1, 0]
    np.savetxt(cand / layout.ATTENTION_MASK, mask, delimiter=",", fmt="%d")
    code, _, err = run_main(step6, ["--candidate-dir", cand, "--reference-dir", quant_run["acts"],
                                    "--no-verify-hashes", "--out-dir", tmp_path / "o"], capsys)
    assert code == 2 and "not of the same prompts" in err and not (tmp_path / "o").exists()
