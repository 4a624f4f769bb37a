"""common/llama/rope.py and common/llama/attention.py against transformers' own functions, equation by equation.

common/ never imports transformers; these tests do, as the independent reference.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import model_factory
from common.llama import attention, rope

CONFIGS = {
    "tiny_llama3": model_factory.hub_config({}),
    "tiny_default": model_factory.hub_config({"rope_scaling": None}),
    "tiny_linear": model_factory.hub_config({"rope_scaling": {"factor": 2.0, "rope_type": "linear"}}),
    "tiny_head_dim_24": model_factory.hub_config({"head_dim": 24}),
    "llama_3_2_1b": model_factory.LLAMA_3_2_1B,
    "smollm2_135m": {**model_factory.hub_config({"rope_scaling": None}), "hidden_size": 576,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0},
}


def hf_config(cfg: dict) -> LlamaConfig:
    return LlamaConfig(**copy.deepcopy(cfg))  # LlamaConfig edits the dicts it is given


def hf_inv_freq(config: LlamaConfig) -> np.ndarray:
    rope_type = config.rope_parameters["rope_type"]
    fn = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
    inv_freq, attention_factor = fn(config)
    assert attention_factor == 1.0  # step 3 assumes unscaled cos/sin for these rope types
    return inv_freq.numpy()


def ours(cfg: dict) -> tuple[int, float, dict | None]:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return head_dim, cfg["rope_theta"], cfg.get("rope_scaling")


@pytest.mark.parametrize("name", CONFIGS)
def test_rope_inv_freq_matches_transformers(name):
    cfg = CONFIGS[name]
    want = hf_inv_freq(hf_config(cfg))
    got = rope.rope_inv_freq(*ours(cfg))
    assert got.dtype == np.float32 and got.shape == want.shape
    if rope.rope_type_of(ours(cfg)[2]) == "default":
        np.testing.assert_array_equal(got, want)  # bit-exact: an angle error grows with the position
    else:  # the scaling's float32 arithmetic is ordered a little differently in torch: a few ulps
        np.testing.assert_allclose(got, want, rtol=5e-7, atol=0)


def test_llama3_scaling_changes_the_tiny_model_frequencies():
    """The tiny model's scaling must matter at short prompts, or the 'ignored scaling' test has no teeth."""
    head_dim, theta, scaling = ours(CONFIGS["tiny_llama3"])
    plain, scaled = rope.rope_inv_freq(head_dim, theta, None), rope.rope_inv_freq(head_dim, theta, scaling)
    assert plain[0] == scaled[0]  # high frequencies kept
    assert np.allclose(scaled[-3:], plain[-3:] / scaling["factor"])  # low frequencies divided by factor
    assert (scaled != plain).sum() >= head_dim // 2 - 1


def test_unsupported_or_incomplete_rope_scaling_is_an_error():
    with pytest.raises(ValueError, match="yarn"):
        rope.rope_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope.rope_inv_freq(16, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0})


@pytest.mark.parametrize("name", ["tiny_llama3", "tiny_linear", "llama_3_2_1b"])
def test_cos_sin_and_apply_rope_match_transformers(name):
    cfg = CONFIGS[name]
    config = hf_config(cfg)
    head_dim = ours(cfg)[0]
    B, H, T = 2, 3, 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, head_dim, generator=g)
    position_ids = torch.stack([torch.arange(T), torch.arange(T) + 4000])  # short and long positions
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(q, position_ids)  # (B, T, Dh)
    q_hf, _ = apply_rotary_pos_emb(q, q, cos_hf, sin_hf)  # (B, H, T, Dh)

    cos, sin = rope.rope_cos_sin(position_ids.numpy(), rope.rope_inv_freq(*ours(cfg)))  # (B, T, Dh/2)
    np.testing.assert_allclose(np.concatenate([cos, cos], -1), cos_hf.numpy(), rtol=0, atol=2e-7)
    np.testing.assert_allclose(np.concatenate([sin, sin], -1), sin_hf.numpy(), rtol=0, atol=2e-7)
    got = rope.apply_rope(q.numpy().transpose(0, 2, 1, 3), cos, sin)  # (B, H, T, Dh) -> (B, T, H, Dh) in
    np.testing.assert_allclose(got.transpose(0, 2, 1, 3), q_hf.numpy(), rtol=0, atol=1e-6)


