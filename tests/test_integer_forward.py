"""Step 4 --integer-only (common/quant/calibrate.py, integer_forward.py, common/check/integer_run.py):
the integer-only forward on a tiny Llama-3.2-shaped model and the demo model, against the float32
captures; its files read back bit for bit; the same bytes under another BLAS core type; planted
mistakes that must change the integers (and the error against float); bad input: one line, exit 2.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import load_script, run_script, step2
from test_quant_fixedpoint import _float_uses

from common.check import integer_run, offline
from common.cli import InputError
from common.files.csv_io import read_int_csv
from common.files import int_layout as il
from common.llama.rope import rope_inv_freq
from common.quant import calibrate as cal
from common.quant import fixedpoint as fp
from common.quant import integer_forward as ifw
from common.quant import zk_forward as zkf
from common.quant.fixedpoint import rms_norm_int_ref, softmax_int_ref
from common.quant.requant import requantize_single_ref as rq_ref
from common.quant.requant import rounding_right_shift_half_up, saturate_ref

PROMPTS = ("The capital of France is Paris. The capital of Italy is", "Attention is all you need: queries")


@pytest.fixture(scope="module")
def tiny(llama32, tmp_path_factory):
    """Step 1 --quant w8a8 --quant-head and step 2 of the tiny llama32 model, then one integer-only run (layer)."""
    base = tmp_path_factory.mktemp("intfwd")
    w, x = base / "w", base / "x"
    assert load_script("1_model_weights.py").main(["--model-dir", str(llama32), "--out-dir", str(w), "--quant", "w8a8",
                                                   "--quant-head"]) == 0
    step2(llama32, x, prompts=PROMPTS)
    out = base / "int"
    rc = integer_run.run(x, w, out, llama32, "layer")
    return {"model": llama32, "w": w, "x": x, "out": out, "rc": rc, "base": base}


def hashes(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("int_*.csv"))}


def test_tiny_layer_and_chain_against_float(tiny):
    rep = json.loads((tiny["out"] / il.REPORT_JSON).read_text())
    lm = rep["head"]["logits"]
    assert tiny["rc"] == 0 and lm["top1_agree"] == lm["prompts"] == 2
    assert lm["cosine"] > 0.995 and lm["kl"] < 0.01
    for n, nodes in rep["layers"].items():
        for node, m in nodes.items():
            assert m["sqnr_db"] > 18, (n, node, m)  # measured on this model: 21 dB and up
    out = tiny["base"] / "chain"
    assert integer_run.run(tiny["x"], tiny["w"], out, tiny["model"], "chain", "double") == 0
    man = json.loads((out / il.MANIFEST).read_text())
    assert man["rule"] == "double" and set(man["files"]) >= set(hashes(out))
    ranges = json.loads((out / il.RANGES).read_text())["ranges"]
    assert set(ranges["0"]) == {"rmsnorm x", "rmsnorm h", "rope q, k", "softmax (scores - max)", "silu"}


def test_int8_activations(tiny, monkeypatch):
    """ACT_BITS = 8: int8 x int8 everywhere, as textbooks do it; recorded, and still close on the tiny model."""
    monkeypatch.setattr(cal, "ACT_BITS", 8)
    out = tiny["base"] / "a8"
    integer_run.run(tiny["x"], tiny["w"], out, tiny["model"], "layer")
    assert all(L["act_bits"] == 8 for L in json.loads((out / il.CALIBRATION).read_text())["layers"])
    xnorm = read_int_csv(out / il.int_node("xnorm", 0))
    assert xnorm.min() >= -128 and xnorm.max() <= 127 and xnorm.max() == 127
    assert json.loads((out / il.REPORT_JSON).read_text())["head"]["logits"]["cosine"] > 0.99


def read_layer(out, L: dict, n: int, B: int, H: int, T: int) -> dict:
    d = {}
    for node in ifw.INT_NODES:
        a = read_int_csv(out / il.int_node(node, n))
        d[node] = a.reshape(B, H, T, T) if node in ("scores", "probs") else a
    return d


def layer_inputs(tiny, n: int = 0):
    """Layer n of the tiny run rebuilt from its files: (IntLayer, record, golden nodes, cos, sin, mask, shape)."""
    meta = json.loads((tiny["x"] / "meta_model.json").read_text())
    B, T, H, Hkv, Dh = (meta[k] for k in ("batch_size", "seq_len", "num_heads", "num_kv_heads", "head_dim"))
    record = integer_run.read_tables(tiny["out"], meta)
    w = integer_run.read_layer_weights(tiny["w"], n, meta)
    mask, pos, _ = offline.read_batch(tiny["x"], B, T)
    cos, sin = ifw.rope_positions(np.array(record["rope"]["cos"]), np.array(record["rope"]["sin"]), pos.astype(np.int64))
    L = record["layers"][n]
    golden = read_layer(tiny["out"], L, n, B, H, T)
    return integer_run.int_layer(L, w), golden, cos, sin, mask, ifw.Shape(B, T, H, Hkv, Dh), meta, pos


def mismatches(a: dict, b: dict) -> int:
    return sum(int(np.sum(a[k] != b[k])) for k in ifw.INT_NODES)


def test_files_are_what_ran_bit_for_bit(tiny):
    layer, golden, cos, sin, mask, shape, *_ = layer_inputs(tiny)
    nodes = ifw.layer_int(golden["x"], layer, cos, sin, mask, shape, "single", {})
    assert mismatches(nodes, golden) == 0


def layer_ref(layer: ifw.IntLayer, g: dict, cos: np.ndarray, sin: np.ndarray, mask: np.ndarray, s: ifw.Shape,
              b: int, t: int) -> dict[str, list]:
    """Query token t of prompt b through the layer in plain Python ints, from the fixedpoint/requant references
    (its keys and values: the golden k, v of the tokens before it)."""
    ints = lambda a: [int(v) for v in a]  # noqa: E731
    r, Dh, half = b * s.T + t, s.Dh, s.Dh // 2
    M = {k: (ints(v.M), ints(v.shift)) for k, v in layer.rq.items()}

    def rq(acc: int, key: str, n: int, bits: int) -> int:
        Ms, shs = M[key]
        return rq_ref(acc, Ms[n if len(Ms) > 1 else 0], shs[n if len(shs) > 1 else 0], bits)

    def lin(x: list, p: str, bits: int) -> list:
        return [rq(sum(a * w for a, w in zip(x, ints(row))), p, n, bits) for n, row in enumerate(layer.w[p])]

    def rrs(v: int, k: int) -> int:  # >>r k, half up
        return (v + (1 << (k - 1))) >> k if k else v

    def add(a: list, fa, c: list, fc, fo) -> list:
        al = lambda v, f: v << (fo.frac - f.frac) if fo.frac >= f.frac else rrs(v, f.frac - fo.frac)  # noqa: E731
        return [saturate_ref(al(u, fa) + al(v, fc), fo.bits) for u, v in zip(a, c)]
    x, f, A = ints(g["x"][r]), layer.fmt, layer.act_bits
    out = {"xnorm": rms_norm_int_ref(x, f["x"].frac, ints(layer.gamma_in), f["gamma_in"].frac, layer.eps_x, 0, A)}
    c, sn = ints(cos[b, t]), ints(sin[b, t])
    rope = lambda y: [saturate_ref(rrs(y[j] * c[j] - y[j + half] * sn[j], 14), 8) for j in range(half)] + [  # noqa: E731
        saturate_ref(rrs(y[j + half] * c[j] + y[j] * sn[j], 14), 8) for j in range(half)]
    q = lin(out["xnorm"], "q_proj", 8)
    out["q"] = [v for h in range(s.H) for v in rope(q[h * Dh:(h + 1) * Dh])]
    out["k"] = [v for h in range(s.Hkv) for v in rope(lin(out["xnorm"], "k_proj", 8)[h * Dh:(h + 1) * Dh])]
    out["v"] = lin(out["xnorm"], "v_proj", 8)
    allowed = [bool(mask[b, j]) and j <= t for j in range(s.T)]
    ctx = []
    for h in range(s.H):
        kv = h // (s.H // s.Hkv)
        qh = out["q"][h * Dh:(h + 1) * Dh]
        keys = [ints(g["k"][b * s.T + j][kv * Dh:(kv + 1) * Dh]) for j in range(s.T)]
        vals = [ints(g["v"][b * s.T + j][kv * Dh:(kv + 1) * Dh]) for j in range(s.T)]
        scores = [rq(sum(a * w for a, w in zip(qh, kj)), "scores", 0, 32) for kj in keys]
        probs = softmax_int_ref(scores, allowed, layer.iexp, 15)
        ctx += [rq(sum(p * vj[i] for p, vj in zip(probs, vals)), "ctx", 0, A) for i in range(Dh)]
    out["ctx"] = ctx
    out["attn"] = lin(ctx, "o_proj", f["attn"].bits)
    out["h"] = add(x, f["x"], out["attn"], f["attn"], f["h"])
    out["hnorm"] = rms_norm_int_ref(out["h"], f["h"].frac, ints(layer.gamma_post), f["gamma_post"].frac, layer.eps_h,
                                    0, A)
    gate, up = lin(out["hnorm"], "gate_proj", 8), lin(out["hnorm"], "up_proj", A)
    out["act"] = [rq(int(layer.silu_table[gv + 128]) * u, "act", 0, A) for gv, u in zip(gate, up)]
    out["mlp"] = lin(out["act"], "down_proj", f["mlp"].bits)
    out["out"] = add(out["h"], f["h"], out["mlp"], f["mlp"], f["out"])
    return out


def test_the_layer_is_its_plain_python_reference(tiny):
    """One token per prompt through layer 1 in plain Python ints (fixedpoint's and requant's *_ref): the
    vectorised layer's files, integer for integer."""
    layer, golden, cos, sin, mask, shape, *_ = layer_inputs(tiny, 1)
    for b in range(shape.B):
        t = shape.T - 1  # each prompt's last token (left padding): it attends to every real key
        ref = layer_ref(layer, golden, cos, sin, mask, shape, b, t)
        for node, values in ref.items():
            assert golden[node][b * shape.T + t].tolist() == values, (b, node)


