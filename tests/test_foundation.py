"""The test models are what they claim to be, and config.json parses the same in both RoPE forms."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model_factory
from common.cli import InputError
from common.files.safetensors_io import INDEX_NAME, head_is_tied, list_tensors
from common.model.model_config import load_config, normalize_rope


def test_llama32_is_hub_shaped(llama32):
    cfg = json.loads((llama32 / "config.json").read_text())
    assert list(cfg) == list(model_factory.LLAMA_3_2_1B)  # the Hub's keys, in the Hub's order
    assert "rope_parameters" not in cfg and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert (llama32 / INDEX_NAME).is_file() and len(list(llama32.glob("model-*-of-*.safetensors"))) > 2
    infos = list_tensors(llama32)
    assert head_is_tied(infos) and {i.dtype for i in infos.values()} == {"BF16"}
    c = load_config(llama32)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_type) == (4, 2, 16, "llama3")


@pytest.mark.parametrize("variant,check", [
    ("fp16_single", lambda d, c, i: not (d / INDEX_NAME).exists() and {x.dtype for x in i.values()} == {"F16"}),
    ("untied", lambda d, c, i: not head_is_tied(i) and not c.tie_word_embeddings),
    ("head_dim", lambda d, c, i: c.head_dim * c.num_heads != c.d_model),
    ("default_rope", lambda d, c, i: c.rope_scaling is None),
    ("bias", lambda d, c, i: "model.layers.0.self_attn.q_proj.bias" in i),
    ("linear_rope", lambda d, c, i: c.rope_type == "linear"),
])
def test_variants(tiny_models, variant, check):
    d = tiny_models[variant]
    assert check(d, load_config(d), list_tensors(d))


def test_tiny_model_runs_in_transformers(llama32):
    model = AutoModelForCausalLM.from_pretrained(llama32, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(llama32)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    logits = model(**ids).logits
    assert logits.shape[-1] == 320 and torch.isfinite(logits).all()
    # random norms (not all ones), so a missing norm weight would be caught downstream
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(64))


def test_rope_forms_normalize_alike():
    hub = {"rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    new = {"rope_parameters": {"rope_theta": 500000.0, **hub["rope_scaling"]}}
    assert normalize_rope(hub) == normalize_rope(new) == (500000.0, {"rope_type": "llama3", "factor": 32.0,
        "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})
    assert normalize_rope({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}) == (1e5, None)
    assert normalize_rope({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}) == (
        1e4, {"rope_type": "linear", "factor": 2.0})
    with pytest.raises(InputError, match="yarn"):
        normalize_rope({"rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_config_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope")
    with pytest.raises(InputError, match="config.json is missing"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError, match="not Llama-family.*llama"):
        load_config(tmp_path)
