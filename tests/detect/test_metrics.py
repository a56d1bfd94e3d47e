from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pytest
import torch

from visiontrain.detect.data import load_labels
from visiontrain.detect.draw import draw_detections, make_grid, save_batch_grid
from visiontrain.detect.metrics import (
    DetectionEvaluator,
    PredictionsError,
    box_iou,
    coco_greedy_match,
    evaluate_predictions,
    evaluate_predictions_file,
    read_predictions_json,
    write_predictions_json,
)
from visiontrain.detect.synthetic import write_synthetic_mar20

NAMES = ["a", "b", "c", "d", "e"]  # "d": ground truth but no predictions; "e": predictions but no ground truth


def random_case(seed: int = 0, n_images: int = 12):
    """Per image ``(preds [n, 6], gt_boxes [m, 4], gt_classes [m])`` with near-miss predictions (IoU
    spread around 0.5), false positives, an image with neither, one with only predictions, one with only
    ground truth and one with more than 100 detections of a class."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_images):
        m = 0 if i in (0, 1) else int(rng.integers(1, 8))
        xy = rng.uniform(0, 150, (m, 2))
        wh = rng.uniform(4, 60, (m, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        cls = rng.choice([0, 1, 2, 3], m, p=[0.35, 0.3, 0.2, 0.15])
        preds = []
        if i != 2 and i != 0:
            for g, c in zip(gt, cls):
                for _ in range(int(rng.integers(0, 3))):
                    jitter = rng.normal(0, 0.2, 4) * np.r_[g[2:] - g[:2], g[2:] - g[:2]]
                    pc = c if rng.random() < 0.8 else rng.integers(0, 3)
                    preds.append([*(g + jitter), rng.random(), 4 if pc == 3 else pc])  # never predict "d"
            for _ in range(int(rng.integers(0, 4))):  # false positives
                xy0 = rng.uniform(0, 150, 2)
                preds.append([*xy0, *(xy0 + rng.uniform(4, 50, 2)), rng.random(), rng.integers(0, 5)])
        if i == 3:  # more than maxDets=100 detections of one class, the true ones scoring lowest
            for _ in range(110):
                xy0 = rng.uniform(0, 150, 2)
                preds.append([*xy0, *(xy0 + rng.uniform(4, 50, 2)), rng.uniform(0.9, 1.0), 0])
            preds += [[*g, rng.uniform(0.5, 0.9), 0] for g in gt]
        p = np.array(preds, np.float64).reshape(-1, 6)
        p[:, 2:4] = np.maximum(p[:, 2:4], p[:, :2] + 0.5)
        out.append((p, gt, cls))
    return out


def pycocotools_eval(case, cat_ids=None):
    """The oracle: pycocotools on the same boxes (categories 1-based, images 1-based)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gt_anns, dets = [], [], []
    for i, (p, g, c) in enumerate(case):
        images.append({"id": i + 1, "width": 250, "height": 250})
        for b, k in zip(g, c):
            w, h = b[2] - b[0], b[3] - b[1]
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": int(k) + 1,
                            "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for x1, y1, x2, y2, s, k in p:
            dets.append({"image_id": i + 1, "category_id": int(k) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gt_anns,
                      "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def fill(case, names=NAMES) -> DetectionEvaluator:
    ev = DetectionEvaluator(names)
    for i, (p, g, c) in enumerate(case):
        ev.add(f"img{i}", p, g, c, (250, 250))
    return ev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_parity_with_pycocotools(seed):
    case = random_case(seed)
    ref = pycocotools_eval(case)
    got = fill(case).compute()
    assert abs(got["mAP50-95"] - ref.stats[0]) <= 1e-4
    assert abs(got["mAP50"] - ref.stats[1]) <= 1e-4
    assert abs(got["mAP75"] - ref.stats[2]) <= 1e-4
    prec = ref.eval["precision"][:, :, :, 0, -1]
    assert set(got["per_class"]) == {"a", "b", "c", "d"} and got["classes_without_gt"] == ["e"]
    for k, name in enumerate(NAMES[:4]):
        assert abs(got["per_class"][name]["AP50-95"] - prec[:, :, k].mean()) <= 1e-4
        assert abs(got["per_class"][name]["AP50"] - prec[0, :, k].mean()) <= 1e-4
    assert got["per_class"]["d"]["AP50-95"] == 0.0 and got["per_class"]["d"]["n_gt"] > 0
    assert 0.05 < got["mAP50"] < 0.95  # a non-trivial case


def test_class_subset_parity():
    case = random_case(3)
    ref = pycocotools_eval(case, cat_ids=[1, 3])
    got = fill(case).compute(class_subset=["c", "a"])
    assert abs(got["mAP50-95"] - ref.stats[0]) <= 1e-4 and abs(got["mAP50"] - ref.stats[1]) <= 1e-4
    assert got["classes"] == ["a", "c"] and set(got["per_class"]) == {"a", "c"}
    with pytest.raises(ValueError, match="'zz'"):
        fill(case).compute(class_subset=["zz"])


def test_greedy_matching_parity_with_pycocotools():
    case = random_case(4)
    ref = pycocotools_eval(case)
    # pycocotools' matches at IoU 0.5, area "all", maxDets 100, by (image, category, score order)
    expected = {}
    for e in ref.evalImgs:
        if e is None or e["aRng"] != [0, 1e10]:
            continue
        scores = [ref.cocoDt.anns[d]["score"] for d in e["dtIds"]]
        expected[(e["image_id"], e["category_id"])] = (sorted(scores, reverse=True),
                                                      list(e["dtMatches"][0] > 0))
    n_tp = n_fp = 0
    for i, (p, g, c) in enumerate(case):
        for k in np.unique(p[:, 5]).astype(int):
            pk = p[p[:, 5] == k]
            kept, tp = coco_greedy_match(pk[:, :4], pk[:, 4], g[c == k])
            s_ref, tp_ref = expected[(i + 1, k + 1)]
            np.testing.assert_allclose(pk[kept, 4], s_ref)
            assert tp.tolist() == tp_ref
            n_tp += int(tp.sum())
            n_fp += int((~tp).sum())
    assert n_tp > 5 and n_fp > 5


def test_precision_recall_at_best_f1_against_brute_force():
    case = random_case(5)
    got = fill(case).compute()
    # float64 reference: sweep every score as a threshold, TP flags from pycocotools' IoU-0.5 matches
    ref = pycocotools_eval(case)
    flags = {}
    for e in ref.evalImgs:
        if e is not None and e["aRng"] == [0, 1e10]:
            for d, m in zip(e["dtIds"], e["dtMatches"][0]):
                flags[d] = (ref.cocoDt.anns[d]["score"], e["category_id"] - 1, m > 0)
    n_gt = {k: sum(int((c == k).sum()) for _, _, c in case) for k in range(5)}
    valid = [k for k in range(5) if n_gt[k] > 0]
    best = (-1.0, 0, 0, 0)
    for thr in sorted({s for s, _, _ in flags.values()}):
        ps, rs, fs = [], [], []
        for k in valid:
            sel = [t for s, c, t in flags.values() if c == k and s >= thr]
            tp = sum(sel)
            p = tp / len(sel) if sel else 0.0
            r = tp / n_gt[k]
            ps.append(p)
            rs.append(r)
            fs.append(2 * p * r / (p + r) if p + r else 0.0)
        if np.mean(fs) > best[0] + 1e-12:
            best = (float(np.mean(fs)), float(np.mean(ps)), float(np.mean(rs)), thr)
    assert got["f1"] == pytest.approx(best[0], abs=1e-9)
    assert got["precision"] == pytest.approx(best[1], abs=1e-9)
    assert got["recall"] == pytest.approx(best[2], abs=1e-9)
    assert got["conf_best_f1"] == pytest.approx(best[3])


def test_no_predictions_and_no_ground_truth():
    case = [(np.zeros((0, 6)), g, c) for _, g, c in random_case(6)]
    got = fill(case).compute()
    assert got["mAP50-95"] == 0.0 and got["mAP50"] == 0.0 and got["precision"] == 0.0 and got["recall"] == 0.0
    assert got["n_pred"] == 0 and all(v["AP50"] == 0.0 for v in got["per_class"].values())
    only_preds = [(p, np.zeros((0, 4)), np.zeros(0, int)) for p, _, _ in random_case(6)]
    got = fill(only_preds).compute()
    assert got["mAP50-95"] == 0.0 and got["per_class"] == {} and got["classes_without_gt"] == NAMES
    assert fill([]).compute()["mAP50"] == 0.0


def test_perfect_predictions_score_one():
    case = [(np.concatenate([g, np.full((len(g), 1), 0.9), c[:, None]], 1), g, c) for _, g, c in random_case(7)]
    got = fill(case).compute()
    assert got["mAP50-95"] == pytest.approx(1.0) and got["precision"] == 1.0 and got["recall"] == 1.0
    cm = np.array(got["confusion_matrix"])
    n_gt = np.bincount(np.concatenate([c for _, _, c in case]), minlength=5)
    np.testing.assert_array_equal(np.diag(cm)[:5], n_gt)
    assert cm.sum() == n_gt.sum()


def test_confusion_matrix_by_hand():
    ev = DetectionEvaluator(["a", "b"])
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float)
    preds = np.array([
        [0, 0, 10, 10, 0.9, 0],     # a -> a
        [20, 20, 30, 31, 0.8, 0],   # predicted a, true b
        [0, 0, 10, 10, 0.7, 1],     # duplicate on a: the gt is taken, so a false positive "b"
        [80, 80, 90, 90, 0.6, 1],   # false positive b
        [50, 50, 60, 60, 0.1, 1],   # below the 0.25 confidence: the b at (50,50) is missed
    ])
    ev.add("x", preds, gt, [0, 1, 1])
    cm = np.array(ev.compute()["confusion_matrix"])
    expected = np.zeros((3, 3), int)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 2] = 2
    expected[2, 1] = 1
    np.testing.assert_array_equal(cm, expected)


