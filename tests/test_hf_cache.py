"""Models where users keep them: a snapshot folder of the Hugging Face cache (every file a relative link
into ../../blobs/), and a repo id as --model-dir resolved offline through huggingface_hub's cache.

The cache is built at test time in the real layout (blobs/<sha256>, snapshots/<commit>/<file> ->
../../blobs/<sha256>, refs/main) from a tiny model, or written by huggingface_hub itself from the
loopback Hub (tests/hub_server.py). Every step reads it and writes the same bytes as from a plain folder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from common import paths
from common.files import layout
from conftest import run_script
from hostile import one_line, run_main
from hub_server import HubServer, Repo
from test_download import hub_env

REPO = "tiny-org/Tiny-Llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_cache(model: Path, cache: Path, repo_id: str = REPO, commit: str = COMMIT,
                ref: str = "main") -> Path:
    """Put model's files into an HF cache at `cache` as huggingface_hub lays them out; return the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(model.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / sha)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", sha))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def csv_bytes(folder: Path) -> dict[str, bytes]:
    """Every CSV under folder, by relative name (the JSON files name the model folder, so differ)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.csv"))}


@pytest.fixture(scope="module")
def cache(llama32, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf") / "hub"
    build_cache(llama32, root)
    return root


def test_the_cache_is_in_the_real_layout(cache):
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    links = list(snapshot.iterdir())
    assert links and all(p.is_symlink() and not os.readlink(p).startswith("/") for p in links)
    assert all(p.resolve().parent.name == "blobs" for p in links)


def test_output_names_are_org_name_for_a_repo_id_and_a_snapshot(cache, tmp_path):
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    for given in (REPO, snapshot):
        assert layout.default_dir(given, layout.ACTS) == paths.OUTPUTS / "tiny-org_Tiny-Llama" / layout.ACTS
    assert layout.default_dir(tmp_path / "a_b", layout.QKV) == paths.OUTPUTS / "a_b" / layout.QKV
    (tmp_path / "tiny-org" / "Tiny-Llama").mkdir(parents=True)  # a folder of that spelling wins over the repo id
    assert not paths.is_repo_id(tmp_path / "tiny-org" / "Tiny-Llama") and paths.is_repo_id(REPO)


LAYER0 = ("--filter", r"layers\.0\.")  # step 3 on layer 0 reads only these: keeps the test short


def test_steps_1_2_3_through_the_cache_write_the_same_bytes_as_from_the_folder(llama32, cache, tmp_path):
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    step2 = ("--prompt", "Hi there", "--layers", "0")
    runs = {}
    for form, model in (("folder", llama32), ("snapshot", snapshot)):  # in-process
        w, x = tmp_path / form / "w", tmp_path / form / "x"
        assert run_main("1_model_weights.py", "--model-dir", model, "--out-dir", w, *LAYER0).code == 0
        r = run_main("2_get_x.py", "--model-dir", model, "--out-dir", x, *step2)
        assert r.code == 0, r.err[-2000:]
        runs[form] = (w, x)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}  # the repo id, as a user runs it: a new process
    w, x = tmp_path / "repo" / "w", tmp_path / "repo" / "x"
    r = run_script("1_model_weights.py", "--model-dir", REPO, "--out-dir", w, *LAYER0, env=env)
    assert r.returncode == 0, r.stderr
    r = run_script("2_get_x.py", "--model-dir", REPO, "--out-dir", x, *step2, env=env)
    assert r.returncode == 0, r.stderr
    assert f"snapshots/{COMMIT}" in r.stdout  # the resolved folder is printed with the settings
    runs["repo"] = (w, x)
    for form in ("snapshot", "repo"):
        for i in (0, 1):
            assert csv_bytes(runs[form][i]) == csv_bytes(runs["folder"][i]) and csv_bytes(runs["folder"][i])
    r = run_main("3_offline_qkv.py", "--model-dir", REPO, "--weights-dir", w, "--acts-dir", x,
                 "--out-dir", tmp_path / "repo" / "qkv")
    assert r.code == 0 and "FAIL" not in r.out, r.out[-2000:]


def test_a_revision_other_than_main_in_hf_home(llama32, tmp_path):
    build_cache(llama32, tmp_path / "home" / "hub", ref="v1", commit="f" * 40)  # no refs/main
    r = run_script("1_model_weights.py", "--model-dir", REPO, "--revision", "v1", "--list",
                   env={"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "model.layers.0.self_attn.q_proj.weight" in r.stdout, r.stderr


def test_a_repo_not_in_the_cache_names_the_download_command(tmp_path):
    r = run_script("1_model_weights.py", "--model-dir", "meta-llama/Not-Here", "--list",
                   env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(tmp_path / "hub") in r.stderr
    assert "`python 0_download_models.py --to-hf-cache --models meta-llama/Not-Here`" in r.stderr


def test_a_revision_with_a_folder_is_refused(llama32):
    one_line(run_main("1_model_weights.py", "--model-dir", llama32, "--revision", "v1", "--list"), "--revision")


@pytest.mark.parametrize("name, blob_of", [("model-00001-of-00005.safetensors", "config.json"),
                                           ("config.json", "model-00001-of-00005.safetensors"),
                                           ("tokenizer.json", "model-00002-of-00005.safetensors")])
def test_a_link_to_a_file_that_is_not_what_its_name_says_is_malformed(llama32, tmp_path, name, blob_of):
    snapshot = build_cache(llama32, tmp_path / "hub")
    target = os.readlink(snapshot / blob_of)
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(target)
    args = ("--out-dir", tmp_path / "out")
    script = "1_model_weights.py" if name.endswith(".safetensors") else "2_get_x.py"
    r = run_main(script, "--model-dir", snapshot, *args, *(("--prompt", "Hi") if script == "2_get_x.py" else ()))
    line = one_line(r, name)
    assert "malformed" in line or "not valid JSON" in line or "tokenizer" in line, line
    assert not (tmp_path / "out").exists()


def test_an_index_entry_outside_the_snapshot_is_still_refused(llama32, tmp_path):
    snapshot = build_cache(llama32, tmp_path / "hub")
    index = snapshot / "model.safetensors.index.json"
    text = index.read_text().replace('"model-00001-of-00005.safetensors"', '"../../blobs/x.safetensors"')
    index.unlink()
    index.write_text(text)
    one_line(run_main("1_model_weights.py", "--model-dir", snapshot, "--list"), "outside the model folder")


def test_download_to_hf_cache_writes_the_snapshot_layout(llama32, tmp_path):
    files = {p.name: p.read_bytes() for p in llama32.iterdir() if p.is_file()}
    with HubServer({REPO: Repo(files)}) as hub:
        env = hub_env(tmp_path, hub.url)
        r = run_script("0_download_models.py", "--to-hf-cache", "--models", REPO, env=env)
        assert r.returncode == 0, r.stderr
    cache = tmp_path / "hf_home" / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    commit = (repo / "refs" / "main").read_text()
    snapshot = repo / "snapshots" / commit
    assert all((snapshot / n).is_symlink() and (snapshot / n).read_bytes() == files[n] for n in files)
    assert not (Path(paths.MODEL_PATHS) / "tiny-org_Tiny-Llama").exists()
    r = run_main("1_model_weights.py", "--model-dir", snapshot, "--out-dir", tmp_path / "w", *LAYER0)
    assert r.code == 0 and csv_bytes(tmp_path / "w"), r.err


def test_no_step_writes_into_the_cache(cache):
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    out = cache / f"models--{REPO.replace('/', '--')}" / "blobs" / "out"
    one_line(run_main("1_model_weights.py", "--model-dir", snapshot, "--out-dir", out), "input folder")
    assert not out.exists()
