"""Detection CLI verbs: ``synth``, ``train``, ``eval``, ``predict``, ``export`` (``split`` lives in
:mod:`visiontrain.detect.fewshot`). Each takes a typed config; ``VERBS`` is what the CLI reads."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontrain.config import ConfigError, opt
from visiontrain.detect.data import (
    IMAGE_SUFFIXES,
    DatasetError,
    boxes_to_original,
    load_labels,
    preprocess_image,
    read_image,
)
from visiontrain.detect.fewshot import SplitConfig, split
from visiontrain.detect.postprocess import postprocess
from visiontrain.detect.task import DetectTrainConfig, train
from visiontrain.engine.checkpoint import (
    CheckpointError,
    extract_model_state,
    load_checkpoint,
    load_state_dict_checked,
)

# ---- loading a detector from any supported file -------------------------------------------------

@dataclass
class Detector:
    """A callable ``images [B, 3, S, S] -> [B, 4 + nc, A]`` with its class names and input size."""

    model: Any
    names: list[str]
    imgsz: int
    kind: str  # "torch" | "onnx"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float()


def load_detector(path: str, device: str = "cpu", imgsz: int = 0) -> Detector:
    """Our checkpoint (EMA weights when present), an Ultralytics ``.pt``, a state dict, or ``.onnx``."""
    from visiontrain.detect.model import YOLOv8

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights={path}: no such file")
    if p.suffix == ".onnx":
        from visiontrain.detect.export import OnnxDetector

        d = OnnxDetector(p)
        if imgsz and imgsz != d.imgsz[0]:
            raise ConfigError(f"{p} was exported for {d.imgsz[0]}x{d.imgsz[1]} inputs; drop imgsz= or re-export")
        return Detector(d, d.names, d.imgsz[0], "onnx")
    try:
        ckpt = load_checkpoint(p)
    except CheckpointError:
        ckpt = None  # an Ultralytics pickle: the safe importer below reads it
    if ckpt is not None and "format_version" in ckpt:
        if ckpt.get("task") != "detect":
            raise CheckpointError(f"{p}: this is a '{ckpt.get('task')}' checkpoint, not a 'detect' one")
        info = ckpt.get("task_state") or {}
        model = YOLOv8(info["scale"], nc=len(info["names"]), names=info["names"])
        state = {k: v for k, v in extract_model_state(ckpt, prefer_ema=True).items()
                 if not k.startswith("distill_adapters.")}  # a distilled student's training-only adapters
        load_state_dict_checked(model, state, source=str(p))
        size = imgsz or int(info.get("imgsz", 640))
        names = list(info["names"])
    else:
        from visiontrain.detect.weights import load_ultralytics

        model = load_ultralytics(p)
        names = list(model.names) if model.names else [str(i) for i in range(model.nc)]
        size = imgsz or 640
    model = model.to(device).prepare_for_inference()
    return Detector(model, names, size, "torch")


# ---- synth ------------------------------------------------------------------------------------

@dataclass
class SynthVerbConfig:
    out: str = opt("data/mar20-synth", "output folder (MAR20 layout)")
    train: int = opt(600, "training images")
    val: int = opt(100, "validation images (ImageSets/Main/test.txt)")
    imgsz: int = opt(320, "image size")
    seed: int = opt(0, "seed (same seed, same bytes)")


def synth(cfg: SynthVerbConfig) -> int:
    from visiontrain.detect.synthetic import write_synthetic_mar20

    out = write_synthetic_mar20(cfg.out, train=cfg.train, val=cfg.val, imgsz=cfg.imgsz, seed=cfg.seed)
    print(f"wrote {cfg.train} train + {cfg.val} val images (MAR20 layout) to {out}")
    return 0


# ---- eval -------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    weights: str = opt("", "model file: our checkpoint, Ultralytics .pt, state dict or .onnx")
    data: str = opt("", "dataset (MAR20/VOC root, YOLO data.yaml, COCO .json)")
    split: str = opt("test", "split to evaluate")
    names: list = opt([], "class names (VOC layout; default MAR20)")
    predictions: str = opt("", "evaluate this COCO results file instead of running a model")
    imgsz: int = opt(0, "input size (0 = the checkpoint's)")
    batch_size: int = opt(16, "batch size")
    conf: float = opt(0.001, "confidence threshold")
    iou: float = opt(0.7, "NMS IoU threshold")
    max_det: int = opt(300, "detections per image")
    classes: list = opt([], "report mAP over this class subset too (e.g. the novel classes)")
    device: str = opt("cpu", "cpu | cuda")
    out: str = opt("runs/detect-eval", "folder for metrics.json, PR curve and confusion matrix PNGs")
    skip_bad_images: bool = opt(False, "leave damaged images out with a warning instead of stopping with an "
                                       "error that lists them")


def print_table(metrics: dict[str, Any]) -> None:
    rows = [("all", metrics["mAP50-95"], metrics["mAP50"], metrics["n_gt"])]
    rows += [(n, d["AP50-95"], d["AP50"], d["n_gt"]) for n, d in metrics["per_class"].items()]
    print(f"{'class':<14}{'mAP50-95':>10}{'mAP50':>9}{'boxes':>8}")
    for n, a, b, g in rows:
        print(f"{n:<14}{a:>10.4f}{b:>9.4f}{g:>8d}")
    print(f"precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f} "
          f"(at conf {metrics['conf_best_f1']:.3f}, best mean F1)")


def evaluate(cfg: EvalConfig) -> int:
    from visiontrain.detect.metrics import evaluate_predictions, read_predictions_json

    if not cfg.data:
        raise ConfigError("eval detect needs data=DIR (the dataset to evaluate on)")
    labels = load_labels(cfg.data, cfg.split, class_names=[str(n) for n in cfg.names] or None,
                         bad_images="skip" if cfg.skip_bad_images else "raise")
    if cfg.predictions:
        preds = read_predictions_json(cfg.predictions, len(labels.class_names), [r.image_id for r in labels.records])
    else:
        if not cfg.weights:
            raise ConfigError("eval detect needs weights=FILE or predictions=FILE.json")
        det = load_detector(cfg.weights, cfg.device, cfg.imgsz)
        if len(det.names) != len(labels.class_names):
            raise ConfigError(f"{cfg.weights} predicts {len(det.names)} classes {det.names[:5]}… but {cfg.data} "
                              f"has {len(labels.class_names)}; evaluate on a dataset with the model's classes")
        preds = predict_labels(det, labels, cfg.batch_size, cfg.conf, cfg.iou, cfg.max_det, cfg.device)
    metrics, ev = evaluate_predictions(preds, labels)
    print_table(metrics)
    if cfg.classes:
        sub = ev.compute([str(c) for c in cfg.classes])
        metrics["subset"] = {"classes": sub["classes"], "mAP50-95": sub["mAP50-95"], "mAP50": sub["mAP50"]}
        print(f"subset {sub['classes']}: mAP50-95 {sub['mAP50-95']:.4f}  mAP50 {sub['mAP50']:.4f}")
        ev.compute()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ev.plot(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote {out / 'metrics.json'}, {out / 'pr_curve.png'}, {out / 'confusion_matrix.png'}")
    return 0


def predict_labels(det: Detector, labels, batch_size: int, conf: float, iou: float, max_det: int,
                   device: str) -> dict[str, np.ndarray]:
    """Run ``det`` over every image of a LabelSet; ``{image_id: [n, 6]}`` in original pixels."""
    paths = {r.image_id: r.path for r in labels.records}
    return predict_paths(det, paths, batch_size, conf, iou, max_det, device)[0]


def predict_paths(det: Detector, paths: dict[str, str], batch_size: int, conf: float, iou: float, max_det: int,
                  device: str, keep_images: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from tqdm import tqdm

    out: dict[str, np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    ids = list(paths)
    for i in tqdm(range(0, len(ids), batch_size), desc="predict", unit="batch", disable=not sys.stderr.isatty()):
        chunk = ids[i:i + batch_size]
        tensors, metas = [], []
        for image_id in chunk:
            img = read_image(paths[image_id])
            t, meta = preprocess_image(img, det.imgsz)
            tensors.append(t)
            metas.append(meta)
            if keep_images:
                images[image_id] = img
        raw = det(torch.stack(tensors).to(device) if det.kind == "torch" else torch.stack(tensors))
        for image_id, d, meta in zip(chunk, postprocess(raw, conf=conf, iou=iou, max_det=max_det), metas):
            out[image_id] = boxes_to_original(d.cpu(), meta["ratio"], meta["pad"], meta["orig_size"]).numpy()
    return out, images


# ---- predict ----------------------------------------------------------------------------------

@dataclass
class PredictConfig:
    weights: str = opt("", "model file: our checkpoint, Ultralytics .pt, state dict or .onnx")
    source: str = opt("", "an image or a folder of images")
    out: str = opt("runs/detect-predict", "output folder: drawn images and predictions.json")
    imgsz: int = opt(0, "input size (0 = the checkpoint's)")
    conf: float = opt(0.25, "confidence threshold")
    iou: float = opt(0.7, "NMS IoU threshold")
    max_det: int = opt(300, "detections per image")
    batch_size: int = opt(8, "batch size")
    device: str = opt("cpu", "cpu | cuda")
    draw: bool = opt(True, "write images with the predictions drawn")


def list_images(source: str) -> dict[str, str]:
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

    if not cfg.weights or not cfg.source:
        raise ConfigError("predict detect needs weights=FILE and source=IMAGE|DIR")
    paths, skipped = drop_damaged(list_images(cfg.source), cfg.source)
    det = load_detector(cfg.weights, cfg.device, cfg.imgsz)
    preds, images = predict_paths(det, paths, cfg.batch_size, cfg.conf, cfg.iou, cfg.max_det, cfg.device,
                                  keep_images=cfg.draw)
    out = Path(cfg.out)
    write_predictions_json(out / "predictions.json", preds)
    if cfg.draw:
        for image_id, img in images.items():
            save_image(out / f"{image_id}.jpg", draw_detections(img, preds[image_id], class_names=det.names))
    n = sum(len(p) for p in preds.values())
    print(f"{n} detections in {len(preds)} images → {out / 'predictions.json'}"
          + (f" and drawn images in {out}" if cfg.draw else "")
          + (f"; skipped {skipped} damaged image(s) (named above)" if skipped else ""))
    return 0


# ---- export -----------------------------------------------------------------------------------

@dataclass
class ExportConfig:
    weights: str = opt("", "our checkpoint, Ultralytics .pt or state dict")
    format: str = opt("onnx", "onnx")
    out: str = opt("", "output file (default: weights with .onnx)")
    imgsz: int = opt(0, "input size (0 = the checkpoint's)")
    dynamic_batch: bool = opt(True, "symbolic batch dimension")


def export(cfg: ExportConfig) -> int:
    from visiontrain.detect.export import export_onnx

    if cfg.format != "onnx":
        raise ConfigError(f"format={cfg.format!r}: only onnx is supported")
    if not cfg.weights:
        raise ConfigError("export detect needs weights=FILE")
    det = load_detector(cfg.weights, "cpu", cfg.imgsz)
    out = Path(cfg.out or Path(cfg.weights).with_suffix(".onnx"))
    export_onnx(det.model, out, imgsz=det.imgsz, dynamic_batch=cfg.dynamic_batch)
    print(f"exported to {out} (input [B, 3, {det.imgsz}, {det.imgsz}], output [B, {4 + len(det.names)}, A])")
    return 0


VERBS: dict[str, tuple[type, Any]] = {
    "synth": (SynthVerbConfig, synth),
    "train": (DetectTrainConfig, train),
    "eval": (EvalConfig, evaluate),
    "predict": (PredictConfig, predict),
    "export": (ExportConfig, export),
    "split": (SplitConfig, split),  # the few-shot split tool of the class-incremental workflow
}
__all__ = ["VERBS", "load_detector"]
