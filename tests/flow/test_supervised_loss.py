from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontrain.flow.losses import sequence_loss


def _reference(preds, gt, valid, gamma, max_flow):
    """float64, loop-by-loop: sum_i gamma^(N-1-i) * mean over valid pixels of (|du| + |dv|) / 2."""
    preds = [p.double().numpy() for p in preds]
    gt, valid = gt.double().numpy(), valid.numpy()
    mask = valid & (np.sqrt((gt ** 2).sum(1)) < max_flow)
    total = 0.0
    n = len(preds)
    for i, p in enumerate(preds):
        diffs = []
        for b in range(gt.shape[0]):
            for y, x in zip(*np.nonzero(mask[b])):
                diffs.append((abs(p[b, 0, y, x] - gt[b, 0, y, x]) + abs(p[b, 1, y, x] - gt[b, 1, y, x])) / 2)
        total += gamma ** (n - 1 - i) * (np.mean(diffs) if diffs else 0.0)
    return total


def _torchvision_reference(preds, gt, valid, gamma, max_flow):
    """The formula of torchvision's references/optical_flow/train.py (divides by all pixels)."""
    valid = valid & (torch.sum(gt ** 2, dim=1).sqrt() < max_flow)
    stacked = torch.stack(preds).double()
    abs_diff = ((stacked - gt.double()).abs() * valid[:, None].double()).mean(dim=(1, 2, 3, 4))
    weights = gamma ** torch.arange(len(preds) - 1, -1, -1, dtype=torch.float64)
    return float((abs_diff * weights).sum())


def _data(seed=0, b=2, h=9, w=11, n=4, invalid=0.3):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randn(b, 2, h, w, generator=g) * 30
    gt[0, :, 0, 0] = torch.tensor([500.0, 0.0])  # beyond max_flow
    preds = [gt + torch.randn(b, 2, h, w, generator=g) * (n - i) for i in range(n)]
    valid = torch.rand(b, h, w, generator=g) > invalid
    return preds, gt, valid


@pytest.mark.parametrize("gamma", [0.8, 0.5, 1.0])
def test_matches_float64_reference_with_invalid_pixels(gamma):
    preds, gt, valid = _data()
    got = sequence_loss(preds, gt, valid, gamma=gamma, max_flow=400)
    assert got.dtype == torch.float32
    assert abs(float(got) - _reference(preds, gt, valid, gamma, 400)) < 1e-5 * max(1.0, float(got))


def test_equals_torchvision_reference_on_dense_and_rescales_on_sparse():
    preds, gt, _ = _data(seed=1)
    gt[0, :, 0, 0] = 1.0  # no pixel beyond max_flow
    dense = torch.ones(gt.shape[0], *gt.shape[2:], dtype=torch.bool)
    ours = float(sequence_loss(preds, gt, dense))
    assert abs(ours - _torchvision_reference(preds, gt, dense, 0.8, 400)) < 1e-5 * ours
    sparse = torch.rand(dense.shape, generator=torch.Generator().manual_seed(3)) > 0.6
    ratio = dense.sum().item() / sparse.sum().item()
    ours = float(sequence_loss(preds, gt, sparse))
    assert abs(ours - ratio * _torchvision_reference(preds, gt, sparse, 0.8, 400)) < 1e-5 * ours


def test_unknown_gt_values_do_not_poison_the_loss_and_gradients_flow():
    preds, gt, valid = _data(seed=2)
    gt[~valid[:, None].expand_as(gt)] = 1e10  # what a .flo "unknown" looks like if unmasked
    preds = [p.clone().requires_grad_(True) for p in preds]
    loss = sequence_loss(preds, gt, valid)
    loss.backward()
    assert torch.isfinite(loss)
    for p in preds:
        assert torch.isfinite(p.grad).all()
        assert (p.grad.abs().sum(1)[~valid] == 0).all()  # invalid pixels get no gradient


def test_last_prediction_weighs_most_and_empty_mask_is_zero():
    preds, gt, valid = _data(seed=4, n=3)
    only_first = [preds[0], gt, gt]
    only_last = [gt, gt, preds[0]]
    a, b = float(sequence_loss(only_first, gt, valid)), float(sequence_loss(only_last, gt, valid))
    assert abs(a - 0.8 ** 2 * b) < 1e-5 * b
    p = preds[0].clone().requires_grad_(True)
    zero = sequence_loss([p], gt, torch.zeros_like(valid))
    zero.backward()
    assert zero.item() == 0.0 and (p.grad == 0).all()


def test_bad_shapes_are_named():
    preds, gt, valid = _data()
    with pytest.raises(ValueError, match="prediction 1"):
        sequence_loss([preds[0], preds[1][:, :, :-1]], gt, valid)
    with pytest.raises(ValueError, match="valid must be"):
        sequence_loss(preds, gt, valid[:, :-1])
    with pytest.raises(ValueError, match="gamma"):
        sequence_loss(preds, gt, valid, gamma=1.5)
