"""Output folders as a clumsy user or an attacker sets them up: never write into (or around) what a step
reads, never through a planted link, refuse a file or folder in the way, an empty path, disk full and
read-only with one line; temporary files of killed runs are removed by the next run."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import test_offline_qkv as qkv
from hostile import fingerprint, one_line, run_main, small_disk


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a.weight": torch.ones(2, 2), "b.weight": torch.arange(3.0)}, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def pipeline(llama32, tmp_path_factory):
    """(model, weights, acts) of the tiny llama32: steps 1 and 2 run once."""
    base = tmp_path_factory.mktemp("hostile_output")
    return llama32, qkv.export_weights(llama32, base / "weights"), qkv.capture(llama32, base / "acts")


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt" / "a.pt"
    path.parent.mkdir()
    torch.save({"w": torch.ones(4)}, path)
    return path


def step1(model, out, *args):
    return run_main("1_model_weights.py", "--model-dir", model, "--out-dir", out, *args)


def step3(p, out, *args):
    model, weights, acts = p
    return run_main("3_offline_qkv.py", "--model-dir", model, "--weights-dir", weights, "--acts-dir", acts,
                    "--out-dir", out, "--layers", "0", *args)


def step2(model, out, *args):
    return run_main("2_get_x.py", "--model-dir", model, "--out-dir", out, "--prompt", "Hi", "--layers", "0", *args)


def convert(ckpt, out, *args, cwd=None):
    return run_main("convert_to_safetensors.py", ckpt, "--output-dir", out, *args, cwd=cwd)


# --- never into, around or inside what is read ---------------------------------------------

@pytest.mark.parametrize("where", ["the model folder", "inside it", "its parent"])
def test_step_1_never_writes_over_or_into_the_model_folder(model, tmp_path, where):
    out = {"the model folder": model, "inside it": model / "sub", "its parent": tmp_path}[where]
    before = fingerprint(tmp_path)
    one_line(step1(model, out, "--layer", "a", "--format", "safetensors"), "input folder")
    assert fingerprint(tmp_path) == before


def test_step_1_refuses_the_model_folder_through_a_link(model, tmp_path):
    (tmp_path / "alias").symlink_to(model)
    before = fingerprint(tmp_path)
    one_line(step1(model, tmp_path / "alias"), "input folder")
    assert fingerprint(tmp_path) == before


def test_steps_2_3_and_the_converter_never_write_into_their_inputs(pipeline, checkpoint, tmp_path):
    model, weights, acts = pipeline
    before = fingerprint(model, weights, acts, checkpoint.parent)
    one_line(step2(model, model), "input folder")
    one_line(step2(model, model / "x"), "input folder")
    for out in (acts, weights, acts / "sub", acts.parent):
        one_line(step3(pipeline, out), "input folder")
    one_line(convert(checkpoint, checkpoint.parent, "--force"), "contains the input file")
    assert fingerprint(model, weights, acts, checkpoint.parent) == before


# --- something in the way ---------------------------------------------------------------------

def test_out_dir_that_is_a_file_or_under_one(model, pipeline, checkpoint, tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    for out in (f, f / "sub"):
        one_line(step1(model, out), str(f))
        one_line(step2(pipeline[0], out), str(f))
        one_line(step3(pipeline, out), str(f))
        one_line(convert(checkpoint, out), str(f))
    assert f.read_text() == "mine"


def test_a_folder_at_a_final_name_or_at_manifest_json(model, tmp_path):
    out = tmp_path / "out"
    (out / "a.weight.csv").mkdir(parents=True)
    one_line(step1(model, out, "--filter", "^a"), "a.weight.csv")
    (out / "a.weight.csv").rmdir()
    (out / "manifest.json").mkdir()
    one_line(step1(model, out, "--filter", "^a"), "manifest.json")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a.weight.csv", "manifest.json"]


def test_a_folder_at_a_final_name_of_steps_2_and_3(pipeline, tmp_path):
    (tmp_path / "x" / "tokens.json").mkdir(parents=True)
    one_line(step2(pipeline[0], tmp_path / "x"), "tokens.json")
    (tmp_path / "q" / "q_layer0.csv").mkdir(parents=True)
    one_line(step3(pipeline, tmp_path / "q"), "q_layer0.csv")


@pytest.mark.parametrize("flag", ["--out-dir", "--model-dir"])
def test_an_empty_path_is_refused_not_the_current_folder(model, tmp_path, flag):
    args = {"--out-dir": ["--model-dir", model], "--model-dir": ["--out-dir", tmp_path / "out"]}[flag]
    for name in ("1_model_weights.py", "2_get_x.py", "3_offline_qkv.py"):
        r = run_main(name, *args, flag, "", cwd=tmp_path)
        one_line(r, "empty")
    one_line(run_main("convert_to_safetensors.py", "", "--output-dir", tmp_path / "o"), "empty")
    one_line(run_main("convert_to_safetensors.py", tmp_path / "a.pt", "--output-dir", ""), "empty")
    one_line(run_main("0_download_models.py", "--model-path", "", "--models", "a/b"), "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_converter_refuses_to_replace_the_current_folder(checkpoint, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    one_line(convert(checkpoint, ".", cwd=here), "current folder")
    one_line(convert(checkpoint, "..", "--force", cwd=here), "--out-dir ..")  # holds the checkpoint, too
    assert here.is_dir() and not any(here.iterdir())
    r = convert(checkpoint, "model", cwd=here)  # what the message suggests
    assert r.code == 0, r.err
    assert sorted(p.name for p in (here / "model").iterdir()) == ["README.md", "model.safetensors"]


# --- links ---------------------------------------------------------------------------------

def test_a_link_at_a_final_name_is_replaced_never_followed(model, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.weight.csv").symlink_to(victim)
    (out / "manifest.json").symlink_to(victim)
    r = step1(model, out)
    assert r.code == 0, r.err
    assert victim.read_text() == "precious"
    assert not (out / "a.weight.csv").is_symlink() and (out / "a.weight.csv").read_text() == "1.0,1.0\n1.0,1.0\n"
    assert not (out / "manifest.json").is_symlink()


def test_a_final_name_that_resolves_to_an_input_file_is_refused(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").symlink_to(model / "model.safetensors")
    before = fingerprint(model)
    one_line(step1(model, out, "--layer", "a", "--format", "safetensors"), "link to the input")
    (out / "model.safetensors").unlink()
    (out / "a.weight.csv").symlink_to(model)
    one_line(step1(model, out), "link to the input")
    assert fingerprint(model) == before


def test_a_link_at_the_manifest_lock_is_refused(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "created-outside"
    (out / ".manifest.json.lock").symlink_to(target)
    one_line(step1(model, out), ".manifest.json.lock")
    assert not os.path.lexists(target)


# --- leftovers of killed runs ---------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def plant_leftovers(folder, final: str):
    """An unlocked temp file, a legacy one of a dead pid, a planted link, and a locked one (a live writer)."""
    folder.mkdir(parents=True, exist_ok=True)
    legacy = f".{final}" + ".tmp-" + str(dead_pid())  # the name the pid-named temp files of older versions had
    stale = [folder / f".{final}.k2j4h5g6.tmp", folder / legacy, folder / f".{final}.zz_9ab7x.tmp"]
    stale[0].write_text("half")
    stale[1].write_text("half")
    stale[2].symlink_to(folder.parent / "elsewhere")
    live = folder / f".{final}.live1234.tmp"
    live.write_text("being written")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return stale, [live], fd


def check_cleaned(stale, kept, fd):
    try:
        assert not [p for p in stale if os.path.lexists(p)]
        assert all(p.exists() for p in kept)  # a writer holds it, or may soon
    finally:
        os.close(fd)



def test_every_step_removes_its_leftovers(model, pipeline, checkpoint, tmp_path):
    left = plant_leftovers(tmp_path / "w", "a.weight.csv")
    assert step1(model, tmp_path / "w").code == 0
    check_cleaned(*left)
    left = plant_leftovers(tmp_path / "x", "x_layer0.csv")
    assert step2(pipeline[0], tmp_path / "x").code == 0
    check_cleaned(*left)
    left = plant_leftovers(tmp_path / "q", "q_layer0.csv")
    assert step3(pipeline, tmp_path / "q").code == 0
    check_cleaned(*left)
    (tmp_path / "models").mkdir()
    stale = tmp_path / "models" / ".conv.abcd1234.tmpd"
    (stale / "sub").mkdir(parents=True)
    assert convert(checkpoint, tmp_path / "models" / "conv").code == 0
    assert not stale.exists()


# --- disk full, read-only ---------------------------------------------------------------------

def test_disk_full_is_one_line_for_steps_2_3_and_the_converter(pipeline, tmp_path):
    with small_disk(tmp_path, "16k") as disk:
        one_line(step2(pipeline[0], disk / "x"), "No space left")
        one_line(step3(pipeline, disk / "q"), "No space left")
        big = tmp_path / "big.pt"
        torch.save({"w": torch.ones(64, 1024)}, big)
        one_line(convert(big, disk / "conv"), "No space left")
        assert not [p for p in disk.rglob("*") if p.name.endswith((".tmp", ".tmpd"))]


def test_read_only_is_one_line_for_steps_1_2_3_and_the_converter(model, pipeline, checkpoint, tmp_path):
    with small_disk(tmp_path, read_only=True) as disk:
        one_line(step1(model, disk / "w"), "Read-only")
        one_line(step2(pipeline[0], disk / "x"), "Read-only")
        one_line(step3(pipeline, disk / "q"), "Read-only")
        one_line(convert(checkpoint, disk / "conv"), "Read-only")


def test_a_temp_file_a_cleaner_removes_before_it_is_locked_is_made_again(tmp_path):
    """mkstemp, then flock: a cleaner running in between removes the file; the writer notices and retries."""
    import tempfile

    from common.files import atomic

    made = []

    def make():
        fd, name = tempfile.mkstemp(dir=tmp_path, prefix=".f.csv.", suffix=atomic.TEMP_SUFFIX)
        made.append(name)
        if len(made) == 1:
            assert atomic.clean_stale_temps(tmp_path) != []  # another run's cleaner gets there first
        return fd, name

    fd, name = atomic._locked_temp(make, os.O_RDWR)
    try:
        assert name == made[1] and os.path.exists(name) and not os.path.exists(made[0])
        assert atomic.clean_stale_temps(tmp_path) == [] and os.path.exists(name)  # locked: kept
    finally:
        os.close(fd)
