"""The floor under the photometric mask: an all-occluded flow costs something and is pulled back."""

from __future__ import annotations

import pytest
import torch

from visiontrain.flow.losses.full_frame import FullFrame, warp_full
from visiontrain.flow.losses.mask_floor import (
    fallback_factor,
    floored_mask,
    out_of_frame_distance,
    out_of_frame_loss,
)
from visiontrain.flow.unsupervised import UnsupervisedFlowObjective
from visiontrain.flow.warp import warp

from .test_unsupervised import textured_pair


class ConstantFlow(torch.nn.Module):
    """One learnable vector everywhere (forward) and its negative (backward)."""

    def __init__(self, u: float, v: float):
        super().__init__()
        self.vector = torch.nn.Parameter(torch.tensor([u, v]))

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> dict:
        field = self.vector.view(1, 2, 1, 1).expand(image1.shape[0], 2, *image1.shape[-2:])
        return {"flow_fw": field, "flow_bw": -field}


def _loss(terms: dict) -> torch.Tensor:
    return sum(v for k, v in terms.items() if not k.startswith("stat/"))


def test_fallback_is_zero_for_a_healthy_mask_and_one_for_an_empty_one() -> None:
    share = torch.tensor([0.0, 0.1, 0.2, 0.9])
    assert fallback_factor(share, 0.2).tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert fallback_factor(share, 0.0).tolist() == [0.0] * 4
    mask = torch.zeros(2, 1, 4, 4)
    mask[1] = 1.0
    mask[1, :, 0, 0] = 0.0  # healthy: kept share 15/16
    weight, fallback = floored_mask(mask, 0.2)
    assert torch.equal(weight[1], mask[1]) and torch.equal(weight[0], torch.ones(1, 4, 4))
    assert fallback.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="floor"):
        fallback_factor(share, 1.0)


def test_out_of_frame_distance_in_pixels_and_in_a_larger_frame() -> None:
    flow = torch.zeros(1, 2, 4, 6)
    flow[:, 0] = 10.0  # x + 10 for x in 0..5: 5 px beyond W-1 = 5 at x = 0, 10 px at x = 5
    distance = out_of_frame_distance(flow)[0, 0]
    assert distance[0].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    # the same crop placed at left=2 in a frame 20 wide is inside
    assert out_of_frame_distance(flow, frame=(4, 20), offset=(0, 2)).abs().sum() == 0
    assert out_of_frame_loss(flow, torch.tensor([0.0])) == 0  # healthy mask: no pull


def test_flow_pointing_out_of_the_image_costs_and_is_pulled_back() -> None:
    """The collapse of issue 18: every pixel's flow leaves the image, the mask keeps nothing. Before the
    floor the census loss was exactly 0 with no gradient; now the loss is positive and its gradient
    points the flow back into the image."""
    image1, image2 = textured_pair((3, 2))
    for u, v in ((200.0, 0.0), (-150.0, 90.0)):
        model = ConstantFlow(u, v)
        terms = UnsupervisedFlowObjective(selfsup_weight=0.0)(model, image1, image2, step=0)
        assert terms["stat/mask_kept"] == 0
        assert terms["census"] > 1.0 and terms["out_of_frame"] > 0
        (grad,) = torch.autograd.grad(_loss(terms), model.vector)
        assert grad[0] * u > 0 and (v == 0 or grad[1] * v > 0)  # descent moves (u, v) towards 0
        old = UnsupervisedFlowObjective(selfsup_weight=0.0, mask_floor=0.0, out_of_frame_weight=0.0)
        terms_old = old(model, image1, image2, step=0)
        assert terms_old["census"] == 0  # what the floor prevents
        assert torch.autograd.grad(_loss(terms_old), model.vector)[0].abs().sum() == 0


def test_a_collapsed_flow_leaves_the_all_occluded_state_under_gradient_descent() -> None:
    """From 144 px out of a 64 px image the pull brings the flow back until the mask keeps about the floor's
    share again; from there the masked census has gradient (a real network goes on learning; this
    one-vector model, the hardest case, stops in a census local minimum ~50 px off)."""
    image1, image2 = textured_pair((3, 2))
    model = ConstantFlow(120.0, -80.0)
    objective = UnsupervisedFlowObjective(selfsup_weight=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2.0)
    shares = []
    for step in range(60):
        terms = objective(model, image1, image2, step)
        shares.append(float(terms["stat/mask_kept"]))
        optimizer.zero_grad()
        _loss(terms).backward()
        optimizer.step()
    assert shares[0] == 0 and min(shares[-10:]) > 0.1
    assert model.vector.detach().norm() < 0.5 * torch.tensor([120.0, -80.0]).norm()


def test_a_healthy_mask_leaves_the_objective_as_it_was() -> None:
    image1, image2 = textured_pair((3, 2))
    model = ConstantFlow(2.5, 1.5)
    new = UnsupervisedFlowObjective(selfsup_weight=0.0)(model, image1, image2, 0)
    old = UnsupervisedFlowObjective(selfsup_weight=0.0, mask_floor=0.0, out_of_frame_weight=0.0)(model, image1, image2, 0)
    assert new["stat/mask_kept"] > 0.8 and new["out_of_frame"] == 0
    assert new["census"] == old["census"] and new["smooth2"] == old["smooth2"]


def test_full_image_warping_supervises_flow_that_leaves_the_crop() -> None:
    image1, image2 = textured_pair((3, 2), size=64)
    full = FullFrame(image1, image2, top=8, left=8)
    crop1, crop2 = full.crop(32, 32)
    flow = torch.zeros(1, 2, 32, 32)
    flow[:, 0], flow[:, 1] = 3.0, 2.0
    warped, valid = warp_full(image2, flow, 8, 8)
    assert valid.all()  # every pixel lands inside the full frame
    assert torch.allclose(warped, crop1, atol=1e-5)  # exact match, also where the flow leaves the crop
    assert warp(crop2, flow)[..., -2:, :].abs().max() < crop1[..., -2:, :].abs().max()  # the crop alone lacks them
    objective = UnsupervisedFlowObjective(selfsup_weight=0.0)
    masks = objective.occlusion_masks(flow, -flow, full=full)
    masks_crop = objective.occlusion_masks(flow, -flow)
    assert masks["mask_fw"].mean() > masks_crop["mask_fw"].mean()
