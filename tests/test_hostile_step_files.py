"""Step 2's files, edited by hand or by a bug, as step 3 reads them: masks that are not 0/1, positions that
are not whole numbers >= 0, tokens.json that is not an object, meta that is not a positive integer or
disagrees with the CSVs. One line naming the file, exit 2, nothing written; a real numeric mismatch is FAIL, exit 1."""
from __future__ import annotations

import json
import shutil

import pytest

import test_offline_qkv as qkv
from hostile import fingerprint, one_line, run_main


@pytest.fixture(scope="module")
def pipeline(llama32, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile_step_files")
    return llama32, qkv.export_weights(llama32, base / "weights"), qkv.capture(llama32, base / "acts")


def set_value(path, row: int, col: int, text: str) -> None:
    lines = path.read_text().splitlines()
    cells = lines[row].split(",")
    cells[col] = text
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def edit_json(path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))  # json writes NaN for float("nan"), as a hand edit might


CSV_CASES = {  # file, row, column, text
    "mask NaN": ("attention_mask.csv", 0, 3, "nan"),
    "mask 0.5": ("attention_mask.csv", 0, 3, "0.5"),
    "mask 2": ("attention_mask.csv", 1, 20, "2.0"),
    "mask negative": ("attention_mask.csv", 1, 20, "-1.0"),
    "position -1": ("position_ids.csv", 0, 5, "-1.0"),
    "position 2.5": ("position_ids.csv", 0, 5, "2.5"),
    "position NaN": ("position_ids.csv", 1, 5, "nan"),
    "position inf": ("position_ids.csv", 1, 30, "inf"),
}
META_CASES = {  # meta_layer0.json fields -> the word the line must hold
    "string heads": ({"num_heads": "4"}, "num_heads"),
    "zero heads": ({"num_heads": 0}, "num_heads"),
    "zero kv heads": ({"num_kv_heads": 0}, "num_kv_heads"),
    "negative batch": ({"batch_size": -2}, "batch_size"),
    "float head_dim": ({"head_dim": 16.0}, "head_dim"),
    "bool d_model": ({"d_model": True}, "d_model"),
    "rope_theta NaN": ({"rope_theta": float("nan")}, "rope_theta"),
    "rope_theta 0": ({"rope_theta": 0}, "rope_theta"),
    "rope_theta a string": ({"rope_theta": "1e4"}, "rope_theta"),
    "rope_scaling a string": ({"rope_scaling": "llama3"}, "rope_scaling"),
    "rope factor negative": ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}, "rope_type": "linear"}, "factor"),
    "inv_freq empty": ({"rope_inv_freq": []}, "rope_inv_freq"),
    "inv_freq NaN": ({"rope_inv_freq": [float("nan")] * 8}, "rope_inv_freq"),
    "inv_freq strings": ({"rope_inv_freq": ["1"] * 8}, "rope_inv_freq"),
    "capability a number": ({"torch_cpu_capability": 512}, "torch_cpu_capability"),
    "head_dim unlike the CSVs": ({"head_dim": 8}, "q_proj"),
    "seq_len unlike the CSVs": ({"seq_len": 36}, "csv"),
    "batch unlike the CSVs": ({"batch_size": 3}, "csv"),
    "kv heads unlike the CSVs": ({"num_kv_heads": 4}, "k_proj"),
}


def acts_copy(pipeline, tmp_path):
    acts = tmp_path / "acts"
    shutil.copytree(pipeline[2], acts)
    return acts


def step3(pipeline, acts, out, *args):
    """Step 3 on files edited on purpose: their sha256 check (tests/test_integrity.py) is off, so the
    content checks these tests are about are what answers."""
    model, weights, _ = pipeline
    return run_main("3_offline_qkv.py", "--model-dir", model, "--weights-dir", weights, "--acts-dir", acts,
                    "--out-dir", out, "--layers", "0", "--no-verify-hashes", *args)


def check_refused(pipeline, acts, tmp_path, *words) -> str:
    before = fingerprint(acts, pipeline[1])
    line = one_line(step3(pipeline, acts, tmp_path / "out"), *words)
    assert fingerprint(acts, pipeline[1]) == before and not (tmp_path / "out").exists()
    return line


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_mask_and_positions_hold_what_they_must(pipeline, tmp_path, case):
    name, row, col, text = CSV_CASES[case]
    acts = acts_copy(pipeline, tmp_path)
    set_value(acts / name, row, col, text)
    check_refused(pipeline, acts, tmp_path, name)


def test_a_prompt_without_any_real_token(pipeline, tmp_path):
    acts = acts_copy(pipeline, tmp_path)
    mask = acts / "attention_mask.csv"
    lines = mask.read_text().splitlines()
    lines[1] = ",".join(["0.0"] * len(lines[1].split(",")))
    mask.write_text("\n".join(lines) + "\n")
    check_refused(pipeline, acts, tmp_path, "attention_mask.csv", "no real token")


@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_values_and_their_agreement_with_the_csvs(pipeline, tmp_path, case):
    changes, word = META_CASES[case]
    acts = acts_copy(pipeline, tmp_path)
    edit_json(acts / "meta_layer0.json", **changes)
    check_refused(pipeline, acts, tmp_path, word)


@pytest.mark.parametrize("content, word", [(b"[1, 2]", "tokens.json"), (b'"text"', "tokens.json"),
                                           (b"\xff\xfe", "tokens.json"), (b'{"input_ids": [[1, 2]]}', "rows"),
                                           (b'{"tokens": "abc"}', "rows")])
def test_tokens_json_must_be_the_batch(pipeline, tmp_path, content, word):
    acts = acts_copy(pipeline, tmp_path)
    (acts / "tokens.json").write_bytes(content)
    check_refused(pipeline, acts, tmp_path, word)


@pytest.mark.parametrize("content", [b"[]", b"not json", b"\xff", b"[" * 100000 + b"]" * 100000])
def test_meta_that_is_not_an_object(pipeline, tmp_path, content):
    acts = acts_copy(pipeline, tmp_path)
    (acts / "meta_layer0.json").write_bytes(content)
    check_refused(pipeline, acts, tmp_path, "meta_layer0.json")


def test_a_wrong_reference_value_is_fail_exit_1_not_an_input_error(pipeline, tmp_path):
    acts = acts_copy(pipeline, tmp_path)
    set_value(acts / "ref_q_layer0.csv", 0, 0, "1000.0")
    r = step3(pipeline, acts, tmp_path / "out")
    assert r.code == 1 and "FAIL" in r.out and r.err == "", r.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert json.dumps(report).count("FAIL") >= 1
