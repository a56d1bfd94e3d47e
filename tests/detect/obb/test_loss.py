"""YOLOv8-OBB loss and rotated assignment: per-term and gradient parity with Ultralytics' ``v8OBBLoss``
(including an empty image and 400 targets per image), chunking invariance, and input errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from visiontrain.detect.loss import DetectionLossInputError
from visiontrain.detect.obb.loss import OBBLoss

NC = 5
STRIDES = (8, 16, 32)
R = 64


def random_batch(per_image: list[int], h: int, w: int, seed: int, nc: int = NC):
    """Random head maps ``[B, 64 + nc + 1, h/s, w/s]`` and targets in Ultralytics' normalised xywhr form,
    including thin boxes, tiny ones (widened or dropped), clusters and angles across the whole range."""
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(len(per_image), R + nc + 1, -(-h // s), -(-w // s), generator=g) for s in STRIDES]
    rows = []
    for b, n in enumerate(per_image):
        if n == 0:
            continue
        xy = torch.rand(n, 2, generator=g) * 0.9 + 0.05
        xy[: n // 4] = xy[0] + torch.randn(n // 4, 2, generator=g) * 0.03
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.004
        wh[n // 4: n // 3, 1] *= 0.2  # thin
        angle = (torch.rand(n, 1, generator=g) - 0.25) * math.pi
        cls = torch.randint(0, nc, (n, 1), generator=g).float()
        rows.append(torch.cat((torch.full((n, 1), float(b)), cls, xy, wh, angle), 1))
    return maps, torch.cat(rows) if rows else torch.zeros(0, 7)


def to_pixels(targets_norm: torch.Tensor, h: int, w: int) -> torch.Tensor:
    xywh = targets_norm[:, 2:6] * torch.tensor([w, h, w, h], dtype=torch.float32)
    return torch.cat((targets_norm[:, :2], xywh, targets_norm[:, 6:]), 1)


def ultralytics_terms(maps, targets_norm, nc: int = NC):
    """Ultralytics' per-term loss (box, cls, dfl, angle), before the batch-size factor, and its loss to backprop."""
    from ultralytics.utils.loss import v8OBBLoss

    class StandIn(nn.Module):  # what v8OBBLoss reads from an OBBModel
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))
            self.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, angle=1.0)
            self.model = [SimpleNamespace(stride=torch.tensor([8.0, 16.0, 32.0]), nc=nc, reg_max=16)]

    criterion = v8OBBLoss(StandIn())
    assign, captured = criterion.assigner, []
    criterion.assigner = lambda *a, **k: captured.append(assign(*a, **k)) or captured[-1]
    flat = torch.cat([m.flatten(2) for m in maps], 2)
    preds = {"boxes": flat[:, :R], "scores": flat[:, R:R + nc],
             "angle": (flat[:, R + nc:].sigmoid() - 0.25) * math.pi, "feats": maps}
    batch = {"batch_idx": targets_norm[:, 0], "cls": targets_norm[:, 1:2], "bboxes": targets_norm[:, 2:7]}
    total, terms = criterion.loss(preds, batch)
    return total, torch.stack(list(terms.values())), captured[0]


CASES = {
    "normal": ([6, 3, 9, 1], 320, 320, 0),
    "empty_image": ([5, 0, 4], 256, 384, 1),
    "all_empty": ([0, 0], 256, 256, 2),
    "400_per_image": ([400, 400], 320, 320, 3),
}


@pytest.mark.parametrize(("per_image", "h", "w", "seed"), [pytest.param(*c, id=k) for k, c in CASES.items()])
def test_terms_and_gradients_match_ultralytics(per_image, h, w, seed):
    pytest.importorskip("ultralytics")
    maps, targets_norm = random_batch(per_image, h, w, seed)
    theirs_maps = [m.clone().requires_grad_(True) for m in maps]
    total, expected, (_, _, their_scores, their_fg, their_idx) = ultralytics_terms(theirs_maps, targets_norm)
    ours_maps = [m.clone().requires_grad_(True) for m in maps]
    terms, assignment = OBBLoss(NC).loss_and_assignment(ours_maps, to_pixels(targets_norm, h, w), (h, w))
    got = torch.stack([terms[k] for k in ("box", "cls", "dfl", "angle")])
    # the same assignment: positives, their gts and soft targets
    assert torch.equal(assignment.fg_mask, their_fg)
    assert torch.equal(assignment.target_gt_idx[their_fg], their_idx[their_fg])
    torch.testing.assert_close(assignment.target_scores, their_scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-7)
    if sum(per_image):
        assert int(assignment.fg_mask.sum()) > 0 and float(got[0].detach()) > 0
    # gradients: Ultralytics back-propagates terms * batch size
    total.sum().backward()
    (got.sum() * len(per_image)).backward()
    for a, b in zip(ours_maps, theirs_maps):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_assignment_is_chunking_invariant():
    maps, targets_norm = random_batch([60, 30], 256, 256, 5)
    t = to_pixels(targets_norm, 256, 256)
    big = OBBLoss(NC).loss_and_assignment(maps, t, 256)
    small = OBBLoss(NC, max_pairs=1).loss_and_assignment(maps, t, 256)  # one gt per chunk
    for k in big[0]:
        assert torch.equal(big[0][k], small[0][k])
    assert torch.equal(big[1].fg_mask, small[1].fg_mask)
    assert torch.equal(big[1].target_gt_idx, small[1].target_gt_idx)


def test_bad_inputs_are_named():
    maps, _ = random_batch([1], 64, 64, 0)
    loss = OBBLoss(NC)
    with pytest.raises(DetectionLossInputError, match=r"\[N, 7\]"):
        loss(maps, torch.zeros(1, 6), 64)
    with pytest.raises(DetectionLossInputError, match="class 9"):
        loss(maps, torch.tensor([[0, 9, 10, 10, 5, 5, 0.0]]), 64)
    with pytest.raises(DetectionLossInputError, match="nc \\+ 1 channels"):
        loss([m[:, :-1] for m in maps], torch.zeros(0, 7), 64)
