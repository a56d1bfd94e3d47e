"""Every setting of the detection task: the train config and its parts, and the config of each verb.

Values are checked when a config is built (``__post_init__``, which :func:`visiontrain.config.load_config`
runs), so a wrong model name, image size or threshold is reported before any data is synthesised or read
and before an output folder exists. Nested parts (``synth.*``, ``aug.*``, ``loss.*``, ``distill.*``) have a
``check(prefix)`` that their owner calls, so messages name the key as the user writes it.

The synthetic set has one description, :class:`SyntheticSet`: the ``synth.*`` keys of ``train`` (used when
``data`` is empty) and the ``synth`` verb (:class:`SynthConfig`, which only gives ``out`` a default folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visiontrain.config import ConfigError, opt
from visiontrain.engine.config import EMAConfig, TrainConfig, check_choice

#: the neck terms of ``distill.feature`` (visiontrain.detect.distill.feature.FEATURE_METHODS)
FEATURE_METHODS = ("cwd", "l2", "mgd", "pkd", "none")
MODELS = ("yolov8n", "yolov8s", "yolov8m", "yolov8l", "yolov8x")
#: what a ``weights=`` / ``distill.teacher=`` file may be (said in every "wrong file" message)
WEIGHT_FILES = "a detect checkpoint, an Ultralytics .pt, a state dict or an .onnx"
NAMES_DOC = "the dataset's class names: VOC's class list (default MAR20's A1..A20), COCO's order, YOLO's check"


def model_scale(model: str) -> str:
    """``yolov8n`` (or ``yolov8n.yaml``, or the oriented-box ``yolov8n-obb``) -> ``n``; any other name is a
    :class:`ConfigError`."""
    name = model.lower().removesuffix(".yaml").removesuffix("-obb")
    if name not in MODELS:
        raise ConfigError(f"model={model!r}: expected {', '.join(MODELS[:-1])} or {MODELS[-1]} (oriented boxes: "
                          f"yolov8n-obb … yolov8x-obb)")
    return name[-1]


def model_is_obb(model: str) -> bool:
    """``model=yolov8?-obb``: the oriented-box (YOLOv8-OBB) variant."""
    return model.lower().removesuffix(".yaml").endswith("-obb")


def check_at_least(cfg: Any, prefix: str, minimum: float, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < minimum:
            raise ConfigError(f"{prefix}{key}={getattr(cfg, key)} must be >= {minimum}")


def check_fraction(cfg: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"{prefix}{key}={getattr(cfg, key)} must be between 0 and 1")


def check_imgsz(value: int, key: str = "imgsz", allow_zero: bool = False) -> None:
    """A model input size: a positive multiple of 32 (the largest stride); ``0`` = "the weights' own" where allowed."""
    if allow_zero and value == 0:
        return
    if value <= 0 or value % 32:
        hint = f" (e.g. {max(32, round(value / 32) * 32)})" if value > 0 else ""
        raise ConfigError(f"{key}={value} must be a positive multiple of 32{hint}"
                          + ("; 0 = the size the weights were trained at" if allow_zero else ""))


def check_detection_output(cfg: Any) -> None:
    """``conf`` and ``iou`` in [0, 1], ``max_det`` >= 1 (train, eval and predict share these keys)."""
    check_fraction(cfg, "", "conf", "iou")
    check_at_least(cfg, "", 1, "max_det")


# ---- parts of the train config ----------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Training augmentation settings (validation never augments)."""

    mosaic: float = opt(1.0, "probability of a 4-image mosaic per training sample (0 = never)")
    close_mosaic: int = opt(10, "switch mosaic off for the last N epochs of the plan (max_steps runs too)")
    degrees: float = opt(0.0, "random rotation range, +/- degrees (boxes become the bounds of rotated boxes)")
    translate: float = opt(0.1, "random translation, +/- fraction of the image size")
    scale: float = opt(0.5, "random scale gain: the scale is drawn from [1 - scale, 1 + scale]")
    shear: float = opt(0.0, "random shear, +/- degrees")
    fliplr: float = opt(0.5, "probability of a horizontal flip")
    flipud: float = opt(0.0, "probability of a vertical flip")
    hsv_h: float = opt(0.015, "hue jitter, fraction of the hue circle")
    hsv_s: float = opt(0.7, "saturation jitter, fraction")
    hsv_v: float = opt(0.4, "value (brightness) jitter, fraction")
    min_box_size: float = opt(2.0, "drop boxes narrower or shorter than this after augmentation (pixels)")
    min_area_ratio: float = opt(0.1, "drop boxes that keep less than this fraction of their scaled area")
    max_aspect: float = opt(100.0, "drop boxes whose aspect ratio exceeds this after augmentation")

    def check(self, prefix: str = "aug.") -> None:
        check_fraction(self, prefix, "mosaic", "fliplr", "flipud", "translate", "scale", "hsv_h", "hsv_s", "hsv_v",
                       "min_area_ratio")
        check_at_least(self, prefix, 0, "close_mosaic", "degrees", "shear", "min_box_size")
        check_at_least(self, prefix, 1, "max_aspect")


