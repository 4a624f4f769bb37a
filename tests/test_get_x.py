"""2_get_x.py: every saved file is what the running model computed, for every Llama variant."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import load_script, run_script
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from common.cli import InputError
from common.files import layout
from common.files.csv_io import read_csv
from common.files.layout import layer_file, meta_file, ref_file
from common.files.safetensors_io import list_tensors, read_tensor

PROMPTS = ["The capital of France is", "Hello world, the quick brown fox"]  # different lengths


get_x = load_script("2_get_x.py")


def capture(model_dir, out_dir, *args: str, prompts=PROMPTS):
    argv = ["--model-dir", str(model_dir), "--out-dir", str(out_dir), *args]
    for p in prompts:
        argv += ["--prompt", p]
    assert get_x.main(argv) == 0
    return out_dir


def read_tokens(out_dir):
    return json.loads((out_dir / "tokens.json").read_text())


def running_model(model_dir, out_dir):
    """Run the model as transformers does, with the test's own hooks; return what it computed."""
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    seen: dict = {}

    def keep(name):
        return lambda m, a, out: seen.__setitem__(name, out)

    hooks = [model.model.rotary_emb.register_forward_hook(keep("cos_sin"))]
    for n, layer in enumerate(model.model.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(keep(f"xnorm{n}")))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hooks.append(getattr(layer.self_attn, proj).register_forward_hook(keep(f"{proj}{n}")))
    ids = torch.tensor(read_tokens(out_dir)["input_ids"])
    mask = torch.from_numpy(read_csv(out_dir / "attention_mask.csv")).long()
    pos = torch.from_numpy(read_csv(out_dir / "position_ids.csv")).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    for h in hooks:
        h.remove()
    return model, seen, out.hidden_states


def flat(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1, t.shape[-1]).numpy()


@pytest.mark.parametrize("variant", ["llama32", "fp16_single", "untied", "head_dim", "default_rope", "bias",
                                     "linear_rope"])
