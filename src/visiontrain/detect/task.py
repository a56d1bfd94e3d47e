"""The detection task: YOLOv8 on MAR20/VOC, YOLO or COCO data, wired into the engine, and the CLI verbs
``synth``, ``train``, ``eval``, ``predict``, ``export`` and ``split``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontrain.config import ConfigError, opt
from visiontrain.detect.augment import AugmentConfig
from visiontrain.detect.data import (
    DatasetError,
    DetectionDataset,
    LabelSet,
    boxes_to_original,
    collate,
    load_labels,
)
from visiontrain.detect.image_check import report_bad_images
from visiontrain.detect.loss import DetectionLoss
from visiontrain.detect.model import YOLOv8
from visiontrain.detect.postprocess import postprocess
from visiontrain.detect.synthetic import write_synthetic_mar20
from visiontrain.engine.config import EMAConfig, TrainConfig
from visiontrain.engine.task import StepInfo, Task

log = logging.getLogger(__name__)


@dataclass
class SynthConfig:
    out: str = opt("", "output folder (synth verb); for training, empty = a cache folder")
    train: int = opt(600, "training images")
    val: int = opt(100, "validation images")
    imgsz: int = opt(320, "image size in pixels")
    seed: int = opt(0, "generator seed")


@dataclass
class LossGains:
    box: float = opt(7.5, "CIoU box loss gain")
    cls: float = opt(0.5, "BCE class loss gain")
    dfl: float = opt(1.5, "distribution focal loss gain")


@dataclass
class DistillConfig:
    teacher: str = opt("", "teacher checkpoint (enables distillation)")
    cwd: float = opt(1.0, "weight of channel-wise distillation on the neck outputs")
    kl: float = opt(10.0, "weight of response KL on the teacher's classes")
    dfl: float = opt(0.0, "weight of DFL-distribution distillation")
    tau: float = opt(1.0, "temperature")
    init_student: bool = opt(True, "a same-scale student starts as the teacher with grown class branch")


@dataclass
class DetectTrainConfig(TrainConfig):
    out: str = opt("runs/detect", "run directory")
    model: str = opt("yolov8n", "yolov8n | yolov8s | yolov8m | yolov8l | yolov8x")
    data: str = opt("", "dataset: MAR20/VOC root, YOLO data.yaml (or root), COCO .json; empty = synthetic MAR20")
    train_split: str = opt("train", "training split name (VOC ImageSets/Main/<split>.txt)")
    val_split: str = opt("test", "validation split name (MAR20 calls it 'test')")
    names: list = opt([], "class names (VOC layout; default MAR20's A1..A20)")
    base_classes: list = opt([], "train on these classes only (others' labels removed; e.g. [A1,...,A10])")
    imgsz: int = opt(320, "training and evaluation image size (multiple of 32)")
    synth: SynthConfig = opt(SynthConfig, "synthetic data used when data is empty")
    aug: AugmentConfig = opt(AugmentConfig, "training augmentation")
    loss: LossGains = opt(LossGains, "loss gains")
    distill: DistillConfig = opt(DistillConfig, "teacher→student distillation")
    freeze_backbone_epochs: int = opt(0, "freeze the backbone for the first N epochs (pretrained-backbone workflow)")
    backbone_only: bool = opt(False, "with weights=: load the backbone only")
    conf: float = opt(0.001, "evaluation confidence threshold")
    iou: float = opt(0.7, "NMS IoU threshold")
    max_det: int = opt(300, "detections kept per image")
    cache_images: bool = opt(True, "keep decoded, resized images in memory")
    skip_bad_images: bool = opt(False, "leave damaged (truncated, empty, undecodable) images out with a warning "
                                       "instead of stopping with an error that lists them")
    channels_last: bool = opt(True, "channels-last memory format (about 2x faster convolutions on CPU)")
    # engine defaults that suit detection
    epochs: int = opt(30, "number of epochs")
    batch_size: int = opt(16, "global batch size")
    optimizer: str = opt("adamw", "sgd (nesterov) | adamw")
    lr: float = opt(0.002, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum / AdamW beta1")
    weight_decay: float = opt(5e-4, "weight decay (never on biases and norm weights)")
    warmup_epochs: float = opt(1.0, "linear warmup in epochs")
    clip_grad: float = opt(10.0, "gradient-norm clipping")
    ema: EMAConfig = opt(lambda: EMAConfig(enabled=True, decay=0.9999, warmup=2000.0), "weight EMA")


def _scale_of(model_name: str) -> str:
    name = model_name.lower().removesuffix(".yaml")
    if not (name.startswith("yolov8") and len(name) == 7 and name[-1] in "nsmlx"):
        raise ConfigError(f"model={model_name!r}: expected yolov8n, yolov8s, yolov8m, yolov8l or yolov8x")
    return name[-1]


def synthetic_data_dir(s: SynthConfig) -> Path:
    """The synthetic MAR20 set described by ``s``, written once (see :mod:`visiontrain.synthcache`)."""
    from visiontrain.synthcache import cache_root, synthesize_once

    params = {"kind": "mar20", "train": s.train, "val": s.val, "imgsz": s.imgsz, "seed": s.seed}
    out = Path(s.out) if s.out else cache_root() / f"mar20-synth-{s.train}-{s.val}-{s.imgsz}-{s.seed}"
    return synthesize_once(out, params, lambda tmp: write_synthetic_mar20(tmp, train=s.train, val=s.val,
                                                                          imgsz=s.imgsz, seed=s.seed),
                           what=f"synthetic MAR20 data ({s.train} train, {s.val} val, {s.imgsz}px)")


def remap_classes(labels: LabelSet, names: list[str]) -> LabelSet:
    """Keep only ``names`` and renumber them ``0..len(names)-1`` in that order (others removed)."""
    kept = labels.keep_classes(names)
    lut = np.full(len(labels.class_names), -1, dtype=np.int64)
    for new, n in enumerate(names):
        lut[labels.class_names.index(n)] = new
    records = [replace(r, classes=lut[r.classes]) for r in kept.records]
    return replace(kept, records=records, class_names=list(names))


def parse_class_list(spec: list | str, known: list[str]) -> list[str]:
    """``[A1, A2]`` or ``A1..A10`` (a range over the known names) → list of names, validated."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[str] = []
    for item in (str(i) for i in items):
        if ".." in item:
            a, b = item.split("..", 1)
            if a not in known or b not in known:
                raise ConfigError(f"class range {item!r}: {a!r} or {b!r} is not among {known}")
            out += known[known.index(a): known.index(b) + 1]
        elif item in known:
            out.append(item)
        else:
            raise ConfigError(f"class {item!r} is not among the dataset's classes {known}")
    return out


