"""Teacher→student distillation for class-incremental detection (learn novel classes, keep the old ones).

The workflow (``base`` = the teacher's classes, ``novel`` = the classes added later)::

    visiontrain train detect base_classes=[A1..A10] out=runs/teacher           # teacher on base classes
    visiontrain split detect data=D base=A1..A10 shots=10 keep_base=false out=D10  # few-shot novel data
    visiontrain train detect data=D10 distill.teacher=runs/teacher/checkpoints/best.pt out=runs/student

The pieces, one file each:

* ``expand.py`` — :func:`expand_classes` grows the class branch of a trained detector (10 → 20 classes): base
  rows are copied by name, novel rows get a fresh weight and the head's prior bias, so the expanded model
  predicts exactly what the teacher predicts for the base classes before any training.
  :func:`split_classes` instead keeps the teacher's class branch as it is and adds a second one for the novel
  classes (:class:`~visiontrain.detect.model.SplitClassBranch`): with ``distill.frozen_base`` (the default for
  a class-incremental student of the teacher's scale) everything but that new branch stays frozen, so the
  student's boxes and base-class scores remain the teacher's exactly, and no distillation term is needed.
* ``feature.py`` — the neck terms, ``distill.feature=cwd|l2|mgd|pkd|none`` (channel-wise distillation,
  score-weighted L2 through a projector, masked generative distillation, Pearson-correlation distillation)
  and their student-side modules (projectors, generators, 1×1 adapters), trained with the student, saved in
  its checkpoints under ``distill_adapters`` and dropped by every loader and by export.
* ``response.py`` — the head terms: ``distill.kl`` (Bernoulli KL on the teacher's class scores) and
  ``distill.dfl`` (KL on the box-side DFL distributions), on anchors weighted by the teacher's confidence.
* ``pseudo.py`` — ``distill.pseudo``: the teacher's confident detections of its classes join each batch's
  labels (the unlabelled old objects stop being background), except where a labelled box already is.
* ``teacher.py`` — :class:`Distiller` (``distill.teacher=PATH``; the task loads the teacher with
  :func:`visiontrain.detect.inference.build_detector`) holds the teacher (eval mode, no gradients, outside the
  student's module tree), initialises a same-scale student from the expanded teacher (unless ``weights=``
  is given, or ``distill.init_student=false``) and adds the weighted terms to the detection loss.

:func:`visiontrain.detect.evaluation.base_novel_metrics` splits mAP into base / novel classes.
"""

from visiontrain.detect.distill.errors import DistillError
from visiontrain.detect.distill.expand import expand_classes, split_classes
from visiontrain.detect.distill.feature import (
    FEATURE_METHODS,
    MGDGenerator,
    Projector,
    cwd_loss,
    level_scores,
    make_feature_modules,
    mgd_loss,
    pkd_loss,
    random_masks,
    score_weighted_l2_loss,
    standardize_channels,
)
from visiontrain.detect.distill.pseudo import teacher_pseudo_labels
from visiontrain.detect.distill.response import dfl_kd_loss, response_kl_loss, teacher_confidence
from visiontrain.detect.distill.teacher import Distiller

__all__ = ["FEATURE_METHODS", "Distiller", "DistillError", "MGDGenerator", "Projector", "cwd_loss", "dfl_kd_loss",
           "expand_classes", "level_scores", "make_feature_modules", "mgd_loss", "pkd_loss", "random_masks",
           "response_kl_loss", "score_weighted_l2_loss", "split_classes", "standardize_channels", "teacher_confidence",
           "teacher_pseudo_labels"]
