"""Distillation between oriented-box models: the response terms skip the OBB head's angle channel, a same-scale
student starts as the teacher, the teacher stays frozen, and mixing an OBB with a horizontal model is refused."""

from __future__ import annotations

import pytest
import torch

from visiontrain.detect.distill import Distiller, DistillError
from visiontrain.detect.model import YOLOv8
from visiontrain.detect.obb.loss import OBBLoss
from visiontrain.detect.obb.model import YOLOv8OBB

OLD = ["a", "b", "c"]
ALL = ["a", "b", "c", "d", "e"]


def _teacher() -> YOLOv8OBB:
    torch.manual_seed(0)
    teacher = YOLOv8OBB("n", nc=len(OLD), names=OLD)
    with torch.no_grad():  # non-trivial class and angle outputs
        for conv in (*teacher.head.cv3, *teacher.head.cv4):
            conv[-1].bias.normal_(0, 1)
    return teacher.eval()


def _batch():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 1, 20, 30, 18, 6, 0.3], [1, 4, 40, 24, 20, 8, -0.5]])  # (b, cls, cx, cy, w, h, angle)
    return images, targets


def test_obb_student_starts_as_the_obb_teacher_and_the_terms_vanish():
    d = Distiller(_teacher(), OLD, ALL, cwd=1.0, kl=2.0, dfl=0.5)
    student = d.attach(YOLOv8OBB("n", nc=len(ALL), names=ALL)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        s, t = student(x), d.teacher(x)
    torch.testing.assert_close(s[:, 4:7], t[:, 4:7], rtol=0, atol=1e-6)  # the teacher's classes
    torch.testing.assert_close(s[:, -1], t[:, -1], rtol=0, atol=1e-6)  # the angle
    student.train()
    for m in student.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    terms = d.training_step(student, *_batch(), OBBLoss(len(ALL)))
    assert {"cwd", "kl", "dfl_kd"} <= set(terms)
    assert terms["cwd"].item() < 1e-6 and terms["kl"].item() < 1e-6 and terms["dfl_kd"].item() < 1e-6


def test_obb_distillation_step_trains_the_student_only():
    d = Distiller(_teacher(), OLD, ALL, cwd=1.0, kl=2.0, dfl=0.5, init_student=False)
    student = d.attach(YOLOv8OBB("n", nc=len(ALL), names=ALL)).train()
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    terms = d.training_step(student, *_batch(), OBBLoss(len(ALL)))
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    assert terms["kl"].item() > 1e-3  # a fresh student disagrees with the teacher
    sum(terms.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert student.head.cv4[0][-1].weight.grad.abs().sum() > 0  # the angle branch trains through the OBB loss
    assert all(torch.equal(v, before[k]) for k, v in d.teacher.state_dict().items())


def test_obb_and_horizontal_models_are_not_mixed():
    with pytest.raises(DistillError, match="oriented-box"):
        Distiller(_teacher(), OLD, ALL).attach(YOLOv8("n", nc=len(ALL), names=ALL))
