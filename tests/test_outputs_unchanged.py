"""Steps 1 -> 2 -> 3 on the demo model write the same bytes as recorded in tests/data/demo_outputs.json.

A refactor must not change a single output byte. Two layers (the first and the last) keep this
fast; reports, plots, manifests and hidden lock files are left out (they hold timings and paths),
and so is the provenance block of the meta files (absolute paths and library versions).
Regenerate the record only for an intended change of an output format:
    python tests/test_outputs_unchanged.py
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

from conftest import ROOT, run_script

from common import paths

RECORD = Path(__file__).parent / "data" / "demo_outputs.json"
LAYERS = "0,29"
WEIGHTS_FILTER = r"^model\.layers\.(0|29)\.(input_layernorm|self_attn\.(q|k|v|o)_proj)\."
NOT_COMPARED = {"report.json", "report.md", "manifest.json"}


def digest(path: Path) -> str:
    if path.name.startswith("meta_"):  # meta_layerN.json, meta_model.json
        meta = json.loads(path.read_text())
        provenance = meta.pop("provenance")
        meta["provenance keys"] = sorted(provenance)
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def demo_outputs(base: Path) -> dict[str, str]:
    """Run the demo pipeline into base; {file relative to base: sha256}."""
    model = paths.DEMO_MODEL_DIR.relative_to(ROOT)  # meta_layerN.json records the path as given
    steps = [("1_model_weights.py", "--model-dir", model, "--out-dir", base / "weights", "--filter", WEIGHTS_FILTER),
             ("2_get_x.py", "--model-dir", model, "--out-dir", base / "x_all_layers", "--layers", LAYERS),
             ("3_offline_qkv.py", "--model-dir", model, "--weights-dir", base / "weights",
              "--acts-dir", base / "x_all_layers", "--out-dir", base / "qkv", "--layers", LAYERS)]
    for script, *args in steps:
        r = run_script(script, *args)
        assert r.returncode == 0, f"{script}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
    return {str(p.relative_to(base)): digest(p) for p in sorted(base.rglob("*"))
            if p.is_file() and p.name not in NOT_COMPARED and p.suffix != ".png" and not p.name.startswith(".")}


def test_demo_outputs_are_byte_identical(demo_model, tmp_path):
    want = json.loads(RECORD.read_text())
    got = demo_outputs(tmp_path)
    assert sorted(got) == sorted(want)
    changed = [name for name in want if got[name] != want[name]]
    assert not changed, f"{len(changed)} outputs changed, e.g. {changed[:5]}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        RECORD.write_text(json.dumps(demo_outputs(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
    sys.exit(0)