def test_apply_rope_pairs_halves_not_neighbours():
    """Dimension j moves with j + Dh/2: a vector with only x[0] set rotates into x[Dh/2]."""
    Dh = 8
    x = np.zeros((1, 1, 1, Dh), np.float32)
    x[..., 0] = 1
    cos, sin = rope.rope_cos_sin(np.array([[1]]), rope.rope_inv_freq(Dh, 10000.0, None))
    y = rope.apply_rope(x, cos, sin)[0, 0, 0]
    assert y[0] == pytest.approx(np.cos(1.0)) and y[Dh // 2] == pytest.approx(np.sin(1.0))
    assert y[1] == 0


def test_attention_matches_torch_sdpa_with_gqa_and_padding():
    B, T, H, Hkv, Dh = 2, 7, 6, 2, 8
    g = np.random.default_rng(0)
    q, k, v = (g.standard_normal((B, T, n, Dh)).astype(np.float32) for n in (H, Hkv, Hkv))
    mask = np.ones((B, T), np.float32)
    mask[1, :3] = 0  # left padding in prompt 1
    allowed = attention.attention_allowed(mask)
    ctx, probs = attention.attention(q, k, v, mask, keep_probs="all")

    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))  # (B, heads, T, Dh)
    want = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.from_numpy(allowed)[:, None], enable_gqa=True).transpose(1, 2).numpy()
    real = mask.astype(bool)  # padded query rows have no allowed key: sdpa gives NaN there, we give 0
    np.testing.assert_allclose(ctx[real], want[real], rtol=0, atol=2e-6)
    assert (ctx[~real] == 0).all() and np.isfinite(probs).all()
    np.testing.assert_allclose(probs[1, :, 3:].sum(-1), 1, atol=1e-6)
    assert (probs[1, :, :, :3] == 0).all()  # padded keys get no weight
    assert (np.triu(probs[0, 0], 1) == 0).all()  # causal


def test_repeat_kv_maps_query_head_h_to_kv_head_h_div_group():
    k = np.arange(3, dtype=np.float32).reshape(1, 1, 3, 1)  # 3 KV heads holding their own index
    assert attention.repeat_kv(k, 4)[0, 0, :, 0].tolist() == [h // 4 for h in range(12)]


def test_blocked_attention_equals_one_block_and_keeps_only_the_asked_probs():
    """Query rows in blocks of 5 (with a ragged last block) give what one T x T block gives."""
    B, T, H, Hkv, Dh = 2, 37, 4, 2, 16
    g = np.random.default_rng(1)
    q, k, v = (g.standard_normal((B, T, n, Dh)).astype(np.float32) for n in (H, Hkv, Hkv))
    mask = np.ones((B, T), np.float32)
    mask[0, :6] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    ctx_full, probs_full = attention.attention(q, k, v, mask, keep_probs="all", block=T)
    ctx, probs = attention.attention(q, k, v, mask, keep_probs="all", block=5)
    np.testing.assert_allclose(ctx, ctx_full, rtol=0, atol=1e-6)
    # BLAS rounds a 5-row block and a 37-row one its own way: a few ulps (1.2e-7 seen with OpenBLAS's Haswell
    # kernels), where a wrong mask or row offset in a block moves probabilities by 1e-2 and more.
    np.testing.assert_allclose(probs, probs_full, rtol=0, atol=1e-6)
    assert (probs[0, :, :, :6] == 0).all() and (np.triu(probs[1, 2], 1) == 0).all()
    _, one = attention.attention(q, k, v, mask, keep_probs=(1, 3), block=5)
    np.testing.assert_array_equal(one, probs[1, 3])  # (T, T) of prompt 1, head 3 only
    ctx_none, none = attention.attention(q, k, v, mask, block=5)
    assert none is None and np.array_equal(ctx_none, ctx)
    with pytest.raises(ValueError, match="PROBS_MAX_SEQ_LEN"):
        n = attention.PROBS_MAX_SEQ_LEN + 1
        attention.attention(np.zeros((1, n, 1, 2), np.float32), *[np.zeros((1, n, 1, 2), np.float32)] * 2,
                            np.ones((1, n)), keep_probs="all")
