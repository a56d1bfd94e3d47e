"""Interrupts keep the work: SIGTERM / Ctrl-C finish the step, write last.pt there, say how to resume, and a
resumed run ends bit-identical to one never interrupted — in one process and under torchrun."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import QUIET, assert_same_state, env, free_port, run_until_step_then_signal
from toy_task import ToyConfig, ToyTask

from visiontrain.config import load_config
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.trainer import Trainer

TOY = str(Path(__file__).with_name("toy_task.py"))
# long enough (5 epochs of 16 steps) to be signalled anywhere; save_every_steps=0: no step checkpoints
COMMON = [*QUIET, "epochs=5", "n_train=128", "batch_size=8", "optimizer=sgd", "lr=0.05", "save_every_steps=0",
          "save_every_minutes=0", "ema.enabled=true", "ema.warmup=5", "eval_every=2", "device=cpu", "log_every=1"]


def toy(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, TOY, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), TOY, *args]


def run_toy(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(toy(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, env=env())


def signalled_toy(args: list[str], step: int, sig: int, nproc: int = 1) -> tuple[int, str]:
    """``run_until_step_then_signal`` for the toy task script (same logs as the CLI)."""
    import launch

    original = launch.cli_command
    launch.cli_command = lambda a, n=1: toy(list(a), n)
    try:
        return run_until_step_then_signal(args, step, sig, nproc)
    finally:
        launch.cli_command = original


@pytest.mark.parametrize("nproc, sig", [(1, signal.SIGTERM), (1, signal.SIGINT), (2, signal.SIGTERM)])
def test_signal_saves_the_step_it_stops_at_and_resume_is_bit_exact(tmp_path, nproc, sig):
    ref = run_toy([f"out={tmp_path / 'ref'}", *COMMON], nproc)
    assert ref.returncode == 0, ref.stdout[-3000:]
    total = load_checkpoint(tmp_path / "ref/checkpoints/last.pt")["step"]

    at = random.Random().randint(2, total - 10)
    run = tmp_path / "cut"
    rc, text = signalled_toy([f"out={run}", "sleep=0.05", *COMMON], at, sig, nproc)
    assert rc == 128 + sig if nproc == 1 else rc != 0, text[-2000:]
    saved = load_checkpoint(run / "checkpoints/last.pt")["step"]
    assert at <= saved <= at + 2 and saved < total, (at, saved)
    assert f"wrote {run}/checkpoints/last.pt at step {saved}; resume with: " in text
    launcher = "visiontrain" if nproc == 1 else "torchrun --nproc_per_node 2 -m visiontrain"
    assert f"resume with: {launcher} train toy resume=auto out={run}" in text
    assert text.count("received: finishing step") == 1  # said once, by rank 0
    assert f"{signal.Signals(sig).name} received" in (run / "log.txt").read_text()

    res = run_toy([f"out={run}", "resume=auto", *COMMON], nproc)
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"resumed from {run}/checkpoints/last.pt at step {saved}" in res.stdout
    assert_same_state(tmp_path / "ref/checkpoints/last.pt", run / "checkpoints/last.pt")


def test_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(toy([f"out={run}", "sleep=1.0", *COMMON]), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env())
    for line in p.stdout:
        if "step 2/" in line:
            break
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)  # inside step 3 (a step sleeps a second)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    assert "step 3/" not in out  # it did not finish the step it was in
    assert "second SIGINT: stopped at once" in out
    assert not (run / "checkpoints" / "last.pt").exists()  # nothing was saved in this run yet
    assert "no checkpoint was written yet" in out


def test_save_every_minutes_writes_last_pt_between_step_checkpoints(tmp_path):
    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'run'}", *QUIET, "epochs=1", "max_steps=6",
                                        "sleep=0.1", "save_every_minutes=0.001", "keep_last=10"])
    result = Trainer(ToyTask(cfg)).fit()
    steps = sorted(int(p.stem[5:]) for p in (Path(result["out"]) / "checkpoints").glob("step_*.pt"))
    assert steps == [1, 2, 3, 4, 5, 6]  # each step sleeps longer than 0.06 s: a save after every one
    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'off'}", *QUIET, "epochs=1", "max_steps=6",
                                        "save_every_minutes=0", "keep_last=10"])
    result = Trainer(ToyTask(cfg)).fit()
    assert [p.name for p in (Path(result["out"]) / "checkpoints").glob("step_*.pt")] == ["step_0000006.pt"]


def test_error_that_ends_a_run_is_in_its_log(tmp_path):
    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'run'}", *QUIET, "epochs=1", "nan_at_step=3",
                                        "nan_policy=stop"])
    trainer = Trainer(ToyTask(cfg))
    with pytest.raises(Exception, match="not finite"):
        trainer.fit()
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "error at step 2: step 3:" in log and "loss term 'reg' is not finite" in log
