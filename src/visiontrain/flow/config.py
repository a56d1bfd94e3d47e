"""Every config of the flow task: training (both methods) and the ``eval``, ``predict``, ``export`` and
``synth`` verbs.

Values are checked when a config is built (``__post_init__``, which :func:`visiontrain.config.load_config`
runs): method and model names and their combinations, sizes (``HxW``, height first), loss and model
settings, and the kind of every data spec, so a wrong value fails before any data is synthesised or read
and before a run or output folder exists. A config is not changed afterwards; what is derived from it
(sizes as ``(H, W)``) is a read-only property.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visiontrain.config import ConfigError, opt
from visiontrain.engine.config import TrainConfig, check_choice, check_device
from visiontrain.flow.augment import FlowAugmentConfig
from visiontrain.flow.data import FlowDataError, parse_spec
from visiontrain.flow.losses.occlusion import OCCLUSION_METHODS
from visiontrain.flow.models.pwc import PWC_MIN_SIZE, PWC_STRIDE
from visiontrain.flow.models.raft import RAFT_MIN_SIZE, RAFT_NAMES, UPSAMPLE_MODES
from visiontrain.flow.sizes import parse_size
from visiontrain.flow.synth.config import FlowGenConfig

METHODS = ("supervised", "unsupervised")
PWC_NAME = "pwc"
MODEL_NAMES = (*RAFT_NAMES, PWC_NAME)
UNLABELED_KINDS = ("frames", "video")  # image pairs without ground truth (method=unsupervised only)
MASK_METHODS = ("brox", "wang")  # occlusion masks that eval / predict draw for a PWC model
TTA_MODES = ("none", "hflip")  # test-time augmentation of eval / predict (inference.predict_flow)
CROP_MULTIPLE = 8  # RAFT works on 1/8-resolution features
SUPERVISED_LR = 4e-4
UNSUPERVISED_LR = 1e-4
UNSUPERVISED_WARMUP_STEPS = 200
SYNTH_TRAIN, SYNTH_VAL, SYNTH_SIZE = 400, 40, "288x352"  # the built-in synthetic set
WEIGHTS_HELP = "a checkpoint of `visiontrain train flow` (best.pt) or a torchvision RAFT / PWC state dict"


def require(cfg: Any, key: str, ok: bool, rule: str) -> None:
    """A :class:`ConfigError` ``key=value must be <rule>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={getattr(cfg, key)!r} must be {rule}")


def check_spec(key: str, spec: str, labeled: bool, why: str = "") -> None:
    """The kind of data spec ``key=spec`` is known; ``labeled``: it must have ground-truth flow (not
    ``frames:`` / ``video:``, whose pairs have none; ``why`` says who needs it). No file is read."""
    kind, _, location = spec.partition(":")
    if kind in UNLABELED_KINDS:
        if labeled:
            raise ConfigError(f"{key}={spec}: {kind}: pairs have no ground-truth flow; {why}")
        if not location:
            raise ConfigError(f"{key}={spec}: give the {'folder' if kind == 'frames' else 'file'} "
                              f"({kind}:{'DIR' if kind == 'frames' else 'FILE'})")
        return
    try:
        parse_spec(spec)
    except FlowDataError as e:
        accepted = "" if labeled else f" (or {', '.join(k + ':' for k in UNLABELED_KINDS)} without ground truth)"
        raise ConfigError(f"{key}: {e}{accepted}") from None


