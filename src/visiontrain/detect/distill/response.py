"""Response distillation: the teacher's class scores (:func:`response_kl_loss`, ``distill.kl``) and box-side
distributions (:func:`dfl_kd_loss`, ``distill.dfl``), both on anchors weighted by the teacher's confidence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from visiontrain.detect.distill.errors import DistillError


def teacher_confidence(teacher_logits: Tensor) -> Tensor:
    """``[B, nc_t, A]`` class logits → ``[B, A]`` the teacher's highest class probability per anchor."""
    return teacher_logits.detach().float().sigmoid().amax(1)


def response_kl_loss(student_logits: Tensor, teacher_logits: Tensor, class_indices: Sequence[int] | Tensor,
                     tau: float = 1.0, anchor_weight: Tensor | str | None = "confidence") -> Tensor:
    """Response distillation on the class logits of the teacher's classes.

    Args:
        student_logits: ``[B, nc_student, A]`` raw class logits of the student (before the sigmoid).
        teacher_logits: ``[B, nc_teacher, A]`` raw class logits of the teacher.
        class_indices: ``nc_teacher`` student class indices, the student's row of each teacher class.
        tau: temperature; logits are divided by it and the loss multiplied by ``tau²``.
        anchor_weight: ``"confidence"`` (default): weight each anchor by the teacher's highest class
            probability (:func:`teacher_confidence`, at temperature 1), ``None``: every anchor alike, or a
            ``[B, A]`` tensor of weights.

    Returns:
        A scalar: ``tau² · Σ_{b,a} w_ba Σ_c KL_bac / Σ_{b,a} w_ba`` with
        ``KL_bac = KL(Bernoulli(σ(t/tau)) ‖ Bernoulli(σ(s/tau)))`` for the teacher classes ``c``.

    Why a per-class **Bernoulli** KL and not a softmax over classes: the YOLOv8 head is a set of independent
    sigmoid classifiers trained with BCE (several classes may fire at one anchor, and "no class" is a valid
    answer). A softmax over classes would discard the absolute level of the scores: at a background anchor
    where the teacher says 0.001 for every class, the softmax turns those tiny, meaningless differences into a
    confident distribution and distils noise. The Bernoulli KL is exactly the KL between the distributions
    the head models, and keeps the "there is an A3 here with p=0.9" / "nothing here" signal.

    Why weight anchors by the teacher's confidence: nearly all anchors are background; unweighted, their
    (tiny) KL terms dominate the mean, and the few anchors that carry the old-class knowledge (where the
    teacher sees a base object, which the few-shot data leaves unlabelled) get little weight. The weights
    are normalised by their sum, so the loss is a weighted mean of per-anchor KLs (sum over classes). An
    all-background batch stays finite (weights are sigmoids > 0; the sum is clamped away from zero).

    Scale: the weighted mean spreads the weight over every anchor near a teacher detection (many more
    than the detection loss's ~10 positives per target), so it needs a larger gain than the BCE term to
    hold the old classes against the few-shot data, where base objects are unlabelled negatives:
    ``distill.kl=10`` kept 92 % of the teacher's base mAP50 in ``benchmarks/detect_distill.py`` (no
    pseudo-labels), ``kl=1`` 83 %. ``kl=2`` with pseudo-labels at 0.1 was the best whole-student combination
    of that benchmark's grid (BENCHMARKS.md, issue 22); the terms are off for a ``distill.frozen_base``
    student, whose base classes are the teacher's own frozen network.
    """
    idx = torch.as_tensor(class_indices, device=student_logits.device, dtype=torch.long)
    if teacher_logits.ndim != 3 or student_logits.ndim != 3:
        raise DistillError(f"response_kl_loss expects [B, nc, A] logits, got student {tuple(student_logits.shape)} "
                           f"and teacher {tuple(teacher_logits.shape)}")
    if idx.numel() != teacher_logits.shape[1]:
        raise DistillError(f"response_kl_loss: {idx.numel()} class indices for {teacher_logits.shape[1]} teacher "
                           "classes; give the student's index of every teacher class")
    s = student_logits.float().index_select(1, idx) / tau  # [B, nc_t, A]
    t = teacher_logits.detach().float() / tau
    if s.shape != t.shape:
        raise DistillError(f"response_kl_loss: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ "
                           "(same batch and anchors needed)")
    p = t.sigmoid()
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    per_anchor = kl.sum(1)  # [B, A]
    if isinstance(anchor_weight, str):
        if anchor_weight != "confidence":
            raise DistillError(f"anchor_weight={anchor_weight!r}: use 'confidence', None or a [B, A] tensor")
        w = teacher_confidence(teacher_logits)
    elif anchor_weight is None:
        w = torch.ones_like(per_anchor)
    else:
        w = anchor_weight.detach().float()
    return (per_anchor * w).sum() / w.sum().clamp(min=1e-6) * (tau * tau)


def dfl_kd_loss(student_box: Tensor, teacher_box: Tensor, reg_max: int = 16, tau: float = 1.0,
                anchor_weight: Tensor | None = None) -> Tensor:
    """Distillation of the box-side distributions (localisation distillation, Zheng et al., CVPR 2022).

    ``student_box``, ``teacher_box``: ``[B, 4·reg_max, A]`` DFL logits (4 sides × ``reg_max`` bins). Per
    anchor and side, ``tau² · KL(softmax(t/tau) ‖ softmax(s/tau))`` over the bins, averaged over the 4 sides,
    then a weighted mean over anchors with ``anchor_weight [B, A]`` (e.g. :func:`teacher_confidence`, so
    only boxes the teacher believes in are taught; ``None``: uniform).
    """
    if student_box.shape != teacher_box.shape or student_box.shape[1] != 4 * reg_max:
        raise DistillError(f"dfl_kd_loss: student {tuple(student_box.shape)} / teacher {tuple(teacher_box.shape)} "
                           f"must both be [B, 4·{reg_max}, A]")
    b, _, a = student_box.shape
    log_ps = F.log_softmax(student_box.float().view(b, 4, reg_max, a) / tau, dim=2)
    log_pt = F.log_softmax(teacher_box.detach().float().view(b, 4, reg_max, a) / tau, dim=2)
    per_anchor = (log_pt.exp() * (log_pt - log_ps)).sum(2).mean(1)  # [B, A]
    w = torch.ones_like(per_anchor) if anchor_weight is None else anchor_weight.detach().float()
    return (per_anchor * w).sum() / w.sum().clamp(min=1e-6) * (tau * tau)
