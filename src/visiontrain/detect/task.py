"""The detection task the engine trains: YOLOv8 on MAR20/VOC, YOLO or COCO data (or synthetic MAR20).

:class:`DetectTask` reads and checks everything before step 1 (the ``weights=`` and ``distill.teacher=``
files first, then every label and image of both splits), keeps what it derives from the config on itself
(the data root, the class names, the classes a run grows from) and leaves the config as it was given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from visiontrain.config import ConfigError
from visiontrain.detect.classes import parse_class_list
from visiontrain.detect.config import DetectTrainConfig, model_is_obb, model_scale
from visiontrain.detect.data import DatasetError, DetectionDataset, collate, collate_obb, load_labels
from visiontrain.detect.image_check import report_bad_images
from visiontrain.detect.inference import (
    TORCH_WEIGHT_FILES,
    build_detector,
    load_weights_into,
    weights_class_names,
)
from visiontrain.detect.loss import DetectionLoss
from visiontrain.detect.model import YOLOv8
from visiontrain.detect.postprocess import postprocess
from visiontrain.detect.synthetic import synthetic_set_dir
from visiontrain.engine.checkpoint import CheckpointError, resume_path
from visiontrain.engine.task import StepInfo, Task

log = logging.getLogger(__name__)


class DetectTask(Task):
    name = "detect"
    primary_metric = "mAP50-95"
    primary_mode = "max"

    def __init__(self, cfg: DetectTrainConfig):
        super().__init__(cfg)
        self.scale = model_scale(cfg.model)
        self.obb = model_is_obb(cfg.model)  # oriented boxes: YOLOv8-OBB, polygon labels, OBB loss and metrics
        teacher = None
        if cfg.distill.teacher:  # files first: a wrong one is reported before any data is written or read
            teacher = build_detector(cfg.distill.teacher, TORCH_WEIGHT_FILES)
            if not teacher.names:
                raise CheckpointError(f"distill.teacher={cfg.distill.teacher}: a plain state dict has no class "
                                      "names; a teacher must be a checkpoint written by `visiontrain train detect` "
                                      "(or an Ultralytics .pt)")
            from visiontrain.detect.obb.model import YOLOv8OBB

            if isinstance(teacher, YOLOv8OBB) != self.obb:
                kind = "an oriented-box (OBB)" if self.obb else "a horizontal-box"
                raise ConfigError(f"distill.teacher={cfg.distill.teacher}: {kind} student (model={cfg.model}) needs "
                                  f"a teacher of the same kind; this file holds {'an OBB' if not self.obb else 'a horizontal'}"
                                  " model")
        weights_names = self._weights_class_names()
        # derived settings live here; the config stays as the user wrote it
        self.data = cfg.data or str(synthetic_set_dir(cfg.synth))
        self.val_data = cfg.val_data or self.data
        given = [str(n) for n in cfg.names] or None
        # every image of both splits is checked here, before step 1: one error names all damaged ones
        self.train_labels = load_labels(self.data, cfg.train_split, class_names=given, bad_images="drop", obb=self.obb)
        self.val_labels = load_labels(self.val_data, cfg.val_split, class_names=given, bad_images="drop", obb=self.obb)
        report_bad_images([self.train_labels, self.val_labels], cfg.skip_bad_images, DatasetError)
        self._warn_if_validating_on_training_data()
        known = list(self.train_labels.class_names)
        self.names = parse_class_list(cfg.base_classes, known, "base_classes") if cfg.base_classes else known
        if cfg.base_classes:
            self.train_labels = self.train_labels.only_classes(self.names)
            self.val_labels = self.val_labels.only_classes(self.names)
        if self.obb:
            from visiontrain.detect.obb.loss import OBBLoss

            self.loss = OBBLoss(len(self.names), box_gain=cfg.loss.box, cls_gain=cfg.loss.cls, dfl_gain=cfg.loss.dfl,
                                angle_gain=cfg.loss.angle, global_normalizer=True)
        else:
            self.loss = DetectionLoss(len(self.names), box_gain=cfg.loss.box, cls_gain=cfg.loss.cls,
                                      dfl_gain=cfg.loss.dfl, global_normalizer=True)
        self.train_set: DetectionDataset | None = None
        self.distiller = None
        if teacher is not None:
            from visiontrain.detect.distill import Distiller

            d = cfg.distill
            self.distiller = Distiller(teacher, teacher.names, self.names, cwd=d.cwd, kl=d.kl, dfl=d.dfl, tau=d.tau,
                                       feature=d.feature, l2=d.l2, mgd=d.mgd, pkd=d.pkd, mgd_mask=d.mgd_mask,
                                       pseudo=d.pseudo, kl_skip_novel=d.kl_skip_novel,
                                       frozen_base=self._frozen_base(teacher), base_negatives=d.base_negatives,
                                       novel_lr_scale=d.novel_lr_scale,
                                       init_student=d.init_student and not cfg.weights,
                                       source=f"distill.teacher={d.teacher}")
        # classes of the teacher / of the weights= file this run grows from: mAP is reported per group
        self.base_names: list[str] | None = self.distiller.teacher_names if self.distiller is not None else None
        if self.base_names is None and weights_names and set(weights_names) < set(self.names):
            self.base_names = weights_names

    def _frozen_base(self, teacher) -> bool:
        """``distill.frozen_base``, with ``auto`` resolved: true for a class-incremental student (the teacher's
        scale, every teacher class and more, no ``weights=``, ``init_student``, ``freeze_bn``), else false.
        Why that default: on the benchmark's grid it keeps the teacher's base predictions exactly and learns the
        novel classes better than plain fine-tuning (BENCHMARKS.md, issue 22)."""
        d, cfg = self.cfg.distill, self.cfg
        if d.frozen_base != "auto":
            return d.frozen_base == "true"
        t_names = [str(n) for n in teacher.names]
        why_not = [why for why, ok in (
            (f"the student is yolov8{self.scale}, the teacher yolov8{teacher.scale}", teacher.scale == self.scale),
            ("the student adds no class to the teacher's", set(t_names) < set(self.names)),
            ("weights= is given", not cfg.weights), ("distill.init_student=false", d.init_student),
            ("freeze_bn=false", cfg.freeze_bn)) if not ok]
        if why_not:
            log.info("distill.frozen_base=auto -> false (%s: the whole student trains under the distillation "
                     "terms)", "; ".join(why_not))
        else:
            log.info("distill.frozen_base=auto -> true (a class-incremental student of the teacher's scale: the "
                     "teacher stays frozen, a new class branch learns the novel classes)")
        return not why_not

    def _weights_class_names(self) -> list[str] | None:
        """The class names of ``weights=`` (checking the file before any data is read). A resumed run does not
        load it again, so there it is only a hint, and a file gone since is no error."""
        if not self.cfg.weights:
            return None
        if resume_path(self.cfg.resume, self.cfg.out) is None:
            return weights_class_names(self.cfg.weights)
        try:
            return weights_class_names(self.cfg.weights)
        except CheckpointError:
            return None

    def _warn_if_validating_on_training_data(self) -> None:
        train, val = self.train_labels, self.val_labels
        if len(train) and train.same_images(val):
            where = (f"data={self.data} is one COCO file, so every split reads it" if train.layout == "coco" and
                     Path(self.data).is_file() and self.val_data == self.data else
                     f"val_split={self.cfg.val_split!r} of {self.val_data} holds the training images of "
                     f"train_split={self.cfg.train_split!r} of {self.data}")
            log.warning("validation data is the training data (%s): validation metrics will not show "
                        "overfitting. Give held-out data with val_data= (e.g. val_data=val.json for COCO).", where)

    def model_signature(self) -> str:
        split = ""
        if self.distiller is not None and self.distiller.frozen_base:  # the class branch's parts, e.g. -parts10+10
            sizes = self.distiller.teacher.head.class_parts or (len(self.distiller.teacher_names),)
            split = f"-parts{'+'.join(map(str, (*sizes, len(self.distiller.novel_names))))}"
        return f"yolov8{self.scale}{'-obb' if self.obb else ''}-nc{len(self.names)}{split}"

    def state_dict(self) -> dict:
        return {"names": list(self.names), "scale": self.scale, "imgsz": self.cfg.imgsz, "obb": self.obb}

    def build_model(self) -> nn.Module:
        if self.obb:
            from visiontrain.detect.obb.model import YOLOv8OBB

            model = YOLOv8OBB(self.scale, nc=len(self.names), names=self.names)
        else:
            model = YOLOv8(self.scale, nc=len(self.names), names=self.names)
        if self.distiller is not None:  # first: attach may add modules (a split class branch, adapters)
            self.distiller.attach(model)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """The engine's groups (decay on weights only), with the biases in their own group when
        ``warmup_bias_lr`` > 0: their warmup starts at that learning rate and falls to ``lr``. With
        ``distill.frozen_base`` the novel class branch gets its own copy of each group at
        ``lr × distill.novel_lr_scale`` (listed first, so the logged ``lr`` is the one that trains)."""
        cfg = self.cfg
        scale = self.distiller.novel_lr_scale if self.distiller is not None and self.distiller.frozen_base else 1.0
        if cfg.warmup_bias_lr <= 0 and scale == 1.0:
            return None
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        weights = [(n, p) for n, p in trainable if p.ndim >= 2]
        norms = [(n, p) for n, p in trainable if p.ndim < 2 and not (cfg.warmup_bias_lr > 0 and n.endswith(".bias"))]
        biases = [(n, p) for n, p in trainable if p.ndim < 2 and cfg.warmup_bias_lr > 0 and n.endswith(".bias")]
        groups = [(weights, {"weight_decay": cfg.weight_decay}), (norms, {"weight_decay": 0.0})]
        if biases:
            groups.append((biases, {"weight_decay": 0.0, "warmup_start": cfg.warmup_bias_lr / cfg.lr}))
        if scale == 1.0:
            return [{"params": [p for _, p in ps], **opts} for ps, opts in groups]
        is_novel = self.distiller.is_novel_param
        novel = [{"params": [p for n, p in ps if is_novel(n)], **opts, "lr": cfg.lr * scale} for ps, opts in groups]
        rest = [{"params": [p for n, p in ps if not is_novel(n)], **opts} for ps, opts in groups]
        return novel + rest

    def load_weights(self, model: nn.Module, path: str) -> None:
        load_weights_into(model, path, self.names, backbone_only=self.cfg.backbone_only)

    def build_datasets(self) -> tuple[DetectionDataset, DetectionDataset]:
        cfg = self.cfg
        self.train_set = DetectionDataset(self.train_labels, cfg.train_split, cfg.imgsz, augment=True,
                                          hyp=cfg.aug, seed=cfg.seed, cache_images=cfg.cache_images, obb=self.obb)
        val = DetectionDataset(self.val_labels, cfg.val_split, cfg.imgsz, augment=False,
                               cache_images=cfg.cache_images, obb=self.obb)
        return self.train_set, val

    def collate(self, samples):
        return collate_obb(samples) if self.obb else collate(samples)

    def frozen_prefixes(self, info: StepInfo) -> tuple[str, ...]:
        """``freeze_backbone_epochs=N``: the backbone trains from epoch N + 1 on; ``distill.frozen_base``: all
        but the novel class branch stays frozen throughout."""
        frozen = ("backbone",) if info.epoch < self.cfg.freeze_backbone_epochs else ()
        if self.distiller is not None:
            frozen += tuple(p for p in self.distiller.frozen_prefixes() if p not in frozen)
        return frozen

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
        from visiontrain.detect.evaluation import base_novel_metrics, flatten_metrics, run_evaluation

        if self.obb:
            from visiontrain.detect.obb.evaluation import obb_metrics, run_obb_evaluation

            obb, hbb = run_obb_evaluation(model, loader, self.names, self.cfg.conf, self.cfg.iou, self.cfg.max_det)
            return flatten_metrics(obb_metrics(obb, hbb))
        evaluator = run_evaluation(model, loader, self.names, self.cfg.conf, self.cfg.iou, self.cfg.max_det)
        metrics = flatten_metrics(evaluator.compute())
        if self.base_names:  # class-incremental run: base / novel / all
            metrics.update(base_novel_metrics(evaluator, self.base_names))
        return metrics

    def visualize(self, model: nn.Module, batch, out_dir: Path) -> None:
        from visiontrain.detect.draw import save_batch_grid

        images, _, metas = batch
        if self.obb:
            from visiontrain.detect.obb.draw import save_obb_batch_grid
            from visiontrain.detect.obb.nms import postprocess_obb

            preds = postprocess_obb(model(images.to(next(model.parameters()).device)).float(), conf=0.25,
                                    iou=self.cfg.iou, max_det=self.cfg.max_det)
            out_dir.mkdir(parents=True, exist_ok=True)
            save_obb_batch_grid(out_dir / "val_predictions.jpg", images[:8], [p.cpu() for p in preds[:8]],
                                class_names=self.names)
            return
        preds = postprocess(model(images.to(next(model.parameters()).device)).float(), conf=0.25,
                            iou=self.cfg.iou, max_det=self.cfg.max_det)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_batch_grid(out_dir / "val_predictions.jpg", images[:8], [p.cpu() for p in preds[:8]],
                        class_names=self.names)

