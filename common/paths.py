"""Where things live. MODEL_DIR here is the one edit that switches the whole pipeline's model."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_PATHS = ROOT / "model_paths"
OUTPUTS = ROOT / "outputs"

# The model every numbered script uses unless told otherwise (--model-dir, or make ... MODEL_DIR=...).
MODEL_DIR = MODEL_PATHS / "meta-llama_Llama-3.2-1B-Instruct"
DEMO_MODEL_DIR = MODEL_PATHS / "SmolLM2-135M-Instruct-Q4_1"


def output_dir(model_dir: str | Path, what: str) -> Path:
    """outputs/<model folder name>/<what>: weights, x_all_layers, qkv."""
    return OUTPUTS / Path(model_dir).name / what
