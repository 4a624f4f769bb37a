"""Ctrl-C at many moments of steps 1, 2, 3 and 5 (SIGINT to the process group, as a terminal sends it):
every time exit 130, one line saying it was interrupted, no temporary file left, and a manifest that
agrees with the files on disk. tests/interrupt_driver.py runs each step, forked (its imports done once
for all of them), and sends the signal at fractions of an uninterrupted run's time."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import test_offline_qkv as qkv
from common.files.atomic import TEMP_NAME
from common.files.manifest import MANIFEST_NAME

DRIVER = Path(__file__).with_name("interrupt_driver.py")
STEPS = {  # script -> (its arguments given (model, weights, acts), moments as fractions of its run time)
    "1_model_weights.py": (lambda m, w, x: ["--model-dir", m, "--out-dir", "{out}"], [i / 13 for i in range(1, 13)]),
    "2_get_x.py": (lambda m, w, x: ["--model-dir", m, "--out-dir", "{out}", "--prompt", "Hello there"],
                   [0.25, 0.5, 0.75]),
    "3_offline_qkv.py": (lambda m, w, x: ["--weights-dir", w, "--acts-dir", x, "--out-dir", "{out}"],
                         [0.25, 0.5, 0.75]),
    "5_golden.py": (lambda m, w, x: ["--in-dir", x, "--out-dir", "{out}"], [0.25, 0.5, 0.75]),
}


@pytest.fixture(scope="module")
def interrupted(llama32, tmp_path_factory) -> dict[str, list[dict]]:
    """script -> its interrupted runs (one driver process for every step: one set of imports)."""
    base = tmp_path_factory.mktemp("interrupt")
    given = (llama32, qkv.export_weights(llama32, base / "weights"), qkv.capture(llama32, base / "acts"))
    plans = [{"script": s, "args": [str(a) for a in args(*given)], "out_dir": str(base / s), "fractions": fractions}
             for s, (args, fractions) in STEPS.items()]
    (base / "plans.json").write_text(json.dumps(plans))
    r = subprocess.run([sys.executable, str(DRIVER), str(base / "plans.json")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.splitlines()[-1])
    for s, result in zip(STEPS, results):
        assert result["first"]["code"] == 0, (s, result["first"]["stderr"][-2000:])
    return {s: result["runs"] for s, result in zip(STEPS, results)}


def check_run(run: dict, start: str = "interrupted") -> bool:
    """True when the run was interrupted (else it had finished); asserts what an interrupt must leave."""
    lines = [l for l in run["stderr"].replace("\r", "\n").splitlines() if l.strip()
             and not ("it/s]" in l or "%|" in l)]  # transformers' loading bar
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


def test_ctrl_c_during_a_multi_shard_export(interrupted):
    runs = interrupted["1_model_weights.py"]
    was = [check_run(r, "interrupted: ") for r in runs]  # with what was written
    for r in runs:  # step 1 records each file as it is written: the manifest lists every file on disk
        listed = set((r["manifest"] or {"files": {}})["files"])
        assert {n for n in r["files"] if not n.startswith(".") and n != MANIFEST_NAME} == listed, r
    assert sum(was) >= len(STEPS["1_model_weights.py"][1]) // 2, [(r["delay"], r["code"]) for r in runs]


@pytest.mark.parametrize("script", ["2_get_x.py", "3_offline_qkv.py", "5_golden.py"])
def test_ctrl_c_in_steps_2_3_and_5(interrupted, script):
    runs = interrupted[script]
    assert sum(check_run(r) for r in runs) >= len(STEPS[script][1]) // 2, [(r["delay"], r["code"]) for r in runs]


def test_what_transformers_logs_while_ctrl_c_unwinds_is_dropped():
    """from_pretrained logs its load report in a `finally`: under Ctrl-C, a half-loaded model's."""
    import logging

    import common.model  # noqa: F401  (installs the filter)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("transformers.modeling_utils")
    log.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                raise KeyboardInterrupt
            finally:
                log.warning("LlamaForCausalLM LOAD REPORT: lm_head.weight MISSING")
        log.warning("kept")  # outside an interrupt every message still shows
    finally:
        log.removeHandler(handler)
    assert seen == ["kept"]
