"""Growing a trained detector's class branch (10 → 20 classes) without changing its base predictions: one
wider branch (:func:`expand_classes`) or the teacher's branch plus a new one (:func:`split_classes`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from visiontrain.detect.distill.errors import DistillError
from visiontrain.detect.model import SplitClassBranch, YOLOv8


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


def _check_names(model: YOLOv8, new_names: list[str], old_names: list[str], what: str) -> None:
    if getattr(model, "fused", False):
        raise DistillError(f"{what}: the model is fused (inference-only); do it before fuse()")
    if len(old_names) != model.head.nc:
        raise DistillError(f"{what}: old_names has {len(old_names)} classes but the model has nc={model.head.nc}")
    for label, names in (("old_names", old_names), ("new_names", new_names)):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DistillError(f"{what}: {label} repeats {dup}")
    lost = [n for n in old_names if n not in new_names]
    if lost:
        raise DistillError(f"{what}: the model's classes {lost} are not in new_names {new_names}; "
                           "the new class list must contain every old class")


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
    _check_names(model, new_names, old_names, "expand_classes")
    head = model.head
    if head.class_parts:
        raise DistillError("expand_classes: the class branch is in parts (a distill.frozen_base student); add "
                           "classes to it with split_classes (distill.frozen_base=true)")
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


@torch.no_grad()
def split_classes(model: YOLOv8, new_names: Sequence[str], old_names: Sequence[str]) -> YOLOv8:
    """Add a class branch for the classes of ``new_names`` not in ``old_names`` (in place; returns ``model``).

    Each level's class branch becomes a :class:`~visiontrain.detect.model.SplitClassBranch` whose parts are the
    model's own branch, untouched (or, when it is split already, its parts: a later class-incremental step), and
    a new part for the novel classes. The new part's two hidden convolutions are copied from the first part
    (a warm start: features already tuned to these objects), its output convolution is fresh, with the head's
    prior bias for the new ``nc``. Rows follow ``new_names`` (matched by name). Backbone, neck and box branch
    are shared, so as long as they and the old parts stay frozen (``distill.frozen_base=true``) the model
    gives exactly the old model's boxes and scores for its classes.
    """
    old_names, new_names = [str(n) for n in old_names], [str(n) for n in new_names]
    _check_names(model, new_names, old_names, "split_classes")
    head = model.head
    novel = [n for n in new_names if n not in old_names]
    if not novel:
        raise DistillError(f"split_classes: new_names {new_names} add no class to {old_names}; nothing to learn")
    ref = head.cv2[0][-1].weight
    levels = []
    for i, (c, old) in enumerate(zip(head.channels, head.cv3)):
        if isinstance(old, SplitClassBranch):  # its parts in cat order, and the old name of each cat position
            parts, order = list(old.parts), [old_names[r] for r in old.perm.argsort().tolist()]
        else:
            parts, order = [old], old_names
        branch = head._class_level(c, len(novel)).to(device=ref.device, dtype=ref.dtype)
        for k in (0, 1):
            if branch[k].conv.weight.shape == parts[0][k].conv.weight.shape:
                branch[k].load_state_dict(parts[0][k].state_dict())
                branch[k].bn.eps = parts[0][k].bn.eps
        branch[2].bias.fill_(math.log(5 / len(new_names) / (640 / head.strides[i]) ** 2))
        levels.append(SplitClassBranch([*parts, branch], [new_names.index(n) for n in order + novel]))
    head.cv3 = torch.nn.ModuleList(levels)
    head.nc = len(new_names)
    model.names = list(new_names)
    return model
