"""Downloads from the Hugging Face Hub: only what the pipeline needs, resumable, with clear errors.

A folder counts as complete only once `.complete` is written, after every file arrived, so an
interrupted download is never mistaken for a finished one; rerunning resumes it (snapshot_download
skips files it already has and resumes partial ones). Tokens come from the argument, else the
HF_TOKEN environment variable or the stored login (huggingface_hub resolves both); they are never
printed, logged or written.
"""
from __future__ import annotations

import errno
import json
import shutil
import warnings
from pathlib import Path

import httpx2  # huggingface_hub 2.x transport: its connection errors surface as these
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from common.cli import InputError

COMPLETE_MARKER = ".complete"
# config, generation config, tokenizer files, weights and their index; nothing else.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "*.safetensors",
                  "model.safetensors.index.json"]
ORIGINAL_PATTERNS = ["original/*"]  # Meta's consolidated .pth: doubles the download


def folder_name(repo_id: str) -> str:
    """meta-llama/Llama-3.2-1B-Instruct -> meta-llama_Llama-3.2-1B-Instruct"""
    return repo_id.replace("/", "_")


def is_complete(dest: Path) -> bool:
    return (dest / COMPLETE_MARKER).is_file()


def download(repo_id: str, dest: Path, token: str | None = None, include_original: bool = False,
             force: bool = False) -> bool:
    """Download repo_id into dest; return False when dest was already complete and left alone."""
    if is_complete(dest) and not force:
        return False
    (dest / COMPLETE_MARKER).unlink(missing_ok=True)
    patterns = ALLOW_PATTERNS + (ORIGINAL_PATTERNS if include_original else [])
    try:
        with warnings.catch_warnings():  # its low-disk warning is said once, below, as an error
            warnings.filterwarnings("ignore", message="Not enough free disk space")
            snapshot_download(repo_id, local_dir=dest, allow_patterns=patterns, token=token or None)
    except GatedRepoError:
        raise InputError(
            f"{repo_id} is gated and this account has no access yet: request it on "
            f"https://huggingface.co/{repo_id}, then set HF_TOKEN (or run `hf auth login`) with that account"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id}: revision not found on the Hub") from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{repo_id} was not found on the Hub (check the spelling; a private repo also needs HF_TOKEN)"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise InputError("the Hugging Face token was rejected (401): set a valid HF_TOKEN or run "
                             "`hf auth login` again") from None
        raise InputError(f"the Hub answered {status} for {repo_id}: try again later") from None
    except (LocalEntryNotFoundError, httpx2.TransportError) as e:
        raise InputError(f"cannot reach the Hugging Face Hub to download {repo_id} ({type(e).__name__}): "
                         "check the network, or run with --demo for the offline demo model") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(dest.parent).free / 1e9
            raise InputError(f"disk full while downloading {repo_id} into {dest} ({free:.1f} GB free): "
                             "free space or use --model-path on a larger disk, then rerun to resume") from None
        raise
    if not any(dest.glob("*.safetensors")):
        raise InputError(f"{repo_id} has no .safetensors weights: this pipeline reads safetensors only "
                         "(convert_to_safetensors.py converts PyTorch checkpoints)")
    (dest / COMPLETE_MARKER).write_text(json.dumps({"repo_id": repo_id, "include_original": include_original},
                                                   indent=2) + "\n")
    return True