def test_add_validates():
    ev = DetectionEvaluator(["a"])
    with pytest.raises(ValueError, match="predicted class 3.0 is outside 0..0"):
        ev.add("x", np.array([[0, 0, 1, 1, 0.5, 3]]), None, None)
    with pytest.raises(ValueError, match="2 gt boxes but 1 gt classes"):
        ev.add("y", None, np.zeros((2, 4)), [0])
    ev.add("z", torch.zeros(0, 6), torch.zeros(0, 4), torch.zeros(0))
    with pytest.raises(ValueError, match="added twice"):
        ev.add("z", None, None, None)


def test_box_iou_reference():
    rng = np.random.default_rng(0)
    a = np.concatenate([x := rng.uniform(0, 50, (6, 2)), x + rng.uniform(1, 30, (6, 2))], 1)
    b = np.concatenate([y := rng.uniform(0, 50, (5, 2)), y + rng.uniform(1, 30, (5, 2))], 1)
    ref = np.zeros((6, 5))
    for i in range(6):
        for j in range(5):
            iw = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            ih = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
            ref[i, j] = iw * ih / (area(a[i]) + area(b[j]) - iw * ih)
    np.testing.assert_allclose(box_iou(a, b), ref, rtol=1e-12)
    assert (ref > 0).any() and (ref == 0).any()


