"""The panorama task on two processes (torchrun, gloo on CPU) as users launch it, and a Ctrl-C (SIGINT) in
one process that a resumed run recovers from bit for bit."""

from __future__ import annotations

import signal

import pytest
from launch import QUIET, assert_same_state, interrupted_then_resumed, run_cli

from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.panorama.synthetic import write_synthetic_panoramas


@pytest.fixture(scope="module")
def panoramas(tmp_path_factory):
    root = tmp_path_factory.mktemp("pano") / "data"
    write_synthetic_panoramas(root, train=8, val=2, size=32, seed=0)
    return root


def tiny(data) -> list[str]:
    return ["train", "panorama", f"data={data}", "pano_size=16", "view_size=32", "encoder_channels=[8,8,8]",
            "fused_channels=4", "unet_channels=[8,16]", "norm_groups=4", "batch_size=4", "sample_steps=2",
            "device=cpu", *QUIET]


def test_panorama_trains_on_two_processes_and_reports_once(panoramas, tmp_path):
    run = run_cli([*tiny(panoramas), "max_steps=2", f"out={tmp_path / 'run'}"], nproc=2)
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.stdout.count(f"run {tmp_path / 'run'}: best psnr") == 1
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2 and ckpt["ema"] is not None


def test_ctrl_c_keeps_the_step_and_resume_is_bit_exact(panoramas, tmp_path):
    args = [*tiny(panoramas), "epochs=3", "save_every_steps=0", "save_every_minutes=0"]  # 2 steps per epoch
    ref = run_cli([*args, f"out={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stdout[-3000:]
    interrupted_then_resumed(args, tmp_path / "cut", step=3, sig=signal.SIGINT)
    assert_same_state(tmp_path / "ref/checkpoints/last.pt", tmp_path / "cut/checkpoints/last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("cache", [0, 8])
def test_one_step_distillation_trains_on_two_processes(panoramas, tmp_path, cache):
    """``distill.teacher`` under torchrun: each rank holds its own frozen teacher outside DDP (DDP would
    refuse or sync it otherwise); the student trains, the checkpoint holds the student only. With
    ``distill.cache`` rank 0 computes the targets and rank 1 waits and reads them."""
    teacher = run_cli([*tiny(panoramas), "max_steps=2", f"out={tmp_path / 'teacher'}"])
    assert teacher.returncode == 0, teacher.stdout[-3000:]
    weights = tmp_path / "teacher/checkpoints/last.pt"
    run = run_cli([*tiny(panoramas), "max_steps=2", f"distill.teacher={weights}", "distill.steps=2", "lr=3e-3",
                   f"distill.cache={cache}", f"out={tmp_path / 'student'}"], nproc=2)
    assert run.returncode == 0, run.stdout[-3000:]
    student, start = load_checkpoint(tmp_path / "student/checkpoints/last.pt"), load_checkpoint(weights)
    assert student["step"] == 2 and len(student["rng"]) == 2 and student.keys() >= {"model", "ema"}
    assert student["model"].keys() == start["model"].keys()  # no teacher inside
    assert any(not (student["model"][k] == start["ema"]["module"][k]).all() for k in student["model"])
    assert (tmp_path / "student/distill_cache.pt").is_file() == bool(cache)
