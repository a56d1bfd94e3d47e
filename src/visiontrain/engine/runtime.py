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
from pathlib import Path

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap (glibc caps it at HEAP_MAX/2 on 64-bit)
TRIM_THRESHOLD = 1 << 31

_state: dict[str, bool] = {}
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each amp=


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    """Deterministic kernels (bit-exact resume): deterministic algorithms (warn where torch has none),
    cuBLAS's workspace setting for them, no cuDNN autotuning."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


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


# ---------------------------------------------------------------------------------------------- amp=auto
def cpu_bf16_speedup(repeats: int = 5) -> float:
    """fp32 time / bf16-autocast time of a 3x3 convolution's forward and backward on this CPU, one thread.

    bf16 autocast is 2-3x faster than float32 on CPUs with native bf16 dot products (AVX512-BF16, AMX),
    but not everywhere: on a virtual machine whose CPU reports ``avx512_bf16``, oneDNN's bf16 kernels ran
    1.7x *slower* than float32 (a 64 -> 64 3x3 convolution over ``[8, 64, 80, 80]``: 50 ms bf16, 28 ms
    fp32), and training in bf16 there costs time and precision for nothing. On a CPU without AVX512 (AVX2
    only) PyTorch runs bf16 convolutions through slow reference kernels: 0.03-0.09x float32's speed, and a
    RAFT training step 10x slower (measured 2026-12-03). The probe is a convolution
    of the size that dominates the detection and flow models, timed after one warm-up call; median of
    ``repeats``; about 0.1 s. Cached per process.
    """
    if "bf16_speedup" in _state:
        return _state["bf16_speedup"]  # type: ignore[return-value]
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 64, 40, 40, generator=gen).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
        times = {}
        for name, enabled in (("fp32", False), ("bf16", True)):
            runs = []
            for _ in range(repeats + 1):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                    y = conv(x.requires_grad_(True))
                y.float().sum().backward()
                runs.append(time.perf_counter() - t)
            times[name] = sorted(runs[1:])[repeats // 2]
    finally:
        torch.set_num_threads(threads)
    _state["bf16_speedup"] = times["fp32"] / max(times["bf16"], 1e-9)  # type: ignore[assignment]
    return _state["bf16_speedup"]  # type: ignore[return-value]


def resolve_amp(amp: str, device_type: str, min_speedup: float = 1.25) -> tuple[str, str]:
    """``amp=auto`` made concrete for ``device_type``: ``(off | bf16 | fp16, why)``; other values pass.

    CUDA: bf16 where the GPU supports it (no loss scaling needed), else fp16 with a GradScaler. CPU: bf16
    when :func:`cpu_bf16_speedup` finds it at least ``min_speedup`` times faster than float32, else off.
    """
    if amp != "auto":
        return amp, "as configured"
    if device_type == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16", "this GPU supports bf16"
        return "fp16", "this GPU has no bf16"
    if device_type == "cpu":
        speedup = cpu_bf16_speedup()
        verdict = "bf16" if speedup >= min_speedup else "off"
        return verdict, f"bf16 convolutions run {speedup:.2f}x the speed of float32 on this CPU"
    return "off", f"no mixed precision on {device_type}"


def cpu_description() -> str:
    """The CPU in one line, for benchmark reports: model name, the vector width torch dispatches to, and
    the native low-precision dot-product extensions it reports, e.g. ``AMD EPYC | torch AVX2 | no
    avx512_bf16/amx_bf16/avx512_fp16``. CPU-time figures of this project differ about 2x between hosts
    with AVX2 only and AVX-512 (and bf16 ones far more), so a figure without this line cannot be compared.
    """
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux
        pass
    wanted = ("avx512_bf16", "amx_bf16", "avx512_fp16")
    have = [f for f in wanted if f in flags]
    ext = " ".join(have) if have else ("no " + "/".join(wanted) if flags else "extensions unknown")
    return f"{model} | torch {torch.backends.cpu.get_cpu_capability()} | {ext}"


def dynamo_exporter_missing() -> str | None:
    """Why ``torch.onnx.export(..., dynamo=True)`` cannot run here, or None when it can.

    The torch.export-based ONNX exporter imports ``onnxscript``, which torch does not install; without it
    the export fails deep inside torch with a bare ``ModuleNotFoundError``.
    """
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:
        return ("the dynamo ONNX exporter needs the 'onnxscript' package: pip install onnxscript "
                "(or pip install 'visiontrain[export]'), or export with dynamo=False (the default)")
    return None
