"""Ctrl-C at many moments of one step, as a terminal sends it (SIGINT to the process group).

    python tests/interrupt_driver.py PLANS.json   # prints one JSON line of results, a list: one per plan

A plan: {"script": "1_model_weights.py", "args": [..., "{out}", ...], "out_dir": "...", "fractions": [0.05, ...]}:
run k writes to out_dir/k.<try> (in place of "{out}"), so every run starts from an empty folder.
The script is imported once here; each run is a fork that becomes its own process group (its CSV
workers join it) and runs the script's main() through cli.run, as a user's process would, with
stdout/stderr in files. A first run, uninterrupted, times the step; then run k gets SIGINT at
fractions[k] of that time; a run that finished before it is run again with half the delay, up to
RETRIES times (the machine's load changes between runs). A fork saves the imports (seconds) of a new
process per run.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cli  # noqa: E402
from conftest import load_script  # noqa: E402

RETRIES = 2


def one_run(module, script: str, args: list[str], out_dir: Path, delay: float | None) -> dict:
    args = [a.replace("{out}", str(out_dir)) for a in args]
    logs = out_dir.parent / f"{out_dir.name}.log"
    logs.mkdir(parents=True)
    out, err = logs / "out", logs / "err"
    pid = os.fork()
    if pid == 0:  # the step, as its own process group
        code = 3
        try:
            os.setpgid(0, 0)
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = [script, *args]
            cli.run(module.main)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a late SIGINT must not change the code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # both sides set it: no race with the kill below
    except OSError:
        pass
    start = time.perf_counter()
    if delay is not None:
        time.sleep(delay)
        try:
            os.killpg(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return {"delay": delay, "seconds": time.perf_counter() - start, "code": os.waitstatus_to_exitcode(status),
            "stderr": err.read_text(errors="replace"), **snapshot(out_dir)}


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the caller ignores SIGINT
    results = []
    for plan in json.loads(Path(sys.argv[1]).read_text()):
        module = load_script(plan["script"])
        base = Path(plan["out_dir"])
        first = one_run(module, plan["script"], plan["args"], base / "first", None)
        runs = []
        for k, f in enumerate(plan["fractions"]):
            delay = f * first["seconds"]
            for retry in range(RETRIES + 1):  # finished before the signal (the load fell): again, sooner
                runs.append(one_run(module, plan["script"], plan["args"], base / f"{k}.{retry}", delay))
                if runs[-1]["code"] != 0:
                    break
                delay /= 2
        results.append({"first": first, "runs": runs})
    print(json.dumps(results))


def snapshot(folder: Path) -> dict:
    """The folder's files (relative name -> sha256) and its manifest.json, for the test to compare."""
    files = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if not p.is_dir()} if folder.exists() else {}
    manifest = folder / "manifest.json"
    return {"files": files, "manifest": json.loads(manifest.read_text()) if manifest.is_file() else None}


if __name__ == "__main__":
    main()
