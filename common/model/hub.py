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
from huggingface_hub import constants, get_session, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from common.cli import InputError

COMPLETE_MARKER = ".complete"
# huggingface_hub asks for its repo listing with no timeout at all: a Hub (or proxy) that accepts the
# connection and never answers would hold the download forever. Every request gets these bounds
# (seconds) wherever the library left them unset: to connect, and between two bytes of an answer.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
# config, generation config, tokenizer files, weights and their index; nothing else.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "*.safetensors",
                  "model.safetensors.index.json"]
ORIGINAL_PATTERNS = ["original/*"]  # Meta's consolidated .pth: doubles the download


def check_repo_id(repo_id: str) -> str:
    """A Hub repo id as the Hub accepts it ("name" or "org/name"; letters, digits, - _ .), else InputError."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(f"{repo_id!r} is not a Hub repo id ({str(e).split('.')[0]}): write it as "
                         "org/name, e.g. meta-llama/Llama-3.2-1B-Instruct") from None
    return repo_id


def bound_timeouts(connect_s: float = CONNECT_TIMEOUT_S, read_s: float = READ_TIMEOUT_S) -> None:
    """Give every Hub request of this process a connect and read timeout where none was set."""
    session = get_session()

    def bound(request: httpx2.Request) -> None:
        limits = {"connect": connect_s, "read": read_s, "write": read_s, "pool": connect_s}
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: given.get(k) if given.get(k) is not None else v for k, v in limits.items()}

    hooks = session.event_hooks
    session.event_hooks = {"request": [h for h in hooks["request"] if getattr(h, "__name__", "") != "bound"] + [bound],
                           "response": hooks["response"]}


def _chain(e: BaseException | None) -> list[BaseException]:
    """An error and its causes, outermost first."""
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _http_error(e: BaseException) -> HfHubHTTPError | None:
    """The Hub's HTTP answer behind an error (snapshot_download wraps it in LocalEntryNotFoundError)."""
    return next((x for x in _chain(e) if isinstance(x, HfHubHTTPError) and x.response is not None), None)


def _answered(repo_id: str, e: HfHubHTTPError) -> InputError:
    status = e.response.status_code
    said = " ".join((e.server_message or e.response.reason_phrase or "").split())[:200]
    if status == 401:
        return InputError("the Hugging Face token was rejected (401): set a valid HF_TOKEN or run "
                          "`hf auth login` again")
    hint = "this account or address may not access it" if status == 403 else "try again later"
    return InputError(f"the Hub at {constants.ENDPOINT} answered {status} for {repo_id}"
                      f"{f' ({said})' if said else ''}: {hint}")


def folder_name(repo_id: str) -> str:
    """meta-llama/Llama-3.2-1B-Instruct -> meta-llama_Llama-3.2-1B-Instruct"""
    return repo_id.replace("/", "_")


def _cause(e: BaseException) -> BaseException:
    """The innermost cause (a timeout inside LocalEntryNotFoundError, say)."""
    return _chain(e)[-1]


def is_complete(dest: Path) -> bool:
    return (dest / COMPLETE_MARKER).is_file()


def download(repo_id: str, dest: Path, token: str | None = None, include_original: bool = False,
             force: bool = False, timeout_s: float = READ_TIMEOUT_S) -> bool:
    """Download repo_id into dest; return False when dest was already complete and left alone.

    `timeout_s`: the longest wait for an answer, or between two bytes of one, before giving up."""
    check_repo_id(repo_id)
    if is_complete(dest) and not force:
        return False
    (dest / COMPLETE_MARKER).unlink(missing_ok=True)
    _snapshot(repo_id, dest, token, include_original, timeout_s, disk=dest.parent)
    _check_weights_arrived(repo_id, dest)
    (dest / COMPLETE_MARKER).write_text(json.dumps({"repo_id": repo_id, "include_original": include_original},
                                                   indent=2) + "\n")
    return True


def download_to_cache(repo_id: str, token: str | None = None, include_original: bool = False,
                      timeout_s: float = READ_TIMEOUT_S) -> Path:
    """Download repo_id into the Hugging Face cache (HF_HUB_CACHE), in its snapshot layout; return the
    snapshot folder. The cache keeps its own books: files already there are not fetched again."""
    check_repo_id(repo_id)
    snapshot = _snapshot(repo_id, None, token, include_original, timeout_s, disk=Path(constants.HF_HUB_CACHE))
    _check_weights_arrived(repo_id, snapshot)
    return snapshot


def _check_weights_arrived(repo_id: str, folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"{repo_id} has no .safetensors weights: this pipeline reads safetensors only "
                         "(convert_to_safetensors.py converts PyTorch checkpoints)")


def _snapshot(repo_id: str, dest: Path | None, token: str | None, include_original: bool, timeout_s: float,
              disk: Path) -> Path:
    """snapshot_download into dest (None: the HF cache); every failure becomes one InputError line."""
    patterns = ALLOW_PATTERNS + (ORIGINAL_PATTERNS if include_original else [])
    bound_timeouts(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s)
    try:
        with warnings.catch_warnings():  # its low-disk warning is said once, below, as an error
            warnings.filterwarnings("ignore", message="Not enough free disk space")
            return Path(snapshot_download(repo_id, local_dir=dest, allow_patterns=patterns, token=token or None))
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
        if e.response is None:
            raise InputError(f"the Hub gave no usable answer for {repo_id}: try again later") from None
        raise _answered(repo_id, e) from None
    except (LocalEntryNotFoundError, httpx2.TransportError) as e:
        answer = _http_error(e)
        if answer is not None:  # it answered, with an error: say what it said
            raise _answered(repo_id, answer) from None
        timed_out = any(isinstance(x, (httpx2.TimeoutException, TimeoutError)) for x in _chain(e))
        what = f"no answer within {timeout_s:g} s" if timed_out else type(_cause(e)).__name__
        raise InputError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to download {repo_id} "
                         f"({what}): check the network, or run with --demo for the offline demo model") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise InputError(f"the Hub at {constants.ENDPOINT} answered something that is not a Hub API answer "
                         f"for {repo_id} ({type(e).__name__}): check HF_ENDPOINT and any proxy, then retry") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(disk).free / 1e9
            raise InputError(f"disk full while downloading {repo_id} into {dest or disk} ({free:.1f} GB free): "
                             "free space or use --model-path on a larger disk, then rerun to resume") from None
        raise
