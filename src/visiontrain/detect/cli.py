"""The detect task's command-line verbs: ``VERBS = {verb: (config schema, function)}``.

``train`` (the engine on :class:`~visiontrain.detect.task.DetectTask`), ``eval`` (table, ``metrics.json``,
PR curve, confusion matrix), ``predict`` (``predictions.json``, drawn images), ``export`` (ONNX), ``synth``
(a synthetic MAR20 set) and ``split`` (the few-shot split of the class-incremental workflow). Each takes
its config from :mod:`visiontrain.detect.config`, already checked; weights of any kind are loaded by
:mod:`visiontrain.detect.inference`. ``eval``, ``predict`` and ``export`` into a folder write into a new
one when it already holds results (``out2``, ``out3`` …), so old and new files never mix.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from visiontrain.config import ConfigError
from visiontrain.detect.classes import parse_class_list
from visiontrain.detect.config import (
    DetectTrainConfig,
    EvalConfig,
    ExportConfig,
    PredictConfig,
    SplitConfig,
    SynthConfig,
)
from visiontrain.detect.data import IMAGE_SUFFIXES, DatasetError, load_labels
from visiontrain.detect.inference import TORCH_WEIGHT_FILES, load_detector, predict_paths
from visiontrain.engine.rundir import fresh_output_dir, write_report


def train(cfg: DetectTrainConfig) -> int:
    from visiontrain.detect.task import DetectTask
    from visiontrain.engine.trainer import fit

    result = fit(DetectTask(cfg))
    m = result["metrics"]
    if m and result["is_main"]:
        print(f"final: mAP50-95 {m.get('mAP50-95', float('nan')):.4f}  mAP50 {m.get('mAP50', float('nan')):.4f}  "
              f"(best {result['best']:.4f} at step {result['best_step']}) → {result['out']}")
    return 0


def evaluate(cfg: EvalConfig) -> int:
    from visiontrain.detect.evaluation import format_table
    from visiontrain.detect.metrics import evaluate_predictions, read_predictions_json

    det = load_detector(cfg.weights, cfg.device, cfg.imgsz) if not cfg.predictions else None
    if (det is not None and det.obb) or (det is None and _oriented_predictions(cfg.predictions)):
        return evaluate_obb(cfg, det)
    labels = load_labels(cfg.data, cfg.split, class_names=[str(n) for n in cfg.names] or None,
                         bad_images="skip" if cfg.skip_bad_images else "raise")
    if det is None:
        preds = read_predictions_json(cfg.predictions, len(labels.class_names), [r.image_id for r in labels.records])
        print(f"{cfg.predictions} on {cfg.data} split {cfg.split!r} ({len(labels)} images)")
    else:
        if len(det.names) != len(labels.class_names):
            raise ConfigError(f"{cfg.weights} predicts {len(det.names)} classes {det.names[:5]}… but {cfg.data} "
                              f"has {len(labels.class_names)}; evaluate on a dataset with the model's classes")
        print(f"{cfg.weights} on {cfg.data} split {cfg.split!r} ({len(labels)} images at {det.imgsz}×{det.imgsz})")
        paths = {r.image_id: r.path for r in labels.records}
        preds = predict_paths(det, paths, cfg.batch_size, cfg.conf, cfg.iou, cfg.max_det, cfg.device)[0]
    metrics, ev = evaluate_predictions(preds, labels)
    print(format_table(metrics))
    if cfg.classes:
        sub = ev.compute(parse_class_list(cfg.classes, list(labels.class_names), "classes"))
        metrics["subset"] = {"classes": sub["classes"], "mAP50-95": sub["mAP50-95"], "mAP50": sub["mAP50"]}
        print(f"subset {sub['classes']}: mAP50-95 {sub['mAP50-95']:.4f}  mAP50 {sub['mAP50']:.4f}")
        ev.compute()
    out = fresh_output_dir(cfg.out)
    ev.plot(out)
    source = {"predictions": cfg.predictions} if det is None else {"weights": cfg.weights, "imgsz": det.imgsz}
    write_report(out / "metrics.json", metrics, **source, data=cfg.data, split=cfg.split, conf=cfg.conf,
                 iou=cfg.iou)
    print(f"wrote {out / 'metrics.json'}, {out / 'pr_curve.png'}, {out / 'confusion_matrix.png'}")
    return 0


def _oriented_predictions(path: str) -> bool:
    """The predictions file holds oriented boxes (``rbox`` / ``poly`` entries)."""
    import json

    from visiontrain.detect.metrics import read_predictions_json
    from visiontrain.detect.obb.metrics import is_obb_predictions

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        read_predictions_json(path)  # raises the usual, precise error
        raise
    return isinstance(data, list) and is_obb_predictions(data)


def evaluate_obb(cfg: EvalConfig, det) -> int:
    """``eval`` of an oriented-box model or oriented predictions: polygon-IoU COCO mAP, DOTA VOC07 AP50, ProbIoU
    mAP and the horizontal mAP of the same predictions."""
    import json

    import numpy as np

    from visiontrain.detect.metrics import DetectionEvaluator
    from visiontrain.detect.obb.evaluation import horizontal_preds, obb_metrics
    from visiontrain.detect.obb.metrics import OBBEvaluator, read_obb_predictions

    labels = load_labels(cfg.data, cfg.split, class_names=[str(n) for n in cfg.names] or None,
                         bad_images="skip" if cfg.skip_bad_images else "raise", obb=True)
    if det is None:
        preds = read_obb_predictions(json.loads(Path(cfg.predictions).read_text()), cfg.predictions,
                                     len(labels.class_names), [r.image_id for r in labels.records])
        print(f"{cfg.predictions} (oriented) on {cfg.data} split {cfg.split!r} ({len(labels)} images)")
    else:
        if len(det.names) != len(labels.class_names):
            raise ConfigError(f"{cfg.weights} predicts {len(det.names)} classes but {cfg.data} has "
                              f"{len(labels.class_names)}; evaluate on a dataset with the model's classes")
        print(f"{cfg.weights} (oriented boxes) on {cfg.data} split {cfg.split!r} ({len(labels)} images)")
        paths = {r.image_id: r.path for r in labels.records}
        preds = predict_paths(det, paths, cfg.batch_size, cfg.conf, cfg.iou, cfg.max_det, cfg.device)[0]
    obb, hbb = OBBEvaluator(labels.class_names), DetectionEvaluator(labels.class_names)
    for r in labels.records:
        p = preds.get(r.image_id, np.zeros((0, 7)))
        obb.add(r.image_id, p, r.polygons, r.classes, r.difficult)
        hbb.add(r.image_id, horizontal_preds(p), r.boxes, r.classes, (r.height, r.width))
    metrics = obb_metrics(obb, hbb)
    print(f"oriented (polygon IoU): mAP50-95 {metrics['mAP50-95']:.4f}  mAP50 {metrics['mAP50']:.4f}  "
          f"mAP75 {metrics['mAP75']:.4f}\nDOTA VOC07 AP50 {metrics['dota_AP50']:.4f}   ProbIoU-matched: mAP50-95 "
          f"{metrics['mAP50-95_probiou']:.4f} mAP50 {metrics['mAP50_probiou']:.4f}\nhorizontal boxes of the same "
          f"predictions: mAP50-95 {metrics['hbb/mAP50-95']:.4f}  mAP50 {metrics['hbb/mAP50']:.4f}")
    out = fresh_output_dir(cfg.out)
    source = {"predictions": cfg.predictions} if det is None else {"weights": cfg.weights, "imgsz": det.imgsz}
    write_report(out / "metrics.json", metrics, **source, data=cfg.data, split=cfg.split, conf=cfg.conf, iou=cfg.iou)
    print(f"wrote {out / 'metrics.json'}")
    return 0


def list_images(source: str) -> dict[str, str]:
    """``{image_id: path}`` of ``source``: one image file, or the images directly in a folder."""
    p = Path(source)
    if p.is_file():
        return {p.stem: str(p)}
    if not p.is_dir():
        raise DatasetError(f"source={source}: no such image or folder")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"source={source}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return {f.stem: str(f) for f in files}


def drop_damaged(paths: dict[str, str], source: str) -> tuple[dict[str, str], int]:
    """``paths`` without its damaged images (each named in a warning on stderr) and how many were left out.

    A single image (``source`` a file) that is damaged, or a folder with nothing else, is an error."""
    from visiontrain.filecheck import check_image_files

    bad = dict(check_image_files(paths.values()))
    if Path(source).is_file() and bad:
        raise DatasetError(f"source={source}: damaged image: {bad[str(Path(source))]}; replace it")
    for path, reason in bad.items():
        print(f"warning: {path}: {reason}; skipped", file=sys.stderr)
    kept = {k: p for k, p in paths.items() if p not in bad}
    if not kept:
        raise DatasetError(f"source={source}: all {len(paths)} images are damaged (see the warnings above)")
    return kept, len(bad)


def predict(cfg: PredictConfig) -> int:
    from visiontrain.detect.draw import draw_detections, save_image
    from visiontrain.detect.metrics import write_predictions_json

    paths, skipped = drop_damaged(list_images(cfg.source), cfg.source)
    det = load_detector(cfg.weights, cfg.device, cfg.imgsz)
    preds, images = predict_paths(det, paths, cfg.batch_size, cfg.conf, cfg.iou, cfg.max_det, cfg.device,
                                  keep_images=cfg.draw)
    out = fresh_output_dir(cfg.out)
    if det.obb:  # rbox + poly entries; rotated boxes drawn
        from visiontrain.detect.obb.draw import draw_rotated
        from visiontrain.detect.obb.metrics import write_obb_predictions_json

        write_obb_predictions_json(out / "predictions.json", preds)
        for image_id, img in images.items():
            save_image(out / f"{image_id}.jpg", draw_rotated(img, preds[image_id], class_names=det.names))
    else:
        write_predictions_json(out / "predictions.json", preds)
    if cfg.draw and not det.obb:
        for image_id, img in images.items():
            save_image(out / f"{image_id}.jpg", draw_detections(img, preds[image_id], class_names=det.names))
    n = sum(len(p) for p in preds.values())
    print(f"{n} detections in {len(preds)} images at {det.imgsz}×{det.imgsz} → {out / 'predictions.json'}"
          + (f" and drawn images in {out}" if cfg.draw else "")
          + (f"; skipped {skipped} damaged image(s) (named above)" if skipped else ""))
    return 0


def export_path(cfg: ExportConfig) -> Path:
    """Where ``export`` writes: ``out`` when it names a ``.onnx`` file, ``<weights stem>.onnx`` in a new folder
    when it names a folder, the weights' path with ``.onnx`` when empty."""
    if not cfg.out:
        return Path(cfg.weights).with_suffix(".onnx")
    if Path(cfg.out).suffix == ".onnx":
        return Path(cfg.out)
    return fresh_output_dir(cfg.out) / f"{Path(cfg.weights).stem}.onnx"


