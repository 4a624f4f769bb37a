"""common/model/layer_loader.py and 2_get_x.py --streaming: the pieces add up to the model, bit for bit."""
from __future__ import annotations

import filecmp
import json
import os
import shutil

import pytest
import torch
from model_factory import VARIANTS
from test_get_x import PROMPTS, capture
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from common.cli import InputError
from common.files import layout
from common.files.layout import meta_file
from common.files.safetensors_io import list_tensors, read_tensor
from common.model.layer_loader import LayerCollector
from common.model.prompts import encode_prompts

def batch(model_dir, prompts=PROMPTS, side="left"):
    return encode_prompts(AutoTokenizer.from_pretrained(str(model_dir)), prompts, padding_side=side)


def collector_logits(col: LayerCollector, b) -> torch.Tensor:
    state = col.embed(b.input_ids, b.attention_mask)  # positions derived from the mask
    for n in range(col.config.num_layers):
        col.run_layer(col.load_layer(n), state)
    return col.logits(state.hidden)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pieces_give_the_models_logits(tiny_models, variant):
    model_dir = tiny_models[variant]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    for side in ("left", "right"):
        b = batch(model_dir, side=side)
        with torch.no_grad():
            want = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        got = collector_logits(LayerCollector(model_dir), b)
        real = b.attention_mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert want[real].abs().max() > 0.1  # logits that can tell a wrong layer from a right one


def test_demo_model_next_token(demo_model):
    tok = AutoTokenizer.from_pretrained(str(demo_model))
    b = encode_prompts(tok, ["The capital of France is"])
    model = AutoModelForCausalLM.from_pretrained(str(demo_model), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[0, -1].argmax().item()
    col = LayerCollector(demo_model)
    state = col.embed(b.input_ids, b.attention_mask)
    for n in range(col.config.num_layers):
        col.run_layer(col.load_layer(n), state)
    assert col.top_k(state, k=3)[0, 0].item() == want


@pytest.mark.parametrize("variant", ["llama32", "bias", "untied", "head_dim"])  # sharded, bf16
def test_streaming_files_are_bit_identical(tiny_models, tmp_path, variant):
    full = capture(tiny_models[variant], tmp_path / "full")
    streamed = capture(tiny_models[variant], tmp_path / "streamed", "--streaming")
    names = sorted(p.name for p in full.iterdir())
    # 12 CSVs + meta per layer; batch, head, meta_model, vocab, manifest
    assert names == sorted(p.name for p in streamed.iterdir()) and len(names) == 3 * 13 + 8
    listed = [json.loads((d / layout.MANIFEST).read_text())["files"] for d in (full, streamed)]
    for name in names:
        if name.endswith(".csv"):
            assert filecmp.cmp(full / name, streamed / name, shallow=False), name
            assert listed[0][name] == listed[1][name], name  # the same shape, bytes and sha256
    for meta in [meta_file(n) for n in range(3)] + [layout.META_MODEL]:
        a, b = (json.loads((d / meta).read_text()) for d in (full, streamed))
        assert (a["provenance"].pop("streaming"), b["provenance"].pop("streaming")) == (False, True)
        assert a == b


def test_streaming_layer_subset(llama32, tmp_path):
    out = capture(llama32, tmp_path / "x", "--streaming", "--layers", "1", "--no-save-x-norm", "--no-save-layer-refs",
                  "--no-save-attn-probs")
    assert sorted(p.name for p in out.glob("*_layer*")) == [
        "meta_layer1.json", "ref_attn_layer1.csv", "ref_k_layer1.csv", "ref_q_layer1.csv", "ref_v_layer1.csv",
        "x_layer1.csv"]
    full = capture(llama32, tmp_path / "full", "--layers", "1")
    assert filecmp.cmp(full / "ref_q_layer1.csv", out / "ref_q_layer1.csv", shallow=False)


def test_modules_hold_the_files_tensors(tiny_models):
    for variant, head in (("bias", "model.embed_tokens.weight"), ("untied", "lm_head.weight")):
        infos = list_tensors(tiny_models[variant])
        col = LayerCollector(tiny_models[variant])
        layer = col.load_layer(2)
        assert isinstance(layer, LlamaDecoderLayer)
        params = dict(layer.named_parameters())
        expected = {n.removeprefix("model.layers.2."): n for n in infos if n.startswith("model.layers.2.")}
        assert sorted(params) == sorted(expected)  # biases included for the bias variant
        for short, full in expected.items():
            assert params[short].dtype == torch.float32 and not params[short].is_meta
            assert torch.equal(params[short], read_tensor(infos[full]).float())
        assert torch.equal(col.load_head().weight, read_tensor(infos[head]).float())
        assert torch.equal(col.load_norm().weight, read_tensor(infos["model.norm.weight"]).float())
    assert "self_attn.q_proj.bias" in dict(LayerCollector(tiny_models["bias"]).load_layer(0).named_parameters())


def test_embed_reads_the_embedding_rows(llama32):
    col = LayerCollector(llama32)
    b = batch(llama32)
    state = col.embed(b.input_ids, b.attention_mask)
    assert torch.equal(state.hidden, col.load_embedding()(b.input_ids))
    assert torch.equal(state.position_ids, b.position_ids)
    with pytest.raises(InputError, match="vocab_size"):
        col.embed(torch.tensor([[5, 320]]))


def test_global_defaults_untouched(llama32):
    before = torch.get_default_dtype(), torch.get_default_device()
    col = LayerCollector(llama32, dtype=torch.bfloat16)
    layer = col.load_layer(0)
    col.load_head()
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert (torch.get_default_dtype(), torch.get_default_device()) == before
    assert torch.empty(1).dtype == torch.float32 and torch.empty(1).device.type == "cpu"


def test_cache_is_used_and_rebuilt_when_shards_change(llama32, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(llama32, model_dir)
    cache = tmp_path / "cache.json"
    col = LayerCollector(model_dir, cache_path=cache)
    saved = json.loads(cache.read_text())
    assert {n: model_dir / s for n, s in saved["weight_map"].items()} == col.weight_map
    assert set(saved["shards"]) == {p.name for p in model_dir.glob("*.safetensors")}

    # A cache that matches the shards is trusted as it stands ...
    name = "model.norm.weight"
    other = next(s for s in saved["shards"] if s != saved["weight_map"][name])
    cache.write_text(json.dumps({**saved, "weight_map": {**saved["weight_map"], name: other}}))
    assert LayerCollector(model_dir, cache_path=cache).weight_map[name].name == other
    # ... and rebuilt once a shard changes.
    shard = model_dir / saved["weight_map"][name]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert LayerCollector(model_dir, cache_path=cache).weight_map[name] == shard
    assert json.loads(cache.read_text())["weight_map"][name] == shard.name
    cache.write_text("{not json")
    assert LayerCollector(model_dir, cache_path=cache).weight_map[name] == shard


def test_missing_config_is_a_clear_file_not_found(llama32, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LayerCollector(tmp_path / "nowhere")
    model_dir = tmp_path / "model"
    shutil.copytree(llama32, model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(InputError, match=r"config\.json does not exist"):
        LayerCollector(model_dir)
