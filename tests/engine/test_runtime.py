"""The allocator tuning applies in a fresh process, is idempotent, and can be switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import ctypes, sys
from visiontrain.engine.runtime import tune_allocator
first = tune_allocator()
assert tune_allocator() == first  # idempotent
print(int(first))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("env, expected", [("", "1"), ("default", "0")])
def test_tune_allocator_in_a_fresh_process(env: str, expected: str) -> None:
    environ = {**os.environ, "VISIONTRAIN_MALLOC": env}
    out = subprocess.run([sys.executable, "-c", CODE], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_resolve_amp() -> None:
    from visiontrain.engine.runtime import cpu_bf16_speedup, resolve_amp

    assert resolve_amp("bf16", "cpu") == ("bf16", "as configured")
    assert resolve_amp("off", "cuda")[0] == "off"
    speedup = cpu_bf16_speedup()  # a real measurement on this CPU, cached
    # a ratio of two positive times; on an AVX2-only CPU bf16 falls back to slow reference kernels and
    # measured 0.03-0.09 (2026-12-03), so no tighter lower bound holds everywhere
    assert 0.001 < speedup < 100 and cpu_bf16_speedup() == speedup
    assert resolve_amp("auto", "cpu")[0] == ("bf16" if speedup >= 1.25 else "off")
    assert resolve_amp("auto", "mps")[0] == "off"


def test_cpu_description_names_what_torch_dispatches_to() -> None:
    import torch

    from visiontrain.engine.runtime import cpu_description

    parts = cpu_description().split(" | ")
    assert len(parts) == 3 and parts[0]
    assert parts[1] == f"torch {torch.backends.cpu.get_cpu_capability()}"
    if sys.platform.startswith("linux"):  # flags read from /proc/cpuinfo
        flags = open("/proc/cpuinfo").read()
        listed = not parts[2].startswith("no ") and "avx512_bf16" in parts[2].split()
        assert listed == (" avx512_bf16" in flags)