def test_planted_mistakes_fail(tiny, monkeypatch):
    """Each planted mistake changes integers the golden files pin (a bit-exact check FAILs)."""
    layer, golden, cos, sin, mask, shape, meta, pos = layer_inputs(tiny)

    def run_with(**kw):
        return ifw.layer_int(golden["x"], kw.get("layer", layer), kw.get("cos", cos), kw.get("sin", sin), mask, shape,
                             kw.get("rule", "single"), {})
    assert mismatches(run_with(rule="double"), golden) > 0  # double rounding where single is recorded
    off = {k: ifw.Requant(r.M, np.minimum(r.shift + 1, 31)) for k, r in layer.rq.items()}
    assert mismatches(run_with(layer=ifw.IntLayer(**{**layer.__dict__, "rq": off})), golden) > 0  # shift off by one
    f = layer.fmt["scores"].frac  # i-exp constants at half the scale, claimed for this one
    wrong = {**fp.iexp_constants(f - 1), "frac_in": f}
    twin = run_with(layer=ifw.IntLayer(**{**layer.__dict__, "iexp": wrong}))
    assert np.sum(twin["probs"] != golden["probs"]) > 0
    # RoPE tables without the llama3 scaling: the model's position range is short, but its low
    # frequencies are scaled (model_factory's original_max_position_embeddings), so q and k change.
    plain = rope_inv_freq(meta["head_dim"], meta["rope_theta"], None)
    c0, s0 = fp.rope_tables(np.arange(int(pos.max()) + 1), plain)
    c_pl, s_pl = ifw.rope_positions(c0.astype(np.int64), s0.astype(np.int64), pos.astype(np.int64))
    twin = run_with(cos=c_pl, sin=s_pl)
    assert np.sum(twin["q"] != golden["q"]) > 0 and np.sum(twin["k"] != golden["k"]) > 0

    # Missing saturation: v_proj's shift one less (v twice as large) makes v saturate; a requantization
    # that forgets to clamp gives other v and so other ctx, attn, ...
    rq = {**layer.rq, "v_proj": ifw.Requant(layer.rq["v_proj"].M, np.maximum(layer.rq["v_proj"].shift - 1, 0))}
    wide = ifw.IntLayer(**{**layer.__dict__, "rq": rq})
    right = run_with(layer=wide)
    assert np.sum((right["v"] == 127) | (right["v"] == -128)) > 2  # it did saturate

    def unsaturated(acc, r, rule, bits=8):
        return rounding_right_shift_half_up(np.asarray(acc, np.int64) * r.M, 31 + r.shift)
    monkeypatch.setattr(ifw, "requant", unsaturated)
    try:  # other integers, or a later op refuses a value outside its format: either way a FAIL
        assert mismatches(run_with(layer=wide), right) > 0
    except InputError as e:
        assert "values must be integers in" in str(e)


