"""The :class:`Distiller`: the teacher, the loss weights and the distillation step of a student run."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from visiontrain.detect.distill.errors import DistillError
from visiontrain.detect.distill.expand import expand_classes, split_classes
from visiontrain.detect.distill.feature import (
    FEATURE_METHODS,
    cwd_loss,
    level_scores,
    make_feature_modules,
    mgd_loss,
    pkd_loss,
    random_masks,
    score_weighted_l2_loss,
)
from visiontrain.detect.distill.pseudo import LABELS_WIN_IOU, label_overlap, teacher_pseudo_labels
from visiontrain.detect.distill.response import dfl_kd_loss, response_kl_loss, teacher_confidence
from visiontrain.detect.model import YOLOv8, flatten_raw
from visiontrain.detect.obb.model import YOLOv8OBB
from visiontrain.detect.weights import ADAPTERS
from visiontrain.engine.checkpoint import unwrap

log = logging.getLogger(__name__)


def is_obb(model: nn.Module) -> bool:
    return isinstance(unwrap(model), YOLOv8OBB)


class Distiller:
    """Teacher, loss weights and the distillation step of a student run (see the package docstring).

    Not an ``nn.Module`` on purpose: the teacher must stay out of the student's module tree (the engine's
    ``model.train()``, optimizer, EMA and checkpoints never see it).

    ``feature`` picks the neck term (:data:`~visiontrain.detect.distill.feature.FEATURE_METHODS`), weighted by
    the weight of the same name (``cwd``, ``l2``, ``mgd``, ``pkd``); ``kl`` and ``dfl`` weight the response
    terms; ``mgd_mask`` is MGD's masked fraction of positions; ``pseudo`` > 0 adds the teacher's detections
    scoring above it to each batch's targets (:mod:`~visiontrain.detect.distill.pseudo`); ``kl_skip_novel``
    drops the KL at every anchor whose *teacher* box overlaps a labelled novel object (IoU above
    :data:`LABELS_WIN_IOU`, the rule pseudo-labels follow too): there the label says the object is new, so the
    teacher's base-class scores are wrong by definition. The teacher has never seen a novel class and calls
    nearly every novel object some base class (148 of 149 on the benchmark's validation set); distilling
    those scores teaches the student the same mistake, and a base class then outscores the novel one at that
    box. The dropped anchors leave the KL's normaliser unchanged (the rest are not weighted up).
    """

    def __init__(self, teacher: YOLOv8, teacher_names: Sequence[str], student_names: Sequence[str],
                 cwd: float = 1.0, kl: float = 1.0, dfl: float = 0.0, tau: float = 1.0,
                 init_student: bool = True, source: str = "teacher", feature: str = "cwd",
                 l2: float = 1.0, mgd: float = 1.0, pkd: float = 1.0, mgd_mask: float = 0.65,
                 pseudo: float = 0.0, kl_skip_novel: bool = False, frozen_base: bool = False,
                 base_negatives: float = 0.0, novel_lr_scale: float = 1.0):
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
        self.novel_indices = [self.student_names.index(n) for n in self.novel_names]
        if feature not in FEATURE_METHODS:
            raise DistillError(f"{source}: feature={feature!r}: use one of {', '.join(FEATURE_METHODS)}")
        weights = {"cwd": cwd, "l2": l2, "mgd": mgd, "pkd": pkd, "kl": kl, "dfl": dfl}
        if min(weights.values()) < 0 or tau <= 0 or not 0 <= mgd_mask < 1 or not 0 <= pseudo < 1:
            raise DistillError(f"distill weights must be >= 0, tau > 0, 0 <= mgd_mask < 1 and 0 <= pseudo < 1 "
                               f"(got {weights}, tau={tau}, mgd_mask={mgd_mask}, pseudo={pseudo})")
        self.feature = feature
        self.feature_weight = 0.0 if feature == "none" else float(weights[feature])
        self.cwd = self.feature_weight if feature == "cwd" else 0.0  # kept for callers reading .cwd
        self.kl, self.dfl, self.tau, self.mgd_mask = float(kl), float(dfl), float(tau), float(mgd_mask)
        self.pseudo = float(pseudo)
        self.kl_skip_novel = bool(kl_skip_novel)
        self.init_student = init_student
        self.source = source
        self.frozen_base = bool(frozen_base)
        self.base_negatives = float(base_negatives)
        self.novel_lr_scale = float(novel_lr_scale)
        if self.base_negatives > 0 and not self.frozen_base:  # the term reads the student's own frozen base rows
            log.debug("%s: base_negatives=%g needs frozen_base=true; off", source, base_negatives)
            self.base_negatives = 0.0
        if self.frozen_base:
            if not self.novel_names:
                raise DistillError(f"{source}: frozen_base=true adds a class branch for new classes, but the student's "
                                   f"classes {self.student_names} are the teacher's; there is nothing to add")
            if not init_student:
                raise DistillError(f"{source}: frozen_base=true starts the student as the teacher itself; drop "
                                   "weights= and distill.init_student=false")
            # the base classes are the teacher's own frozen network: the terms that teach them have nothing to do
            self.feature, self.feature_weight, self.cwd = "none", 0.0, 0.0
            self.kl, self.dfl, self.pseudo, self.kl_skip_novel = 0.0, 0.0, 0.0, False

    def _levels_and_new_part(self) -> tuple[int, int]:
        """Levels of the head, and the index of the part ``frozen_base`` adds to each level's class branch."""
        return len(self.teacher.head.channels), len(self.teacher.head.class_parts) or 1

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter prefixes that stay frozen for ``frozen_base``: everything but the novel class branch."""
        if not self.frozen_base:
            return ()
        angle = ("head.cv4",) if is_obb(self.teacher) else ()
        levels, new = self._levels_and_new_part()
        old = (f"head.cv3.{i}.parts.{k}" for i in range(levels) for k in range(new))
        return ("backbone", "neck", "head.cv2", *angle, *old)

    def is_novel_param(self, name: str) -> bool:
        """Whether the parameter ``name`` belongs to the class branch ``frozen_base`` adds (the one that trains)."""
        levels, new = self._levels_and_new_part()
        return self.frozen_base and any(name.startswith(f"head.cv3.{i}.parts.{new}.") for i in range(levels))

    # ----------------------------------------------------------------------------------------
    def attach(self, model: YOLOv8) -> YOLOv8:
        """Prepare a freshly built student: initialise it from the expanded teacher when both have the
        same scale (and ``init_student``), and add the feature method's student-side modules
        (``distill_adapters``: projectors, MGD generators, or 1×1 adapters when neck widths differ)."""
        t_ch, s_ch = self.teacher.head.channels, model.head.channels
        if is_obb(model) != is_obb(self.teacher):
            kinds = {True: "an oriented-box (OBB) model", False: "a horizontal-box model"}
            raise DistillError(f"{self.source}: the teacher is {kinds[is_obb(self.teacher)]} and the student "
                               f"{kinds[is_obb(model)]}; distil between models of the same kind (model=yolov8?-obb "
                               "for both, or neither)")
        if model.reg_max != self.teacher.reg_max and self.dfl > 0:
            raise DistillError(f"{self.source}: DFL distillation needs equal reg_max (teacher {self.teacher.reg_max}, "
                               f"student {model.reg_max}); set distill.dfl=0")
        if self.frozen_base:
            if model.scale != self.teacher.scale:
                raise DistillError(f"{self.source}: frozen_base=true keeps the teacher's network for the base classes, "
                                   f"so the student must have its scale: model=yolov8{self.teacher.scale}"
                                   f"{'-obb' if is_obb(model) else ''} (got yolov8{model.scale})")
            split = split_classes(copy.deepcopy(self.teacher), self.student_names, self.teacher_names)
            model.head.split_class_branch(split.head.class_parts)
            model.load_state_dict(split.state_dict())
            log.info("frozen_base: the student is the teacher (frozen) plus a class branch for %d novel classes",
                     len(self.novel_names))
        elif self.init_student and model.scale == self.teacher.scale:
            expanded = expand_classes(copy.deepcopy(self.teacher), self.student_names, self.teacher_names)
            model.load_state_dict(expanded.state_dict())
            log.info("student initialised from the teacher with the class branch grown %d → %d classes",
                     len(self.teacher_names), len(self.student_names))
        modules = make_feature_modules(self.feature, s_ch, t_ch) if self.feature_weight > 0 else None
        if modules is not None:
            ref = next(model.parameters())
            model.add_module(ADAPTERS, modules.to(device=ref.device))
        return model

    def _teacher_on(self, device: torch.device) -> YOLOv8:
        if self.teacher.head.cv2[0][-1].weight.device != device:
            self.teacher.to(device)
        if self.teacher.training:  # nothing should flip it, but never run the teacher in train mode
            self.teacher.eval()
        return self.teacher

    def feature_loss(self, feats_s: list[Tensor], feats_t: list[Tensor], cls_t: Tensor,
                     modules: nn.ModuleList | None) -> Tensor:
        """The unweighted neck term of ``self.feature``. ``feats_*``: ``[B, C, H_i, W_i]`` per level;
        ``cls_t``: the teacher's ``[B, nc_t, A]`` class logits (``l2`` weights positions by them)."""
        if self.feature in ("cwd", "pkd"):
            if modules is not None:
                feats_s = [a(f) for a, f in zip(modules, feats_s)]
            return cwd_loss(feats_s, feats_t, self.tau) if self.feature == "cwd" else pkd_loss(feats_s, feats_t)
        if self.feature == "l2":
            scores = level_scores(cls_t, [tuple(f.shape[2:]) for f in feats_t])
            return score_weighted_l2_loss([p(f) for p, f in zip(modules, feats_s)], feats_t, scores)
        return mgd_loss(feats_s, feats_t, modules, random_masks(feats_s, self.mgd_mask))

    def on_novel_labels(self, decoded_t: Tensor, targets: Tensor) -> Tensor:
        """``[B, A]`` True where the teacher's box overlaps a labelled novel object of its image with IoU above
        :data:`LABELS_WIN_IOU`. ``decoded_t``: the teacher's ``[B, 4 + nc_t, A]`` eval output (xywh pixels),
        ``targets``: rows ``(batch_idx, cls, x1, y1, x2, y2)``; for an oriented-box teacher ``[B, 4 + nc_t + 1,
        A]`` (the angle last) and rows ``(batch_idx, cls, cx, cy, w, h, angle)``, compared by ProbIoU."""
        b, _, a = decoded_t.shape
        out = torch.zeros(b, a, dtype=torch.bool, device=decoded_t.device)
        novel = targets[torch.isin(targets[:, 1].long(), torch.as_tensor(self.novel_indices, device=targets.device))]
        if not len(novel):
            return out
        obb = is_obb(self.teacher)
        boxes_t = decoded_t.float().transpose(1, 2)  # [B, A, 4 + nc_t (+ 1)]
        boxes_t = torch.cat((boxes_t[..., :4], boxes_t[..., -1:]), -1) if obb else box_convert(
            boxes_t[..., :4], "cxcywh", "xyxy")
        for i in novel[:, 0].long().unique().tolist():
            gt = novel[novel[:, 0] == i, 2:7 if obb else 6].to(boxes_t)
            out[i] = label_overlap(boxes_t[i], gt, obb).amax(1) > LABELS_WIN_IOU
        return out

    def base_negatives_loss(self, net: nn.Module, preds: list[Tensor], targets: Tensor) -> Tensor:
        """Novel classes off where the base part sees one of its classes: ``Σ_a w_a Σ_c softplus(z_ac) / Σ_a w_a``
        over the novel rows ``c`` (BCE with target 0), ``w_a`` = the base classes' highest probability at
        anchor ``a``, 0 where the anchor's box overlaps a labelled novel object. (frozen_base: the base rows are
        the teacher's own.)"""
        with torch.no_grad():
            decoded = net.head.decode([p.detach() for p in preds]).float()
            rows = torch.as_tensor(self.class_indices, device=decoded.device) + 4
            as_teacher = [decoded[:, :4], decoded.index_select(1, rows)]
            if is_obb(net):
                as_teacher.append(decoded[:, -1:])
            as_teacher = torch.cat(as_teacher, 1)
            w = as_teacher[:, 4:4 + len(self.class_indices)].amax(1) * ~self.on_novel_labels(as_teacher, targets)
        _, cls = flatten_raw(preds, net.reg_max)
        novel = cls.float().index_select(1, torch.as_tensor(self.novel_indices, device=cls.device))
        return (torch.nn.functional.softplus(novel).sum(1) * w).sum() / w.sum().clamp(min=1e-6)

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor, loss: Any) -> dict[str, Tensor]:
        """Detection loss terms of the student (on ``targets`` plus the teacher's pseudo-labels when
        ``pseudo`` > 0) plus the feature term (named after the method: ``cwd``,
        ``l2``, ``mgd`` or ``pkd``), ``kl`` (and ``dfl_kd``), each already weighted.

        ``model`` may be DDP-wrapped: it is only called (training-mode forward, three raw maps); the neck
        outputs are captured with a forward hook on ``unwrap(model).neck``."""
        if self.frozen_base:  # the teacher is inside the student: nothing to distil, no teacher forward
            preds = model(images)
            terms = dict(loss(preds, targets, tuple(images.shape[2:])))
            if self.base_negatives > 0:
                terms["base_neg"] = self.base_negatives_loss(unwrap(model), preds, targets) * self.base_negatives
            return terms
        net = unwrap(model)
        captured: list[list[Tensor]] = []
        handle = net.neck.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            preds = model(images)
        finally:
            handle.remove()
        teacher = self._teacher_on(images.device)
        with torch.no_grad():
            feats_t, raw_t = teacher.forward_with_features(images)
            skip_novel = self.kl_skip_novel and self.kl > 0 and bool(self.novel_indices)
            decoded_t = teacher.head.decode(raw_t) if self.pseudo > 0 or skip_novel else None
            if skip_novel:
                on_novel = self.on_novel_labels(decoded_t, targets)
            if self.pseudo > 0:
                extra = teacher_pseudo_labels(decoded_t, targets, self.class_indices, self.pseudo,
                                              tuple(images.shape[2:]), obb=is_obb(teacher))
                targets = torch.cat((targets, extra.to(targets)))
        terms = dict(loss(preds, targets, tuple(images.shape[2:])))
        if self.pseudo > 0:  # logged as train/stat/pseudo_per_image: how many old objects the teacher labels
            terms["stat/pseudo_per_image"] = torch.tensor(len(extra) / len(images), device=images.device)
        box_s, cls_s = flatten_raw(preds, net.reg_max)
        box_t, cls_t = flatten_raw(raw_t, teacher.reg_max)
        cls_s, cls_t = cls_s[:, :net.nc], cls_t[:, :teacher.nc]  # an OBB head's angle channel follows the classes
        if self.feature_weight > 0:
            modules = getattr(net, ADAPTERS, None)
            terms[self.feature] = self.feature_loss(list(captured[-1]), list(feats_t), cls_t,
                                                    modules) * self.feature_weight
        weight = teacher_confidence(cls_t)
        if self.kl > 0:
            kl_weight = weight * ~on_novel if skip_novel else weight  # the KL only; dfl_kd keeps every anchor
            kl = response_kl_loss(cls_s, cls_t, self.class_indices, self.tau, kl_weight)
            if skip_novel:  # the normaliser without the mask: the remaining anchors are not weighted up
                kl = kl * (kl_weight.sum() / weight.sum().clamp(min=1e-6))
            terms["kl"] = kl * self.kl
        if self.dfl > 0:
            terms["dfl_kd"] = dfl_kd_loss(box_s, box_t, net.reg_max, self.tau, weight) * self.dfl
        return terms
