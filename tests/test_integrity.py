"""Integrity: step 2's manifest.json, and steps 3 and 4 refusing any input edited after steps 1 and 2 wrote it.

A change below the tolerance (one digit of a weight, rope_theta in a meta file, a padding row that no
check compares) is invisible to the numbers: each case here PASSes with --no-verify-hashes, and is
refused by default, exit 2, one line naming the file.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import load_script

import test_offline_qkv as qkv_tests
from common import paths
from common.cli import InputError
from common.files import layout
from common.files.atomic import sha256_file
from common.files.csv_io import read_csv, write_csv
from common.model import capture
from hostile import fingerprint, one_line, run_main

STEPS = ("3_offline_qkv.py", "4_offline_forward.py")
Q_PROJ = layout.weight_file(layout.weight_name(0, "self_attn", "q_proj", "weight"))


@pytest.fixture(scope="module")
def pipeline(llama32, tmp_path_factory):
    """(model, weights: every tensor, acts: two prompts, the short one left-padded)."""
    base = tmp_path_factory.mktemp("integrity")
    weights = base / "weights"
    assert load_script("1_model_weights.py").main(["--model-dir", str(llama32), "--out-dir", str(weights)]) == 0
    return llama32, weights, qkv_tests.capture(llama32, base / "acts")


def copies(pipeline, tmp_path):
    _, weights, acts = pipeline
    shutil.copytree(weights, tmp_path / "weights")
    shutil.copytree(acts, tmp_path / "acts")
    return tmp_path / "weights", tmp_path / "acts"


def step(name, pipeline, weights, acts, out, *args):
    extra = ("--no-plots",) if name == STEPS[1] else ()
    return run_main(name, "--model-dir", pipeline[0], "--weights-dir", weights, "--acts-dir", acts,
                    "--out-dir", out, *extra, *args)


def change_one_digit(path):
    """The last digit of the first plain (no exponent) number with 6+ digits, moved by one: ~1e-7 relative."""
    text = path.read_text()
    m = re.search(r"-?\d\.\d{5,}(?=[,\n])", text)
    last = m.end() - 1
    digit = str((int(text[last]) + 1) % 10) if text[last] != "9" else "8"
    path.write_text(text[:last] + digit + text[last + 1:])


def change_rope_theta(path):
    meta = json.loads(path.read_text())
    meta["rope_theta"] *= 1 + 1e-9
    path.write_text(json.dumps(meta, indent=2) + "\n")


def tamper_padding_rows(path):
    """Shift every padding row (the short prompt's left padding): no check compares those rows."""
    acts = path.parent
    pad = read_csv(acts / layout.ATTENTION_MASK).reshape(-1) == 0
    assert pad.any()
    x = read_csv(path)
    x[pad] += 0.25
    write_csv(path, x)


EDITS = {  # case -> (folder, file, edit)
    "one digit of a weight": ("weights", Q_PROJ, change_one_digit),
    "rope_theta in a meta file": ("acts", layout.meta_file(0), change_rope_theta),
    "padding rows of x": ("acts", layout.layer_file("x", 0), tamper_padding_rows),
    "padding rows of xnorm": ("acts", layout.layer_file("xnorm", 0), tamper_padding_rows),
}


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("case", list(EDITS))
def test_an_edit_below_the_tolerance_is_refused_by_its_hash(pipeline, tmp_path, case, name):
    weights, acts = copies(pipeline, tmp_path)
    folder, file, edit = EDITS[case]
    target = (weights if folder == "weights" else acts) / file
    edit(target)
    before = fingerprint(weights, acts)
    which = "step 1" if folder == "weights" else "step 2"
    line = one_line(step(name, pipeline, weights, acts, tmp_path / "out"), str(target),
                    f"was modified after {which} wrote it", "--force" if which == "step 1" else "2_get_x.py")
    assert "--no-verify-hashes" in line
    assert fingerprint(weights, acts) == before and not (tmp_path / "out").exists()

    # The numbers alone do not see it: unchecked, the same files PASS, and the report says they were unchecked.
    r = step(name, pipeline, weights, acts, tmp_path / "out", "--no-verify-hashes")
    assert r.code == 0, r.out[-3000:] + r.err[-2000:]
    assert "NOT verified (--no-verify-hashes)" in r.out
    settings = json.loads((tmp_path / "out" / layout.REPORT_JSON).read_text())["settings"]
    assert settings["VERIFY_HASHES"] == "False" and settings["input hashes"].startswith("NOT verified")


@pytest.mark.parametrize("name", STEPS)
def test_untouched_folders_pass_and_are_left_as_they_were(pipeline, tmp_path, name):
    _, weights, acts = pipeline
    before = fingerprint(weights, acts)
    r = step(name, pipeline, weights, acts, tmp_path / "out")
    assert r.code == 0, r.out[-3000:] + r.err[-2000:]
    assert fingerprint(weights, acts) == before
    settings = json.loads((tmp_path / "out" / layout.REPORT_JSON).read_text())["settings"]
    assert settings["VERIFY_HASHES"] == "True"
    assert re.match(r"the sha256 of all \d+ input files \(.* MB\) match their folders' manifest.json",
                    settings["input hashes"]), settings["input hashes"]


@pytest.mark.parametrize("name", STEPS)
def test_an_unlisted_a_deleted_and_a_missing_manifest_are_named(pipeline, tmp_path, name):
    weights, acts = copies(pipeline, tmp_path)
    manifest = acts / layout.MANIFEST
    listed = json.loads(manifest.read_text())
    del listed["files"][layout.layer_file("x", 0)]
    manifest.write_text(json.dumps(listed))
    one_line(step(name, pipeline, weights, acts, tmp_path / "out"), str(acts / layout.layer_file("x", 0)),
             f"is not listed in {manifest}")

    shutil.copy2(pipeline[2] / layout.MANIFEST, manifest)
    (acts / layout.ref_file("q", 0)).unlink()  # listed, then deleted: not an optional file step 2 skipped
    one_line(step(name, pipeline, weights, acts, tmp_path / "out"), str(acts / layout.ref_file("q", 0)),
             "is gone")

    (weights / layout.MANIFEST).unlink()
    (acts / layout.MANIFEST).unlink()
    one_line(step(name, pipeline, weights, acts, tmp_path / "out"), f"{manifest} is missing", "--no-verify-hashes")
    assert not (tmp_path / "out").exists()


def test_step_2_manifest_lists_every_file_it_wrote(pipeline):
    model, _, acts = pipeline
    m = json.loads((acts / layout.MANIFEST).read_text())
    assert m["step"] == 2
    assert sorted(m["files"]) == sorted(p.name for p in acts.iterdir() if p.name != layout.MANIFEST)
    for name, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(acts / name) and entry["bytes"] == (acts / name).stat().st_size
        if name.endswith(".csv"):
            assert read_csv(acts / name, tuple(entry["shape"])).shape == tuple(entry["shape"])  # else InputError
    inputs = m["inputs"]["files"]
    assert inputs["config.json"]["sha256"] == sha256_file(model / "config.json")
    assert inputs["tokenizer.json"]["sha256"] == sha256_file(model / "tokenizer.json")
    shards = [p for p in model.glob("*.safetensors")]
    assert shards and all(inputs[p.name]["bytes"] == p.stat().st_size for p in shards)


def test_a_step_2_run_cut_short_leaves_no_manifest(pipeline, tmp_path, monkeypatch):
    """The old manifest goes first and the new one comes last: nothing vouches for a half-rewritten folder."""
    model, weights, acts = pipeline
    rerun = tmp_path / "acts"
    shutil.copytree(acts, rerun)

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(capture, "write_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        qkv_tests.capture(model, rerun, "--layers", "0")
    assert not (rerun / layout.MANIFEST).exists()
    one_line(step(STEPS[0], pipeline, weights, rerun, tmp_path / "out"), f"{rerun / layout.MANIFEST} is missing")


def test_a_decode_subfolder_is_checked_like_any_file(pipeline, tmp_path):
    """verify_files takes paths inside the folder: files step 2 writes in subfolders are covered the same way."""
    from common.files import manifest
    folder = tmp_path / "acts"
    (folder / "decode" / "step_1").mkdir(parents=True)
    entries = manifest.save_csv(folder, "decode/step_1/x_layer0.csv", np.ones((2, 3), np.float32))
    manifest.write_step_manifest(folder, 2, entries, {})
    assert manifest.verify_files(folder, ["decode/step_1/x_layer0.csv"], "step 2", "rerun") == (1, 24)
    write_csv(folder / "decode/step_1/x_layer0.csv", np.full((2, 3), 2, np.float32))
    with pytest.raises(Exception, match=r"decode/step_1/x_layer0.csv was modified after step 2 wrote it"):
        manifest.verify_files(folder, ["decode/step_1/x_layer0.csv"], "step 2", "rerun")


def test_grade_checks_its_references_too(pipeline, tmp_path):
    """6_grade.py reads step 2's ref_ files: a padding row changed there is named, as in steps 3 and 4."""
    weights, acts = copies(pipeline, tmp_path)
    assert step(STEPS[0], pipeline, weights, acts, tmp_path / "qkv").code == 0
    tamper_padding_rows(acts / layout.ref_file("q", 1))
    args = ("--candidate-dir", tmp_path / "qkv", "--reference-dir", acts, "--out-dir", tmp_path / "grade")
    one_line(run_main("6_grade.py", *args), str(acts / layout.ref_file("q", 1)), "was modified after step 2")
    r = run_main("6_grade.py", *args, "--no-verify-hashes")
    assert r.code == 0 and "NOT verified" in r.out, r.out[-2000:]


def test_step_2_never_removes_step_1s_manifest(pipeline, tmp_path):
    model, weights, _ = pipeline
    shared = tmp_path / "weights"
    shutil.copytree(weights, shared)
    before = fingerprint(shared)
    with pytest.raises(InputError, match=re.escape(f"{shared} holds the manifest.json of step 1: give step 2 a "
                                                   "folder of its own")):
        qkv_tests.capture(model, shared, "--layers", "0")
    assert fingerprint(shared) == before


@pytest.mark.parametrize("name", STEPS)
def test_the_rerun_hint_names_the_model_the_capture_came_from(pipeline, tmp_path, name):
    """Not the default --model-dir: the meta files say which model step 2 ran."""
    weights, acts = copies(pipeline, tmp_path)
    change_one_digit(acts / layout.layer_file("x", 0))
    extra = ("--no-plots",) if name == STEPS[1] else ()
    r = run_main(name, "--weights-dir", weights, "--acts-dir", acts, "--out-dir", tmp_path / "out", *extra)
    line = one_line(r, layout.layer_file("x", 0), f"python 2_get_x.py --model-dir {pipeline[0]}")
    assert str(paths.MODEL_DIR) not in line


def test_layers_past_the_capture_say_which_layers_it_has(pipeline, tmp_path):
    weights, acts = copies(pipeline, tmp_path)
    r = step(STEPS[0], pipeline, weights, acts, tmp_path / "out", "--layers", "0-999999999")
    one_line(r, "the capture in", "has layers 0..2")
