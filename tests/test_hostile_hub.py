"""The Hub as it misbehaves, and repo ids as users mistype them: an error answer says what the Hub said
(not "check the network"), an answer that is not the Hub API is one line, a Hub that never answers gives up
after --timeout, and a repo id or --model-path that cannot be right is refused before any request."""
from __future__ import annotations

import time

import pytest

from hostile import one_line, run_main
from hub_server import HubServer, Repo
from test_download import download, one_error_line

REPO = "meta-llama/Tiny-Llama"
FILES = {"config.json": b"{}", "model.safetensors": b"\x00" * 64}

FAULTS = {  # fault -> words the one line must hold
    403: ["answered 403", "Forbidden"],
    500: ["answered 500", "try again later"],
    502: ["answered 502"],
    "not_json": ["not a Hub API answer"],
    "bad_listing": ["not a Hub API answer"],
    "hang": ["cannot reach", "no answer within 1 s"],
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_misbehaving_hub_is_one_line_that_says_what_happened(tmp_path, fault):
    with HubServer({REPO: Repo(FILES)}) as hub:
        hub.fault = fault
        hub.hang_s = 5.0
        t0 = time.monotonic()
        r = download(tmp_path, hub.url, REPO, "--timeout", "1")
        took = time.monotonic() - t0
    line = one_error_line(r)
    for w in FAULTS[fault]:
        assert w in line, line
    if fault != "hang":
        assert "check the network" not in line  # it answered: the network is fine
    assert took < 4.5  # not the server's 5 s, let alone minutes
    assert not (tmp_path / "models" / "meta-llama_Tiny-Llama" / ".complete").exists()


@pytest.mark.parametrize("repo_id", ["..", "a/b/c", "", " ", "a b", "../etc", "a--b", "/abs/path", "org/.."])
def test_an_invalid_repo_id_is_refused_before_any_request(tmp_path, repo_id):
    r = run_main("0_download_models.py", "--model-path", tmp_path / "models", "--models", "ok/fine", repo_id)
    one_line(r, "not a Hub repo id")
    assert not (tmp_path / "models").exists()


def test_model_path_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    for path in (f, f / "sub"):
        one_line(run_main("0_download_models.py", "--model-path", path, "--models", REPO), str(f))
        one_line(run_main("0_download_models.py", "--model-path", path, "--demo"), str(f))
    assert f.read_text() == "mine"


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_timeout_must_be_positive(tmp_path, value):
    one_line(run_main("0_download_models.py", "--model-path", tmp_path, "--models", REPO, f"--timeout={value}"),
             "--timeout")
