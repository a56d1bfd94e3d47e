"""Self-supervision of UFlow / SMURF (Jonschkowski et al. 2020, Stone et al. 2021; after DDFlow / SelFlow).

The network's own prediction on the full image pair (the *teacher*, no gradient) supervises its
prediction on a harder input (the *student*): a central crop of both images, resized back to the
original size, so pixels near the crop border lose context and objects look bigger. The student's
flow is pulled towards the teacher's flow, cropped and resized the same way (vectors x the zoom)::

    loss = mean_pixels(mask * rho(teacher - student)),   rho(x) = (|x| + 0.01)^0.4 summed over u, v
    mask = c_teacher * (1 - c_student),   c = exp(-|fw + warp(bw, fw)|^2 / (sigma^2 (H^2 + W^2))) * in_frame

with ``sigma`` 0.003 for the teacher and 0.03 for the student (UFlow's and SMURF's code, ``gaussian``):
the student learns only where the teacher is forward-backward consistent and in frame *and* the
student is not (yet): near the crop border, where its matches left the crop, and where it is wrong.
Paper-code defaults: weight 0.6, switched on after 500k of 1M steps and ramped up linearly over 100k
steps, 64 pixels removed on each side of 640 x 640 images (a fraction here, 0.1 of the height and width).

Why not the simpler mask this module used before (the teacher's own occlusion and in-bounds mask,
normalised by its kept count): it diverged (issue 18). It teaches *every* trusted pixel the teacher's
flow x 1.25 (the crop zoom), also where the student already agrees with itself, and a network that
cannot tell the zoomed crop from the original (random textures carry no scale cue) carries what it
learns on the crop over to the full image: the next teacher predicts more, and so on; the census
term pins the flow only within its capture range of a few pixels. Measured on a (3, 2) px
translation (``tests/flow/test_selfsup.py``, PWC x0.25): the flow grew from 3.7 to 49 px within 80
steps of self-supervision and the mask emptied; with this mask it stays at 3.6 px over 200 steps.
Normalising by all pixels also keeps a shrinking mask from amplifying the term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from visiontrain.flow.deterministic import resize_bilinear
from visiontrain.flow.losses.census import robust_abs
from visiontrain.flow.warp import resize_flow, warp, warp_valid_mask

SELFSUP_WEIGHT = 0.6
SELFSUP_START_STEP = 500_000
SELFSUP_RAMP_STEPS = 100_000
SELFSUP_CROP_FRACTION = 0.1
SIGMA_TEACHER = 0.003  # SMURF's fb_sigma_teacher / fb_sigma_student, fractions of the image diagonal
SIGMA_STUDENT = 0.03


def selfsup_weight_at(step: int, weight: float, start_step: int, ramp_steps: int) -> float:
    """Effective weight at ``step``: 0 before ``start_step``, then a linear ramp over ``ramp_steps``
    (``weight`` right away when ``ramp_steps`` is 0)."""
    if weight == 0 or step < start_step:
        return 0.0
    if ramp_steps <= 0:
        return float(weight)
    return float(weight) * min(1.0, (step - start_step) / ramp_steps)


def central_crop_box(height: int, width: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the central crop that removes ``crop_fraction`` of the height
    (and width) on each side, at least one pixel. ``crop_fraction`` must be in ``(0, 0.5)``."""
    if not 0.0 < crop_fraction < 0.5:
        raise ValueError(f"selfsup crop fraction must be in (0, 0.5), got {crop_fraction}")
    dy = max(1, round(height * crop_fraction))
    dx = max(1, round(width * crop_fraction))
    if height - 2 * dy < 2 or width - 2 * dx < 2:
        raise ValueError(f"selfsup crop fraction {crop_fraction} leaves nothing of a {height}×{width} (H×W) image")
    return dy, height - dy, dx, width - dx