def test_files_are_what_the_model_computed(tiny_models, tmp_path, variant):
    out = capture(tiny_models[variant], tmp_path / "x")
    model, seen, hidden = running_model(tiny_models[variant], out)
    c = model.config
    H, Hkv, Dh, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    B, T = len(PROMPTS), len(read_tokens(out)["input_ids"][0])
    cos, sin = seen["cos_sin"]
    for n in range(c.num_hidden_layers):
        # hidden_states[n] is the input of layer n for n < L (only [L] is replaced by the final norm)
        assert np.array_equal(read_csv(out / layer_file("x", n), (B * T, d)), flat(hidden[n]))
        assert np.array_equal(read_csv(out / layer_file("xnorm", n), (B * T, d)), flat(seen[f"xnorm{n}"]))
        # the test's own RoPE on the test's own q/k_proj outputs, then back to head-major columns
        q = seen[f"q_proj{n}"].view(B, T, H, Dh).transpose(1, 2)  # (B, T, H*Dh) -> (B, H, T, Dh)
        k = seen[f"k_proj{n}"].view(B, T, Hkv, Dh).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        assert np.array_equal(read_csv(out / ref_file("q", n), (B * T, H * Dh)), flat(q.transpose(1, 2).reshape(B, T, H * Dh)))
        assert np.array_equal(read_csv(out / ref_file("k", n), (B * T, Hkv * Dh)), flat(k.transpose(1, 2).reshape(B, T, Hkv * Dh)))
        assert np.array_equal(read_csv(out / ref_file("v", n), (B * T, Hkv * Dh)), flat(seen[f"v_proj{n}"]))
        assert np.array_equal(read_csv(out / ref_file("attn", n), (B * T, d)), flat(seen[f"o_proj{n}"]))
        meta = json.loads((out / meta_file(n)).read_text())
        assert (meta["layer"], meta["batch_size"], meta["seq_len"], meta["d_model"]) == (n, B, T, d)
        assert (meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == (H, Hkv, Dh)
        assert meta["rope_theta"] == c.rope_parameters["rope_theta"]
        assert meta["rope_type"] == c.rope_parameters["rope_type"]
        assert (meta["rope_scaling"] or {"rope_type": "default"})["rope_type"] == meta["rope_type"]
        assert meta["rms_norm_eps"] == c.rms_norm_eps and meta["attention_bias"] == c.attention_bias
        assert meta["dtype"] == "float32" and meta["padding_side"] == "left"
        assert meta["provenance"]["attn_implementation"] == "eager"


def test_x_layer0_is_the_embedding_rows(llama32, tmp_path):
    out = capture(llama32, tmp_path / "x", "--layers", "0")
    infos = list_tensors(llama32)
    emb = read_tensor(infos["model.embed_tokens.weight"]).float()
    ids = torch.tensor(read_tokens(out)["input_ids"]).reshape(-1)
    assert np.array_equal(read_csv(out / "x_layer0.csv"), emb[ids].numpy())
    assert sorted(p.name for p in out.glob("x_layer*.csv")) == ["x_layer0.csv"]


def test_positions_and_mask_follow_the_padding(llama32, tmp_path):
    for side in ("left", "right"):
        out = capture(llama32, tmp_path / side, "--padding-side", side, "--layers", "0")
        mask = read_csv(out / "attention_mask.csv").astype(int)
        pos = read_csv(out / "position_ids.csv").astype(int)
        for b in range(len(PROMPTS)):
            real = mask[b] == 1
            assert pos[b][real].tolist() == list(range(real.sum()))
            assert real[-1] if side == "left" else real[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_prompt_alone(llama32, tmp_path, side):
    batch = capture(llama32, tmp_path / "batch", "--padding-side", side)
    mask = read_csv(batch / "attention_mask.csv").astype(bool)
    B, T = mask.shape
    for b, prompt in enumerate(PROMPTS):
        alone = capture(llama32, tmp_path / f"alone{b}", prompts=[prompt])
        rows = np.arange(b * T, (b + 1) * T)[mask[b]]
        for n in range(3):
            for stem in ("x", "xnorm", "ref_q", "ref_k", "ref_v", "ref_attn"):
                got = read_csv(batch / layer_file(stem, n))[rows]
                np.testing.assert_allclose(got, read_csv(alone / layer_file(stem, n)), rtol=1e-5, atol=1e-5,
                                           err_msg=f"{layer_file(stem, n)}, prompt {b}, {side} padding")


def test_rerun_overwrites_cleanly(llama32, tmp_path):
    out = capture(llama32, tmp_path / "x")
    capture(llama32, out, "--layers", "1", "--no-save-reference", "--no-save-layer-refs", "--no-save-attn-probs",
            "--logits", "none", prompts=PROMPTS[:1])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention_mask.csv", "manifest.json", "meta_layer1.json", "meta_model.json", "position_ids.csv",
                     "tokens.json", "x_layer1.csv", "xnorm_layer1.csv"]
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(listed) == [n for n in names if n != "manifest.json"]  # this run's files, none left over
    assert json.loads((out / "meta_layer1.json").read_text())["batch_size"] == 1


def test_bfloat16_compute_is_recorded(llama32, tmp_path):
    out = capture(llama32, tmp_path / "x", "--dtype", "bfloat16", "--layers", "1")
    meta = json.loads((out / "meta_layer1.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["provenance"]["compute_dtype"] == "bfloat16"
    x = torch.from_numpy(read_csv(out / "ref_q_layer1.csv"))
    assert torch.equal(x, x.bfloat16().float())  # bf16 values, widened exactly


def test_chat_template(llama32, tmp_path):
    out = capture(llama32, tmp_path / "x", "--chat", "--layers", "0", prompts=PROMPTS[:1])
    tokens = read_tokens(out)["tokens"][0]
    assert tokens[:2] == ["<|begin_of_text|>", "<|start_header_id|>"]
    assert "".join(tokens).endswith("assistant<|end_header_id|>ĊĊ")  # the generation prompt


def test_bad_input_is_one_line_and_exit_2(tiny_models, tmp_path):
    r = run_script("2_get_x.py", "--model-dir", tmp_path / "nowhere", "--out-dir", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nowhere" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()

    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_models["fp16_single"], no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(InputError, match="config.json"):
        capture(no_config, tmp_path / "out")
    not_llama = tmp_path / "not_llama"
    shutil.copytree(tiny_models["fp16_single"], not_llama)
    cfg = json.loads((not_llama / "config.json").read_text())
    (not_llama / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(InputError, match="not Llama-family.*llama"):
        capture(not_llama, tmp_path / "out")
    with pytest.raises(InputError, match="empty"):
        capture(tiny_models["llama32"], tmp_path / "out", prompts=["  "])
    with pytest.raises(InputError, match="max_position_embeddings"):
        capture(tiny_models["llama32"], tmp_path / "out", prompts=["hello world " * 400])
    with pytest.raises(InputError, match="layers"):
        capture(tiny_models["llama32"], tmp_path / "out", "--layers", "7")
    assert not (tmp_path / "out").exists()


def test_demo_model(demo_model, tmp_path):
    out = capture(demo_model, tmp_path / "x", "--layers", "0,29", prompts=["The capital of France is"])
    meta = json.loads((out / "meta_layer29.json").read_text())
    assert (meta["d_model"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == (576, 9, 3, 64)
    assert meta["rope_theta"] == 100000.0 and meta["rope_scaling"] is None
    T = meta["seq_len"]
    assert read_csv(out / "ref_q_layer29.csv").shape == (T, 576)
    assert read_csv(out / "ref_k_layer29.csv").shape == (T, 192)
    ids = torch.tensor(read_tokens(out)["input_ids"]).reshape(-1)
    emb = read_tensor(list_tensors(demo_model)["model.embed_tokens.weight"]).float()
    assert np.array_equal(read_csv(out / "x_layer0.csv"), emb[ids].numpy())


def test_rope_parameters_config_form(llama32, tmp_path):
    """config.json with transformers 5's rope_parameters gives the same meta and files as rope_theta + rope_scaling."""
    model_dir = tmp_path / "model"
    shutil.copytree(llama32, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    params = {"rope_theta": cfg.pop("rope_theta"), **cfg.pop("rope_scaling")}
    (model_dir / "config.json").write_text(json.dumps({**cfg, "rope_parameters": params}))
    hub_form = capture(llama32, tmp_path / "hub", "--layers", "2")
    new_form = capture(model_dir, tmp_path / "new", "--layers", "2")
    a, b = (json.loads((d / "meta_layer2.json").read_text()) for d in (hub_form, new_form))
    keys = ("rope_theta", "rope_type", "rope_scaling")
    assert [a[k] for k in keys] == [b[k] for k in keys] and a["rope_scaling"]["factor"] == 8.0
    for stem in ("x", "ref_q", "ref_k"):
        assert (hub_form / f"{stem}_layer2.csv").read_bytes() == (new_form / f"{stem}_layer2.csv").read_bytes()


@pytest.mark.parametrize("variant", ["llama32", "untied", "mlp_bias"])
@pytest.mark.parametrize("logits", ["all", "last"])
def test_every_node_is_what_the_model_computed(tiny_models, tmp_path, variant, logits):
    """ref_h/hnorm/act/mlp/out/probs of every layer, ref_norm and ref_logits, against the test's own hooks."""
    out = capture(tiny_models[variant], tmp_path / "x", "--logits", logits)
    model = LlamaForCausalLM.from_pretrained(str(tiny_models[variant]), dtype=torch.float32,
                                             attn_implementation="eager")
    seen: dict = {}
    hooks = [model.model.norm.register_forward_hook(lambda m, a, o: seen.__setitem__("norm", o))]
    for n, layer in enumerate(model.model.layers):
        post, mlp = layer.post_attention_layernorm, layer.mlp
        hooks += [post.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(f"h{n}", a[0])),
                  post.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(f"hnorm{n}", o)),
                  mlp.down_proj.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(f"act{n}", a[0])),
                  mlp.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(f"mlp{n}", o)),
                  layer.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(f"out{n}", o))]
    tokens = read_tokens(out)
    ids = torch.tensor(tokens["input_ids"])
    mask = torch.from_numpy(read_csv(out / "attention_mask.csv")).long()
    pos = torch.from_numpy(read_csv(out / "position_ids.csv")).long()
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True)
    for h in hooks:
        h.remove()
    B, T = ids.shape
    for n in range(model.config.num_hidden_layers):
        for stem in ("h", "hnorm", "act", "mlp", "out"):
            assert np.array_equal(read_csv(out / layout.ref_file(stem, n)), flat(seen[f"{stem}{n}"])), (stem, n)
        probs = res.attentions[n]  # (B, H, T, T)
        assert np.array_equal(read_csv(out / layout.ref_file("probs", n)), probs.reshape(-1, T).numpy())
    assert np.array_equal(read_csv(out / "ref_norm.csv"), flat(seen["norm"]))
    all_logits = flat(res.logits)
    last = [b * T + T - 1 for b in range(B)]  # left padding: every prompt ends at T - 1
    want = all_logits if logits == "all" else all_logits[last]
    assert np.array_equal(read_csv(out / "ref_logits.csv"), want)
    meta = json.loads((out / "meta_model.json").read_text())
    c = model.config
    assert (meta["num_layers"], meta["vocab_size"], meta["intermediate_size"]) == (c.num_hidden_layers, c.vocab_size,
                                                                                  c.intermediate_size)
    assert (meta["hidden_act"], meta["mlp_bias"], meta["norm_class"]) == ("silu", variant == "mlp_bias", "LlamaRMSNorm")
    assert meta["tie_word_embeddings"] == (variant != "untied") and meta["logits"] == logits
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    assert len(vocab) == c.vocab_size and "".join(vocab[i] for i in tokens["input_ids"][0]).endswith(PROMPTS[0])
