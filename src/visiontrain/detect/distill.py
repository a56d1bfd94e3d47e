"""Teacher→student distillation for class-incremental detection (learn novel classes, keep the old ones).

The workflow (``base`` = the teacher's classes, ``novel`` = the classes added later)::

    visiontrain train detect base_classes=[A1..A10] out=runs/teacher           # teacher on base classes
    visiontrain split detect data=D base=A1..A10 shots=10 keep_base=false out=D10  # few-shot novel data
    visiontrain train detect data=D10 distill.teacher=runs/teacher/checkpoints/best.pt out=runs/student

What the pieces do:

* :func:`expand_classes` grows the class branch of a trained detector (10 → 20 classes): base rows are
  copied by name, novel rows get a fresh weight and the head's usual prior bias, so the expanded model
  predicts exactly what the teacher predicts for the base classes before any training.
* :class:`Distiller` (``distill.teacher=PATH``; the task loads the teacher with
  :func:`visiontrain.detect.inference.build_detector`) holds the teacher (eval mode, no gradients, kept
  outside the student's module tree so the engine's ``model.train()`` never reaches it). ``attach`` initialises a
  **same-scale** student from the expanded teacher (unless ``weights=`` is given, or
  ``distill.init_student=false``) and, when neck widths differ (a yolov8s teacher into a yolov8n
  student), adds 1×1 ``distill_adapters`` (student → teacher channels) that train with the student and are
  saved in its checkpoints (inference ignores them). ``training_step`` adds to the detection loss:

  - ``cwd``: channel-wise distillation (:func:`cwd_loss`) on the three neck outputs;
  - ``kl``: response distillation (:func:`response_kl_loss`) on the class logits of the teacher's classes;
  - ``dfl_kd`` (``distill.dfl > 0``): distillation of the box-side distributions (:func:`dfl_kd_loss`).

* :func:`visiontrain.detect.evaluation.base_novel_metrics` splits mAP into base / novel classes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visiontrain.detect.model import YOLOv8, flatten_raw
from visiontrain.detect.weights import ADAPTERS
from visiontrain.engine.checkpoint import unwrap

log = logging.getLogger(__name__)


class DistillError(ValueError):
    """A teacher / student combination that cannot be distilled; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# losses