def crop_resize(tensor: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Crop ``[B, C, H, W]`` to ``box`` and bilinearly resize back to ``H x W`` (values unchanged)."""
    top, bottom, left, right = box
    size = tuple(tensor.shape[-2:])
    return resize_bilinear(tensor[..., top:bottom, left:right], size, align_corners=False)


def crop_resize_flow(flow: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Crop ``flow [B, 2, H, W]`` to ``box`` and resize back to ``H x W``, scaling the vectors with it."""
    top, bottom, left, right = box
    return resize_flow(flow[..., top:bottom, left:right], tuple(flow.shape[-2:]))


def fb_consistency(flow_fw: torch.Tensor, flow_bw: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soft forward-backward consistency ``exp(-|fw + warp(bw, fw)|^2 / (sigma^2 (H^2 + W^2)))`` times the
    in-frame mask of ``fw``: ``[B, 2, H, W] x 2 -> [B, 1, H, W]`` in [0, 1], detached (SMURF's ``gaussian``)."""
    flow_fw, flow_bw = flow_fw.detach(), flow_bw.detach()
    height, width = flow_fw.shape[-2:]
    sq_diff = ((flow_fw + warp(flow_bw, flow_fw)) ** 2).sum(dim=1, keepdim=True)
    return torch.exp(-sq_diff / (sigma**2 * (height**2 + width**2))) * warp_valid_mask(flow_fw)


def selfsup_loss(teacher_flow: torch.Tensor, student_flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean(mask * (|t - s| + 0.01)^0.4)`` over every pixel (not only the masked ones); flows ``[B, 2, H, W]``,
    ``mask [B, 1, H, W]``. Teacher and mask are detached: only the student learns."""
    error = robust_abs(teacher_flow.detach() - student_flow).sum(dim=1, keepdim=True)
    return (error * mask.detach()).mean()


def self_supervision(
    model: Callable[..., dict],
    image1: torch.Tensor,
    image2: torch.Tensor,
    teacher_fw: torch.Tensor,
    teacher_bw: torch.Tensor,
    crop_fraction: float = SELFSUP_CROP_FRACTION,
    gamma: float = 0.8,
) -> torch.Tensor:
    """Bidirectional self-supervision loss (mean of forward and backward), a scalar.

    ``image1, image2 [B, 3, H, W]``: the full images the teacher saw; ``teacher_fw, teacher_bw
    [B, 2, H, W]``: its full-resolution flows (detached here). The student is ``model`` on the
    cropped-resized pair; a model that returns ``flow_fw_sequence`` (RAFT) has every iteration taught
    by the teacher's final flow, weighted ``gamma^(N-1-i)``. Mask (SMURF): teacher consistent and in
    frame, student not (yet) both; the loss is averaged over all pixels.
    """
    teacher_fw, teacher_bw = teacher_fw.detach(), teacher_bw.detach()
    box = central_crop_box(image1.shape[-2], image1.shape[-1], crop_fraction)
    trust_fw = crop_resize(fb_consistency(teacher_fw, teacher_bw, SIGMA_TEACHER), box)
    trust_bw = crop_resize(fb_consistency(teacher_bw, teacher_fw, SIGMA_TEACHER), box)
    target_fw, target_bw = crop_resize_flow(teacher_fw, box), crop_resize_flow(teacher_bw, box)
    student = model(crop_resize(image1, box), crop_resize(image2, box))
    sequence_fw = student.get("flow_fw_sequence") or [student["flow_fw"]]
    sequence_bw = student.get("flow_bw_sequence") or [student["flow_bw"]]
    loss = teacher_fw.new_zeros(())
    for i, (student_fw, student_bw) in enumerate(zip(sequence_fw, sequence_bw)):
        mask_fw = trust_fw * (1.0 - fb_consistency(student_fw, student_bw, SIGMA_STUDENT))
        mask_bw = trust_bw * (1.0 - fb_consistency(student_bw, student_fw, SIGMA_STUDENT))
        both = (selfsup_loss(target_fw, student_fw, mask_fw) + selfsup_loss(target_bw, student_bw, mask_bw)) / 2.0
        loss = loss + gamma ** (len(sequence_fw) - 1 - i) * both
    return loss
