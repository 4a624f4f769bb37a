"""Running the pipeline from a benchmark: a script or `-c` snippet as a child process, and the demo model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """`python *cmd` in the repository root; a code outside `ok` ends the benchmark with the child's output."""
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if r.returncode not in ok:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)[:300]}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def ensure_demo_model(model_dir: Path) -> None:
    """Build the demo model (0_download_models.py --demo) unless it is complete."""
    if not (model_dir / ".complete").is_file():
        print("building the demo model (0_download_models.py --demo) ...", flush=True)
        run("0_download_models.py", "--demo")