@dataclass
class SyntheticSet:
    """A synthetic MAR20 set (:func:`visiontrain.detect.synthetic.write_synthetic_mar20`)."""

    out: str = opt("", "where the synthetic set is written; empty = a cache folder ($VISIONTRAIN_CACHE)")
    train: int = opt(600, "training images")
    val: int = opt(100, "validation images (ImageSets/Main/test.txt)")
    imgsz: int = opt(320, "image size in pixels (>= 64)")
    seed: int = opt(0, "generator seed (same seed, same bytes)")

    def check(self, prefix: str = "synth.") -> None:
        check_at_least(self, prefix, 1, "train")
        check_at_least(self, prefix, 0, "val")
        check_at_least(self, prefix, 64, "imgsz")


@dataclass
class LossGains:
    box: float = opt(7.5, "CIoU box loss gain")
    cls: float = opt(0.5, "BCE class loss gain")
    dfl: float = opt(1.5, "distribution focal loss gain")
    angle: float = opt(1.0, "angle loss gain (oriented-box models only; Ultralytics 8.4's default)")

    def check(self, prefix: str = "loss.") -> None:
        check_at_least(self, prefix, 0, "box", "cls", "dfl", "angle")


@dataclass
class DistillConfig:
    teacher: str = opt("", "teacher weights (enables distillation): a detect checkpoint or an Ultralytics .pt, "
                           "with class names")
    feature: str = opt("none", "neck term: cwd (channel-wise) | l2 (score-weighted L2 through a projector, as "
                              "Ultralytics' distill_model=) | mgd (masked generative) | pkd (Pearson) | none; "
                              "weighted by the key of the same name")
    cwd: float = opt(1.0, "weight of channel-wise distillation on the neck outputs (feature=cwd)")
    l2: float = opt(6.0, "weight of the score-weighted L2 feature term (feature=l2; 6 = Ultralytics' dis)")
    mgd: float = opt(2.0, "weight of masked generative distillation (feature=mgd)")
    pkd: float = opt(1.0, "weight of Pearson-correlation distillation (feature=pkd)")
    mgd_mask: float = opt(0.65, "MGD: fraction of student feature positions masked (the paper's lambda)")
    kl: float = opt(2.0, "weight of response KL on the teacher's classes")
    dfl: float = opt(0.0, "weight of DFL-distribution distillation (localisation distillation)")
    tau: float = opt(1.0, "temperature")
    pseudo: float = opt(0.1, "teacher detections of its classes scoring above this join each batch's labels "
                             "(pseudo-labels for the unlabelled old objects; 0 = off)")
    kl_skip_novel: bool = opt(False, "no response KL at anchors whose teacher box overlaps a labelled novel "
                                     "object (IoU > 0.5: the label wins over the teacher's base-class scores)")
    base_negatives: float = opt(5.0, "frozen_base: weight of a term that turns the novel classes off where the "
                                     "teacher sees one of its classes (not at labelled novel objects), so they do "
                                     "not outscore an old class on an old object; 0 = off")
    novel_lr_scale: float = opt(5.0, "frozen_base: the novel class branch trains at lr × this (it trains alone, "
                                     "from a warm start; 5 measured best of 1, 5 and 10)")
    init_student: bool = opt(True, "a same-scale student starts as the teacher with grown class branch")
    frozen_base: str = opt("auto", "true: the student is the teacher, frozen, plus a new class branch for the "
                                   "novel classes, so base predictions stay the teacher's exactly (kl, pseudo and "
                                   "feature terms are off); false: the whole student trains under the distillation "
                                   "terms; auto: true for a class-incremental student (the teacher's scale, more "
                                   "classes, no weights=), else false")

    def check(self, prefix: str = "distill.") -> None:
        check_at_least(self, prefix, 0, "cwd", "l2", "mgd", "pkd", "kl", "dfl", "base_negatives")
        if self.novel_lr_scale <= 0:
            raise ConfigError(f"{prefix}novel_lr_scale={self.novel_lr_scale} must be > 0")
        if self.feature not in FEATURE_METHODS:
            import difflib

            close = difflib.get_close_matches(str(self.feature), FEATURE_METHODS, n=1)
            raise ConfigError(f"{prefix}feature={self.feature!r} is not one of {', '.join(FEATURE_METHODS)}."
                              + (f" Did you mean {close[0]!r}?" if close else ""))
        if self.tau <= 0:
            raise ConfigError(f"{prefix}tau={self.tau} must be > 0")
        if not 0 <= self.mgd_mask < 1:
            raise ConfigError(f"{prefix}mgd_mask={self.mgd_mask} must be in [0, 1)")
        if not 0 <= self.pseudo < 1:
            raise ConfigError(f"{prefix}pseudo={self.pseudo} must be in [0, 1) (a score threshold; 0 = off)")
        self.frozen_base = str(self.frozen_base).lower()
        if self.frozen_base not in ("auto", "true", "false"):
            raise ConfigError(f"{prefix}frozen_base={self.frozen_base!r} must be auto, true or false")


