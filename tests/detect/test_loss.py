"""YOLOv8 detection loss: parity with Ultralytics' ``v8DetectionLoss`` (terms and gradients), a float64
DFL reference, empty batches, and the errors for malformed input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visiontrain.detect.loss import DetectionLoss, DetectionLossInputError, dfl_loss

NC = 20
STRIDES = (8, 16, 32)


def random_batch(per_image: list[int], h: int, w: int, seed: int, nc: int = NC):
    """Random head maps ``[B, 64 + nc, h/s, w/s]`` and targets in Ultralytics' normalised-xywh form."""
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(len(per_image), 64 + nc, -(-h // s), -(-w // s), generator=g) for s in STRIDES]
    rows = []
    for b, n in enumerate(per_image):
        xy = torch.rand(n, 2, generator=g) * 0.9 + 0.05
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.01
        cls = torch.randint(0, nc, (n, 1), generator=g).float()
        rows.append(torch.cat((torch.full((n, 1), float(b)), cls, xy, wh), 1))
    return maps, torch.cat(rows) if rows else torch.zeros(0, 6)


def to_pixel_xyxy(targets_norm: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Our target format, converted with the same float operations Ultralytics applies internally."""
    xywh = targets_norm[:, 2:6] * torch.tensor([w, h, w, h], dtype=torch.float32)
    xyxy = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
    return torch.cat((targets_norm[:, :2], xyxy), 1)


def ultralytics_terms(maps, targets_norm, nc: int = NC):
    """Ultralytics' per-term loss (box, cls, dfl) before its batch-size multiplication, on the same maps."""
    from ultralytics.utils.loss import v8DetectionLoss

    class StandIn(nn.Module):  # what v8DetectionLoss reads from a DetectionModel
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))
            self.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
            self.model = [SimpleNamespace(stride=torch.tensor([8.0, 16.0, 32.0]), nc=nc, reg_max=16)]

    criterion = v8DetectionLoss(StandIn())
    preds = {
        "boxes": torch.cat([m[:, :64].flatten(2) for m in maps], 2),
        "scores": torch.cat([m[:, 64:].flatten(2) for m in maps], 2),
        "feats": maps,
    }
    batch = {"batch_idx": targets_norm[:, 0], "cls": targets_norm[:, 1:2], "bboxes": targets_norm[:, 2:6]}
    total, _ = criterion(preds, batch)  # total = (box, cls, dfl) * batch size
    (fg, *_), terms, _ = criterion.get_assigned_targets_and_loss(preds, batch)
    torch.testing.assert_close(total, terms * maps[0].shape[0])
    return terms, fg


CASES = {
    "normal": ([6, 3, 9, 1], 320, 320, 0),
    "empty_image": ([5, 0, 4], 320, 480, 1),
    "all_empty": ([0, 0], 320, 320, 2),
    "400_per_image": ([400, 400], 320, 320, 3),
}


@pytest.mark.parametrize(
    ("per_image", "h", "w", "seed"),
    [pytest.param(*case, id=name) for name, case in CASES.items()]
    + [pytest.param([400] * 4, 640, 640, 4, id="400_per_image_640", marks=pytest.mark.slow)],
)
def test_terms_match_ultralytics(per_image, h, w, seed):
    pytest.importorskip("ultralytics")
    maps, targets_norm = random_batch(per_image, h, w, seed)
    expected, expected_fg = ultralytics_terms(maps, targets_norm)
    terms, assignment = DetectionLoss(NC).loss_and_assignment(maps, to_pixel_xyxy(targets_norm, h, w), (h, w))
    assert set(terms) == {"box", "cls", "dfl"}
    ours = torch.stack([terms["box"], terms["cls"], terms["dfl"]])
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=0)
    assert torch.equal(assignment.fg_mask, expected_fg)
    if sum(per_image):
        assert terms["box"] > 0 and terms["dfl"] > 0
    else:
        assert terms["box"] == 0 and terms["dfl"] == 0


def test_gradients_match_ultralytics():
    pytest.importorskip("ultralytics")
    per_image, h, w, seed = CASES["normal"]
    maps, targets_norm = random_batch(per_image, h, w, seed)
    theirs = [m.clone().requires_grad_() for m in maps]
    ours = [m.clone().requires_grad_() for m in maps]
    ultralytics_terms(theirs, targets_norm)[0].sum().backward()
    sum(DetectionLoss(NC)(ours, to_pixel_xyxy(targets_norm, h, w), (h, w)).values()).backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-9)
    assert sum(a.grad[:, :64].abs().sum() for a in ours) > 0  # the box branch gets gradient too