# ---------------------------------------------------------------------------------------- train
@dataclass
class FlowTrainConfig(TrainConfig):
    out: str = opt("runs/flow", "run directory")
    lr: float | None = opt(None, "peak learning rate; empty = 4e-4 for method=supervised (RAFT on FlyingChairs), "
                                 "1e-4 for unsupervised (UFlow)")
    warmup_steps: int | None = opt(None, "linear lr warmup in optimizer steps; empty = 0 for supervised, 200 for "
                                         "unsupervised (when warmup_epochs is 0 too)")
    weight_decay: float = opt(1e-4, "weight decay (never on biases and norm weights)")
    clip_grad: float = opt(1.0, "clip the global gradient norm (RAFT: 1.0)")
    batch_size: int = opt(4, "global batch size")
    model: str = opt("raft_small", "raft_small | raft_small_convex (raft_small with convex upsampling) | raft_large (torchvision) | pwc (UFlow's PWC; method=unsupervised)")
    method: str = opt("supervised", "supervised (sequence loss on ground truth) | unsupervised (UFlow / SMURF, no "
                                    "GT; model=pwc from scratch, or a RAFT fine-tuned from weights=)")
    data: str = opt("", "training data spec (chairs:DIR, sintel-clean:DIR, kitti:DIR, things:DIR, hd1k:DIR, "
                        "pairs:DIR, pair:A,B,GT; unsupervised also frames:DIR, video:FILE); empty = synthetic "
                        "chairs-layout set in synth_dir")
    val_data: str = opt("", "validation data spec; empty = the val split of data when it has one")
    crop: str = opt("256x320", "supervised: random training crop HxW, multiples of 8; every training image must "
                               "be at least this size (never upscaled); sides below 128, the least torchvision's "
                               "RAFT takes, are padded to 128 inside the model call; empty = whole images, no "
                               "rescale; chairs in the RAFT paper: 368x496")
    num_flow_updates_train: int = opt(12, "RAFT refinement steps while training")
    num_flow_updates_eval: int = opt(12, "RAFT refinement steps at evaluation (torchvision uses 32 on Sintel)")
    upsample_train: str = opt("all", "RAFT models with convex upsampling (raft_small_convex, raft_large): which "
                              "predictions use it in supervised training: all (RAFT) | last (the "
                              "intermediate ones bilinear; 0.84x the step time, BENCHMARKS.md)")
    gamma: float = opt(0.8, "sequence-loss decay: prediction i of N weighs gamma^(N-1-i)")
    max_flow: float = opt(400.0, "ground truth with |flow| >= max_flow is excluded from the loss")
    aug: FlowAugmentConfig = opt(FlowAugmentConfig, "training augmentation")
    synth_dir: str = opt("", "where the built-in synthetic set goes; empty = $VISIONTRAIN_CACHE "
                             "(~/.cache/visiontrain)/flow_synth/<settings>")
    synth_train: int = opt(SYNTH_TRAIN, "built-in synthetic set: training pairs")
    synth_val: int = opt(SYNTH_VAL, "built-in synthetic set: validation pairs")
    synth_size: str = opt(SYNTH_SIZE, "built-in synthetic set: image size HxW")
    synth_seed: int = opt(0, "built-in synthetic set: its seed (independent of the training seed)")
    gen: FlowGenConfig = opt(FlowGenConfig, "built-in synthetic set: its generator (gen.style=legacy: the old one)")
    vis_max_error: float = opt(10.0, "end-point error shown as the brightest colour in error maps")
    unsup_size: str = opt("", "unsupervised: resize training pairs to HxW (multiples of 32, >= 64); empty = "
                              "centre-crop each pair to multiples of 32 (pairs must be at least 64x64)")
    census_weight: float = opt(1.0, "unsupervised: census loss weight")
    smooth1_weight: float = opt(0.0, "unsupervised: first-order edge-aware smoothness weight")
    smooth2_weight: float = opt(2.0, "unsupervised: second-order edge-aware smoothness weight")
    ssim_weight: float = opt(0.0, "unsupervised: SSIM photometric weight")
    occlusion: str = opt("wang", "unsupervised: occlusion estimation wang | brox | none")
    selfsup_weight: float = opt(0.6, "unsupervised: self-supervision weight once switched on")
    selfsup_start_step: int = opt(-1, "unsupervised: optimizer step at which self-supervision starts (-1 = "
                                      "off)")
    selfsup_ramp_steps: int = opt(0, "unsupervised: self-supervision ramp length in steps")
    unsup_crop: str = opt("", "unsupervised: random training crop HxW the model sees (multiples of 32 for pwc, 8 for "
                              "RAFT), while the photometric loss warps the whole frame (SMURF's full-image warping: "
                              "flow leaving the crop is still supervised); empty = whole pairs")
    mask_floor: float = opt(0.2, "unsupervised: below this share of pixels kept by the occlusion mask the photometric "
                                 "loss falls back towards the unmasked one and flow pointing out of the image is "
                                 "pulled back (0 = off; the all-occluded state otherwise costs 0)")
    mask_guard_share: float = opt(0.05, "unsupervised: a step whose mask keeps less than this share is a "
                                        "collapsed step (warned about)")
    mask_guard_steps: int = opt(100, "unsupervised: stop the run after this many collapsed steps in a row "
                                     "(0 = never)")
    pwc_width: float = opt(1.0, "model=pwc: channel multiplier (UFlow: 1.0; 0.5 makes the network 2.6x cheaper "
                                "on a CPU, the benchmark's choice)")

    @property
    def unsupervised(self) -> bool:
        return self.method == "unsupervised"

    @property
    def crop_hw(self) -> tuple[int, int] | None:
        """``crop`` as ``(H, W)``; ``None``: whole images."""
        if not self.crop:
            return None
        return parse_size(self.crop, "crop", CROP_MULTIPLE, CROP_MULTIPLE,
                          f"RAFT works on 1/{CROP_MULTIPLE}-resolution features; sides below {RAFT_MIN_SIZE} are "
                          f"padded to {RAFT_MIN_SIZE}, the least torchvision's RAFT takes")

    @property
    def unsup_hw(self) -> tuple[int, int] | None:
        """``unsup_size`` as ``(H, W)``; ``None``: centre-crop each pair to multiples of 32."""
        if not self.unsup_size:
            return None
        return parse_size(self.unsup_size, "unsup_size", PWC_STRIDE, PWC_MIN_SIZE, "the PWC model's input sizes")

    @property
    def unsup_crop_hw(self) -> tuple[int, int] | None:
        """``unsup_crop`` as ``(H, W)``; ``None``: the model sees whole pairs."""
        if not self.unsup_crop:
            return None
        if self.model == PWC_NAME:
            return parse_size(self.unsup_crop, "unsup_crop", PWC_STRIDE, PWC_MIN_SIZE, "the PWC model's input sizes")
        return parse_size(self.unsup_crop, "unsup_crop", CROP_MULTIPLE, CROP_MULTIPLE,
                          f"RAFT works on 1/{CROP_MULTIPLE}-resolution features")

    @property
    def synth_hw(self) -> tuple[int, int]:
        return parse_size(self.synth_size, "synth_size", minimum=32)

    def __post_init__(self) -> None:
        """Method-dependent defaults for what was left empty (an explicit value always wins), then checks."""
        if self.lr is None:
            self.lr = UNSUPERVISED_LR if self.unsupervised else SUPERVISED_LR
        if self.warmup_steps is None:
            self.warmup_steps = UNSUPERVISED_WARMUP_STEPS if self.unsupervised and not self.warmup_epochs else 0
        super().__post_init__()
        check_choice(self, "method", METHODS)
        check_choice(self, "model", MODEL_NAMES)
        if not self.unsupervised and self.model == PWC_NAME:
            raise ConfigError(f"model={PWC_NAME} is trained with method=unsupervised; supervised training "
                              f"uses {' or '.join(RAFT_NAMES)}")
        self.crop_hw, self.unsup_hw, self.unsup_crop_hw, self.synth_hw  # noqa: B018 - parsed (and checked) once here
        require(self, "mask_floor", 0 <= self.mask_floor < 1, "in [0, 1) (0 = off)")
        require(self, "mask_guard_share", 0 <= self.mask_guard_share < 1, "in [0, 1)")
        require(self, "mask_guard_steps", self.mask_guard_steps >= 0, ">= 0 (0 = never stop)")
        for key in ("num_flow_updates_train", "num_flow_updates_eval", "synth_train"):
            require(self, key, getattr(self, key) >= 1, ">= 1")
        require(self, "synth_val", self.synth_val >= 0, ">= 0")
        require(self, "gamma", 0 < self.gamma <= 1, "in (0, 1] (RAFT: 0.8)")
        require(self, "upsample_train", self.upsample_train in UPSAMPLE_MODES, f"one of {', '.join(UPSAMPLE_MODES)}")
        require(self, "max_flow", self.max_flow > 0, "> 0 (RAFT: 400)")
        require(self, "vis_max_error", self.vis_max_error > 0, "> 0")
        require(self, "pwc_width", 0 < self.pwc_width <= 4, "in (0, 4] (UFlow: 1.0)")
        check_choice(self, "occlusion", OCCLUSION_METHODS)
        for key in ("census_weight", "smooth1_weight", "smooth2_weight", "ssim_weight", "selfsup_weight"):
            require(self, key, getattr(self, key) >= 0, ">= 0")
        if self.unsupervised and self.census_weight == 0 and self.ssim_weight == 0:
            raise ConfigError("census_weight=0 and ssim_weight=0: nothing ties the flow to the images; set one > 0")
        require(self, "selfsup_start_step", self.selfsup_start_step >= -1, ">= 0, or -1 (off)")
        require(self, "selfsup_ramp_steps", self.selfsup_ramp_steps >= 0, ">= 0")
        if self.data:
            check_spec("data", self.data, labeled=not self.unsupervised,
                       why="method=supervised trains on ground truth (method=unsupervised does not)")
        if self.val_data:
            check_spec("val_data", self.val_data, labeled=True, why="validation compares with ground truth")


