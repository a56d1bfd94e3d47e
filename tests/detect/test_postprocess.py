"""Post-processing: the same detections as Ultralytics' ``non_max_suppression`` (the oracle).

Class-aware parity is checked in float64: Ultralytics shifts boxes by ``class * 7680`` px before one
NMS, which in float32 rounds coordinates enough to flip a pair whose IoU is within ~1e-3 of the
threshold (our per-class NMS does not move boxes; see postprocess.py). In float64 that rounding is
~1e-12, so the two must agree exactly. Class-agnostic parity needs no shift and is checked in float32.
"""

from __future__ import annotations

import pytest
import torch

from visiontrain.detect.postprocess import PostprocessInputError, postprocess


def realistic_predictions(
    batch: int = 3, nc: int = 20, anchors: int = 8400, objects: int = 25, seed: int = 0, dtype=torch.float32
) -> torch.Tensor:
    """``[B, 4 + nc, A]`` like a trained head's output: clusters of jittered boxes around objects, the
    object's class scoring high, a low background on every class."""
    g = torch.Generator().manual_seed(seed)
    preds = torch.zeros(batch, 4 + nc, anchors, dtype=torch.float64)
    for b in range(batch):
        centre = torch.rand(objects, 2, generator=g, dtype=torch.float64) * 600 + 20
        size = torch.rand(objects, 2, generator=g, dtype=torch.float64) * 150 + 8
        label = torch.randint(0, nc, (objects,), generator=g)
        owner = torch.randint(0, objects, (anchors,), generator=g)
        jitter = torch.randn(anchors, 4, generator=g, dtype=torch.float64) * size[owner].repeat(1, 2) * 0.05
        preds[b, :2] = (centre[owner] + jitter[:, :2]).T
        preds[b, 2:4] = (size[owner] + jitter[:, 2:]).abs().T + 1
        logits = torch.randn(anchors, nc, generator=g, dtype=torch.float64) * 1.5 - 6.5
        logits[torch.arange(anchors), label[owner]] += (
            torch.rand(anchors, generator=g, dtype=torch.float64) * 7
        )
        preds[b, 4:] = logits.sigmoid().T
    return preds.to(dtype)


def ultralytics_nms(preds, **kwargs):
    from ultralytics.utils.nms import non_max_suppression

    return non_max_suppression(preds.clone(), **kwargs)


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"image {i}: {a.shape} vs {b.shape}"
        assert torch.equal(a, b.to(a.dtype)), f"image {i}: different detections"


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize(
    ("agnostic", "dtype"), [(True, torch.float32), (False, torch.float64), (True, torch.float64)]
)
def test_matches_ultralytics(agnostic, dtype, multi_label):
    pytest.importorskip("ultralytics")
    preds = realistic_predictions(seed=1, dtype=dtype)
    kwargs = dict(agnostic=agnostic, multi_label=multi_label, max_det=300)
    ours = postprocess(preds, conf=0.25, iou=0.7, **kwargs)
    theirs = ultralytics_nms(preds, conf_thres=0.25, iou_thres=0.7, **kwargs)
    assert_same(ours, theirs)
    assert all(0 < len(d) for d in ours)
    assert sum(len(d) for d in ours) < 3 * 300  # NMS did the work, not only the max_det cap


def test_thresholds_caps_and_class_filter_match_ultralytics():
    pytest.importorskip("ultralytics")
    preds = realistic_predictions(batch=2, seed=2, dtype=torch.float64)
    for kwargs in (
        dict(conf=0.6, iou=0.5),
        dict(conf=0.1, iou=0.7, max_det=17),
        dict(conf=0.25, iou=0.7, max_nms=200),
        dict(conf=0.25, iou=0.45, classes=[3, 7, 11]),
    ):
        ours = postprocess(preds, **kwargs)
        renamed = {{"conf": "conf_thres", "iou": "iou_thres"}.get(k, k): v for k, v in kwargs.items()}
        theirs = ultralytics_nms(preds, **renamed)
        assert_same(ours, theirs)
    filtered = postprocess(preds, classes=[3, 7, 11])
    assert all(set(d[:, 5].long().tolist()) <= {3, 7, 11} for d in filtered)
    assert all(len(d) <= 17 for d in postprocess(preds, conf=0.1, max_det=17))


def test_output_format_sorted_and_thresholded():
    preds = realistic_predictions(batch=2, seed=3)
    for d in postprocess(preds, conf=0.3):
        assert d.shape[1] == 6 and d.dtype == preds.dtype
        assert (d[:, 4] > 0.3).all()
        assert (d[:-1, 4] >= d[1:, 4]).all()
        assert (d[:, 2] >= d[:, 0]).all() and (d[:, 3] >= d[:, 1]).all()
    empty = postprocess(torch.zeros(2, 24, 100))
    assert [tuple(d.shape) for d in empty] == [(0, 6), (0, 6)]


def test_bad_input_is_named():
    with pytest.raises(PostprocessInputError, match=r"predictions \[B, 4 \+ nc, A\]"):
        postprocess(torch.zeros(24, 100))
    with pytest.raises(PostprocessInputError, match="conf"):
        postprocess(torch.zeros(1, 24, 100), conf=1.5)


def test_float32_class_aware_nms_keeps_what_exact_arithmetic_keeps():
    """Float32 class-aware NMS selects the same detections as the same predictions in float64 (the
    class shift Ultralytics uses would not: it differs on some of these images)."""
    for seed in range(4):
        preds = realistic_predictions(seed=seed)
        exact = postprocess(preds.double())
        for ours, ref in zip(postprocess(preds), exact):
            assert torch.equal(ours[:, 4:].double(), ref[:, 4:])  # same scores and classes, same order
            torch.testing.assert_close(ours[:, :4].double(), ref[:, :4], rtol=1e-6, atol=1e-4)