# ---- train ------------------------------------------------------------------------------------


@dataclass
class DetectTrainConfig(TrainConfig):
    out: str = opt("runs/detect", "run directory")
    model: str = opt("yolov8n", "yolov8n | yolov8s | yolov8m | yolov8l | yolov8x; oriented boxes: yolov8n-obb … "
                                "yolov8x-obb (data with oriented annotations: MAR20, DOTA, YOLO-OBB)")
    data: str = opt("", "dataset: MAR20/VOC root, YOLO data.yaml (or root), COCO .json or folder; empty = "
                        "synthetic MAR20 (synth.*)")
    val_data: str = opt("", "validation dataset (same forms as data); empty = data's val_split")
    train_split: str = opt("train", "training split name (VOC ImageSets/Main/<split>.txt)")
    val_split: str = opt("test", "validation split name (MAR20 calls it 'test')")
    names: list = opt([], NAMES_DOC)
    base_classes: list = opt([], "train on these classes only (others' labels removed; e.g. [A1,...,A10])")
    imgsz: int = opt(320, "training and evaluation image size (multiple of 32)")
    synth: SyntheticSet = opt(SyntheticSet, "synthetic data used when data is empty")
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
    warmup_bias_lr: float = opt(0.0, "learning rate the biases start the warmup at (Ultralytics: 0.1, falling to "
                                     "lr while the weights rise from 0); 0 = biases warm up like the weights")
    clip_grad: float = opt(10.0, "gradient-norm clipping")
    ema: EMAConfig = opt(lambda: EMAConfig(enabled=True, decay=0.9999, warmup=2000.0), "weight EMA")

    def __post_init__(self) -> None:
        super().__post_init__()
        model_scale(self.model)
        check_imgsz(self.imgsz)
        check_detection_output(self)
        check_at_least(self, "", 0, "freeze_backbone_epochs")
        check_at_least(self, "", 0, "warmup_bias_lr")
        for key in ("train_split", "val_split"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is empty; name the split (e.g. {key}=train)")
        if self.backbone_only and not self.weights:
            raise ConfigError("backbone_only=true loads the backbone of weights=FILE; give weights= too")
        self.synth.check("synth.")
        self.aug.check("aug.")
        self.loss.check("loss.")
        self.distill.check("distill.")
        if self.distill.frozen_base == "true":
            if not self.distill.teacher:
                raise ConfigError("distill.frozen_base=true keeps a teacher's network for its classes; give "
                                  "distill.teacher=FILE too")
            if not self.freeze_bn:
                raise ConfigError("distill.frozen_base=true needs freeze_bn=true: the frozen teacher's BatchNorm "
                                  "statistics must not change, or its classes' predictions drift")
            if self.weights:
                raise ConfigError("distill.frozen_base=true starts the student as the teacher; drop weights=")


# ---- verbs ------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    weights: str = opt("", f"model file: {WEIGHT_FILES}")
    data: str = opt("", "dataset (MAR20/VOC root, YOLO data.yaml, COCO .json or folder)")
    split: str = opt("test", "split to evaluate")
    names: list = opt([], NAMES_DOC)
    predictions: str = opt("", "evaluate this COCO results file instead of running a model")
    imgsz: int = opt(0, "input size, a multiple of 32 (0 = the checkpoint's)")
    batch_size: int = opt(16, "batch size")
    conf: float = opt(0.001, "confidence threshold")
    iou: float = opt(0.7, "NMS IoU threshold")
    max_det: int = opt(300, "detections per image")
    classes: list = opt([], "report mAP over this class subset too (e.g. the novel classes: [A11..A20])")
    device: str = opt("cpu", "cpu | cuda")
    out: str = opt("runs/detect-eval", "folder for metrics.json, PR curve and confusion matrix PNGs (a new "
                                       "out2, out3… when it holds results)")
    skip_bad_images: bool = opt(False, "leave damaged images out with a warning instead of stopping with an "
                                       "error that lists them")

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("eval detect needs data=DIR (the dataset to evaluate on)")
        if not self.weights and not self.predictions:
            raise ConfigError("eval detect needs weights=FILE or predictions=FILE.json")
        check_imgsz(self.imgsz, allow_zero=True)
        check_at_least(self, "", 1, "batch_size")
        check_detection_output(self)


@dataclass
class PredictConfig:
    weights: str = opt("", f"model file: {WEIGHT_FILES}")
    source: str = opt("", "an image or a folder of images")
    out: str = opt("runs/detect-predict", "output folder: drawn images and predictions.json (a new out2, out3… "
                                          "when it holds results)")
    imgsz: int = opt(0, "input size, a multiple of 32 (0 = the checkpoint's)")
    conf: float = opt(0.25, "confidence threshold")
    iou: float = opt(0.7, "NMS IoU threshold")
    max_det: int = opt(300, "detections per image")
    batch_size: int = opt(8, "batch size")
    device: str = opt("cpu", "cpu | cuda")
    draw: bool = opt(True, "write images with the predictions drawn")

    def __post_init__(self) -> None:
        if not self.weights or not self.source:
            raise ConfigError("predict detect needs weights=FILE and source=IMAGE|DIR")
        check_imgsz(self.imgsz, allow_zero=True)
        check_at_least(self, "", 1, "batch_size")
        check_detection_output(self)


@dataclass
class ExportConfig:
    weights: str = opt("", "our checkpoint, Ultralytics .pt or state dict")
    format: str = opt("onnx", "onnx")
    out: str = opt("", "output: a FILE.onnx, or a folder (a new one: out2, out3… when it holds files); "
                       "empty = the weights' path with .onnx")
    imgsz: int = opt(0, "input size, a multiple of 32 (0 = the checkpoint's)")
    dynamic_batch: bool = opt(True, "symbolic batch dimension")

    def __post_init__(self) -> None:
        if not self.weights:
            raise ConfigError("export detect needs weights=FILE")
        if self.weights.endswith(".onnx"):
            raise ConfigError(f"weights={self.weights} is already an ONNX export; export needs the checkpoint "
                              "(or Ultralytics .pt, or state dict) it came from")
        check_choice(self, "format", ("onnx",))
        check_imgsz(self.imgsz, allow_zero=True)


@dataclass
class SynthConfig(SyntheticSet):
    """The ``synth`` verb: :class:`SyntheticSet` written to a folder of your choice."""

    out: str = opt("data/mar20-synth", "output folder (MAR20 layout)")

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("synth detect needs out=DIR (where to write the data set)")
        self.check(prefix="")


@dataclass
class SplitConfig:
    data: str = opt("", "source dataset: MAR20/VOC root, YOLO data.yaml (or root), COCO .json or folder")
    base: Any = opt("", "base classes: a range A1..A10 or a list [A1,A2,...]; all other classes are novel")
    shots: int = opt(10, "annotated training images per novel class (K)")
    seed: int = opt(0, "selection seed (same data and seed, same split)")
    out: str = opt("", "output folder (MAR20/VOC layout); must not exist or be empty")
    keep_base: bool = opt(True, "keep all base data; false = only the K-shot images, with novel labels only")
    names: list = opt([], NAMES_DOC)
    train_split: str = opt("train", "training split of the source")
    val_split: str = opt("test", "validation split of the source (copied whole)")
    obb: bool = opt(False, "also carry the oriented boxes (MAR20 robndbox, DOTA, YOLO-OBB) into "
                           "Annotations/Oriented Bounding Boxes/ (for model=yolov8?-obb)")

    def __post_init__(self) -> None:
        if not self.data or not self.out:
            raise ConfigError("split detect needs data=DIR (source dataset) and out=DIR (where to write the split)")
        if self.shots < 1:
            raise ConfigError(f"shots={self.shots}: need at least 1 annotated image per novel class")
        if not self.base:
            raise ConfigError("split detect needs base=A1..A10 (or base=[A1,A2,...]): the classes the teacher knows")
