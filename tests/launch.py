"""Run visiontrain the way users do, in other processes: the CLI, ``torchrun`` with several processes, and
runs that get a signal part-way. Shared by the per-task distributed and interrupt tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from visiontrain.engine.checkpoint import load_checkpoint

QUIET = ["tensorboard=false", "plots=false", "progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """One OpenMP thread per process (2 processes on a 2-core CI machine), unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def cli_command(args: Sequence[str], nproc: int = 1) -> list[str]:
    """``python -m visiontrain ARGS`` or ``torchrun --nproc_per_node N -m visiontrain ARGS``."""
    if nproc == 1:
        return [sys.executable, "-m", "visiontrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "visiontrain", *args]


def run_cli(args: Sequence[str], nproc: int = 1, timeout: float = 600, **extra_env: str
            ) -> subprocess.CompletedProcess:
    """Run to the end; stdout and stderr together in ``.stdout``."""
    return subprocess.run(cli_command(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=env(**extra_env))


def run_until_step_then_signal(args: Sequence[str], step: int, sig: int, nproc: int = 1,
                               timeout: float = 600, **extra_env: str) -> tuple[int, str]:
    """Start a training run (``log_every=1`` and ``progress=false`` in ``args``), send ``sig`` to the
    launched process (the torchrun agent when ``nproc > 1``) once it logs step ``step``, and return
    ``(exit status, whole output)``."""
    p = subprocess.Popen(cli_command(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env(**extra_env), start_new_session=True)
    lines: list[str] = []
    sent = False
    deadline = time.monotonic() + timeout
    pattern = re.compile(r"\bstep (\d+)/\d+")
    try:
        for line in p.stdout:  # type: ignore[union-attr]
            lines.append(line)
            m = pattern.search(line)
            if not sent and m and int(m.group(1)) >= step:
                os.kill(p.pid, sig)
                sent = True
            if time.monotonic() > deadline:
                break
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert sent, "the run ended before it could be signalled:\n" + "".join(lines[-30:])
    return p.returncode, "".join(lines)


def training_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor that defines a checkpoint's training state: weights, EMA, optimizer moments."""
    ckpt = load_checkpoint(path)
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    if ckpt.get("ema"):
        out.update({f"ema.{k}": v for k, v in ckpt["ema"]["module"].items()})
    for pid, st in ckpt["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def assert_same_state(a: str | Path, b: str | Path) -> None:
    """The two checkpoints hold bit-identical training states."""
    sa, sb = training_state(a), training_state(b)
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


def interrupted_then_resumed(base: Sequence[str], out: Path, step: int, sig: int, nproc: int = 1) -> int:
    """Signal a run at ``step``, check the interrupt kept exactly the step it stopped at, resume it with
    ``resume=auto`` and return the step the interrupted run had saved."""
    rc, text = run_until_step_then_signal([*base, f"out={out}", "log_every=1"], step, sig, nproc)
    assert rc == 128 + sig or (nproc > 1 and rc != 0), text[-3000:]
    m = re.search(r"wrote \S+last\.pt at step (\d+); resume with: (.+)", text)
    assert m, "no 'wrote last.pt at step N; resume with' line:\n" + text[-3000:]
    saved = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert saved == int(m.group(1)) >= step
    assert f"resume=auto out={out}" in m.group(2)
    done = run_cli([*base, f"out={out}", "resume=auto"], nproc)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"resumed from {out}/checkpoints/last.pt at step {saved}" in done.stdout
    return saved