# ----------------------------------------------------------------------------------------------
# COCO results files


def test_predictions_json_roundtrip_and_file_evaluation(tmp_path):
    root = write_synthetic_mar20(tmp_path / "ds", train=0, val=4, imgsz=96, seed=0)
    labels = load_labels(root, "val")
    rng = np.random.default_rng(0)
    preds = {}
    for r in labels.records[:3]:  # the last image gets no predictions
        p = np.concatenate([r.boxes + rng.normal(0, 2, r.boxes.shape), rng.random((len(r.boxes), 1)),
                            r.classes[:, None]], 1)
        p[:, 2:4] = np.maximum(p[:, 2:4], p[:, :2] + 1)
        preds[r.image_id] = np.round(p, 3)
    path = write_predictions_json(tmp_path / "preds.json", preds)
    rows = json.loads(path.read_text())
    assert set(rows[0]) == {"image_id", "category_id", "bbox", "score"} and isinstance(rows[0]["image_id"], str)
    back = read_predictions_json(path, 20, [r.image_id for r in labels.records])
    assert set(back) == set(preds)
    for k in preds:
        np.testing.assert_allclose(back[k], preds[k], atol=2e-3)
    direct, _ = evaluate_predictions(back, labels)
    from_file, _ = evaluate_predictions_file(path, root, "val")
    assert from_file["mAP50-95"] == direct["mAP50-95"] and from_file["n_images"] == 4
    assert 0 < from_file["mAP50"] <= 1


