"""Rotated NMS equals Ultralytics' ``non_max_suppression(rotated=True)`` on random inputs (class-aware,
agnostic, multi-label, class filter), and the blocked Fast-NMS equals the dense one."""

from __future__ import annotations

import math

import pytest
import torch

from visiontrain.detect.obb.nms import fast_nms_rotated, postprocess_obb


def random_preds(B: int, nc: int, A: int, seed: int) -> torch.Tensor:
    """Clustered boxes (many overlaps) with random scores and angles: ``[B, 4 + nc + 1, A]``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(B, 2, 12, generator=g) * 300
    pick = torch.randint(0, 12, (B, A), generator=g)
    xy = torch.gather(centres, 2, pick[:, None].expand(B, 2, A)) + torch.randn(B, 2, A, generator=g) * 6
    wh = torch.rand(B, 2, A, generator=g) * 40 + 8
    scores = torch.rand(B, nc, A, generator=g) ** 3
    angle = (torch.rand(B, 1, A, generator=g) - 0.25) * math.pi
    return torch.cat((xy, wh, scores, angle), 1)


@pytest.mark.parametrize("kwargs", [{}, {"agnostic": True}, {"multi_label": True}, {"classes": [0, 2]},
                                    {"iou": 0.3, "conf": 0.1, "max_det": 20}])
def test_equals_ultralytics(kwargs):
    nms = pytest.importorskip("ultralytics.utils.nms")
    preds = random_preds(3, 4, 800, seed=len(str(kwargs)))
    args = {"conf": 0.25, "iou": 0.7, **kwargs}
    theirs = nms.non_max_suppression(preds.clone(), args.pop("conf"), args.pop("iou"), rotated=True,
                                     nc=4, **{k: v for k, v in args.items() if k != "max_det"},
                                     max_det=args.get("max_det", 300))
    ours = postprocess_obb(preds, **{"conf": 0.25, "iou": 0.7, **kwargs})
    for a, b in zip(ours, theirs):
        b = b[:, [0, 1, 2, 3, 6, 4, 5]]  # (x, y, w, h, conf, cls, angle) -> ours
        assert len(a) > 5
        torch.testing.assert_close(a, b)


def test_blocked_equals_dense():
    preds = random_preds(1, 3, 600, seed=9)[0].T
    box, score, cls = torch.cat((preds[:, :4], preds[:, -1:]), 1), preds[:, 4:7].max(1)[0], preds[:, 4:7].argmax(1)
    assert torch.equal(fast_nms_rotated(box, score, 0.5, cls, block=7), fast_nms_rotated(box, score, 0.5, cls))
    assert fast_nms_rotated(box[:0], score[:0], 0.5).numel() == 0
