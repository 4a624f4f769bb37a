"""Models in the Hugging Face cache: a repo id as --model-dir, resolved offline to its snapshot folder.

The cache is huggingface_hub's own (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub):
<cache>/models--org--name/{blobs/<sha>, snapshots/<commit>/<file> -> ../../blobs/<sha>, refs/main}.
Nothing here touches the network; 0_download_models.py --to-hf-cache fills the cache.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache

from common import paths
from common.cli import InputError
from common.model.hub import check_repo_id

REVISION = None  # None: the commit refs/main names; else a branch or tag under refs/, or a commit hash


def download_command(repo_id: str) -> str:
    """The command that puts repo_id into the HF cache."""
    return f"python 0_download_models.py --to-hf-cache --models {shlex.quote(repo_id)}"


def snapshot_folder(repo_id: str, revision: str | None = REVISION) -> Path:
    """<cache>/models--org--name/snapshots/<commit>/ for repo_id at revision (refs/main without one)."""
    check_repo_id(repo_id)
    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)  # follows refs/<revision>
    if not isinstance(config, str):
        at = f" at revision {revision!r}" if revision else ""
        raise InputError(f"{repo_id}: no such folder, and not in the Hugging Face cache {constants.HF_HUB_CACHE}"
                         f"{at}: get it with `{download_command(repo_id)}`")
    return Path(config).parent


def resolve_model_dir(model_dir: Path, revision: str | None = REVISION) -> Path:
    """--model-dir as given when it is a folder (or nothing like a repo id); a repo id's snapshot folder."""
    if not paths.is_repo_id(model_dir):
        if revision is not None:
            raise InputError(f"--revision {revision}: applies to a repo id as --model-dir, not to the folder "
                             f"{model_dir}: drop --revision, or give the repo id")
        return model_dir
    return snapshot_folder(str(model_dir), revision)