class DetectTask(Task):
    name = "detect"
    primary_metric = "mAP50-95"
    primary_mode = "max"

    def __init__(self, cfg: DetectTrainConfig):
        super().__init__(cfg)
        self.scale = _scale_of(cfg.model)
        # derived settings live here; the config stays as the user wrote it
        self.data = cfg.data or str(synthetic_data_dir(cfg.synth))
        given = [str(n) for n in cfg.names] or None
        # every image of both splits is checked here, before step 1: one error names all damaged ones
        self.train_labels = load_labels(self.data, cfg.train_split, class_names=given, bad_images="drop")
        self.val_labels = load_labels(self.data, cfg.val_split, class_names=given, bad_images="drop")
        report_bad_images([self.train_labels, self.val_labels], cfg.skip_bad_images, DatasetError)
        self.all_names = list(self.train_labels.class_names)
        self.names = parse_class_list(cfg.base_classes, self.all_names) if cfg.base_classes else self.all_names
        if cfg.base_classes:
            self.train_labels = remap_classes(self.train_labels, self.names)
        self.loss = DetectionLoss(len(self.names), box_gain=cfg.loss.box, cls_gain=cfg.loss.cls,
                                  dfl_gain=cfg.loss.dfl, global_normalizer=True)
        self.train_set: DetectionDataset | None = None
        self.distiller = None
        if cfg.distill.teacher:
            from visiontrain.detect.distill import Distiller

            self.distiller = Distiller.from_config(cfg, self.names)
        # classes of the teacher / of the weights= checkpoint this run grows from: mAP is reported per group
        self.base_names: list[str] | None = self.distiller.teacher_names if self.distiller is not None else None
        if self.base_names is None and cfg.weights:
            from visiontrain.detect.distill import detector_class_names

            known = detector_class_names(cfg.weights)
            self.base_names = known if known and set(known) < set(self.names) else None

    def model_signature(self) -> str:
        return f"yolov8{self.scale}-nc{len(self.names)}"

    def state_dict(self) -> dict:
        return {"names": list(self.names), "scale": self.scale, "imgsz": self.cfg.imgsz}

    def build_model(self) -> nn.Module:
        model = YOLOv8(self.scale, nc=len(self.names), names=self.names)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.distiller is not None:
            self.distiller.attach(model)
        return model

    def load_weights(self, model: nn.Module, path: str) -> None:
        from visiontrain.detect.distill import load_detect_weights

        load_detect_weights(model, path, self.names, backbone_only=self.cfg.backbone_only)

    def build_datasets(self):
        cfg = self.cfg
        self.train_set = DetectionDataset(self.train_labels, cfg.train_split, cfg.imgsz, augment=True,
                                          hyp=cfg.aug, seed=cfg.seed, cache_images=cfg.cache_images)
        val = self.val_dataset(cfg.val_split, self.val_labels)
        return self.train_set, val

    def val_dataset(self, split: str, labels: LabelSet | None = None) -> DetectionDataset:
        cfg = self.cfg
        if labels is None:
            labels = load_labels(self.data, split, class_names=[str(n) for n in cfg.names] or None,
                                 bad_images="skip" if cfg.skip_bad_images else "raise")
        if cfg.base_classes:
            labels = remap_classes(labels, self.names)
        return DetectionDataset(labels, split, cfg.imgsz, augment=False, cache_images=cfg.cache_images)

    def collate(self, samples):
        return collate(samples)

    def frozen_prefixes(self, info: StepInfo) -> tuple[str, ...]:
        """``freeze_backbone_epochs=N``: the backbone trains from epoch N + 1 on."""
        return ("backbone",) if info.epoch < self.cfg.freeze_backbone_epochs else ()

    def on_epoch_start(self, model: nn.Module, info: StepInfo) -> None:
        """Mosaic off for the last ``aug.close_mosaic`` epochs of the plan (``max_steps`` runs too)."""
        cfg = self.cfg
        if self.train_set is None:
            return
        closing = cfg.aug.close_mosaic > 0 and info.epoch >= info.total_epochs - cfg.aug.close_mosaic
        self.train_set.mosaic = cfg.aug.mosaic > 0 and not closing

    def training_step(self, model: nn.Module, batch, info: StepInfo) -> dict[str, torch.Tensor]:
        images, targets, _ = batch
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.distiller is not None:
            return self.distiller.training_step(model, images, targets, self.loss)
        preds = model(images)
        return self.loss(preds, targets, tuple(images.shape[2:]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        evaluator = run_evaluation(model, loader, self.names, self.cfg.conf, self.cfg.iou, self.cfg.max_det)
        metrics = flatten_metrics(evaluator.compute())
        if self.base_names:  # class-incremental run: base / novel / all
            from visiontrain.detect.distill import base_novel_metrics

            metrics.update(base_novel_metrics(evaluator, self.base_names))
        return metrics

    def visualize(self, model: nn.Module, batch, out_dir: Path) -> None:
        from visiontrain.detect.draw import save_batch_grid

        images, _, metas = batch
        preds = postprocess(model(images.to(next(model.parameters()).device)).float(), conf=0.25,
                            iou=self.cfg.iou, max_det=self.cfg.max_det)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_batch_grid(out_dir / "val_predictions.jpg", images[:8], [p.cpu() for p in preds[:8]],
                        class_names=self.names)


def run_evaluation(model: nn.Module, loader, names: list[str], conf: float, iou: float, max_det: int):
    """Predict over ``loader`` and accumulate COCO-style statistics against the dataset's labels
    (in original image pixels). Returns the filled :class:`DetectionEvaluator`."""
    from visiontrain.detect.metrics import DetectionEvaluator

    dataset = loader.dataset
    gt = {r.image_id: r for r in dataset.labels.records}
    evaluator = DetectionEvaluator(names)
    device = next(model.parameters()).device
    for images, _, metas in loader:
        out = model(images.to(device)).float()
        for det, meta in zip(postprocess(out, conf=conf, iou=iou, max_det=max_det), metas):
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


def train(cfg: DetectTrainConfig) -> int:
    from visiontrain.engine.trainer import fit

    result = fit(DetectTask(cfg))
    m = result["metrics"]
    if m and result["is_main"]:
        print(f"final: mAP50-95 {m.get('mAP50-95', float('nan')):.4f}  mAP50 {m.get('mAP50', float('nan')):.4f}  "
              f"(best {result['best']:.4f} at step {result['best_step']}) → {result['out']}")
    return 0


