"""Flags and prompts a clumsy user types: layer ranges checked before they are expanded (no 10**9-entry
list), tolerances that are not finite numbers >= 0, prompts that are not UTF-8 or empty, chat templates that
raise or reach for Python internals, tokenizers whose ids fall outside the embedding. One line, exit 2."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import test_offline_qkv as qkv
from hostile import one_line, run_main


@pytest.fixture(scope="module")
def pipeline(llama32, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile_flags")
    return llama32, qkv.export_weights(llama32, base / "weights"), qkv.capture(llama32, base / "acts")


def step2(model, out, *args):
    return run_main("2_get_x.py", "--model-dir", model, "--out-dir", out, *args)


def step3(p, out, *args):
    model, weights, acts = p
    return run_main("3_offline_qkv.py", "--model-dir", model, "--weights-dir", weights, "--acts-dir", acts,
                    "--out-dir", out, *args)


LAYERS = ["0-999999999", "999999999", "3", "2-1", "-1", "a", "1,,2", "0-2-4"]


@pytest.mark.parametrize("spec", LAYERS)
def test_layer_ranges_are_checked_before_they_are_expanded(pipeline, tmp_path, spec):
    one_line(step2(pipeline[0], tmp_path / "x", "--layers", spec, "--prompt", "Hi"), "--layers")
    one_line(step3(pipeline, tmp_path / "q", "--layers", spec), "--layers")
    assert not (tmp_path / "x").exists() and not (tmp_path / "q").exists()


@pytest.mark.parametrize("value", ["nan", "-1e-5", "inf", "-inf", "x", ""])
@pytest.mark.parametrize("flag", ["--atol", "--rtol"])
def test_tolerances_are_finite_and_not_negative(pipeline, tmp_path, flag, value):
    one_line(step3(pipeline, tmp_path / "q", f"{flag}={value}"), "finite number >= 0")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("prompt, word", [(os.fsdecode(b"caf\xe9 \xff"), "UTF-8"), ("", "empty"), ("  \n\t", "empty")])
def test_prompts_that_are_not_text(llama32, tmp_path, prompt, word):
    one_line(step2(llama32, tmp_path / "x", "--prompt", "fine", "--prompt", prompt), word)
    assert not (tmp_path / "x").exists()


def with_template(llama32, tmp_path, template: str):
    model = tmp_path / "model"
    shutil.copytree(llama32, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (model / "chat_template.jinja").write_text(template)
    return model


TEMPLATES = {
    "raises": "{{ raise_exception('this template takes no user turns') }}",
    "python internals": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "syntax error": "{% if messages %}{{ messages[0]['content'] }",
    "undefined attribute call": "{{ messages.nothing_here() }}",
    "division by zero": "{{ 1 // 0 }}",
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_a_chat_template_that_fails_is_one_line(llama32, tmp_path, case):
    model = with_template(llama32, tmp_path, TEMPLATES[case])
    one_line(step2(model, tmp_path / "x", "--chat", "--prompt", "Hi"), "chat template")
    assert not (tmp_path / "x").exists()


def test_a_tokenizer_with_ids_past_the_embedding(llama32, tmp_path):
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(llama32, model)
    tok = AutoTokenizer.from_pretrained(model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    extra = [f"<extra_{i}>" for i in range(vocab + 5 - len(tok))]
    tok.add_tokens(extra)
    tok.save_pretrained(model)
    assert tok.convert_tokens_to_ids(extra[-1]) >= vocab
    line = one_line(step2(model, tmp_path / "x", "--prompt", f"Hi {extra[-1]}"), "vocab_size")
    assert "outside the embedding" in line and not (tmp_path / "x").exists()


def test_a_broken_tokenizer_file_is_one_line(llama32, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama32, model)
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    one_line(step2(model, tmp_path / "x", "--prompt", "Hi"), "tokenizer")
    assert not (tmp_path / "x").exists()
