"""Memory readings the benchmarks share: a process's peak RSS, and a sampled peak of anything."""
from __future__ import annotations

import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident set (VmHWM). Not ru_maxrss: after fork+exec that also counts the
    parent's resident pages at the fork."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB (macOS: bytes)


def tree_pss_mb() -> float:
    """Proportional set size of this process and its children (the forked CSV workers): shared
    pages are split between the processes that share them, so the sum is the real footprint."""
    import psutil
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


@contextmanager
def sampled_peak(measure: Callable[[], float], interval: float) -> Iterator[list[float]]:
    """Call `measure` every `interval` s in a thread while the block runs; yields [peak], which
    holds the first reading on entry and the largest one when the block ends."""
    peak, done = [measure()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], measure())
            time.sleep(interval)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
