"""The unsupervised objective: composition of its terms, switches by step, masks, and a short training run."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from visiontrain.flow.losses.census import census_loss
from visiontrain.flow.losses.photometric import ssim_loss
from visiontrain.flow.losses.smoothness import (
    downsample_image,
    smoothness_first_order,
    smoothness_second_order,
)
from visiontrain.flow.models.pwc import PWCFlow
from visiontrain.flow.unsupervised import UnsupervisedFlowObjective, save_mask_png
from visiontrain.flow.warp import warp, warp_valid_mask


def textured_pair(shift: tuple[int, int], size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``image2(x + shift) = image1(x)`` exactly: both are windows of one smooth random texture."""
    rng = np.random.default_rng(seed)
    pad = 16
    texture = cv2.GaussianBlur(rng.random((size + 2 * pad, size + 2 * pad, 3)).astype(np.float32), (0, 0), 1.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    u, v = shift
    image1 = texture[pad : pad + size, pad : pad + size]
    image2 = texture[pad - v : pad - v + size, pad - u : pad - u + size]
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]  # noqa: E731
    return as_t(image1), as_t(image2)


class FixedFlows(torch.nn.Module):
    """Returns given flows (and their 1/4-resolution pyramid level); counts its calls."""

    def __init__(self, fw: torch.Tensor, bw: torch.Tensor, fw_q: torch.Tensor, bw_q: torch.Tensor):
        super().__init__()
        self.fw, self.bw = torch.nn.Parameter(fw), torch.nn.Parameter(bw)
        self.fw_q, self.bw_q = torch.nn.Parameter(fw_q), torch.nn.Parameter(bw_q)
        self.calls = 0

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> dict:
        self.calls += 1
        return {"flow_fw": self.fw, "flow_bw": self.bw, "flow_fw_pyramid": [self.fw_q], "flow_bw_pyramid": [self.bw_q]}


@pytest.fixture
def setup() -> tuple[FixedFlows, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image1, image2 = textured_pair((3, 2))
    fw = torch.zeros(1, 2, 64, 64)
    fw[:, 0], fw[:, 1] = 3.0, 2.0
    fw = fw + 0.5 * torch.randn_like(fw)
    bw = -fw.roll((2, 3), dims=(-2, -1)) + 0.2 * torch.randn_like(fw)
    model = FixedFlows(fw, bw, torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16))
    return model, image1, image2


def test_terms_are_weighted_means_of_both_directions(setup) -> None:
    model, image1, image2 = setup
    objective = UnsupervisedFlowObjective(census_weight=1.5, smooth1_weight=0.7, smooth2_weight=2.0,
                                          ssim_weight=0.3, occlusion="brox", selfsup_weight=0.0)
    terms = objective(model, image1, image2, step=0)
    assert set(terms) == {"census", "smooth1", "smooth2", "ssim", "out_of_frame", "stat/mask_kept"}
    assert terms["out_of_frame"] == 0  # a healthy mask: the floor does nothing
    masks = objective.occlusion_masks(model.fw, model.bw)
    assert masks["occlusion_fw"].sum() > 0 and masks["valid_fw"].sum() < 64 * 64  # both masks matter here
    mask_fw = (1 - masks["occlusion_fw"]) * warp_valid_mask(model.fw)
    mask_bw = (1 - masks["occlusion_bw"]) * warp_valid_mask(model.bw)
    census = (census_loss(image1, warp(image2, model.fw), mask_fw) + census_loss(image2, warp(image1, model.bw), mask_bw)) / 2
    ssim = (ssim_loss(image1, warp(image2, model.fw), mask_fw) + ssim_loss(image2, warp(image1, model.bw), mask_bw)) / 2
    small1, small2 = downsample_image(image1, (16, 16)), downsample_image(image2, (16, 16))
    s1 = (smoothness_first_order(small1, model.fw_q) + smoothness_first_order(small2, model.bw_q)) / 2
    s2 = (smoothness_second_order(small1, model.fw_q) + smoothness_second_order(small2, model.bw_q)) / 2
    torch.testing.assert_close(terms["census"], 1.5 * census)
    torch.testing.assert_close(terms["ssim"], 0.3 * ssim)
    torch.testing.assert_close(terms["smooth1"], 0.7 * s1)
    torch.testing.assert_close(terms["smooth2"], 2.0 * s2)
    # Without a pyramid the full-resolution flow is resized to 1/4 for smoothness.
    no_pyramid = lambda a, b: {"flow_fw": model.fw, "flow_bw": model.bw}  # noqa: E731
    assert objective(no_pyramid, image1, image2, 0)["smooth2"] != terms["smooth2"]


