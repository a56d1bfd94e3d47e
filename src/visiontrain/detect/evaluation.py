"""Evaluating a detector: over a validation loader (training), as scalars for the engine's logs, split into
base / novel classes (class-incremental runs), and as the table ``eval`` prints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from visiontrain.detect.inference import boxes_to_original
from visiontrain.detect.metrics import DetectionEvaluator
from visiontrain.detect.postprocess import postprocess


def run_evaluation(model: nn.Module, loader, names: list[str], conf: float, iou: float, max_det: int,
                   multi_label: bool = False) -> DetectionEvaluator:
    """Predict over ``loader`` (a :class:`~visiontrain.detect.data.DetectionDataset`'s, batches of
    ``images [B, 3, S, S]``) and accumulate COCO-style statistics against the dataset's labels in original
    image pixels. Returns the filled :class:`DetectionEvaluator`.

    ``multi_label``: a box enters NMS once per class scoring above ``conf`` (what Ultralytics' validator
    does) instead of once with its best class (what ``predict`` does, and this function by default)."""
    dataset = loader.dataset
    gt = {r.image_id: r for r in dataset.labels.records}
    evaluator = DetectionEvaluator(names)
    device = next(model.parameters()).device
    for images, _, metas in loader:
        out = model(images.to(device)).float()
        for det, meta in zip(postprocess(out, conf=conf, iou=iou, max_det=max_det, multi_label=multi_label), metas):
            det = boxes_to_original(det.cpu(), meta["ratio"], meta["pad"], meta["orig_size"])
            rec = gt[meta["image_id"]]
            evaluator.add(meta["image_id"], det.numpy(), rec.boxes, rec.classes)
    return evaluator


def flatten_metrics(m: dict[str, Any]) -> dict[str, float]:
    """Scalars for the engine's logs (per-class values as ``per_class/<name>/AP50-95``)."""
    out = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
    for name, d in (m.get("per_class") or {}).items():
        for k, v in d.items():
            if isinstance(v, (int, float)):
                out[f"per_class/{name}/{k}"] = float(v)
    return out


def base_novel_metrics(evaluator: DetectionEvaluator, base_names: Sequence[str]) -> dict[str, float]:
    """``mAP50-95/base``, ``mAP50/base``, ``mAP50-95/novel``, ``mAP50/novel`` (and ``/all``) of a filled
    evaluator; novel = its classes not in ``base_names``. Leaves ``evaluator.last`` holding the all-class result."""
    names = list(evaluator.class_names)
    base = [n for n in names if n in set(base_names)]
    novel = [n for n in names if n not in set(base_names)]
    out: dict[str, float] = {}
    for tag, subset in (("base", base), ("novel", novel)):
        if subset:
            m = evaluator.compute(subset)
            out[f"mAP50-95/{tag}"], out[f"mAP50/{tag}"] = float(m["mAP50-95"]), float(m["mAP50"])
    m = evaluator.compute()
    out["mAP50-95/all"], out["mAP50/all"] = float(m["mAP50-95"]), float(m["mAP50"])
    return out


def format_table(metrics: dict[str, Any]) -> str:
    """The per-class table of a :meth:`DetectionEvaluator.compute` result: AP to 4 decimals, box counts."""
    rows = [("all", metrics["mAP50-95"], metrics["mAP50"], metrics["n_gt"])]
    rows += [(n, d["AP50-95"], d["AP50"], d["n_gt"]) for n, d in metrics["per_class"].items()]
    width = max(14, *(len(str(n)) + 2 for n, *_ in rows))
    lines = [f"{'class':<{width}}{'mAP50-95':>10}{'mAP50':>9}{'boxes':>8}"]
    lines += [f"{n:<{width}}{a:>10.4f}{b:>9.4f}{int(g):>8d}" for n, a, b, g in rows]
    lines.append(f"precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f} "
                 f"(at conf {metrics['conf_best_f1']:.3f}, best mean F1)")
    return "\n".join(lines)
