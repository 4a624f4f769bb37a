"""Where things live. MODEL_DIR here is the one edit that switches the whole pipeline's model."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_PATHS = ROOT / "model_paths"
OUTPUTS = ROOT / "outputs"

# The model every numbered script uses unless told otherwise (--model-dir, or make ... MODEL_DIR=...).
MODEL_DIR = MODEL_PATHS / "meta-llama_Llama-3.2-1B-Instruct"
DEMO_MODEL_DIR = MODEL_PATHS / "SmolLM2-135M-Instruct-Q4_1"

# "org/name" as the Hub spells repo ids (huggingface_hub's validate_repo_id has the last word).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
CACHE_REPO_PREFIX = "models--"  # HF cache: <cache>/models--org--name/snapshots/<revision>/


def is_repo_id(model_dir: str | Path) -> bool:
    """True when --model-dir names a Hub repo ("org/name") rather than a folder: a folder that exists wins."""
    text = str(model_dir)
    return (REPO_ID.fullmatch(text) is not None and "--" not in text and ".." not in text
            and not Path(text).exists())


def cache_repo(model_dir: str | Path) -> Path | None:
    """.../models--org--name for a snapshot folder of the HF cache (.../snapshots/<revision>), else None."""
    p = Path(model_dir)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith(CACHE_REPO_PREFIX):
        return p.parent.parent
    return None


def model_name(model_dir: str | Path) -> str:
    """The outputs' folder name of a model: org_name for a repo id or a snapshot folder of the HF cache,
    else the model folder's own name."""
    if (repo := cache_repo(model_dir)) is not None:
        return repo.name.removeprefix(CACHE_REPO_PREFIX).replace("--", "_")
    if is_repo_id(model_dir):
        return str(model_dir).replace("/", "_")
    return Path(model_dir).name


def output_dir(model_dir: str | Path, what: str) -> Path:
    """outputs/<model name>/<what>: weights, x_all_layers, qkv."""
    return OUTPUTS / model_name(model_dir) / what