@pytest.mark.parametrize("content, msg", [
    ("{", r"preds.json line 1: malformed JSON"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"image_id": "1", "bbox": [0, 0, 1, 1], "score": 0.5}]', "entry 0: needs keys"),
    ('[{"image_id": "1", "category_id": 20, "bbox": [0, 0, 1, 1], "score": 0.5}]',
     r"entry 0: category_id 20 must be a 0-based class index in 0..19"),
    ('[{"image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5},'
     ' {"image_id": "nope", "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]',
     r"entry 1: image_id 'nope' is not an image of the dataset"),
    ('[{"image_id": "1", "category_id": 1, "bbox": [0, 0, -1, 1], "score": 0.5}]', r"entry 0: bbox must be"),
    ('[{"image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1], "score": "high"}]', r"entry 0: score must be"),
])
def test_bad_predictions_files(tmp_path, content, msg):
    (tmp_path / "preds.json").write_text(content)
    with pytest.raises(PredictionsError, match=msg):
        read_predictions_json(tmp_path / "preds.json", 20, ["1", "2"])


# ----------------------------------------------------------------------------------------------
# pictures: PR curves, confusion matrix, drawn detections


def test_plots_and_drawings(tmp_path):
    ev = fill(random_case(8))
    ev.compute()
    paths = ev.plot(tmp_path / "plots")
    for p in paths:
        img = cv2.imread(str(p))
        assert img is not None and img.shape[0] > 200 and img.std() > 5
    image = np.full((80, 120, 3), 50, np.uint8)
    preds = np.array([[10, 10, 60, 50, 0.87, 2], [70, 20, 110, 70, 0.1, 0]])
    drawn = draw_detections(image, preds, ["x", "y", "z"], gt=np.array([[2, 10, 10, 60, 50]]), conf=0.25)
    assert drawn.shape == image.shape and (image == 50).all()  # input untouched
    changed = np.nonzero((drawn != 50).any(2))
    assert changed[1].max() < 70  # the low-score box is skipped
    grid = make_grid([drawn, drawn, drawn])
    assert grid.shape == (2 * 84 + 4, 2 * 124 + 4, 3)
    out = save_batch_grid(tmp_path / "batch.jpg", torch.rand(2, 3, 64, 64), [torch.tensor(preds), None],
                          torch.tensor([[0, 1, 5, 5, 30, 30]]), ["x", "y", "z"])
    assert cv2.imread(str(out)).shape == (64 + 2 * 4, 2 * 64 + 3 * 4, 3)


def test_run_evaluation_multi_label_scores_a_box_under_every_class_above_the_threshold():
    """One object of class "b" whose box scores 0.9 for "a" and 0.6 for "b": by its best class only it is a
    false "a" detection and "b" is missed (AP 0); with ``multi_label`` it is also found as "b" (AP 1), as
    Ultralytics' validator counts it."""
    from types import SimpleNamespace

    from visiontrain.detect.evaluation import run_evaluation

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(x.shape[0], 4 + 2, 1)
            out[:, :4, 0] = torch.tensor([32.0, 32, 20, 20])
            out[:, 4:, 0] = torch.tensor([0.9, 0.6])
            return out

    record = SimpleNamespace(image_id=0, boxes=np.array([[22.0, 22, 42, 42]]), classes=np.array([1]))
    meta = {"image_id": 0, "ratio": (1.0, 1.0), "pad": (0.0, 0.0), "orig_size": (64, 64)}
    batches = [(torch.zeros(1, 3, 64, 64), None, [meta])]

    class Loader(list):  # what run_evaluation reads of a DataLoader: iteration and .dataset.labels.records
        dataset = SimpleNamespace(labels=SimpleNamespace(records=[record]))

    found = {}
    for multi in (False, True):
        ev = run_evaluation(Fixed(), Loader(batches), ["a", "b"], conf=0.001, iou=0.7, max_det=300,
                            multi_label=multi)
        found[multi] = ev.compute(["b"])["mAP50"]
    assert found[False] == 0.0 and found[True] > 0.99
