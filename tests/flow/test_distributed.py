"""Optical flow on two processes (torchrun, gloo on CPU), supervised RAFT and unsupervised PWC, as users
launch it; and a SIGTERM to the torchrun agent during unsupervised training (whose self-supervision
switch depends on the step) that a resumed run recovers from bit for bit."""

from __future__ import annotations

import signal

import pytest
from launch import QUIET, assert_same_state, interrupted_then_resumed, run_cli

from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.flow.synthetic import write_synthetic_chairs


@pytest.fixture(scope="module")
def chairs(tmp_path_factory):
    return write_synthetic_chairs(tmp_path_factory.mktemp("ddp") / "chairs", train=8, val=2, size=(128, 160), seed=0)


def supervised(chairs) -> list[str]:
    return ["train", "flow", f"data=chairs:{chairs}", "crop=128x160", "batch_size=4", "num_flow_updates_train=2",
            "num_flow_updates_eval=2", "device=cpu", *QUIET]


def unsupervised(chairs) -> list[str]:
    return ["train", "flow", "method=unsupervised", "model=pwc", "pwc_width=0.25", f"data=chairs:{chairs}",
            "batch_size=4", "selfsup_start_step=2", "device=cpu", *QUIET]


@pytest.mark.parametrize("kind", ["supervised", "unsupervised", "convex_upsample_last"])
def test_flow_trains_on_two_processes_and_reports_once(chairs, tmp_path, kind):
    args = {"supervised": supervised(chairs), "unsupervised": unsupervised(chairs),
            "convex_upsample_last": [*supervised(chairs), "model=raft_small_convex", "upsample_train=last"]}[kind]
    run = run_cli([*args, "max_steps=2", f"out={tmp_path / 'run'}"], nproc=2)
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.stdout.count("final validation") == 1  # the table is printed by rank 0 only
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2


def test_sigterm_to_the_torchrun_agent_during_unsupervised_training_resumes_bit_exact(chairs, tmp_path):
    args = [*unsupervised(chairs), "epochs=3", "save_every_steps=0", "save_every_minutes=0"]  # 2 steps/epoch
    ref = run_cli([*args, f"out={tmp_path / 'ref'}"], nproc=2)
    assert ref.returncode == 0, ref.stdout[-3000:]
    interrupted_then_resumed(args, tmp_path / "cut", step=3, sig=signal.SIGTERM, nproc=2)
    assert_same_state(tmp_path / "ref/checkpoints/last.pt", tmp_path / "cut/checkpoints/last.pt")