def export(cfg: ExportConfig) -> int:
    from visiontrain.detect.export import export_onnx

    det = load_detector(cfg.weights, "cpu", cfg.imgsz, needs=TORCH_WEIGHT_FILES)
    out = export_path(cfg)
    export_onnx(det.model, out, imgsz=det.imgsz, dynamic_batch=cfg.dynamic_batch)
    print(f"exported to {out} ({det.imgsz}×{det.imgsz} inputs: images [B, 3, {det.imgsz}, {det.imgsz}] → "
          f"predictions [B, {4 + len(det.names) + int(det.obb)}, A]{', angle last' if det.obb else ''})")
    return 0


def synth(cfg: SynthConfig) -> int:
    from visiontrain.detect.synthetic import write_synthetic_mar20

    out = write_synthetic_mar20(cfg.out, train=cfg.train, val=cfg.val, imgsz=cfg.imgsz, seed=cfg.seed)
    print(f"wrote {cfg.train} train + {cfg.val} val images of {cfg.imgsz}×{cfg.imgsz} (MAR20 layout) to {out}")
    return 0


def split(cfg: SplitConfig) -> int:
    """Write the few-shot dataset ``cfg`` describes (see :mod:`visiontrain.detect.fewshot`)."""
    from visiontrain.detect.classes import parse_class_list
    from visiontrain.detect.fewshot import write_few_shot_split

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} exists and is not empty; choose a new folder or delete it")
    given = [str(n) for n in cfg.names] or None
    train_labels = load_labels(cfg.data, cfg.train_split, class_names=given, obb=cfg.obb)
    val_labels = load_labels(cfg.data, cfg.val_split, class_names=given, obb=cfg.obb)
    names = list(train_labels.class_names)
    base = parse_class_list(cfg.base, names, "base")
    if all(n in base for n in names):
        raise ConfigError(f"base={cfg.base} covers every class of {cfg.data}; nothing is left to be novel")
    m = write_few_shot_split(train_labels, val_labels, base, cfg.shots, cfg.seed, cfg.keep_base, out, str(cfg.data))
    print(f"wrote {out}: {m['train_images']} train images ({'all base data + ' if cfg.keep_base else ''}"
          f"{m['few_shot_images']} few-shot images for {len(m['novel'])} novel classes, K={cfg.shots}), "
          f"{m['val_images']} val images (all labels)")
    print("annotated train images per class: " + " ".join(f"{n}:{k}" for n, k in m["images_per_class"].items()))
    for n, have in m["shortfall"].items():
        print(f"warning: novel class {n} is in only {have} training images (< shots={cfg.shots}); all are used")
    for n, have in m["excess"].items():
        print(f"warning: novel class {n} ends in {have} chosen images (> shots={cfg.shots}): images with several "
              "novel classes left no other choice")
    if names != [f"A{i}" for i in range(1, 21)]:
        print(f"note: read it with names={names} (the class list is also in split.json)")
    return 0


VERBS: dict[str, tuple[type, Any]] = {
    "train": (DetectTrainConfig, train),
    "eval": (EvalConfig, evaluate),
    "predict": (PredictConfig, predict),
    "export": (ExportConfig, export),
    "synth": (SynthConfig, synth),
    "split": (SplitConfig, split),  # the few-shot split tool of the class-incremental workflow
}
