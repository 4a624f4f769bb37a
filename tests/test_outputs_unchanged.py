"""Steps 1 -> 2 -> 3 on the demo model write what tests/data/demo_outputs.json records.

A refactor must not change an output byte where the bytes are defined on every machine: step 1's CSV
export and step 2's torch captures (sha256). Step 3's numbers are float32 results of numpy and BLAS,
whose kernels round differently on AVX2 and AVX-512 machines (docs/reproducibility.md): their text
must be exactly what csv_io writes for the values they hold, with every digit float32 needs, and the
values must match the running model's own numbers (step 2's ref_*.csv) within CLOSE_TO_CAPTURE of
the largest of them.
Two layers (the first and the last) keep this fast; reports, plots, manifests and hidden lock files
are left out (they hold timings and paths), and so are the meta files' provenance block (absolute
paths and library versions) and torch_cpu_capability (the capture machine's, which step 3 reads).
Regenerate the record only for an intended change of an output format:
    python tests/test_outputs_unchanged.py
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_script

from common import paths
from common.files.csv_io import read_csv, write_csv

RECORD = Path(__file__).parent / "data" / "demo_outputs.json"
LAYERS = "0,29"
WEIGHTS_FILTER = r"^model\.layers\.(0|29)\.(input_layernorm|self_attn\.(q|k|v|o)_proj)\."
NOT_COMPARED = {"report.json", "report.md", "manifest.json"}
MACHINE_KEYS = ("provenance", "torch_cpu_capability")  # in the meta files: of the machine, not of the model
STEP3 = "qkv"  # step 3's out dir: numpy's float32 results, compared as numbers
# numpy against torch: at most 1.3e-6 of the largest value on AVX-512 and on AVX2 (OpenBLAS Haswell)
# kernels, for q, k, v, attn and probs of both layers. 1e-5 catches any one value moved by 1e-5 of
# the largest, i.e. a 1e-4 relative change of every value within 10x of the largest.
CLOSE_TO_CAPTURE = 1e-5


def digest(path: Path) -> str:
    if path.name.startswith("meta_"):  # meta_layerN.json, meta_model.json
        meta = json.loads(path.read_text())
        for key in MACHINE_KEYS:
            meta[f"{key} recorded"] = meta.pop(key, None) is not None
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def needs_8_digits(a: np.ndarray) -> float:
    """The share of nonzero values that 7 significant digits would change: 0.55-0.72 in step 3's files
    (about 2/3, as for any float32 values), 0 for a file printed with 7 or fewer digits."""
    x = a[a != 0]
    return float(np.mean(np.float32([float(f"{v:.7g}") for v in x.tolist()]) != x))


def capture_of(name: str) -> str:
    """Step 2's file holding what the running model computed for step 3's `name` (qkv/q_layer0.csv)."""
    return f"x_all_layers/ref_{Path(name).name}"


def demo_outputs(base: Path) -> list[str]:
    """Run the demo pipeline into base; the compared files, relative to base."""
    model = paths.DEMO_MODEL_DIR.relative_to(ROOT)  # meta_layerN.json records the path as given
    steps = [("1_model_weights.py", "--model-dir", model, "--out-dir", base / "weights", "--filter", WEIGHTS_FILTER),
             ("2_get_x.py", "--model-dir", model, "--out-dir", base / "x_all_layers", "--layers", LAYERS),
             ("3_offline_qkv.py", "--model-dir", model, "--weights-dir", base / "weights",
              "--acts-dir", base / "x_all_layers", "--out-dir", base / STEP3, "--layers", LAYERS)]
    for script, *args in steps:
        r = run_script(script, *args)
        assert r.returncode == 0, f"{script}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
    return [str(p.relative_to(base)) for p in sorted(base.rglob("*"))
            if p.is_file() and p.name not in NOT_COMPARED and p.suffix != ".png" and not p.name.startswith(".")]


def record(base: Path, names: list[str]) -> dict:
    return {"sha256": {n: digest(base / n) for n in names if Path(n).parts[0] != STEP3},
            "close to the capture": {n: capture_of(n) for n in names if Path(n).parts[0] == STEP3}}


def mismatches(base: Path, want: dict, scratch: Path) -> list[str]:
    """What differs from the record in base: one line per file."""
    bad = [f"{n}: sha256 differs" for n, sha in want["sha256"].items() if digest(base / n) != sha]
    for n, ref in want["close to the capture"].items():
        got, model = read_csv(base / n), read_csv(base / ref)
        write_csv(scratch / "rewritten.csv", got)  # formatting float32 is defined on every machine
        if (scratch / "rewritten.csv").read_bytes() != (base / n).read_bytes():
            bad.append(f"{n}: not the text csv_io writes for its values")
        elif needs_8_digits(got) < 1 / 3:
            bad.append(f"{n}: printed with fewer digits than float32 needs")
        if got.shape != model.shape:
            bad.append(f"{n}: shape {got.shape}, the capture's {model.shape}")
            continue
        far = np.abs(got - model).max() / np.abs(model).max()
        if not far <= CLOSE_TO_CAPTURE:
            bad.append(f"{n}: {far:.1e} of the largest value away from {ref} (allowed {CLOSE_TO_CAPTURE:.0e})")
    return bad


@pytest.fixture(scope="module")
def demo_run(demo_model, tmp_path_factory) -> tuple[Path, list[str]]:
    base = tmp_path_factory.mktemp("demo_outputs")
    return base, demo_outputs(base)


def test_demo_outputs_are_unchanged(demo_run, tmp_path):
    base, names = demo_run
    want = json.loads(RECORD.read_text())
    assert names == sorted([*want["sha256"], *want["close to the capture"]])
    bad = mismatches(base, want, tmp_path)
    assert not bad, f"{len(bad)} outputs changed: {bad[:5]} (on a new kind of CPU: docs/reproducibility.md)"


@pytest.mark.parametrize("mistake", ["one value 1e-4 off", "printed with %.6g", "a capture byte changed"])
def test_a_planted_change_of_the_outputs_is_caught(demo_run, tmp_path, mistake):
    """Planted-mistake twins of the test above: each must make the comparison fail."""
    base, names = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    want = json.loads(RECORD.read_text())
    for n in want["close to the capture"]:
        a = read_csv(copy / n)
        if mistake == "one value 1e-4 off":
            i = np.unravel_index(np.abs(a).argmax(), a.shape)
            a[i] *= np.float32(1 + 1e-4)
            write_csv(copy / n, a)
        elif mistake == "printed with %.6g":
            np.savetxt(copy / n, a, fmt="%.6g", delimiter=",")
    if mistake == "a capture byte changed":
        for n in [n for n in want["sha256"] if n.startswith("x_all_layers/ref_")]:
            text = (copy / n).read_bytes()
            (copy / n).write_bytes(text[:-2] + (b"0" if text[-2:-1] != b"0" else b"1") + text[-1:])
    named = {line.split(": ")[0] for line in mismatches(copy, want, tmp_path)}
    if mistake == "a capture byte changed":
        assert named == {n for n in want["sha256"] if n.startswith("x_all_layers/ref_")}
    else:
        assert named == set(want["close to the capture"])

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        RECORD.write_text(json.dumps(record(Path(tmp), demo_outputs(Path(tmp))), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
    sys.exit(0)