def test_default_weights_are_uflow_code_defaults(setup) -> None:
    model, image1, image2 = setup
    objective = UnsupervisedFlowObjective()
    assert (objective.census_weight, objective.smooth1_weight, objective.smooth2_weight) == (1.0, 0.0, 2.0)
    assert (objective.occlusion, objective.selfsup_weight, objective.selfsup_start_step) == ("wang", 0.6, 500_000)
    assert set(objective(model, image1, image2, step=0)) == {"census", "smooth2", "out_of_frame", "selfsup",
                                                             "stat/mask_kept"}


def test_occlusion_and_selfsup_switch_on_by_step(setup) -> None:
    model, image1, image2 = setup
    objective = UnsupervisedFlowObjective(occlusion="wang", occlusion_start_step=10, selfsup_start_step=20,
                                          selfsup_ramp_steps=0)
    early = objective.occlusion_masks(model.fw, model.bw, step=5)
    late = objective.occlusion_masks(model.fw, model.bw, step=10)
    assert early["occlusion_fw"].sum() == 0 and late["occlusion_fw"].sum() > 0
    model.calls = 0
    terms = objective(model, image1, image2, step=19)
    assert terms["selfsup"].item() == 0.0 and model.calls == 1  # no student pass before the start step
    terms = objective(model, image1, image2, step=20)
    assert terms["selfsup"].item() > 0 and model.calls == 3  # one teacher/photometric pass + the student
    total = sum(v for k, v in terms.items() if not k.startswith("stat/"))
    total.backward()
    assert model.fw.grad is not None and model.fw.grad.abs().sum() > 0


def test_objective_with_pwc_gives_finite_gradients() -> None:
    torch.manual_seed(1)
    model = PWCFlow(channel_multiplier=0.125)
    for layer in [decoder.to_flow for decoder in model.decoders] + [model.refine.net[-1]]:
        torch.nn.init.normal_(layer.weight, std=0.02)  # zero at init; non-zero so every layer gets gradient
    image1, image2 = textured_pair((2, 1))
    objective = UnsupervisedFlowObjective(smooth1_weight=1.0, selfsup_start_step=0, selfsup_ramp_steps=0, ssim_weight=0.1)
    terms = objective(model, image1, image2, step=1)
    assert set(terms) == {"census", "smooth1", "smooth2", "ssim", "selfsup", "out_of_frame", "stat/mask_kept"}
    sum(v for k, v in terms.items() if not k.startswith("stat/")).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="occlusion"):
        UnsupervisedFlowObjective(occlusion="fb")
    with pytest.raises(ValueError, match="smooth2_weight"):
        UnsupervisedFlowObjective(smooth2_weight=-1)
    with pytest.raises(ValueError, match="nothing ties"):
        UnsupervisedFlowObjective(census_weight=0)
    objective = UnsupervisedFlowObjective()
    with pytest.raises(ValueError, match="flow_bw"):
        objective(lambda a, b: {"flow_fw": torch.zeros(1, 2, 8, 8)}, torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), 0)


def test_save_mask_png(tmp_path) -> None:
    mask = torch.zeros(1, 6, 8)
    mask[:, 2:4, 3:] = 1.0
    path = save_mask_png(mask, tmp_path / "occ" / "mask.png")
    read = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert read.shape == (6, 8) and read.dtype == np.uint8
    assert np.array_equal(read, (mask[0].numpy() * 255).astype(np.uint8))


@pytest.mark.slow
def test_short_unsupervised_training_learns_a_known_translation() -> None:
    """Without ground truth, 120 steps (UFlow's Adam lr 1e-4) on one pair bring EPE far below zero flow's."""
    torch.manual_seed(0)
    shift = (3, 2)
    image1, image2 = textured_pair(shift)
    truth = torch.tensor([float(shift[0]), float(shift[1])]).view(1, 2, 1, 1)
    model = PWCFlow(channel_multiplier=0.25)
    objective = UnsupervisedFlowObjective(selfsup_weight=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    zero_epe = truth.norm().item()
    for step in range(120):
        terms = objective(model, image1, image2, step)
        optimizer.zero_grad()
        sum(v for k, v in terms.items() if not k.startswith("stat/")).backward()
        optimizer.step()
    with torch.no_grad():
        flow = model(image1, image2, backward=False)["flow_fw"]
    epe = (flow - truth)[..., 8:-8, 8:-8].norm(dim=1).mean().item()  # interior: borders move out of view
    assert epe < 0.25 * zero_epe, f"EPE {epe:.3f} vs zero flow {zero_epe:.3f}"
