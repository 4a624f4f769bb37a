"""Shared fixtures: tiny random Llama models (built once per session) and the demo model."""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import common.model  # noqa: E402,F401  (first: its logging filter keeps torchao's import noise quiet)
from common import paths  # noqa: E402

import model_factory  # noqa: E402

DEMO_DIR = paths.DEMO_MODEL_DIR


def pytest_report_header(config) -> str:
    """The kernels numpy, BLAS and torch compute with: float results differ between them (docs/reproducibility.md)."""
    import machine
    return machine.describe()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Every variant of model_factory.VARIANTS, keyed by name."""
    base = tmp_path_factory.mktemp("models")
    return {v: model_factory.build_model(base / v, v) for v in model_factory.VARIANTS}


@pytest.fixture(scope="session")
def llama32(tiny_models) -> Path:
    """The Llama-3.2-shaped tiny model: bf16 shards + index, tied, GQA, llama3 RoPE."""
    return tiny_models["llama32"]


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real offline demo model (SmolLM2-135M-Instruct), built by 0_download_models.py --demo."""
    if not (DEMO_DIR / ".complete").is_file():
        subprocess.run([sys.executable, str(ROOT / "0_download_models.py"), "--demo"], check=True, cwd=ROOT)
    return DEMO_DIR


def run_script(script: str, *args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a numbered script as a user would; returns the completed process (never raises)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd)


def load_script(script: str):
    """A numbered script as a module, to call its main(argv) in-process (saves the imports of a new process)."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _step2_script():
    return load_script("2_get_x.py")


def step2(model_dir: Path, out_dir: Path, *args: str, prompts=()) -> Path:
    """Step 2 in-process on `prompts` (each passed as --prompt); returns out_dir."""
    argv = ["--model-dir", str(model_dir), "--out-dir", str(out_dir), *args]
    for p in prompts:
        argv += ["--prompt", p]
    assert _step2_script().main(argv) == 0
    return out_dir


def prepared_once(tiny_models: dict[str, Path], base: Path, export, capture):
    """variant -> (model_dir, weights_dir, acts_dir): export(model, dir) and capture(model, dir) run once
    per variant, on first use."""
    done: dict[str, tuple[Path, Path, Path]] = {}

    def get(variant: str) -> tuple[Path, Path, Path]:
        if variant not in done:
            model = tiny_models[variant]
            done[variant] = (model, export(model, base / variant / "weights"), capture(model, base / variant / "x"))
        return done[variant]
    return get
