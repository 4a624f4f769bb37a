"""0_download_models.py against a loopback Hub: the real huggingface_hub client, HF_ENDPOINT pointed
at tests/hub_server.py. Covers download, skip on rerun, resume, gated, bad token, not found, no
network, disk full, and a token that never appears in any output or file."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import run_script
from hub_server import HubServer, Repo

TOKEN = "_".join(["hf", "LoopbackSecretToken0123456789abcdefXYZ"])  # built, so no token-like literal is tracked
WANTED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja", "model.safetensors.index.json"}


@pytest.fixture(scope="module")
def repo_files(llama32) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in llama32.iterdir() if p.is_file()}
    files["original/consolidated.00.pth"] = b"\x80" * 4096
    files["README.md"] = b"# tiny llama\n"
    files[".gitattributes"] = b"*.safetensors filter=lfs\n"
    return files


def hub_env(tmp_path: Path, url: str, token: str | None = None) -> dict:
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "5", "HF_HUB_ETAG_TIMEOUT": "5"}
    env["HF_TOKEN"] = token or ""  # empty: no token (and no stored login under the fresh HF_HOME)
    return env


def download(tmp_path: Path, server_url: str, repo: str, *extra: str, token: str | None = None):
    return run_script("0_download_models.py", "--model-path", tmp_path / "models", "--models", repo, *extra,
                      env=hub_env(tmp_path, server_url, token))


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]  # progress bars may come before it
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr
    return errors[0]


def test_download_then_rerun_skips(tmp_path, repo_files):
    with HubServer({"meta-llama/Tiny-Llama": Repo(repo_files)}) as hub:
        r = download(tmp_path, hub.url, "meta-llama/Tiny-Llama")
        assert r.returncode == 0, r.stderr
        dest = tmp_path / "models" / "meta-llama_Tiny-Llama"
        got = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()
               and ".cache" not in p.parts}
        shards = {n for n in repo_files if n.endswith(".safetensors")}
        assert got == WANTED | shards | {".complete"}  # no original/, README, .gitattributes
        for name in WANTED | shards:
            assert (dest / name).read_bytes() == repo_files[name], name
        assert len(hub.downloads()) == len(WANTED | shards)

        hub.log.clear()
        again = download(tmp_path, hub.url, "meta-llama/Tiny-Llama")
        assert again.returncode == 0 and "already complete" in again.stdout
        assert hub.downloads() == []

        # The folder is a real model: the pipeline's reader and transformers both take it.
        from transformers import AutoConfig
        assert AutoConfig.from_pretrained(dest).num_hidden_layers == 3


def test_include_original(tmp_path, repo_files):
    with HubServer({"meta-llama/Tiny-Llama": Repo(repo_files)}) as hub:
        r = download(tmp_path, hub.url, "meta-llama/Tiny-Llama", "--include-original")
        assert r.returncode == 0, r.stderr
        dest = tmp_path / "models" / "meta-llama_Tiny-Llama"
        assert (dest / "original/consolidated.00.pth").read_bytes() == repo_files["original/consolidated.00.pth"]


def test_interrupted_download_is_not_complete_and_resumes(tmp_path, repo_files):
    shard = sorted(n for n in repo_files if n.endswith(".safetensors"))[0]
    with HubServer({"meta-llama/Tiny-Llama": Repo(repo_files)}) as hub:
        hub.truncate.add(shard)  # every try of this file drops: the client's own retries give up
        first = download(tmp_path, hub.url, "meta-llama/Tiny-Llama")
        dest = tmp_path / "models" / "meta-llama_Tiny-Llama"
        assert "cannot reach" in one_error_line(first)  # the cut connection ends the first run
        assert not (dest / ".complete").exists() and (dest / "config.json").exists()
        hub.truncate.clear()
        second = download(tmp_path, hub.url, "meta-llama/Tiny-Llama")
        assert second.returncode == 0, second.stderr
        assert (dest / ".complete").is_file()
        assert (dest / shard).read_bytes() == repo_files[shard]


def test_gated_without_access(tmp_path, repo_files):
    with HubServer({"meta-llama/Gated": Repo(repo_files, gated=True)}) as hub:
        line = one_error_line(download(tmp_path, hub.url, "meta-llama/Gated"))
        assert "gated" in line and "HF_TOKEN" in line and "huggingface.co/meta-llama/Gated" in line
        assert not (tmp_path / "models" / "meta-llama_Gated" / ".complete").exists()


def test_gated_with_token_never_leaks_it(tmp_path, repo_files):
    repos = {"meta-llama/Gated": Repo(repo_files, gated=True, allowed_tokens={TOKEN})}
    with HubServer(repos, valid_tokens={TOKEN}) as hub:
        r = download(tmp_path, hub.url, "meta-llama/Gated", token=TOKEN)
        assert r.returncode == 0, r.stderr
        assert any(req.authorization == f"Bearer {TOKEN}" for req in hub.log)  # it was really used
    assert TOKEN not in r.stdout + r.stderr
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


def test_rejected_token(tmp_path, repo_files):
    with HubServer({"meta-llama/Tiny-Llama": Repo(repo_files)}, valid_tokens={TOKEN}) as hub:
        r = download(tmp_path, hub.url, "meta-llama/Tiny-Llama", token="_".join(["hf", "wrong" * 7]))
        line = one_error_line(r)
        assert "token was rejected" in line
        assert "hf_wrong" not in r.stdout + r.stderr


def test_unknown_repo(tmp_path, repo_files):
    with HubServer({"meta-llama/Tiny-Llama": Repo(repo_files)}) as hub:
        line = one_error_line(download(tmp_path, hub.url, "meta-llama/No-Such-Model"))
        assert "not found" in line and "meta-llama/No-Such-Model" in line


def test_no_network_suggests_demo(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = one_error_line(download(tmp_path, f"http://127.0.0.1:{port}", "meta-llama/Tiny-Llama"))
    assert "cannot reach" in line and "--demo" in line


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full(tmp_path, tiny_disk):
    files = {"config.json": b"{}", "model.safetensors": os.urandom(256 * 1024)}
    with HubServer({"meta-llama/Big": Repo(files)}) as hub:
        r = run_script("0_download_models.py", "--model-path", tiny_disk, "--models", "meta-llama/Big",
                       env=hub_env(tmp_path, hub.url))
        line = one_error_line(r)
        assert "disk full" in line
        assert not (tiny_disk / "meta-llama_Big" / ".complete").exists()
