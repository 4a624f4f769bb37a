"""The SIMD kernels this process computes with: OpenBLAS's core, numpy's dispatch targets, torch's CPU capability.

Printed in pytest's header (conftest.py), since float results of numpy and BLAS depend on them
(docs/reproducibility.md). `make test-avx2` runs `python tests/machine.py --avx2` first: it exits 1
unless the AVX2 emulation really took hold.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import torch


def openblas_core() -> str:
    """OpenBLAS's kernel family (Haswell, SkylakeX, Zen, ...), asked of the library numpy loaded."""
    libs = Path(np.__file__).parent.with_name("numpy.libs")
    for lib in sorted(libs.glob("libscipy_openblas*.so*")):
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            f = getattr(ctypes.CDLL(str(lib)), symbol, None)
            if f is not None:
                f.restype = ctypes.c_char_p
                return f().decode()
    return "unknown (numpy not linked to a bundled OpenBLAS)"


def numpy_targets() -> list[str]:
    """numpy's dispatch targets that this CPU has and NPY_DISABLE_CPU_FEATURES left on (as numpy.show_runtime())."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]


def describe() -> str:
    return (f"OpenBLAS core {openblas_core()}; numpy SIMD targets {' '.join(numpy_targets()) or 'baseline only'}; "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    print(describe())
    if "--avx2" in sys.argv[1:]:
        avx512 = [t for t in numpy_targets() if "512" in t or t == "X86_V4"]
        ok = openblas_core() == "Haswell" and not avx512 and torch.backends.cpu.get_cpu_capability() == "AVX2"
        if not ok:
            print("the AVX2 emulation did not take hold: see AVX2_ENV in the Makefile", file=sys.stderr)
            sys.exit(1)
