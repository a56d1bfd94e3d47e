"""Process-level settings that make CPU training faster.

:func:`tune_allocator` keeps glibc's ``malloc`` from handing every large tensor back to the kernel.
By default glibc serves allocations above a dynamic threshold (128 KiB, raised up to 32 MiB as it
adapts) with ``mmap`` and returns them with ``munmap`` on free; the next tensor of that size then
page-faults on every 4 KiB page the first time it is written (the kernel zero-fills each one). A
CNN training step allocates and frees hundreds of activation tensors of several MiB, so on a CPU a large
share of the time of cheap element-wise kernels (SiLU, BatchNorm, their backward passes) is page
faults: a bf16 SiLU forward over ``[8, 16, 320, 320]`` measured 51 ms by default and 16 ms tuned on
this project's 2-core machine. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps freed blocks
in the heap for reuse (the same effect as preloading jemalloc/tcmalloc, which Intel's and PyTorch's CPU
performance guides recommend, without a dependency). Peak memory is unchanged; what changes is that
the process keeps its peak after the step instead of returning it between allocations.

It is a no-op where glibc is absent (macOS, Windows, musl) and is applied once per process. The engine's
``Trainer`` calls it; ``VISIONTRAIN_MALLOC=default`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap (glibc caps it at HEAP_MAX/2 on 64-bit)
TRIM_THRESHOLD = 1 << 31

_state: dict[str, bool] = {}


def tune_allocator() -> bool:
    """Apply the ``malloc`` settings above once; return whether they are active in this process."""
    if "tuned" in _state:
        return _state["tuned"]
    tuned = False
    if sys.platform.startswith("linux") and os.environ.get("VISIONTRAIN_MALLOC", "") != "default":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            # older glibc refuses thresholds above HEAP_MAX_SIZE / 2 (32 MiB): fall back to that
            mmap_ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
            tuned = bool(mmap_ok) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _state["tuned"] = tuned
    return tuned