def _as_list(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def cwd_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor], tau: float = 1.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Each channel of a ``[B, C, H, W]`` map is turned into a distribution over its ``H·W`` positions by a
    softmax with temperature ``tau``; the loss is ``tau² · KL(teacher ‖ student)`` averaged over the
    ``B·C`` channel distributions::

        loss = tau² / (B·C) · Σ_{b,c} Σ_i p_t(i) · (log p_t(i) - log p_s(i)),   p = softmax(x[b, c] / tau)

    Lists of maps (one per pyramid level, same shapes pairwise) give the **sum** of the per-level losses
    (one CWD term per level, as in the paper's FPN setting); a weight on the total therefore applies to
    every level alike. Computed in float32 whatever the input dtype (autocast).
    """
    s_list, t_list = _as_list(student), _as_list(teacher)
    if len(s_list) != len(t_list):
        raise DistillError(f"cwd_loss: {len(s_list)} student maps but {len(t_list)} teacher maps")
    total = s_list[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        if s.shape != t.shape or s.ndim != 4:
            raise DistillError(f"cwd_loss: level {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must "
                               "be equal [B, C, H, W] shapes (add a 1×1 adapter when channel counts differ)")
        b, c = s.shape[:2]
        log_ps = F.log_softmax(s.float().flatten(2) / tau, dim=-1)  # [B, C, HW]
        log_pt = F.log_softmax(t.float().flatten(2) / tau, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [B, C]
        total = total + kl.sum() * (tau * tau) / (b * c)
    return total


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
    ``distill.kl=10`` (the default) kept 92 % of the teacher's base mAP50 in ``benchmarks/detect_distill.py``,
    ``kl=1`` 83 %.
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


# --------------------------------------------------------------------------------------------
# head expansion


@torch.no_grad()
def _copy_block(old: Tensor, new: Tensor, zero_cross: bool) -> None:
    """Copy ``old`` into the leading block of ``new`` (dims 0 and 1 when 2-D+); with ``zero_cross``
    the weights from new input channels to old output channels are zeroed, so old outputs keep their value."""
    if old.ndim == 1:
        new[: old.shape[0]] = old
        return
    o, i = old.shape[:2]
    new[:o, :i] = old
    if zero_cross:
        new[:o, i:] = 0


@torch.no_grad()
def expand_classes(model: YOLOv8, new_names: Sequence[str], old_names: Sequence[str]) -> YOLOv8:
    """Grow ``model``'s class branch from ``old_names`` to ``new_names`` (in place; returns ``model``).

    Every old class must be in ``new_names`` (any order: rows are matched by name). Its output row is
    copied; novel rows get a fresh weight and the detect head's prior bias ``log(5 / nc / (640 / s)²)``
    for the new ``nc``. If the hidden width of the class branch grows too (it is ``max(c_P3, min(nc, 100))``),
    the added hidden channels are fresh and the weights from them into the old channels and rows are zero,
    so the expanded model gives, before any training, exactly the old model's boxes and base-class scores.
    """
    old_names, new_names = [str(n) for n in old_names], [str(n) for n in new_names]
    head = model.head
    if getattr(model, "fused", False):
        raise DistillError("expand_classes: the model is fused (inference-only); expand before fuse()")
    if len(old_names) != head.nc:
        raise DistillError(f"expand_classes: old_names has {len(old_names)} classes but the model has nc={head.nc}")
    for what, names in (("old_names", old_names), ("new_names", new_names)):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DistillError(f"expand_classes: {what} repeats {dup}")
    lost = [n for n in old_names if n not in new_names]
    if lost:
        raise DistillError(f"expand_classes: the model's classes {lost} are not in new_names {new_names}; "
                           "the new class list must contain every old class")
    ref = head.cv2[0][-1].weight
    new_branch = head._class_branch(len(new_names)).to(device=ref.device, dtype=ref.dtype)
    rows = torch.tensor([new_names.index(n) for n in old_names], device=ref.device)
    novel = [j for j, n in enumerate(new_names) if n not in old_names]
    for i, (old, new) in enumerate(zip(head.cv3, new_branch)):
        for k in (0, 1):  # the two Conv(conv + BN + SiLU) blocks: grow the hidden width if needed
            _copy_block(old[k].conv.weight, new[k].conv.weight, zero_cross=k == 1)
            for name in ("weight", "bias", "running_mean", "running_var"):
                _copy_block(getattr(old[k].bn, name), getattr(new[k].bn, name), zero_cross=False)
            new[k].bn.num_batches_tracked.copy_(old[k].bn.num_batches_tracked)
            new[k].bn.eps = old[k].bn.eps
        w_old, w_new = old[2].weight, new[2].weight  # [nc, hidden, 1, 1]
        w_new[rows] = 0
        w_new[rows, : w_old.shape[1]] = w_old
        new[2].bias[rows] = old[2].bias
        if novel:
            new[2].bias[novel] = math.log(5 / len(new_names) / (640 / head.strides[i]) ** 2)
    head.cv3 = new_branch
    head.nc = len(new_names)
    model.names = list(new_names)
    return model


# --------------------------------------------------------------------------------------------
# the distiller


def make_adapters(student_channels: Sequence[int], teacher_channels: Sequence[int]) -> nn.ModuleList:
    """One 1×1 conv (with bias) per level mapping ``[B, c_s, H, W]`` to ``[B, c_t, H, W]``."""
    return nn.ModuleList(nn.Conv2d(cs, ct, 1) for cs, ct in zip(student_channels, teacher_channels))


class Distiller:
    """Teacher, loss weights and the distillation step of a student run (see the module docstring).

    Not an ``nn.Module`` on purpose: the teacher must stay out of the student's module tree (the engine's
    ``model.train()``, optimizer, EMA and checkpoints never see it).
    """

    def __init__(self, teacher: YOLOv8, teacher_names: Sequence[str], student_names: Sequence[str],
                 cwd: float = 1.0, kl: float = 1.0, dfl: float = 0.0, tau: float = 1.0,
                 init_student: bool = True, source: str = "teacher"):
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_names = [str(n) for n in teacher_names]
        self.student_names = [str(n) for n in student_names]
        missing = [n for n in self.teacher_names if n not in self.student_names]
        if missing:
            raise DistillError(f"{source}: the teacher's classes {missing} are not among the student's classes "
                               f"{self.student_names}; the student must predict every teacher class (set names= "
                               "or base_classes= so they are included)")
        self.class_indices = [self.student_names.index(n) for n in self.teacher_names]
        self.novel_names = [n for n in self.student_names if n not in self.teacher_names]
        if min(cwd, kl, dfl) < 0 or tau <= 0:
            raise DistillError(f"distill weights must be >= 0 and tau > 0 (got cwd={cwd}, kl={kl}, dfl={dfl}, "
                               f"tau={tau})")
        self.cwd, self.kl, self.dfl, self.tau = float(cwd), float(kl), float(dfl), float(tau)
        self.init_student = init_student
        self.source = source

    # ----------------------------------------------------------------------------------------
    def attach(self, model: YOLOv8) -> YOLOv8:
        """Prepare a freshly built student: initialise it from the expanded teacher when both have the
        same scale (and ``init_student``), and add ``distill_adapters`` when neck widths differ."""
        t_ch, s_ch = self.teacher.head.channels, model.head.channels
        if model.reg_max != self.teacher.reg_max and self.dfl > 0:
            raise DistillError(f"{self.source}: DFL distillation needs equal reg_max (teacher {self.teacher.reg_max}, "
                               f"student {model.reg_max}); set distill.dfl=0")
        if self.init_student and model.scale == self.teacher.scale:
            expanded = expand_classes(copy.deepcopy(self.teacher), self.student_names, self.teacher_names)
            model.load_state_dict(expanded.state_dict())
            log.info("student initialised from the teacher with the class branch grown %d → %d classes",
                     len(self.teacher_names), len(self.student_names))
        if tuple(s_ch) != tuple(t_ch) and self.cwd > 0:
            model.add_module(ADAPTERS, make_adapters(s_ch, t_ch))
        return model

    def _teacher_on(self, device: torch.device) -> YOLOv8:
        if self.teacher.head.cv2[0][-1].weight.device != device:
            self.teacher.to(device)
        if self.teacher.training:  # nothing should flip it, but never run the teacher in train mode
            self.teacher.eval()
        return self.teacher

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor, loss: Any) -> dict[str, Tensor]:
        """Detection loss terms of the student plus ``cwd``, ``kl`` (and ``dfl_kd``), each already weighted.

        ``model`` may be DDP-wrapped: it is only called (training-mode forward, three raw maps); the neck
        outputs are captured with a forward hook on ``unwrap(model).neck``."""
        net = unwrap(model)
        captured: list[list[Tensor]] = []
        handle = net.neck.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            preds = model(images)
        finally:
            handle.remove()
        terms = dict(loss(preds, targets, tuple(images.shape[2:])))
        teacher = self._teacher_on(images.device)
        with torch.no_grad():
            feats_t, raw_t = teacher.forward_with_features(images)
        if self.cwd > 0:
            feats_s = captured[-1]
            adapters = getattr(net, ADAPTERS, None)
            if adapters is not None:
                feats_s = [a(f) for a, f in zip(adapters, feats_s)]
            terms["cwd"] = cwd_loss(feats_s, feats_t, self.tau) * self.cwd
        box_s, cls_s = flatten_raw(preds, net.reg_max)
        box_t, cls_t = flatten_raw(raw_t, teacher.reg_max)
        weight = teacher_confidence(cls_t)
        if self.kl > 0:
            terms["kl"] = response_kl_loss(cls_s, cls_t, self.class_indices, self.tau, weight) * self.kl
        if self.dfl > 0:
            terms["dfl_kd"] = dfl_kd_loss(box_s, box_t, net.reg_max, self.tau, weight) * self.dfl
        return terms
