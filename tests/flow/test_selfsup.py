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


@pytest.mark.slow
def test_flow_stays_bounded_under_self_supervision_on_a_known_translation() -> None:
    """Issue 18's divergence, CPU-sized: a PWC learns a (3, 2) px translation for 120 steps, then trains 200
    more with self-supervision at full weight. Before the fix (teacher's own occlusion mask, normalised by
    its kept count) the same run's flow grew from 3.7 to 49 px within 80 steps and the mask emptied; now
    the flow stays at the translation."""
    from visiontrain.flow.models.pwc import PWCFlow
    from visiontrain.flow.unsupervised import UnsupervisedFlowObjective

    from .test_unsupervised import textured_pair

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pairs = [textured_pair((3, 2), seed=s) for s in range(4)]
    truth = torch.tensor([3.0, 2.0]).view(1, 2, 1, 1)
    model = PWCFlow(channel_multiplier=0.25)
    objective = UnsupervisedFlowObjective(selfsup_start_step=120, selfsup_ramp_steps=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    largest, shares = 0.0, []
    try:
        for step in range(320):
            image1, image2 = pairs[step % 4]
            terms = objective(model, image1, image2, step)
            optimizer.zero_grad()
            sum(v for k, v in terms.items() if not k.startswith("stat/")).backward()
            optimizer.step()
            if step >= 120:
                shares.append(float(terms["stat/mask_kept"]))
                if step % 20 == 0:
                    with torch.no_grad():
                        flow = model(image1, image2, backward=False)["flow_fw"]
                    largest = max(largest, flow.norm(dim=1).max().item())
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        flow = model(*pairs[0], backward=False)["flow_fw"]
    epe = (flow - truth)[..., 8:-8, 8:-8].norm(dim=1).mean().item()
    assert largest < 6.0, f"flow grew to {largest:.1f} px (true motion 3.6 px)"
    assert epe < 1.0 and min(shares) > 0.5, (epe, min(shares))
