"""Task-aligned assigner: equal to Ultralytics' ``TaskAlignedAssigner`` (the oracle), chunking-invariant."""

from __future__ import annotations

import pytest
import torch

from visiontrain.detect.assigner import AssignerInputError, Assignment, TaskAlignedAssigner
from visiontrain.detect.boxes import make_anchors

STRIDES = (8, 16, 32)


def shapes_for(h: int, w: int) -> list[tuple[int, int]]:
    return [(-(-h // s), -(-w // s)) for s in STRIDES]


def random_problem(per_image: list[int], h: int, w: int, nc: int, seed: int):
    """Predictions scattered around the gts (so many CIoUs are positive), with overlapping gt clusters,
    tiny gts (widened by the assigner), gts touching the top-left corner (where Ultralytics' top-k
    breaks zero-metric ties among the first anchors), gts partly outside the image and duplicates."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes_for(h, w)
    points, stride = make_anchors(shapes, STRIDES)
    anchors_px = points * stride
    A, B = len(points), len(per_image)
    rows = []
    for b, n in enumerate(per_image):
        if n == 0:
            continue
        centre = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        centre[: n // 4] = (
            centre[0] + torch.randn(n // 4, 2, generator=g) * 10
        )  # a cluster of overlapping gts
        size = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.4 + 2
        size[n // 4 : n // 2] = torch.rand(n // 2 - n // 4, 2, generator=g) * 14 + 1  # tiny: widened to 16
        boxes = torch.cat((centre - size / 2, centre + size / 2), 1)
        if n >= 3:
            boxes[-1] = torch.tensor([0.0, 0.0, 30.0, 6.0])  # top-left strip over the first anchors
            boxes[-2] = torch.tensor([-20.0, -5.0, 50.0, 25.0])  # partly outside
        if n >= 5:
            boxes[-3] = boxes[-4]  # duplicate gt
        cls = torch.randint(0, nc, (n,), generator=g)
        rows.append(torch.cat((torch.full((n, 1), float(b)), cls[:, None].float(), boxes), 1))
    targets = torch.cat(rows) if rows else torch.zeros(0, 6)

    scores = torch.rand(B, A, nc, generator=g) ** 3
    owner = torch.randint(0, max(len(targets), 1), (B, A), generator=g)
    near = targets[owner, 2:6] if len(targets) else torch.zeros(B, A, 4)
    jitter = torch.randn(B, A, 4, generator=g) * 12
    random_boxes = (
        anchors_px.repeat(1, 2) + torch.tensor([-1.0, -1.0, 1.0, 1.0]) * torch.rand(B, A, 1, generator=g) * 80
    )
    use_near = torch.rand(B, A, 1, generator=g) < 0.6
    pd_boxes = torch.where(use_near, near + jitter, random_boxes)
    pd_boxes = torch.cat((pd_boxes[..., :2], torch.maximum(pd_boxes[..., 2:], pd_boxes[..., :2] + 0.5)), -1)
    return shapes, anchors_px, scores, pd_boxes, targets


def ultralytics_assign(shapes, anchors_px, scores, pd_boxes, targets, nc):
    from ultralytics.utils.tal import TaskAlignedAssigner as UltralyticsAssigner

    B = scores.shape[0]
    counts = [int((targets[:, 0] == b).sum()) for b in range(B)]
    M = max(counts) if counts else 0
    gt_labels = torch.zeros(B, M, 1)
    gt_boxes = torch.zeros(B, M, 4)
    for b in range(B):
        sel = targets[targets[:, 0] == b]
        gt_labels[b, : len(sel), 0] = sel[:, 1]
        gt_boxes[b, : len(sel)] = sel[:, 2:6]
    mask_gt = gt_boxes.sum(2, keepdim=True).gt(0.0)
    oracle = UltralyticsAssigner(topk=10, num_classes=nc, alpha=0.5, beta=6.0, stride=list(STRIDES))
    labels, boxes, tscores, fg, gt_idx = oracle(scores, pd_boxes, anchors_px, gt_labels, gt_boxes, mask_gt)
    # how many anchors the top-k gave to several gts (the conflict-resolution path)
    n_conflicts = 0
    if M:
        mask_pos, _, _ = oracle.get_pos_mask(scores, pd_boxes, gt_labels, gt_boxes, anchors_px, mask_gt)
        n_conflicts = int((mask_pos.sum(-2) > 1).sum())
    return (labels, boxes, tscores, fg, gt_idx), n_conflicts


def ours_assign(shapes, scores, pd_boxes, targets, nc, **kwargs) -> Assignment:
    assigner = TaskAlignedAssigner(topk=10, num_classes=nc, alpha=0.5, beta=6.0, **kwargs)
    return assigner(
        scores, pd_boxes, shapes, STRIDES, targets[:, 0].long(), targets[:, 1].long(), targets[:, 2:6]
    )


def assert_same_as_ultralytics(ours: Assignment, oracle) -> None:
    labels, boxes, tscores, fg, gt_idx = oracle
    assert torch.equal(ours.fg_mask, fg)
    assert torch.equal(ours.target_gt_idx, gt_idx)
    assert torch.equal(ours.target_labels, labels)
    assert torch.equal(ours.target_boxes, boxes)
    torch.testing.assert_close(ours.target_scores, tscores.float(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("per_image", "h", "w", "seed"),
    [
        ([12, 30, 7, 1], 320, 320, 0),
        ([40, 0, 25], 320, 480, 1),  # an image without gts, a non-square input
        ([60, 60], 128, 160, 2),  # 400 anchors: fewer than 64 * topk, Ultralytics' dense top-k path
        ([150, 90], 640, 640, 3),
    ],
)
def test_matches_ultralytics(per_image, h, w, seed):
    pytest.importorskip("ultralytics")
    nc = 6
    shapes, anchors_px, scores, pd_boxes, targets = random_problem(per_image, h, w, nc, seed)
    ours = ours_assign(shapes, scores, pd_boxes, targets, nc)
    oracle, n_conflicts = ultralytics_assign(shapes, anchors_px, scores, pd_boxes, targets, nc)
    assert_same_as_ultralytics(ours, oracle)
    # the problem exercises what it should: positives, anchors claimed by several gts, soft scores
    assert ours.fg_mask.sum() > 2 * sum(per_image)
    assert n_conflicts > 0
    assert (ours.target_scores.amax(-1)[ours.fg_mask] > 0).float().mean() > 0.5


def test_zero_metric_ties_in_the_first_anchors_match_ultralytics():
    """A gt over the first anchors whose predictions are all poor: Ultralytics' top-k takes some of its
    zero-metric anchors among the first ``topk``; the assigner must take the same ones."""
    pytest.importorskip("ultralytics")
    nc = 3
    shapes = shapes_for(320, 320)
    points, stride = make_anchors(shapes, STRIDES)
    anchors_px = points * stride
    A = len(points)
    targets = torch.tensor([[0, 1, 0.0, 0.0, 44.0, 10.0], [0, 2, 100.0, 100.0, 140.0, 150.0]])
    scores = torch.full((1, A, nc), 0.5)
    pd_boxes = torch.tensor([300.0, 300.0, 310.0, 310.0]).repeat(1, A, 1)  # far away: CIoU < 0 -> metric 0
    pd_boxes[0, 2] = torch.tensor([10.0, 0.0, 30.0, 8.0])  # one good prediction for the first gt
    ours = ours_assign(shapes, scores, pd_boxes, targets, nc)
    oracle, _ = ultralytics_assign(shapes, anchors_px, scores, pd_boxes, targets, nc)
    assert_same_as_ultralytics(ours, oracle)
    assert ours.fg_mask[0, :10].sum() > 1  # zero-metric anchors were taken, as Ultralytics does


def test_chunking_does_not_change_the_result():
    nc = 5
    shapes, _, scores, pd_boxes, targets = random_problem([80, 50, 3], 320, 320, nc, seed=7)
    whole = ours_assign(shapes, scores, pd_boxes, targets, nc)
    chunked = ours_assign(shapes, scores, pd_boxes, targets, nc, max_pairs=700)  # ~1 gt per chunk
    for name in ("fg_mask", "target_gt_idx", "target_labels", "target_boxes"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    # CPU kernels evaluate atan/pow differently at the tail of an array, so scores may move by an ulp
    torch.testing.assert_close(whole.target_scores, chunked.target_scores, rtol=1e-6, atol=1e-12)


def test_gt_order_across_images_does_not_matter_but_order_within_an_image_defines_the_index():
    nc = 4
    shapes, _, scores, pd_boxes, targets = random_problem([20, 15], 320, 320, nc, seed=8)
    reference = ours_assign(shapes, scores, pd_boxes, targets, nc)
    interleaved = torch.cat([targets[targets[:, 0] == 1], targets[targets[:, 0] == 0]])
    again = ours_assign(shapes, scores, pd_boxes, interleaved, nc)
    assert torch.equal(reference.target_gt_idx, again.target_gt_idx)
    assert torch.equal(reference.target_scores, again.target_scores)


def test_no_gts_and_padding_boxes():
    nc = 3
    shapes = shapes_for(64, 64)
    A = sum(h * w for h, w in shapes)
    scores, boxes = torch.rand(2, A, nc), torch.rand(2, A, 4) * 64
    none = TaskAlignedAssigner(num_classes=nc)(
        scores,
        boxes,
        shapes,
        STRIDES,
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 4),
    )
    assert not none.fg_mask.any() and none.target_scores.abs().sum() == 0
    assert (none.target_labels == nc).all()  # Ultralytics' "no class" label for a gt-free batch
    # an all-zero box is padding, as in Ultralytics: never assigned
    padding = TaskAlignedAssigner(num_classes=nc)(
        scores, boxes, shapes, STRIDES, torch.tensor([0]), torch.tensor([1]), torch.zeros(1, 4)
    )
    assert not padding.fg_mask.any()


def test_bad_inputs_are_named():
    assigner = TaskAlignedAssigner(num_classes=3)
    shapes = shapes_for(64, 64)
    A = sum(h * w for h, w in shapes)
    ok = dict(
        pd_scores=torch.rand(1, A, 3),
        pd_boxes=torch.rand(1, A, 4),
        level_shapes=shapes,
        strides=STRIDES,
        gt_batch_idx=torch.tensor([0]),
        gt_labels=torch.tensor([1]),
        gt_boxes=torch.tensor([[1.0, 1.0, 20.0, 20.0]]),
    )
    with pytest.raises(AssignerInputError, match=r"pd_scores must be \[B, A, 3\]"):
        assigner(**{**ok, "pd_scores": torch.rand(1, A, 4)})
    with pytest.raises(AssignerInputError, match="give 84 anchors, preds have 83"):
        assigner(**{**ok, "pd_scores": torch.rand(1, A - 1, 3), "pd_boxes": torch.rand(1, A - 1, 4)})
    with pytest.raises(AssignerInputError, match=r"gt_boxes \[N, 4\]"):
        assigner(**{**ok, "gt_boxes": torch.rand(1, 5)})
    with pytest.raises(AssignerInputError, match="gt box 0 is not finite"):
        assigner(**{**ok, "gt_boxes": torch.tensor([[1.0, float("inf"), 20.0, 20.0]])})


def test_class_major_scores_give_the_same_assignment():
    """The loss passes a ``[B, C, A]`` tensor seen as ``[B, A, C]``; the layout must not matter."""
    nc = 4
    shapes, _, scores, pd_boxes, targets = random_problem([30, 12], 320, 320, nc, seed=9)
    class_major = scores.transpose(1, 2).contiguous().transpose(1, 2)
    assert not class_major.is_contiguous()
    a = ours_assign(shapes, scores, pd_boxes, targets, nc)
    b = ours_assign(shapes, class_major, pd_boxes, targets, nc)
    for name in ("fg_mask", "target_gt_idx", "target_labels", "target_boxes", "target_scores"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