# ---------------------------------------------------------------------------------------- verbs
def check_inference_keys(cfg: Any) -> None:
    """The keys ``eval`` and ``predict`` share: ``weights``, ``model``, ``num_flow_updates``, ``tta``,
    ``occlusion``."""
    if not cfg.weights:
        raise ConfigError(f"weights= is required: {WEIGHTS_HELP}")
    if cfg.model:
        check_choice(cfg, "model", MODEL_NAMES)
    require(cfg, "num_flow_updates", cfg.num_flow_updates >= 1, ">= 1")
    check_choice(cfg, "tta", TTA_MODES)
    check_choice(cfg, "occlusion", MASK_METHODS)
    check_device(cfg.device)


@dataclass
class FlowEvalConfig:
    weights: str = opt("", f"{WEIGHTS_HELP}; required")
    model: str = opt("", "raft_small | raft_small_convex | raft_large | pwc; empty = from the checkpoint (or inferred from its keys)")
    data: str = opt("", "data spec to evaluate; empty = the built-in synthetic set's val split")
    split: str = opt("val", "val | train: which split of data (datasets without a val split use train)")
    num_flow_updates: int = opt(12, "RAFT refinement steps")
    tta: str = opt("none", "none | hflip: also run the mirrored pair and average the two flows (2x the time; "
                           "BENCHMARKS.md, flip averaging)")
    batch_size: int = opt(1, "evaluation batch size (mixed-size data is padded; 1 gives exact per-image numbers)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    out: str = opt("runs/flow_eval", "folder for metrics.json and pictures (a new out2, out3... if it holds files)")
    pictures: int = opt(4, "side-by-side PNGs to write (first N samples)")
    vis_max_error: float = opt(10.0, "end-point error shown as the brightest colour")
    occlusion: str = opt("brox", "PWC models: occlusion mask PNGs by brox (forward-backward check) or wang")
    synth_seed: int = opt(0, "seed of the built-in synthetic set (when data is empty)")
    synth_dir: str = opt("", "built-in synthetic set folder (when data is empty); see train")
    gen: FlowGenConfig = opt(FlowGenConfig, "built-in synthetic set's generator (when data is empty); see train")

    def __post_init__(self) -> None:
        check_inference_keys(self)
        check_choice(self, "split", ("val", "train"))
        require(self, "batch_size", self.batch_size >= 1, ">= 1")
        require(self, "pictures", self.pictures >= 0, ">= 0")
        require(self, "vis_max_error", self.vis_max_error > 0, "> 0")
        if self.data:
            check_spec("data", self.data, labeled=True, why="eval compares with ground truth")


@dataclass
class FlowPredictConfig:
    weights: str = opt("", f"{WEIGHTS_HELP}; required")
    model: str = opt("", "raft_small | raft_small_convex | raft_large | pwc; empty = from the checkpoint (or inferred from its keys)")
    image1: str = opt("", "first image; required")
    image2: str = opt("", "second image; required")
    gt: str = opt("", "optional ground-truth flow (.flo, .pfm, KITTI .png): adds EPE and a side-by-side PNG")
    out: str = opt("runs/flow_predict", "output folder (flow.flo, flow.png; a new out2, out3... if it holds files)")
    num_flow_updates: int = opt(12, "RAFT refinement steps")
    tta: str = opt("none", "none | hflip: also run the mirrored pair and average the two flows (2x the time; "
                           "BENCHMARKS.md, flip averaging)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    occlusion: str = opt("brox", "PWC models: occlusion.png by brox (forward-backward check) or wang")

    def __post_init__(self) -> None:
        check_inference_keys(self)
        if not self.image1 or not self.image2:
            raise ConfigError("image1= and image2= are required (the two frames, e.g. image1=a.png image2=b.png)")


@dataclass
class FlowExportConfig:
    weights: str = opt("", "checkpoint of a PWC model (method=unsupervised); required")
    format: str = opt("onnx", "export format (onnx)")
    out: str = opt("", "output file (default: weights with .onnx: best.pt -> best.onnx)")
    size: str = opt("", "input size HxW, multiples of 32 (default: the training size unsup_size, else 384x512)")
    opset: int = opt(17, "ONNX opset (>= 16: grid_sample)")
    check: bool = opt(True, "run the exported graph in ONNX Runtime and compare with PyTorch")

    @property
    def size_hw(self) -> tuple[int, int] | None:
        if not self.size:
            return None
        return parse_size(self.size, "size", PWC_STRIDE, PWC_MIN_SIZE, "the PWC model's input sizes")

    def __post_init__(self) -> None:
        if not self.weights:
            raise ConfigError("weights= is required: a checkpoint of `visiontrain train flow method=unsupervised "
                              "model=pwc` or a PWC state dict")
        check_choice(self, "format", ("onnx",))
        self.size_hw  # noqa: B018 - checked here
        require(self, "opset", self.opset >= 16, ">= 16 (the warp's grid_sample needs opset 16)")


@dataclass
class FlowSynthConfig:
    out: str = opt("data/flow_synth", "output folder (FlyingChairs layout: data/, FlyingChairs_train_val.txt)")
    train: int = opt(SYNTH_TRAIN, "training pairs")
    val: int = opt(SYNTH_VAL, "validation pairs")
    size: str = opt(SYNTH_SIZE, "image size HxW")
    seed: int = opt(0, "random seed (pair i depends only on seed and i)")
    max_translation: float = opt(14.0, "gen.style=legacy: largest foreground translation in pixels")
    gen: FlowGenConfig = opt(FlowGenConfig, "the generator: layered (default) or gen.style=legacy; each factor "
                                            "of the layered one has its own switch (gen.jpeg=false, ...)")

    @property
    def size_hw(self) -> tuple[int, int]:
        return parse_size(self.size, "size", minimum=32)

    def __post_init__(self) -> None:
        require(self, "train", self.train >= 0, ">= 0")
        require(self, "val", self.val >= 0, ">= 0")
        if self.train + self.val == 0:
            raise ConfigError("train=0 and val=0: nothing to write; set train= or val=")
        self.size_hw  # noqa: B018 - checked here
        require(self, "max_translation", self.max_translation >= 0, ">= 0")
