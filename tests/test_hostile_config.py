"""config.json as an attacker or a clumsy user writes it: every fault is one line naming the file,
exit 2, before any weight is loaded (so nothing is computed from random fill-ins), nothing written."""
from __future__ import annotations

import json
import shutil

import pytest
from transformers.activations import ACT2FN

from hostile import fingerprint, one_line, run_main

from common.llama.mlp import ACTIVATIONS



@pytest.fixture(scope="module")
def base(llama32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_config") / "model"
    shutil.copytree(llama32, folder)
    return folder


def with_config(base, tmp_path, edit) -> object:
    model = tmp_path / "model"
    shutil.copytree(base, model)
    cfg = json.loads((model / "config.json").read_text())
    new = edit(cfg)
    if isinstance(new, bytes):
        (model / "config.json").write_bytes(new)
    else:
        (model / "config.json").write_text(json.dumps(cfg if new is None else new))
    return model


def setter(**changes):
    def edit(cfg):
        for k, v in changes.items():
            if v is KeyError:
                cfg.pop(k, None)
            else:
                cfg[k] = v
    return edit


# Config files that are not a config (type, encoding, depth): the file is named.
NOT_A_CONFIG = {
    "a list": lambda cfg: [cfg],
    "a string": lambda cfg: "llama",
    "not UTF-8": lambda cfg: json.dumps(cfg).replace('"llama"', '"ll\\u00e4ma"').encode().replace(b"\\u00e4", b"\xe4"),
    "nested 200000 deep": lambda cfg: b"[" * 200000 + b"]" * 200000,
    "not JSON": lambda cfg: b"{'hidden_size': 64}",
}
# Fields of the wrong type or range: the field is named.
BAD_FIELDS = {
    "no hidden_size": (setter(hidden_size=KeyError), "hidden_size"),
    "zero heads": (setter(num_attention_heads=0), "num_attention_heads"),
    "negative heads": (setter(num_attention_heads=-4), "num_attention_heads"),
    "string heads": (setter(num_attention_heads="4"), "num_attention_heads"),
    "bool layers": (setter(num_hidden_layers=True), "num_hidden_layers"),
    "float vocab": (setter(vocab_size=320.5), "vocab_size"),
    "rope_scaling a string": (setter(rope_scaling="llama3"), "rope_scaling"),
    "rope_scaling a list": (setter(rope_scaling=[8.0]), "rope_scaling"),
    "llama3 without its keys": (setter(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    "rope factor NaN": (setter(rope_scaling={"rope_type": "linear", "factor": float("nan")}), "factor"),
    "rope_theta 0": (setter(rope_theta=0), "rope_theta"),
    "rope_theta negative": (setter(rope_theta=-10000.0), "rope_theta"),
    "rope_theta NaN": (setter(rope_theta=float("nan")), "rope_theta"),
    "rope_theta a string": (setter(rope_theta="1e4"), "rope_theta"),
    "rms_norm_eps negative": (setter(rms_norm_eps=-1e-6), "rms_norm_eps"),
    "rms_norm_eps infinite": (setter(rms_norm_eps=float("inf")), "rms_norm_eps"),
    "kv heads not dividing": (setter(num_key_value_heads=3), "num_key_value_heads"),
    "zero kv heads": (setter(num_key_value_heads=0), "num_key_value_heads"),
    "hidden not a multiple of heads": (setter(hidden_size=66, head_dim=KeyError), "num_attention_heads"),
    "odd head_dim": (setter(head_dim=15), "head_dim"),
    "attention_bias a string": (setter(attention_bias="yes"), "attention_bias"),
    "num_hidden_layers 0": (setter(num_hidden_layers=0), "num_hidden_layers"),
    "hidden_act foo": (setter(hidden_act="foo"), "hidden_act 'foo' is not supported (supported: silu)"),
    "hidden_act a list": (setter(hidden_act=["silu"]), "hidden_act"),
}
# Well-formed configs that disagree with the weights: transformers would fill in random values.
DISAGREE = {
    "more layers than the files": (setter(num_hidden_layers=5), "model.layers.3."),
    "attention_bias without biases": (setter(attention_bias=True), "q_proj.bias"),
    "head_dim unlike the weights": (setter(head_dim=8), "q_proj.weight"),
    "vocab unlike the embedding": (setter(vocab_size=300), "embed_tokens"),
    "fewer layers than the files": (setter(num_hidden_layers=2), "model.layers.2."),
    "untied but no lm_head": (setter(tie_word_embeddings=False), "lm_head.weight"),
    "mlp_bias without biases": (setter(mlp_bias=True), "gate_proj.bias"),
}


def step2(model, out):
    return run_main("2_get_x.py", "--model-dir", model, "--out-dir", out, "--prompt", "Hello", "--device", "cpu")


@pytest.mark.parametrize("case", list(NOT_A_CONFIG) + list(BAD_FIELDS) + list(DISAGREE))
def test_bad_config_is_one_line_before_any_load(base, tmp_path, case):
    if case in NOT_A_CONFIG:
        model, word = with_config(base, tmp_path, NOT_A_CONFIG[case]), "config.json"
    else:
        edit, word = {**BAD_FIELDS, **DISAGREE}[case]
        model = with_config(base, tmp_path, edit)
    before = fingerprint(model)
    line = one_line(step2(model, tmp_path / "out"), word)
    assert str(model) in line
    assert fingerprint(model) == before and not (tmp_path / "out").exists()


def test_streaming_path_is_checked_the_same_way(base, tmp_path):
    model = with_config(base, tmp_path, setter(num_hidden_layers=5))
    r = run_main("2_get_x.py", "--model-dir", model, "--out-dir", tmp_path / "out", "--prompt", "Hi", "--streaming")
    one_line(r, "model.layers.3.")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_an_unknown_hidden_act_is_refused_at_the_door_for_both_captures(base, tmp_path, streaming):
    model = with_config(base, tmp_path, setter(hidden_act="foo"))
    r = run_main("2_get_x.py", "--model-dir", model, "--out-dir", tmp_path / "out", "--prompt", "Hi",
                 "--streaming" if streaming else "--no-streaming")
    one_line(r, str(model / "config.json"), "hidden_act 'foo'", "silu")
    assert not (tmp_path / "out").exists()


def test_every_activation_steps_3_and_4_recompute_is_one_the_model_code_has():
    assert set(ACTIVATIONS) <= set(ACT2FN)  # so the door's list (common/llama/mlp.py) is what both can run