def test_autocast_does_not_lower_the_loss_precision():
    per_image, h, w, seed = CASES["normal"]
    maps, targets_norm = random_batch(per_image, h, w, seed)
    targets = to_pixel_xyxy(targets_norm, h, w)
    reference = DetectionLoss(NC)(maps, targets, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = DetectionLoss(NC)(maps, targets, (h, w))
        from_bf16 = DetectionLoss(NC)([m.bfloat16() for m in maps], targets, (h, w))
    for name in reference:
        assert under_autocast[name].dtype == torch.float32
        torch.testing.assert_close(under_autocast[name], reference[name], rtol=1e-6, atol=0)
        assert torch.isfinite(from_bf16[name]) and from_bf16[name].dtype == torch.float32


def test_dfl_matches_float64_reference():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 16, generator=g, dtype=torch.float64)
    target = torch.rand(50, generator=g, dtype=torch.float64) * 16  # includes values past the last bin
    ours = dfl_loss(logits, target)
    ref = []
    for row, t in zip(logits.tolist(), target.tolist()):
        t = min(max(t, 0.0), 15 - 0.01)
        left = int(t)
        log_z = torch.logsumexp(torch.tensor(row, dtype=torch.float64), 0).item()
        ref.append(-((left + 1 - t) * (row[left] - log_z) + (t - left) * (row[left + 1] - log_z)))
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_empty_batch_pushes_every_class_score_down():
    maps, _ = random_batch([0, 0], 256, 256, seed=6)
    maps = [m.requires_grad_() for m in maps]
    terms = DetectionLoss(NC)(maps, torch.zeros(0, 6), 256)
    sum(terms.values()).backward()
    for m in maps:
        assert torch.isfinite(m.grad).all()
        assert (m.grad[:, 64:] > 0).all()  # descending lowers every class logit
        assert (m.grad[:, :64] == 0).all()  # nothing to regress
    # the class term is mean BCE against zeros, normalised by max(sum of targets, 1) = 1
    logits = torch.cat([m.detach()[:, 64:].flatten(2) for m in maps], 2)
    expected = 0.5 * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="sum")
    torch.testing.assert_close(terms["cls"], expected)


def test_assignment_is_returned_for_reuse():
    per_image, h, w, seed = CASES["normal"]
    maps, targets_norm = random_batch(per_image, h, w, seed)
    terms, assignment = DetectionLoss(NC).loss_and_assignment(maps, to_pixel_xyxy(targets_norm, h, w), (h, w))
    A = sum(m.shape[2] * m.shape[3] for m in maps)
    assert assignment.fg_mask.shape == (4, A) and assignment.target_scores.shape == (4, A, NC)
    assert assignment.fg_mask.any()
    # positives carry soft targets of their gt's class only
    fg = assignment.fg_mask
    assert (assignment.target_scores[~fg] == 0).all()
    assert (assignment.target_scores[fg].argmax(-1) == assignment.target_labels[fg]).all()


def test_bad_inputs_name_the_problem():
    loss = DetectionLoss(NC)
    maps, targets_norm = random_batch([2, 1], 320, 320, seed=7)
    targets = to_pixel_xyxy(targets_norm, 320, 320)
    with pytest.raises(DetectionLossInputError, match="list of 3 maps"):
        loss(maps[:2], targets, 320)
    with pytest.raises(
        DetectionLossInputError,
        match=r"prediction map 0 \(stride 8\) has shape .* expected \(2, 84, 40, 40\)",
    ):
        loss([maps[0][:, :80], *maps[1:]], targets, 320)
    with pytest.raises(DetectionLossInputError, match="input size 640x640"):
        loss(maps, targets, 640)
    with pytest.raises(DetectionLossInputError, match=r"targets must be \[N, 6\]"):
        loss(maps, targets[:, :5], 320)
    bad = targets.clone()
    bad[1, 1] = 20
    with pytest.raises(DetectionLossInputError, match="targets row 1: class 20 is outside 0..19"):
        loss(maps, bad, 320)
    bad = targets.clone()
    bad[2, 0] = 2
    with pytest.raises(
        DetectionLossInputError, match="targets row 2: batch index 2 is not an image of this batch"
    ):
        loss(maps, bad, 320)
    bad = targets.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(DetectionLossInputError, match="targets row 0 is not finite"):
        loss(maps, bad, 320)
