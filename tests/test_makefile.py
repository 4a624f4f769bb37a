"""`make steps` reruns only what is out of date: each step's stamp against what it reads, its key output and its settings.

Dry runs (`make -n`) on a stand-in model folder and hand-made stamps: nothing here runs a step. A
planted mistake twin: a stale stamp that make would trust is caught by the key file being newer.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from conftest import ROOT

from common import paths

STEPS = ["1_model_weights.py", "2_get_x.py", "3_offline_qkv.py", "4_offline_forward.py", "5_golden.py",
         "6_grade.py"]
STAMPS = ["weights", "x_all_layers.generate0", "qkv", "forward", "x_all_layers.offset8000", "qkv.offset8000",
          "forward.offset8000", "golden", "grade", "forward_chain"]
KEYS = ["weights/manifest.json", "x_all_layers/manifest.json", "qkv/report.json", "forward/report.json",
        "x_all_layers_offset8000/manifest.json", "qkv_offset8000/report.json", "forward_offset8000/report.json",
        "golden/golden_manifest.json", "grade/report.json", "forward_chain/report.md", "forward_chain/report.json"]

pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv/bin/python").exists(),
                                reason="needs make and the .venv the Makefile uses")


@pytest.fixture
def up_to_date(tmp_path):
    """A model folder and outputs/<its name>/ whose every step is done: key files first, stamps after."""
    model = tmp_path / f"make-test-{os.getpid()}"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = paths.OUTPUTS / model.name
    for key in KEYS:
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        (out / key).write_text("**PASS: stand-in**\n")
    old = time.time() - 100
    for f in [model / "config.json", *(out / k for k in KEYS)]:
        os.utime(f, (old, old))
    (out / ".make").mkdir()
    for s in STAMPS:  # now: newer than what they vouch for and than the code
        (out / ".make" / s).touch()
    yield model, out
    shutil.rmtree(out)


def change(path) -> None:
    """A later write than any stamp, whatever the clock's resolution."""
    later = time.time() + 10
    os.utime(path, (later, later))


def planned(model) -> list[str]:
    """The step scripts `make steps` would run, in order."""
    r = subprocess.run(["make", "-n", "--no-print-directory", "steps", f"MODEL_DIR={model}", "LONG_OFFSET=8000",
                        "GENERATE=0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [s for line in r.stdout.splitlines() if not line.startswith("echo") for s in STEPS if s in line]


def test_nothing_is_redone_when_nothing_changed(up_to_date):
    model, _ = up_to_date
    assert planned(model) == []


def test_new_model_files_redo_every_step_in_order(up_to_date):
    model, _ = up_to_date
    change(model / "config.json")
    assert planned(model) == ["1_model_weights.py", "2_get_x.py", "3_offline_qkv.py", "4_offline_forward.py",
                              "2_get_x.py", "3_offline_qkv.py", "4_offline_forward.py", "5_golden.py", "6_grade.py",
                              "4_offline_forward.py"]


def test_a_capture_run_by_hand_redoes_what_reads_it(up_to_date):
    """Step 2's manifest newer than its stamp: step 2 and what reads its folder rerun, step 1 and the
    capture at the offset do not."""
    model, out = up_to_date
    change(out / "x_all_layers/manifest.json")
    assert planned(model) == ["2_get_x.py", "3_offline_qkv.py", "4_offline_forward.py", "5_golden.py", "6_grade.py",
                              "4_offline_forward.py"]


def test_a_missing_report_redoes_its_step(up_to_date):
    model, out = up_to_date
    (out / "grade/report.json").unlink()
    assert planned(model) == ["6_grade.py"]


def test_another_setting_redoes_the_capture(up_to_date):
    model, _ = up_to_date
    r = subprocess.run(["make", "-n", "--no-print-directory", "steps", f"MODEL_DIR={model}", "LONG_OFFSET=8000",
                        "GENERATE=2"], cwd=ROOT, capture_output=True, text=True)
    assert "2_get_x.py --model-dir" in r.stdout and "--generate 2" in r.stdout


def test_a_stamp_alone_does_not_vouch_for_a_deleted_folder(up_to_date):
    """Planted mistake twin: were the stamps trusted alone, a deleted qkv/ would never come back."""
    model, out = up_to_date
    shutil.rmtree(out / "qkv")
    assert planned(model) == ["3_offline_qkv.py", "6_grade.py"]
