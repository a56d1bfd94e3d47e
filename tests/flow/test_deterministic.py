"""The reproducible bilinear ops used for GPU training under deterministic algorithms: same values and
gradients as torch's ``grid_sample`` / ``interpolate``, and a RAFT that runs through them computes what
torchvision's forward computes. (That they are bit-reproducible is a GPU property: gpu_check's resume row.)"""

import pytest
import torch
import torch.nn.functional as F

from visiontrain.flow import deterministic
from visiontrain.flow.deterministic import gather_bilinear, matmul_resize, needs_deterministic
from visiontrain.flow.models import raft as raft_module
from visiontrain.flow.models.raft import build_raft, raft_forward


@pytest.mark.parametrize("align_corners", [True, False])
def test_gather_bilinear_equals_grid_sample_in_values_and_gradients(align_corners):
    torch.manual_seed(0)
    image = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(2, 5, 6, 2, dtype=torch.float64) * 2.6 - 1.3)  # a third of the samples fall outside
    grid[0, 0, 0] = torch.tensor([1.0, -1.0])  # exactly on the corner
    grid.requires_grad_(True)
    ours, theirs = gather_bilinear(image, grid, align_corners), F.grid_sample(image, grid, align_corners=align_corners)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    weights = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), [image, grid]),
                    torch.autograd.grad((theirs * weights).sum(), [image, grid])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gather_bilinear_turns_nonfinite_positions_into_nan_like_grid_sample():
    image = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    grid = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    grid[0, 0, 1, 0], grid[0, 0, 2, 1] = float("nan"), float("inf")
    torch.testing.assert_close(gather_bilinear(image, grid, True), F.grid_sample(image, grid, align_corners=True),
                               equal_nan=True)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(56, 72), (3, 4), (7, 9), (1, 5), (14, 5)])
def test_matmul_resize_equals_bilinear_interpolate(size, align_corners):
    torch.manual_seed(1)
    x = torch.randn(2, 2, 7, 9, dtype=torch.float64, requires_grad=True)
    ours = matmul_resize(x, size, align_corners)
    theirs = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    w = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad((ours * w).sum(), x)[0],
                               torch.autograd.grad((theirs * w).sum(), x)[0], rtol=0, atol=1e-12)


def test_only_gpu_training_under_deterministic_algorithms_takes_the_reproducible_path():
    x = torch.ones(2, requires_grad=True)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert not needs_deterministic(x)  # a CPU tensor: torch's ops are already reproducible
        if torch.cuda.is_available():
            y = x.cuda()
            assert needs_deterministic(y)
            with torch.no_grad():
                assert not needs_deterministic(y)
            torch.use_deterministic_algorithms(False)
            assert not needs_deterministic(y)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("name,upsample", [("raft_small", "all"), ("raft_small_convex", "all"),
                                           ("raft_small_convex", "last")])
def test_raft_through_the_reproducible_ops_computes_torchvisions_forward(monkeypatch, name, upsample):
    torch.manual_seed(0)
    model = build_raft(name)
    a, b = torch.rand(2, 1, 3, 128, 136)
    expected = raft_forward(model, a, b, num_flow_updates=3, upsample=upsample)
    grads = torch.autograd.grad(expected[-1].square().mean() + expected[0].abs().mean(), list(model.parameters()),
                                allow_unused=True)
    calls = []

    def forced(*tensors):
        calls.append(len(tensors))
        return True

    monkeypatch.setattr(deterministic, "needs_deterministic", forced)
    monkeypatch.setattr(raft_module, "needs_deterministic", forced)
    spy = []
    monkeypatch.setattr(deterministic, "gather_bilinear",
                        lambda *args: spy.append("gather") or gather_bilinear(*args))
    monkeypatch.setattr(deterministic, "matmul_resize", lambda *args: spy.append("matmul") or matmul_resize(*args))
    got = raft_forward(model, a, b, num_flow_updates=3, upsample=upsample)
    assert calls and "gather" in spy and ("matmul" in spy) == (name == "raft_small" or upsample == "last")
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    got_grads = torch.autograd.grad(got[-1].square().mean() + got[0].abs().mean(), list(model.parameters()),
                                    allow_unused=True)
    for g, e in zip(got_grads, grads):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
