"""Ctrl-C at many moments of steps 1, 2, 3 and 5 (SIGINT to the process group, as a terminal sends it):
every time exit 130, one line saying it was interrupted, no temporary file left, and a manifest that
agrees with the files on disk. tests/interrupt_driver.py runs the step (forked, its imports done once)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.atomic import TEMP_NAME
from common.manifest import MANIFEST_NAME

DRIVER = Path(__file__).with_name("interrupt_driver.py")


def interrupt(tmp_path: Path, script: str, args: list, fractions: list[float]) -> list[dict]:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"script": script, "args": [str(a) for a in args], "out_dir": str(tmp_path / "runs"),
                                "fractions": fractions}))
    r = subprocess.run([sys.executable, str(DRIVER), str(plan)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["first"]["code"] == 0, result["first"]["stderr"][-2000:]
    return result["runs"]


def check_run(run: dict, start: str = "interrupted") -> bool:
    """True when the run was interrupted (else it had finished); asserts what an interrupt must leave."""
    lines = [l for l in run["stderr"].splitlines() if l.strip()]
    assert run["code"] in (0, 130), run
    if run["code"] == 130:
        assert len(lines) == 1 and lines[0].startswith(start), run["stderr"][-3000:]
    else:
        assert "interrupted" not in run["stderr"] and "Traceback" not in run["stderr"], run["stderr"][-3000:]
    names = run["files"]
    assert not [n for n in names if TEMP_NAME.fullmatch(Path(n).name) or n.endswith(".tmp")], names
    manifest = run["manifest"]
    if manifest is not None:  # what it vouches for is on disk, byte for byte
        for name, entry in manifest["files"].items():
            assert names.get(name) == entry["sha256"], (name, run)
    return run["code"] == 130


FRACTIONS = [i / 17 for i in range(1, 17)]


def test_ctrl_c_during_a_multi_shard_export(llama32, tmp_path):
    runs = interrupt(tmp_path, "1_model_weights.py", ["--model-dir", llama32, "--out-dir", "{out}"], FRACTIONS)
    interrupted = [check_run(r, "interrupted: ") for r in runs]  # with what was written
    for r in runs:  # step 1 records each file as it is written: the manifest lists every file on disk
        listed = set((r["manifest"] or {"files": {}})["files"])
        assert {n for n in r["files"] if not n.startswith(".") and n != MANIFEST_NAME} == listed, r
    assert sum(interrupted) >= len(runs) // 2, [(r["delay"], r["code"]) for r in runs]
    print([(round(r["delay"], 3), r["code"], r["stderr"].strip()[:80]) for r in runs])
