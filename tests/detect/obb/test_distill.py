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


def test_obb_pseudo_labels_are_the_teachers_rotated_detections_where_nothing_is_labelled():
    from visiontrain.detect.distill import teacher_pseudo_labels

    decoded = torch.zeros(2, 4 + 2 + 1, 5)  # (cx, cy, w, h), 2 class scores, angle
    decoded[:, 2:4] = 1.0

    def put(img, anchor, xywhr, cls, score):
        decoded[img, :4, anchor] = torch.tensor(xywhr[:4])
        decoded[img, -1, anchor] = xywhr[4]
        decoded[img, 4 + cls, anchor] = score

    put(0, 0, (50, 50, 30, 8, 0.5), 1, 0.9)
    put(0, 1, (51, 50, 30, 8, 0.5), 1, 0.8)   # the same object: rotated NMS keeps the 0.9 one
    put(0, 2, (150, 150, 20, 6, -0.3), 0, 0.6)
    put(0, 3, (100, 20, 10, 10, 0.0), 0, 0.2)  # below conf
    put(0, 4, (170, 50, 20, 6, 0.0), 0, 0.5)   # centre outside the 160-px-wide image: dropped
    put(1, 0, (30, 30, 24, 8, 1.0), 0, 0.95)   # on a labelled box: the label wins
    put(1, 1, (80, 80, 24, 8, 1.0), 1, 0.7)
    targets = torch.tensor([[1.0, 4, 30, 31, 24, 8, 1.0]])
    rows = teacher_pseudo_labels(decoded, targets, class_indices=[3, 1], conf=0.25, img_hw=(200, 160), obb=True)
    expected = torch.tensor([[0, 1, 50, 50, 30, 8, 0.5], [0, 3, 150, 150, 20, 6, -0.3], [1, 1, 80, 80, 24, 8, 1.0]])
    torch.testing.assert_close(rows, expected)


def test_obb_distiller_uses_pseudo_labels_and_skips_the_kl_on_labelled_novel_objects():
    images, _ = _batch()
    teacher = _teacher()
    with torch.no_grad():
        decoded = teacher.head.decode(teacher.forward_with_features(images)[1])  # [B, 4 + 3 + 1, A]
    box = [*decoded[0, :4, 7].tolist(), decoded[0, -1, 7].item()]  # the teacher's box at anchor 7 of image 0
    novel = torch.tensor([[0, ALL.index("d"), *box]])
    kl, seen = {}, []
    for skip in (False, True):
        d = Distiller(_teacher(), OLD, ALL, kl=1.0, feature="none", init_student=False, kl_skip_novel=skip,
                      pseudo=0.3)
        torch.manual_seed(0)
        student = d.attach(YOLOv8OBB("n", nc=len(ALL), names=ALL)).train()
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        loss = OBBLoss(len(ALL))  # wrapped: record the targets the Distiller gives the loss
        terms = d.training_step(student, images, novel, lambda p, t, hw, _loss=loss: seen.append(t) or _loss(p, t, hw))
        kl[skip] = terms["kl"].item()
    assert terms["stat/pseudo_per_image"].item() > 0
    assert seen[-1].shape[1] == 7 and len(seen[-1]) > 1  # the label plus rotated pseudo-labels (b, cls, xywhr)
    assert set(seen[-1][1:, 1].long().tolist()) <= {ALL.index(n) for n in OLD}
    mask = d.on_novel_labels(decoded, novel)
    assert mask[0, 7] and not mask[1].any()
    assert kl[True] < kl[False]
