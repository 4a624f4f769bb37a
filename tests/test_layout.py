"""common/files/layout.py: the names it builds are the ones the steps write, and it parses them back."""
from __future__ import annotations

from conftest import load_script
from model_factory import TINY

from common.files import layout


def test_layer_names_round_trip():
    for stem in (*layout.STEP2_STEMS, "q", "attn", "meta"):
        for n in (0, 7, 123):
            name = layout.meta_file(n) if stem == "meta" else layout.layer_file(stem, n)
            assert layout.parse_layer_file(name) == (stem, n)
    assert layout.ref_file("q", 3) == layout.layer_file("ref_q", 3) == "ref_q_layer3.csv"
    assert layout.meta_file(3) == "meta_layer3.json"
    assert layout.parse_layer_file("x_layer.csv") is None and layout.parse_layer_file("x_layer3.npy") is None


def test_step2_files_are_told_apart_from_others():
    assert all(layout.is_step2_file(name) for name in ("x_layer3.csv", "ref_attn_layer0.csv", "meta_layer12.json",
                                                       *layout.BATCH_FILES))
    # step 3's outputs, a meta of the wrong kind, anything a user left there: never removed by step 2
    assert not any(layout.is_step2_file(name) for name in ("q_layer3.csv", "meta_layer3.csv", "x_layer3.json",
                                                           "notes.txt", "report.json"))


def test_attention_weight_files_are_what_step_1_writes(tiny_models, tmp_path):
    step1 = load_script("1_model_weights.py")
    for variant, bias in (("llama32", False), ("bias", True)):
        out = tmp_path / variant
        assert step1.main(["--model-dir", str(tiny_models[variant]), "--out-dir", str(out),
                           "--filter", layout.ATTENTION_FILTER]) == 0
        want = {p for n in range(TINY["num_hidden_layers"])
                for p in layout.qkv_weight_files(out, n, bias).values()}
        assert set(out.glob("*.csv")) == want and len(want) == 3 * (1 + 4 * (2 if bias else 1))


def test_step_4_weight_files_are_what_step_1_writes(tiny_models, tmp_path):
    """Every tensor of a model is a file step 4 names: the layers' (biases included), the norm and the head."""
    step1 = load_script("1_model_weights.py")
    for variant, attention_bias, mlp_bias, tied in (("untied", False, False, False), ("bias", True, False, True),
                                                     ("mlp_bias", False, True, True)):
        out = tmp_path / variant
        assert step1.main(["--model-dir", str(tiny_models[variant]), "--out-dir", str(out)]) == 0
        want = {p for n in range(TINY["num_hidden_layers"])
                for p in layout.layer_weight_files(out, n, attention_bias, mlp_bias).values()}
        want |= set(layout.head_weight_files(out, tied).values())
        if not tied:  # the input embedding is a tensor too, though step 4 reads lm_head
            want.add(out / layout.weight_file(layout.EMBEDDING))
        assert set(out.glob("*.csv")) == want
