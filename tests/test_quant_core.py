"""The integer core of the quantized path (issue 19) against torchao 0.18's running model.

For every scheme on every tiny variant (and a part of the demo model, timed): numpy's q and scale
are bit-identical to torchao's qdata and scale; the per-token activation quantization is
bit-identical to torchao's on the inputs each linear really saw; each quantized linear's output is
recomputed offline from the integers (w8a8: bit-exact; float paths: within sqrt(K) float32 ulps of
sum|x||w|, see docs/quantized.md); int32 accumulators equal numpy's int64 matmul; step 1 --quant's
CSVs read back to exactly torchao's numbers. Planted mistakes must fail each check.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import DEMO_DIR, load_script
from model_factory import VARIANTS
from transformers import LlamaForCausalLM

from common.cli import InputError
from common.model.quant import apply_scheme, torchao_activation_quant, torchao_config, torchao_qdata
from common.quant import intmm
from common.quant import quantize as Q
from common.quant.schemes import HEAD, SCHEMES, get_scheme
from common.model.torchao_import import torchao_quantization

U = 2.0 ** -24  # float32 unit roundoff
PROMPT_IDS = [[1, 7, 11, 50, 90, 2, 5, 8, 100, 200, 300, 17]]


# --- the running torchao model, captured once per (model, scheme) --------------------------------


def run_quantized(model_dir, scheme_name: str, quant_head: bool = True, model=None, only=None) -> dict:
    """Load float32 (or take `model`), keep the float weights, apply torchao, run PROMPT_IDS with every
    quantized linear's input and output captured. `only`: quantize just these linears (they get their
    float weights back afterwards, so that `model` can serve the next scheme)."""
    scheme = get_scheme(scheme_name)
    model = model or LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    floats = {n: p.detach().numpy().copy() for n, p in model.named_parameters()
              if only is None or n.removesuffix(".weight") in only}
    if model.config.tie_word_embeddings and (only is None or HEAD in only):
        floats[f"{HEAD}.weight"] = model.get_input_embeddings().weight.detach().numpy().copy()
    if only is not None:
        tq, names = torchao_quantization(), list(only)
        originals = {n: model.get_submodule(n).weight for n in names}
        tq.quantize_(model, torchao_config(scheme), filter_fn=lambda m, fqn: fqn in names and fqn != HEAD)
        if HEAD in names:
            tq.quantize_(model, torchao_config(scheme.head()), filter_fn=lambda m, fqn: fqn == HEAD)
    else:
        names = apply_scheme(model, scheme, quant_head=quant_head)
    io = {}

    def keep(name):
        def hook(module, args, out):
            io[name] = (args[0].detach().reshape(-1, args[0].shape[-1]).clone(), out.detach().reshape(-1, out.shape[-1]))
        return hook
    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():  # without the head when it is not quantized (the demo's is 28 M weights)
        (model if HEAD in names else model.model)(torch.tensor(PROMPT_IDS))
    linears = {}
    for n in names:
        mod = model.get_submodule(n)
        x, y = io[n]
        linears[n] = {"scheme": scheme.head() if n == HEAD else scheme, "x": x, "y": y.numpy(),
                      "weight": mod.weight, "bias": None if mod.bias is None else mod.bias.detach().numpy()}
    run = {"floats": floats, "qdata": torchao_qdata(model, names), "linears": linears}
    for h in hooks:
        h.remove()
    if only is not None:
        for n, w in originals.items():
            model.get_submodule(n).weight = w
    return run


@functools.cache
def _captured(model_dir, scheme_name):
    return run_quantized(model_dir, scheme_name)


@pytest.fixture
def captured(tiny_models):
    return lambda variant, scheme_name: _captured(tiny_models[variant], scheme_name)


def offline_linear(lin: dict, q: np.ndarray, scale: np.ndarray, act_quant=None) -> tuple[np.ndarray, np.ndarray]:
    """The offline output of one quantized linear and the bound sum|x||w| (+|b|) its float error is measured in."""
    s, x, b = lin["scheme"], lin["x"].numpy(), lin["bias"]
    if s.act == "sym":
        xq, xs = (act_quant or Q.quantize_activation_per_token)(x)
        y = intmm.rescale_int8_float32(intmm.int_matmul(xq, q), xs, scale, b)
        xd = Q.dequantize_activation_float32(xq, xs)
    elif s.act == "asym":
        xq, xs, zp = Q.quantize_activation_per_token_asymmetric(x)
        y = intmm.rescale_groups_float32(intmm.int_matmul_groups(xq, q, s.group_size or x.shape[1], zp), xs, scale, b)
        xd = Q.dequantize_activation_float32(xq, xs, zp)
    else:
        y, xd = intmm.linear_weight_only_float32(x, q, scale, b), x
    wd = Q.dequantize_weight_float32(q, scale).astype(np.float64)
    bound = np.abs(xd.astype(np.float64)) @ np.abs(wd).T + (0 if b is None else np.abs(b))
    return y, bound


def float_error_ratio(y: np.ndarray, y_ref: np.ndarray, bound: np.ndarray) -> float:
    """max |y - y_ref| / (sqrt(K) u sum|x||w|): how many 'random-walk' float32 roundings apart they are."""
    return float((np.abs(y.astype(np.float64) - y_ref) / (bound * U)).max())


FLOAT_TOL = 2.0  # x sqrt(K) u sum|x||w|


def within_float_tolerance(y, y_ref, bound, K) -> bool:
    # torchao rounds the dequantized operands (2 roundings per product) and sums K float32 products:
    # its error is at most (K + 2) u sum|x||w|, and with roundings of random sign it stays near
    # sqrt(K) u sum|x||w|. Measured (docs/quantized.md): at most 0.52 sqrt(K) on the tiny models and
    # the demo model; one weight off by one LSB is hundreds of times more.
    return float_error_ratio(y, y_ref, bound) <= FLOAT_TOL * np.sqrt(K)


# --- weights: bit-identical to torchao's qdata and scale ------------------------------------------


def weight_of(run, name):
    return run["floats"][name]


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_bit_identical(captured, variant, scheme_name):
    run = captured(variant, scheme_name)
    assert len(run["qdata"]) == 3 * 7 + 1  # seven linears per layer, and the head (--quant-head)
    for name, (tq, ts) in run["qdata"].items():
        scheme = get_scheme(scheme_name).head() if name == f"{HEAD}.weight" else get_scheme(scheme_name)
        q, s = Q.quantize_weight(weight_of(run, name), scheme)
        assert q.dtype == tq.dtype == np.int8 and s.dtype == ts.dtype == np.float32, name
        assert np.array_equal(q, tq) and np.array_equal(s, ts), name
        assert q.min() >= scheme.qmin and q.max() <= scheme.qmax


def quantize_weight_with(w, scheme, *, rounding=np.rint, per_tensor=False, divisor=None, group=None):
    """quantize_weight with one planted mistake."""
    N, K = w.shape
    g = K if (scheme.group_size is None and group is None) else (group or scheme.group_size)
    blocks = w.reshape(1 if per_tensor else N, -1, g if not per_tensor else N * K)
    amax = Q._absmax_float32(blocks)
    half = np.float32(divisor if divisor is not None else (scheme.qmax - scheme.qmin) / 2)
    scale = np.maximum(amax / half, np.float32(scheme.weight_eps))
    q = np.clip(rounding(blocks * (np.float32(1) / scale[..., None])), scheme.qmin, scheme.qmax).astype(np.int8)
    return q.reshape(N, K), scale


def round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def test_our_twin_builder_is_faithful(captured):
    """The twins below differ from quantize_weight in their one mistake only."""
    run = captured("llama32", "w4a8-g32")
    name = "model.layers.1.mlp.down_proj.weight"
    assert np.array_equal(quantize_weight_with(weight_of(run, name), get_scheme("w4a8-g32"))[0], run["qdata"][name][0])


@pytest.mark.parametrize("mistake", ["per_tensor", "amax_over_127", "groups_of_64"])
def test_planted_weight_mistakes_fail(captured, mistake):
    scheme_name = "w4a8-g32" if mistake == "groups_of_64" else "w8a8"
    run = captured("llama32", scheme_name)
    scheme = get_scheme(scheme_name)
    kwargs = {"per_tensor": {"per_tensor": True}, "amax_over_127": {"divisor": 127.0},
              "groups_of_64": {"group": 64}}[mistake]
    differs = 0
    for name, (tq, ts) in run["qdata"].items():
        if name.startswith(HEAD):
            continue
        q, s = quantize_weight_with(weight_of(run, name), scheme, **kwargs)
        differs += not (np.array_equal(q, tq) and s.shape == ts.shape and np.array_equal(s, ts))
    assert differs == 3 * 7  # every tensor caught


def test_rounding_ties_to_even_like_torchao():
    """Scale exactly 1 (amax 127.5): ties at +-0.5, +-1.5, +-2.5 round to even, as torch.round does;
    the round-half-away twin is caught."""
    w = np.array([[127.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0]], np.float32)
    q, s = Q.quantize_weight(w, get_scheme("w8a8"))
    assert s[0, 0] == 1.0 and q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]
    tq = _torchao_weight(w, "w8a8")
    assert np.array_equal(q, tq)
    twin, _ = quantize_weight_with(w, get_scheme("w8a8"), rounding=round_half_away)
    assert not np.array_equal(twin, tq)
    # Python's round() is ties-to-even too: the plain reference, on ties, negative ties and the extremes
    inv = np.float32(1) / s[0, 0]
    assert q[0].tolist() == [max(-128, min(127, round(float(np.float32(v) * inv)))) for v in w[0]]


def test_torchao_import_is_quiet():
    """transformers imports torchao when it is installed; its GPU-only noise must not reach the console."""
    from conftest import ROOT
    import subprocess
    import sys
    code = ("import common.model; from transformers import LlamaForCausalLM; "
            "from common.model.torchao_import import torchao_quantization; torchao_quantization()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""


def _torchao_weight(w: np.ndarray, scheme_name: str) -> np.ndarray:
    tq = torchao_quantization()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = torch.from_numpy(w.copy())
    tq.quantize_(lin, torchao_config(get_scheme(scheme_name)))
    return lin.weight.qdata.numpy()


def test_tiny_amax_is_clamped_like_torchao():
    """A row of zeros and a row far below the floor: the scale floor (2**-23 int8, 2**-126 intx)."""
    w = np.zeros((2, 64), np.float32)
    w[1, :3] = [1e-9, -3e-10, 2e-10]
    for name in ("w8a8", "w4a16-g32"):
        assert np.array_equal(Q.quantize_weight(w, get_scheme(name))[0], _torchao_weight(w, name)), name


# --- activations: bit-identical to torchao's per-token quantization -------------------------------


@pytest.mark.parametrize("scheme_name", ["w8a8", "w4a8-g32"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_activation_quantization_bit_identical(captured, variant, scheme_name):
    run = captured(variant, scheme_name)
    for name, lin in run["linears"].items():
        tq, ts, tz = torchao_activation_quant(lin["weight"], lin["x"])
        x = lin["x"].numpy()
        if lin["scheme"].act == "sym":
            xq, xs = Q.quantize_activation_per_token(x)
            assert tz is None
        else:
            xq, xs, zp = Q.quantize_activation_per_token_asymmetric(x)
            assert np.array_equal(zp, tz) and zp.dtype == tz.dtype, name
        assert np.array_equal(xq, tq) and np.array_equal(xs, ts) and xs.dtype == ts.dtype and xs.shape == ts.shape, name


def test_activation_per_tensor_twin_fails(captured):
    run = captured("llama32", "w8a8")
    caught = 0
    for name, lin in run["linears"].items():
        tq, ts, _ = torchao_activation_quant(lin["weight"], lin["x"])
        x = lin["x"].numpy()
        whole = Q.symmetric_scale_float32(Q._absmax_float32(x.reshape(1, -1)), -128, 127, 2.0 ** -23)
        xq = Q.quantize_round_half_even(x, whole, None, -128, 127)
        caught += not np.array_equal(xq, tq)
        y, bound = offline_linear(lin, *run["qdata"][f"{name}.weight"],
                                  act_quant=lambda a: (xq, np.broadcast_to(whole, (a.shape[0], 1))))
        caught += not np.array_equal(y, lin["y"])
    assert caught == 2 * len(run["linears"])


# --- each quantized linear recomputed offline from the integers -----------------------------------


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear_outputs_offline(captured, variant, scheme_name):
    run = captured(variant, scheme_name)
    for name, lin in run["linears"].items():
        q, s = run["qdata"][f"{name}.weight"]
        y, bound = offline_linear(lin, q, s)
        if scheme_name == "w8a8":
            assert np.array_equal(y, lin["y"]), name  # int32 accumulate + float32 epilogue: bit-exact
        else:
            assert within_float_tolerance(y, lin["y"], bound, q.shape[1]), (name, float_error_ratio(y, lin["y"], bound))


def test_planted_wrong_weight_rounding_fails_the_float_tolerance(captured):
    """One weight off by one LSB in every float-path linear: the sqrt(K)-ulp tolerance catches it."""
    for scheme_name in ("w4a8-g32", "w8a16", "w4a16-g32"):
        run = captured("llama32", scheme_name)
        for name, lin in run["linears"].items():
            q, s = run["qdata"][f"{name}.weight"]
            q = q.copy()
            k = int(np.abs(lin["x"].numpy()).sum(axis=0).argmax())  # the input column that matters most
            q[:, k] = np.where(q[:, k] < lin["scheme"].qmax, q[:, k] + 1, q[:, k] - 1)
            y, bound = offline_linear(lin, q, s)
            assert not within_float_tolerance(y, lin["y"], bound, q.shape[1]), (scheme_name, name)


@pytest.mark.parametrize("scheme_name", ["w8a8", "w4a8-g32"])
def test_int32_accumulators_equal_int64_matmul(captured, scheme_name):
    for variant in VARIANTS:
        run = captured(variant, scheme_name)
        for name, lin in run["linears"].items():
            q, _ = run["qdata"][f"{name}.weight"]
            x = lin["x"].numpy()
            if lin["scheme"].act == "sym":
                xq, _ = Q.quantize_activation_per_token(x)
                acc = intmm.int_matmul(xq, q)
                assert acc.dtype == np.int32 and np.array_equal(acc, xq.astype(np.int64) @ q.astype(np.int64).T)
            else:
                xq, _, zp = Q.quantize_activation_per_token_asymmetric(x)
                g = lin["scheme"].group_size or x.shape[1]
                acc = intmm.int_matmul_groups(xq, q, g, zp)
                x64 = xq.astype(np.int64) - zp.astype(np.int64)[:, None]
                want = np.stack([x64[:, i:i + g] @ q[:, i:i + g].astype(np.int64).T for i in range(0, x.shape[1], g)])
                assert acc.dtype == np.int32 and np.array_equal(acc, want), name


# --- the integer matmul itself, and int4 packing ---------------------------------------------------


def test_int_matmul_matches_plain_python_ints_at_the_extremes():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (5, 300), dtype=np.int8)
    w = rng.integers(-128, 128, (7, 300), dtype=np.int8)
    x[0], w[0] = -128, -128  # the largest product, every term: 300 * 2**14
    x[1], w[1, :] = -128, 127
    acc = intmm.int_matmul(x, w)
    assert acc.tolist() == intmm.int_matmul_python(x, w)
    assert acc[0, 0] == 300 * 2 ** 14 and acc[1, 1] == -300 * 128 * 127


def test_int_matmul_chunks_when_float64_would_not_be_exact(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (3, 50), dtype=np.int8)
    w = rng.integers(-128, 128, (4, 50), dtype=np.int8)
    monkeypatch.setattr(intmm, "FLOAT64_EXACT", 7 * 2 ** 14)  # chunks of 7: the loop over K runs
    assert intmm.int_matmul(x, w).tolist() == intmm.int_matmul_python(x, w)


def test_int_matmul_refuses_an_int32_overflow():
    x = np.full((1, 1 << 17), -128, np.int8)
    with pytest.raises(OverflowError):
        intmm.int_matmul(x, x)


def test_int4_packing_low_nibble_first():
    q = np.array([[1, -2, 7, -8]], np.int8)
    packed = Q.pack_int4(q)
    assert packed.tolist() == [[0xE1, 0x87]]  # 1 | (-2 & 0xF) << 4; 7 | (-8 & 0xF) << 4
    assert np.array_equal(Q.unpack_int4(packed), q)
    all_pairs = np.array(np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))).reshape(2, -1).T.astype(np.int8)
    assert np.array_equal(Q.unpack_int4(Q.pack_int4(all_pairs)), all_pairs)
    swapped = (q[:, 0::2].astype(np.uint8) & 0xF) << 4 | (q[:, 1::2].astype(np.uint8) & 0xF)  # the planted twin
    assert not np.array_equal(swapped, packed)
    assert not np.array_equal(Q.unpack_int4(swapped), q)


def test_schemes_table_and_lookup():
    assert get_scheme("w4a8-g64").group_size == 64 and get_scheme("w4a16-g128").act is None
    for bad in ("w5a8", "w4a8-g0", "W8A8", "w8a8-g32", ""):
        with pytest.raises(ValueError, match="unknown quantization scheme"):
            get_scheme(bad)
    assert get_scheme("w4a8-g32").head().torchao_config == (
        "Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))")
    for scheme in [*SCHEMES.values(), *(s.head() for s in SCHEMES.values()), get_scheme("w4a16-g64")]:
        config = torchao_config(scheme)  # the object applied is the one the recorded text names
        assert scheme.torchao_config.startswith(type(config).__name__ + "(")
        if scheme.family == "intx":
            g = config.weight_granularity if scheme.act else config.granularity
            assert config.weight_dtype == getattr(torch, f"int{scheme.weight_bits}")
            assert g.group_size == scheme.group_size if scheme.group_size else g.axis == 0


# --- step 1 --quant --------------------------------------------------------------------------------


@functools.cache
def _step1():
    return load_script("1_model_weights.py")


def read_int_csv(path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.int64, delimiter=",", ndmin=2)


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("variant", ["llama32", "untied", "bias"])
def test_step1_quant_files_are_torchaos_numbers(captured, tiny_models, tmp_path, variant, scheme_name):
    from common.files.csv_io import read_csv
    run = captured(variant, scheme_name)
    out = tmp_path / "w"
    assert _step1().main(["--model-dir", str(tiny_models[variant]), "--out-dir", str(out),
                          "--quant", scheme_name, "--quant-head"]) == 0
    files = json.loads((out / "manifest.json").read_text())["files"]
    for name, (tq, ts) in run["qdata"].items():
        q = read_int_csv(out / f"{name}.q.csv")
        assert np.array_equal(q, tq.astype(np.int64)), name
        s = read_csv(out / f"{name}.scale.csv")
        assert s.dtype == np.float32 and np.array_equal(s, ts), name
        entry = files[f"{name}.q.csv"]["quant"]
        assert entry["rounding"] == "half_even" and entry["quant_head"] is True and entry["role"] == "q"
        assert entry["range"] == ([-8, 7] if "w4" in scheme_name and not name.startswith(HEAD) else [-128, 127])
        assert not (out / f"{name}.csv").exists()  # the quantized weights are not also written as floats
    assert (out / "model.embed_tokens.weight.csv").is_file() and (out / "model.norm.weight.csv").is_file()


def test_step1_quant_bad_input_writes_nothing(tiny_models, tmp_path):
    from conftest import run_script
    out = tmp_path / "w"
    model = str(tiny_models["llama32"])
    r = run_script("1_model_weights.py", "--model-dir", model, "--out-dir", out, "--quant", "w4a8-g48")
    assert r.returncode == 2 and "group size 48" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not out.exists()
    for argv in (["--quant", "w3a8"], ["--quant-head"], ["--quant", "w8a8", "--format", "npy"]):
        with pytest.raises(InputError):
            _step1().main(["--model-dir", model, "--out-dir", str(out), *argv])
        assert not out.exists()


def test_model_quant_refuses_what_torchao_cannot_quantize(tiny_models):
    model = LlamaForCausalLM.from_pretrained(tiny_models["llama32"], dtype=torch.float32)
    with pytest.raises(InputError, match="group size 48"):
        apply_scheme(model, get_scheme("w4a8-g48"))
    with pytest.raises(InputError, match="float32"):
        apply_scheme(model.to(torch.bfloat16), get_scheme("w8a8"))
    with pytest.raises(InputError, match="no decoder-layer linears"):
        apply_scheme(torch.nn.Sequential(torch.nn.Linear(64, 64)), get_scheme("w8a8"))


# --- the demo model ---------------------------------------------------------------------------------

DEMO_LINEARS = [f"model.layers.{i}.{m}" for i in (0, 29) for m in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def demo_float32(demo_model):
    return LlamaForCausalLM.from_pretrained(demo_model, dtype=torch.float32)


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
def test_demo_model(demo_model, demo_float32, scheme_name):
    """The real demo model, layers 0 and 29 (and the head with w8a8; every tensor: the tiny models and
    benchmarks/bench_quant_export.py --check-all): weights, activations and outputs as above."""
    only = DEMO_LINEARS + ([HEAD] if scheme_name == "w8a8" else [])
    run = run_quantized(demo_model, scheme_name, model=demo_float32, only=only)
    for name, lin in run["linears"].items():
        tq, ts = run["qdata"][f"{name}.weight"]
        q, s = Q.quantize_weight(weight_of(run, f"{name}.weight"), lin["scheme"])
        assert np.array_equal(q, tq) and np.array_equal(s, ts), name
        if lin["scheme"].act:
            aq, as_, _ = torchao_activation_quant(lin["weight"], lin["x"])
            quant = (Q.quantize_activation_per_token if lin["scheme"].act == "sym"
                     else Q.quantize_activation_per_token_asymmetric)(lin["x"].numpy())
            assert np.array_equal(quant[0], aq) and np.array_equal(quant[1], as_), name
        y, bound = offline_linear(lin, q, s)
        if scheme_name == "w8a8":
            assert np.array_equal(y, lin["y"]), name
        else:
            assert within_float_tolerance(y, lin["y"], bound, q.shape[1]), name