def test_integer_path_has_no_float():
    ops = [ifw.requant, ifw.linear_int, ifw.seen, ifw.attention_int, ifw.layer_int, ifw.next_input, ifw.head_int,
           ifw.rope_positions, zkf.matmul_zk, zkf.mul_zk, zkf.norm_zk, zkf.silu_zk, zkf.layer_zk, zkf.head_zk]
    for op in ops:
        assert _float_uses(op) == [], op.__name__


def test_same_bytes_under_another_blas_core(tiny):
    """No float on the integer path: OpenBLAS's Haswell kernels and numpy without AVX-512 give the same files."""
    out = tiny["base"] / "haswell"
    env = {"OPENBLAS_CORETYPE": "Haswell", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
    r = run_script("4_offline_forward.py", "--integer-only", "--model-dir", tiny["model"], "--acts-dir", tiny["x"],
                   "--weights-dir", tiny["w"], "--out-dir", out, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    ours = hashes(tiny["out"])
    assert len(ours) > 16 * 3 and hashes(out) == ours
    # The ZK preset's int64 products and shifts (numpy's SIMD integer loops, no BLAS) alike, in chain mode.
    zk_here, zk_there = tiny["base"] / "zk_here", tiny["base"] / "zk_haswell"
    assert integer_run.run(tiny["x"], tiny["w"], zk_here, tiny["model"], "chain", zk=True) == 0
    r = run_script("4_offline_forward.py", "--integer-only", "--zk", "--mode", "chain", "--model-dir", tiny["model"],
                   "--acts-dir", tiny["x"], "--weights-dir", tiny["w"], "--out-dir", zk_there, env=env)
    assert r.returncode == 0 and hashes(zk_there) == hashes(zk_here) != ours, r.stdout + r.stderr


def test_zk_preset(tiny, monkeypatch):
    """The ZK preset (int64 at 2^16): layer and chain against float; its files pin every >>r 16."""
    out = tiny["base"] / "zk"
    assert integer_run.run(tiny["x"], tiny["w"], out, tiny["model"], "chain", zk=True) == 0
    rep = json.loads((out / il.REPORT_JSON).read_text())
    lm = rep["head"]["logits"]
    assert lm["top1_agree"] == lm["prompts"] and lm["cosine"] > 0.999, lm
    assert all(m["sqnr_db"] > 30 for nodes in rep["layers"].values() for m in nodes.values())  # measured: 35 and up
    assert json.loads((out / il.MANIFEST).read_text())["preset"] == "zk"
    golden = read_int_csv(out / il.int_node("mlp", 0))

    def floor_shift(x, k):  # planted: truncation where >>r (half up) is stated
        return np.asarray(x, np.int64) >> k
    monkeypatch.setattr(zkf, "rounding_right_shift_half_up", floor_shift)
    twin = tiny["base"] / "zk_twin"
    integer_run.run(tiny["x"], tiny["w"], twin, tiny["model"], "chain", zk=True)
    assert np.sum(read_int_csv(twin / il.int_node("mlp", 0)) != golden) > 0


def test_format_that_cannot_hold_the_range(tiny, tmp_path):
    with pytest.raises(InputError, match="x layer 0"):
        cal.fmt_for("x layer 0", np.array([-1e9, 1e9]), cal.RESIDUAL_BITS)
    acts = tmp_path / "x"
    shutil.copytree(tiny["x"], acts)
    x0 = acts / "x_layer0.csv"
    rows = x0.read_text().splitlines()
    x0.write_text("\n".join(["1e9," + r.split(",", 1)[1] for r in rows]) + "\n")  # far past Q(24, 0)
    r = run_script("4_offline_forward.py", "--integer-only", "--model-dir", tiny["model"], "--acts-dir", acts,
                   "--weights-dir", tiny["w"], "--out-dir", tmp_path / "o", "--no-verify-hashes")
    one_line_exit_2(r, "x layer 0", "does not fit int24")


def bad_run(tiny, tmp_path, edit) -> subprocess.CompletedProcess:
    calib = tmp_path / "calib"
    shutil.copytree(tiny["out"], calib)
    edit(calib)
    return run_script("4_offline_forward.py", "--integer-only", "--model-dir", tiny["model"], "--acts-dir", tiny["x"],
                      "--weights-dir", tiny["w"], "--out-dir", tmp_path / "o", "--calibration", calib)


def one_line_exit_2(r, *words) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line


def test_bad_multiplier_and_table(tiny, tmp_path):
    def big_m(folder):
        rec = json.loads((folder / il.CALIBRATION).read_text())
        rec["layers"][1]["requant"]["q_proj"]["M"][0] = 2**31
        (folder / il.CALIBRATION).write_text(json.dumps(rec))
    one_line_exit_2(bad_run(tiny, tmp_path / "a", big_m), "layer 1 q_proj", "multiplier")

    def short_table(folder):
        p = folder / il.silu_table(0)
        p.write_text(",".join(p.read_text().strip().split(",")[:255]) + "\n")
    one_line_exit_2(bad_run(tiny, tmp_path / "b", short_table), il.silu_table(0), "shape")

    def no_format(folder):
        rec = json.loads((folder / il.CALIBRATION).read_text())
        del rec["layers"][2]["fmt_h"]
        rec["layers"][0]["fmt_x"] = [24, 70]
        (folder / il.CALIBRATION).write_text(json.dumps(rec))
    one_line_exit_2(bad_run(tiny, tmp_path / "c", no_format), "layer 0", "fmt_x [24, 70]")


def test_demo_chain_keeps_top1(demo_model, tmp_path):
    """The demo model (30 layers): the integer-only chain keeps the float model's top-1 at each prompt's end."""
    w, x, out = tmp_path / "w", tmp_path / "x", tmp_path / "int"
    assert load_script("1_model_weights.py").main(["--model-dir", str(demo_model), "--out-dir", str(w), "--quant",
                                                   "w8a8", "--quant-head"]) == 0
    step2(demo_model, x, prompts=("The capital of France is", "Water boils at a temperature of", "def fibonacci(n):"))
    assert integer_run.run(x, w, out, demo_model, "chain") == 0
    lm = json.loads((out / il.REPORT_JSON).read_text())["head"]["logits"]
    assert lm["top1_agree"] == 3 and lm["cosine"] > 0.99, lm
    # The same bytes on an AVX2 machine: the calibration's float ranges (numpy, BLAS) differ there by an
    # ulp, which its coarse rounding absorbs (calibrate.coarse_up); past it everything is integers.
    env = {"OPENBLAS_CORETYPE": "Haswell", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
    r = run_script("4_offline_forward.py", "--integer-only", "--mode", "chain", "--model-dir", demo_model,
                   "--acts-dir", x, "--weights-dir", w, "--out-dir", tmp_path / "int_avx2", env=env)
    assert r.returncode == 0 and hashes(tmp_path / "int_avx2") == hashes(out), r.stdout + r.stderr


def test_an_edited_weight_is_refused_by_its_hash(tiny, tmp_path):
    """One int8 weight changed by 1 after step 1 wrote it: refused (exit 2, the file named) before any work."""
    weights = tmp_path / "w"
    shutil.copytree(tiny["w"], weights)
    name = "model.layers.0.self_attn.q_proj.weight.q.csv"
    rows = (weights / name).read_text().splitlines()
    first = rows[0].split(",")
    first[0] = str(int(first[0]) + (1 if int(first[0]) < 127 else -1))
    (weights / name).write_text("\n".join([",".join(first), *rows[1:]]) + "\n")
    r = run_script("4_offline_forward.py", "--integer-only", "--model-dir", tiny["model"], "--acts-dir", tiny["x"],
                   "--weights-dir", weights, "--out-dir", tmp_path / "o")
    one_line_exit_2(r, name)
