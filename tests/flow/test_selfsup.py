"""Self-supervision: ramp, crop geometry (flow rescaled with the crop), loss formula, gradient only to the student."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.flow.selfsup import (
    central_crop_box,
    crop_resize,
    crop_resize_flow,
    fb_consistency,
    self_supervision,
    selfsup_loss,
    selfsup_weight_at,
)


def test_weight_switches_on_after_the_start_step_and_ramps() -> None:
    assert selfsup_weight_at(99, 0.6, start_step=100, ramp_steps=50) == 0.0
    assert selfsup_weight_at(100, 0.6, 100, 50) == 0.0
    assert selfsup_weight_at(125, 0.6, 100, 50) == pytest.approx(0.3)
    assert selfsup_weight_at(10_000, 0.6, 100, 50) == pytest.approx(0.6)
    assert selfsup_weight_at(100, 0.6, 100, 0) == pytest.approx(0.6)
    assert selfsup_weight_at(10_000, 0.0, 100, 0) == 0.0


def test_crop_box_and_bad_fractions() -> None:
    assert central_crop_box(640, 640, 0.1) == (64, 576, 64, 576)  # UFlow's 64 px at 640 x 640
    assert central_crop_box(64, 96, 0.1) == (6, 58, 10, 86)
    with pytest.raises(ValueError, match=r"\(0, 0.5\)"):
        central_crop_box(64, 64, 0.5)


def test_cropped_resized_flow_matches_the_geometry_of_cropped_resized_images() -> None:
    """An affine flow u = a x + b y + c stays affine; at output pixel X the source position is
    x = (X + 0.5) / s - 0.5 + left (align_corners=False) and the vector is scaled by s."""
    height, width = 40, 60
    box = central_crop_box(height, width, 0.1)  # (4, 36, 6, 54)
    top, bottom, left, right = box
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    coeffs = ((0.05, -0.02, 1.5), (0.01, 0.03, -2.0))
    flow = np.stack([a * xs + b * ys + c for a, b, c in coeffs])[None]
    got = crop_resize_flow(torch.from_numpy(flow), box).numpy()[0]
    sx, sy = width / (right - left), height / (bottom - top)
    out_y, out_x = np.mgrid[0:height, 0:width].astype(np.float64)
    src_x = (out_x + 0.5) / sx - 0.5 + left
    src_y = (out_y + 0.5) / sy - 0.5 + top
    for channel, ((a, b, c), scale) in enumerate(zip(coeffs, (sx, sy))):
        expected = (a * src_x + b * src_y + c) * scale
        interior = (slice(2, -2), slice(2, -2))  # bilinear resize clamps at the outermost half pixel
        assert np.abs(got[channel][interior] - expected[interior]).max() < 1e-10
    # Images go through exactly the same resampling (without the vector scaling).
    image = torch.from_numpy(np.stack([xs, ys, xs + ys])[None])
    resized = crop_resize(image, box).numpy()[0]
    assert np.abs(resized[0][interior] - src_x[interior]).max() < 1e-10


def test_selfsup_loss_formula_and_mask() -> None:
    rng = np.random.default_rng(0)
    teacher, student = rng.standard_normal((2, 2, 2, 5, 6))
    mask = (rng.random((2, 1, 5, 6)) > 0.4).astype(np.float64)
    expected = ((np.abs(teacher - student) + 0.01) ** 0.4).sum(1, keepdims=True)
    expected = (expected * mask).mean()  # over every pixel (SMURF), not over the masked ones
    got = selfsup_loss(torch.from_numpy(teacher), torch.from_numpy(student), torch.from_numpy(mask))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert selfsup_loss(torch.from_numpy(teacher), torch.from_numpy(student), torch.zeros(2, 1, 5, 6)).item() == 0


def test_fb_consistency_is_one_for_consistent_flow_and_small_otherwise() -> None:
    flow = torch.zeros(1, 2, 40, 60)
    flow[:, 0], flow[:, 1] = 2.0, -1.0
    consistent = fb_consistency(flow, -flow, 0.003)
    assert consistent[..., 2:-2, 3:-3].min() == pytest.approx(1.0)  # interior (the border points outside)
    assert consistent[..., :, -2:].max() == 0  # out of frame: never trusted
    assert fb_consistency(flow, torch.zeros_like(flow), 0.003).max() < 1e-3


class ConstantFlow(torch.nn.Module):
    """One learnable vector everywhere (forward); backward flow zero unless ``consistent``."""

    def __init__(self, u: float, v: float, consistent: bool = False):
        super().__init__()
        self.vector = torch.nn.Parameter(torch.tensor([u, v], dtype=torch.float64))
        self.consistent = consistent

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> dict:
        field = self.vector.view(1, 2, 1, 1).expand(image1.shape[0], 2, *image1.shape[-2:])
        return {"flow_fw": field, "flow_bw": -field if self.consistent else torch.zeros_like(field)}


def test_self_supervision_is_minimal_for_a_student_that_scales_with_the_crop() -> None:
    height, width = 40, 60
    images = torch.rand(2, 1, 3, height, width, dtype=torch.float64)
    teacher_fw = torch.zeros(1, 2, height, width, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        teacher_fw[:, 0], teacher_fw[:, 1] = 2.0, -1.0
    teacher_bw = -teacher_fw
    top, bottom, left, right = central_crop_box(height, width, 0.1)
    sx, sy = width / (right - left), height / (bottom - top)
    student = ConstantFlow(2.0 * sx, -1.0 * sy)  # inconsistent student: self-supervision applies
    loss = self_supervision(student, images[0], images[1], teacher_fw, teacher_bw, 0.1)
    naive = ConstantFlow(2.0, -1.0)  # forgets that the crop was enlarged
    assert self_supervision(naive, images[0], images[1], teacher_fw, teacher_bw).item() > loss.item() + 0.05
    # A student already consistent and in frame is left alone (SMURF's student mask).
    settled = ConstantFlow(2.0 * sx, -1.0 * sy, consistent=True)
    assert self_supervision(settled, images[0], images[1], teacher_fw, teacher_bw).item() < 0.05 * loss.item()  # border only
    # Only the student learns: the teacher's flow receives no gradient.
    shifted = ConstantFlow(3.0, 0.0)
    grad_student, grad_teacher = torch.autograd.grad(
        self_supervision(shifted, images[0], images[1], teacher_fw, teacher_bw),
        (shifted.vector, teacher_fw), allow_unused=True,
    )
    assert grad_teacher is None and grad_student.abs().sum() > 0
