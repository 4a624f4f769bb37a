"""common/llama/norm.py, common/llama/mlp.py and common/llama/forward.py against transformers' own modules, in-process.

common/ never imports transformers; these tests do, as the independent reference. A random tiny
Llama (norm weights and biases made to matter, as model_factory does) runs in float32 with hooks;
our numpy equations must land within float32 rounding of every node, and planted mistakes must not.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import model_factory
from common.llama import forward, mlp, norm
from common.llama.attention import AttentionWeights
from common.llama.mlp import MLPWeights

RTOL = 1e-5  # step 4's default: max_abs <= RTOL * max|ref|


def rel_err(got: np.ndarray, want) -> float:
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def random_model(overrides: dict, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(model_factory.hub_config(overrides))))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model.eval()


def np_(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy().astype(np.float32)


def layer_weights(layer) -> forward.LayerWeights:
    a, m = layer.self_attn, layer.mlp
    return forward.LayerWeights(
        input_layernorm=np_(layer.input_layernorm.weight),
        attn=AttentionWeights(np_(a.q_proj.weight), np_(a.k_proj.weight), np_(a.v_proj.weight), np_(a.o_proj.weight),
                              np_(a.q_proj.bias), np_(a.k_proj.bias), np_(a.v_proj.bias), np_(a.o_proj.bias)),
        post_attention_layernorm=np_(layer.post_attention_layernorm.weight),
        mlp=MLPWeights(np_(m.gate_proj.weight), np_(m.up_proj.weight), np_(m.down_proj.weight),
                       np_(m.gate_proj.bias), np_(m.up_proj.bias), np_(m.down_proj.bias)))


def spec(c) -> forward.LayerSpec:
    scaling = c.rope_parameters if c.rope_parameters.get("rope_type", "default") != "default" else None
    return forward.LayerSpec(c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                             c.rope_parameters["rope_theta"], scaling, c.rms_norm_eps, c.hidden_act)


def test_rms_norm_matches_llama_rmsnorm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=g) * 3
    mod = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        mod.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        want = mod(x)
    got = norm.rms_norm(x.numpy(), np_(mod.weight), 1e-5)
    assert got.dtype == np.float32 and rel_err(got, want) < 1e-6
    gemma = x.numpy() / np.sqrt((x.numpy() ** 2).mean(-1, keepdims=True) + 1e-5) * (1 + np_(mod.weight))
    assert rel_err(gemma, want) > 0.5  # a (1 + w) norm is far off


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_matches_llama_mlp(bias):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, mlp_bias=bias, hidden_act="silu")
    torch.manual_seed(1)
    mod = LlamaMLP(config)
    if bias:
        with torch.no_grad():
            for lin in (mod.gate_proj, mod.up_proj, mod.down_proj):
                lin.bias.normal_(0, 0.1)
    x = torch.randn(9, 64) * 2
    w = MLPWeights(np_(mod.gate_proj.weight), np_(mod.up_proj.weight), np_(mod.down_proj.weight),
                   np_(mod.gate_proj.bias), np_(mod.up_proj.bias), np_(mod.down_proj.bias))
    with torch.no_grad():
        want_act = mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x)
        want = mod(x)
    got = mlp.swiglu_mlp(x.numpy(), w, "silu")
    assert rel_err(got["act"], want_act) < 1e-6 and rel_err(got["mlp"], want) < 1e-6
    swapped = mlp.swiglu_mlp(x.numpy(), MLPWeights(w.up, w.gate, w.down, w.b_up, w.b_gate, w.b_down), "silu")
    assert rel_err(swapped["mlp"], want) > 0.1  # gate and up swapped is far off


def test_silu_is_finite_for_large_inputs():
    x = np.array([-1e4, -100, 0, 100, 1e4], np.float32)
    np.testing.assert_array_equal(mlp.silu(x), torch.nn.functional.silu(torch.from_numpy(x)).numpy())


def test_unsupported_activation_is_an_error():
    with pytest.raises(ValueError, match="gelu"):
        mlp.activation("gelu")


def run_model(model, ids, mask, pos):
    """Every layer's input and output and the logits, from the running model (float32)."""
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out[0] if isinstance(out, tuple) else out))
             for n, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    for h in hooks:
        h.remove()
    return out.hidden_states[0], [seen[n] for n in range(len(model.model.layers))], out.logits


@pytest.mark.parametrize("variant", model_factory.VARIANTS)
def test_chain_matches_the_running_model(variant):
    """x_layer0 -> every layer -> norm -> head equals the model, layer by layer and at the logits."""
    model = random_model(model_factory.VARIANTS[variant])
    c = model.config
    B, T = 2, 12
    ids = torch.randint(0, c.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    x0, outs, logits = run_model(model, ids, mask, pos)
    real = mask.reshape(-1).numpy() > 0
    d = c.hidden_size

    layers = {n: layer_weights(layer) for n, layer in enumerate(model.model.layers)}
    loaded = []
    def load(n):
        loaded.append(n)
        return layers[n]
    x = x0.reshape(B * T, d).numpy()
    for n, nodes in forward.chain(x, range(c.num_hidden_layers), load, pos.numpy(), mask.numpy(), lambda n: spec(c)):
        assert loaded[-1] == n
        want = outs[n].reshape(B * T, d).numpy()
        assert rel_err(nodes["out"][real], want[real]) < RTOL, n
        x = nodes["out"]
    head_w = model.lm_head.weight if variant == "untied" else model.model.embed_tokens.weight
    assert (variant == "untied") != (model.lm_head.weight is model.model.embed_tokens.weight)
    out = forward.head(x, np_(model.model.norm.weight), np_(head_w), c.rms_norm_eps)
    want = logits.reshape(B * T, -1).numpy()
    assert rel_err(out["logits"][real], want[real]) < RTOL
    np.testing.assert_array_equal(forward.top_k(out["logits"][real], 1), forward.top_k(want[real], 1))
    last = forward.last_real_rows(mask.numpy())
    assert last.tolist() == [T - 1, 2 * T - 1]
    picked = forward.head(x, np_(model.model.norm.weight), np_(head_w), c.rms_norm_eps, last)["logits"]
    np.testing.assert_allclose(picked, out["logits"][last], rtol=0, atol=1e-6)  # the same rows (matmul rounding)


def test_last_real_rows_with_right_padding():
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert forward.last_real_rows(mask).tolist() == [2, 7, 8]


def test_chain_holds_one_layer_of_weights_at_a_time():
    """Each layer's weights are dropped before the caller sees its output, and loaded only when needed."""
    import weakref

    model = random_model({})
    c = model.config
    B, T = 1, 5
    alive: list[weakref.ref] = []

    def load(n):
        assert all(r() is None for r in alive), "an earlier layer's weights are still alive"
        w = layer_weights(model.model.layers[n])  # fresh arrays: only the chain holds them
        alive.append(weakref.ref(w))
        return w

    x = np.random.default_rng(0).standard_normal((B * T, c.hidden_size)).astype(np.float32)
    mask, pos = np.ones((B, T), np.int64), np.arange(T)[None]
    seen = []
    for n, nodes in forward.chain(x, range(c.num_hidden_layers), load, pos, mask, lambda n: spec(c)):
        assert alive[-1]() is None and len(alive) == n + 1
        seen.append(n)
    assert seen == list(range(c.num_hidden_layers))
