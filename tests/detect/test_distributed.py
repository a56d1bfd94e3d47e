"""Detection on several processes (torchrun, gloo on CPU) as users launch it: plain, synchronised BatchNorm
against one process, distillation, and a SIGTERM to the torchrun agent that a resumed run recovers from
bit for bit."""

from __future__ import annotations

import copy
import signal

import pytest
import torch
from launch import QUIET, assert_same_state, interrupted_then_resumed, run_cli

from visiontrain.config import load_config
from visiontrain.detect.config import DetectTrainConfig
from visiontrain.detect.synthetic import write_synthetic_mar20
from visiontrain.detect.task import DetectTask
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_mar20(tmp_path_factory.mktemp("ddp") / "data", train=16, val=4, imgsz=64, seed=1)


def base(data) -> list[str]:
    return ["train", "detect", f"data={data}", "imgsz=64", "batch_size=8", "device=cpu", *QUIET]


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """Four SGD steps in one process: the reference run and a teacher checkpoint."""
    out = tmp_path_factory.mktemp("one") / "run"
    done = run_cli([*base(data), "max_steps=4", "optimizer=sgd", f"out={out}"])
    assert done.returncode == 0, done.stdout[-3000:]
    return out


def test_two_processes_with_sync_bn_equal_one_process(data, one_process, tmp_path):
    """Same global batch, 4 steps: weights within 1e-4 (measured: 1e-6, float summation order). SGD, since
    Adam's first steps move each weight by about lr·sign(gradient) and so turn the rounding noise of
    near-zero gradients into lr-sized differences: with AdamW one process on 1 vs 2 threads differs by
    1.2e-3 after 4 steps, as much as 2 processes vs 1 do."""
    two = run_cli([*base(data), "max_steps=4", "optimizer=sgd", "sync_bn=true", f"out={tmp_path / 'two'}"],
                  nproc=2)
    assert two.returncode == 0, two.stdout[-3000:]
    assert "sync_bn: 57 BatchNorm layers" in two.stdout
    assert two.stdout.count("final: mAP50-95") == 1  # the summary comes from rank 0 only
    a = load_checkpoint(one_process / "checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "two/checkpoints/last.pt")
    assert a["step"] == b["step"] == 4 and len(b["rng"]) == 2
    for part in ("model", "ema"):
        sa = a[part] if part == "model" else a[part]["module"]
        sb = b[part] if part == "model" else b[part]["module"]
        worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
        assert worst < 1e-4, f"{part}: 2 processes differ from 1 by {worst:.3g}"
    # without synchronised statistics the runs part: BatchNorm sees half the batch in each process
    apart = run_cli([*base(data), "max_steps=4", "optimizer=sgd", "sync_bn=false", f"out={tmp_path / 'nosync'}"],
                    nproc=2)
    assert apart.returncode == 0, apart.stdout[-3000:]
    c = load_checkpoint(tmp_path / "nosync/checkpoints/last.pt")["model"]
    assert max((a["model"][k] - c[k]).abs().max().item() for k in c if "running" not in k) > 5e-4


def test_distillation_trains_on_two_processes(data, one_process, tmp_path):
    teacher = one_process / "checkpoints/last.pt"
    run = run_cli([*base(data), "max_steps=2", f"distill.teacher={teacher}", "model=yolov8s",
                   "freeze_backbone_epochs=1", "log_every=1", f"out={tmp_path / 'kd'}"], nproc=2)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "kl " in run.stdout and "pseudo_per_image " in run.stdout  # the default distillation terms trained
    assert load_checkpoint(tmp_path / "kd/checkpoints/last.pt")["step"] == 2


def test_frozen_base_student_on_two_processes_keeps_the_teacher(data, tmp_path):
    """``distill.teacher=`` alone with a 10-class teacher of the student's scale (frozen_base=auto -> true): on
    two processes only the novel branch trains (DDP with most parameters frozen) and the teacher's weights and
    BatchNorm statistics come back bit for bit."""
    from visiontrain.detect.distill import split_classes
    from visiontrain.detect.model import YOLOv8
    from visiontrain.detect.synthetic import MAR20_NAMES

    names = list(MAR20_NAMES)[:10]
    torch.manual_seed(0)
    teacher = YOLOv8("n", nc=10, names=names)
    path = tmp_path / "teacher.pt"
    torch.save({"format_version": 1, "task": "detect", "task_state": {"names": names, "scale": "n", "imgsz": 64},
                "model": teacher.state_dict(), "ema": None}, path)
    run = run_cli([*base(data), "max_steps=2", f"distill.teacher={path}", "lr=0.05", f"out={tmp_path / 'fb'}"],
                  nproc=2)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "distill.frozen_base=auto -> true" in run.stdout
    ckpt = load_checkpoint(tmp_path / "fb/checkpoints/last.pt")
    assert ckpt["step"] == 2
    own = teacher.state_dict()
    for part in ("model", "ema"):
        state = ckpt[part] if part == "model" else ckpt[part]["module"]
        for k, v in state.items():
            if ".parts.1." in k or k.endswith(".perm"):
                continue
            assert torch.equal(v, own[k.replace(".parts.0.", ".")]), f"{part}.{k}"
    start = split_classes(copy.deepcopy(teacher), list(MAR20_NAMES), names).state_dict()
    moved = max((v - start[k]).abs().max().item() for k, v in ckpt["model"].items() if ".parts.1." in k
                and v.is_floating_point())
    assert moved > 1e-4  # the novel branch trained


def test_sigterm_to_the_torchrun_agent_keeps_the_step_and_resume_is_bit_exact(data, tmp_path):
    args = [*base(data), "epochs=3", "save_every_steps=0", "save_every_minutes=0"]  # 2 steps per epoch
    ref = run_cli([*args, f"out={tmp_path / 'ref'}"], nproc=2)
    assert ref.returncode == 0, ref.stdout[-3000:]
    saved = interrupted_then_resumed(args, tmp_path / "cut", step=3, sig=signal.SIGTERM, nproc=2)
    assert saved < 6
    assert_same_state(tmp_path / "ref/checkpoints/last.pt", tmp_path / "cut/checkpoints/last.pt")


def test_fixed_parameters_never_train_and_the_optimizer_holds_only_trainable_ones(data, tmp_path):
    """The DFL projection is built fixed; the backbone freeze/unfreeze schedule must not make it trainable
    (under DDP that was 'parameters that were not used in producing loss')."""
    cfg = load_config(DetectTrainConfig, None, [f"data={data}", "imgsz=64", "batch_size=8", "epochs=2",
                                                "freeze_backbone_epochs=1", f"out={tmp_path / 'r'}", *QUIET])
    trainer = Trainer(DetectTask(cfg))
    dfl = trainer.model.head.dfl.conv.weight
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(dfl) not in in_optimizer
    for epoch in (0, 1):
        trainer._apply_freeze(epoch)
        assert not dfl.requires_grad
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trainable == in_optimizer  # after unfreezing: exactly the optimizer's parameters
    assert torch.equal(dfl, torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1))
