"""The optical-flow task: supervised RAFT training, evaluation, prediction and synthetic data.

Verbs (``visiontrain <verb> flow key=value ...``):

* ``train``   ``model=raft_small data=chairs:DIR [val_data=SPEC] crop=HxW ...`` (engine ``fit``). Without
  ``data=`` a small FlyingChairs-layout set is synthesised once into ``synth_dir`` and used.
* ``eval``    ``weights=W data=SPEC`` prints a table and writes ``<out>/metrics.json`` (``epe``; ``1px``,
  ``3px``, ``5px``: share of pixels with EPE below 1/3/5 px; ``fl_all``: KITTI outlier rate; pixel-weighted,
  plus ``*_per_image``) and a few side-by-side PNGs.
* ``predict`` ``weights=W image1=A image2=B out=DIR`` writes ``flow.flo`` and ``flow.png`` (``gt=`` adds
  the side-by-side figure).
* ``synth``   ``out=DIR train=N val=N size=HxW seed=K`` writes a FlyingChairs-layout data set.
* ``export``  ``weights=W format=onnx out=F.onnx size=HxW`` exports a PWC model (forward and backward flow,
  dynamic batch) and checks ONNX Runtime's outputs against PyTorch's.

For a PWC model, ``eval`` and ``predict`` also write occlusion masks as PNG (white = pixel of image 1 not
visible in image 2), estimated from the forward and backward flow (``occlusion=brox|wang``).

``method`` selects the training objective. ``supervised`` is the sequence loss on RAFT's predictions.
``unsupervised`` (``model=pwc``) is UFlow: :class:`~visiontrain.flow.unsupervised.UnsupervisedFlowObjective`
(census, second-order smoothness, ``wang`` occlusion, optional self-supervision) on pairs without ground
truth: ``data=frames:DIR``, ``data=video:FILE`` or any supervised spec (its ground truth is dropped for
training and used only for validation). Training images are centre-cropped to multiples of 32 (or resized
to ``unsup_size=HxW``). With the supervised default ``lr=4e-4`` left unchanged, ``method=unsupervised``
trains at ``lr=1e-4`` with a 200-step warmup (``warmup_steps`` when 0). Self-supervision is off unless
``selfsup_start_step`` is set (>= 0). The task counts its own ``training_step`` calls (the engine does not
hand it the step); the count is saved in checkpoints (``task_state``) and restored on resume.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontrain.config import ConfigError, opt
from visiontrain.engine.config import TrainConfig
from visiontrain.engine.task import StepInfo, Task
from visiontrain.flow.augment import FlowAugment, FlowAugmentConfig
from visiontrain.flow.checks import check_flow_datasets
from visiontrain.flow.data import collate_flow, has_split, open_flow_dataset, parse_spec
from visiontrain.flow.frames import unlabeled_dataset
from visiontrain.flow.io import write_flo
from visiontrain.flow.losses.supervised import sequence_loss
from visiontrain.flow.metrics import METRIC_NAMES, FlowMetrics, format_metrics_table
from visiontrain.flow.models.pwc import PWCFlow
from visiontrain.flow.models.raft import RAFT_NAMES, build_raft, load_raft_weights, raft_forward
from visiontrain.flow.synthetic import write_synthetic_chairs
from visiontrain.flow.unsupervised import OCCLUSION_METHODS, UnsupervisedFlowObjective, save_mask_png
from visiontrain.flow.viz import flow_to_color, save_png, side_by_side
from visiontrain.synthcache import cache_root, synthesize_once

METHODS = ("supervised", "unsupervised")
log = logging.getLogger(__name__)
PWC_NAME = "pwc"
MODEL_NAMES = (*RAFT_NAMES, PWC_NAME)
UNLABELED_KINDS = ("frames", "video")
PWC_STRIDE = 32  # PWCFlow needs sides that are multiples of 32 and >= 64
SUPERVISED_LR = 4e-4
UNSUPERVISED_LR = 1e-4
UNSUPERVISED_WARMUP_STEPS = 200


def parse_size(text: str, key: str, multiple: int = 1, minimum: int = 16) -> tuple[int, int]:
    """``"256x320"`` -> ``(256, 320)``; clear :class:`ConfigError` otherwise."""
    parts = str(text).lower().split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not HxW (e.g. {key}=256x320)") from None
    if h < minimum or w < minimum or h % multiple or w % multiple:
        raise ConfigError(f"{key}={text!r}: height and width must be >= {minimum}"
                          + (f" and multiples of {multiple}" if multiple > 1 else ""))
    return h, w


def ensure_synthetic_chairs(folder: str | Path, train: int, val: int, size: tuple[int, int], seed: int) -> Path:
    """A synthetic FlyingChairs-layout set at ``folder``, written once (see :mod:`visiontrain.synthcache`)."""
    params = {"kind": "chairs", "train": train, "val": val, "size": list(size), "seed": seed}
    return synthesize_once(folder, params, lambda tmp: write_synthetic_chairs(tmp, train, val, size, seed),
                           what=f"synthetic FlyingChairs-layout data ({train} train, {val} val pairs)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------- config
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
    method: str = opt("supervised", "supervised (sequence loss on ground truth) | unsupervised (UFlow, no GT)")
    data: str = opt("", "training data spec (chairs:DIR, sintel-clean:DIR, kitti:DIR, things:DIR, hd1k:DIR, "
                        "pairs:DIR, pair:A,B,GT); empty = synthetic chairs-layout set in synth_dir")
    val_data: str = opt("", "validation data spec; empty = the val split of data when it has one")
    crop: str = opt("256x320", "training crop HxW (multiples of 8, >= 128); chairs in the RAFT paper: 368x496")
    num_flow_updates_train: int = opt(12, "RAFT refinement steps while training")
    num_flow_updates_eval: int = opt(12, "RAFT refinement steps at evaluation (torchvision uses 32 on Sintel)")
    gamma: float = opt(0.8, "sequence-loss decay: prediction i of N weighs gamma^(N-1-i)")
    max_flow: float = opt(400.0, "ground truth with |flow| >= max_flow is excluded from the loss")
    aug: FlowAugmentConfig = opt(FlowAugmentConfig, "training augmentation")
    synth_dir: str = opt("", "where the built-in synthetic set goes; empty = $VISIONTRAIN_CACHE "
                             "(~/.cache/visiontrain)/flow_synth/<settings>")
    synth_train: int = opt(400, "built-in synthetic set: training pairs")
    synth_val: int = opt(40, "built-in synthetic set: validation pairs")
    synth_size: str = opt("288x352", "built-in synthetic set: image size HxW")
    synth_seed: int = opt(0, "built-in synthetic set: its seed (independent of the training seed)")
    vis_max_error: float = opt(10.0, "end-point error shown as the brightest colour in error maps")
    unsup_size: str = opt("", "unsupervised: resize training pairs to HxW (multiples of 32, >= 64); empty = "
                              "centre-crop each pair to multiples of 32")
    census_weight: float = opt(1.0, "unsupervised: census loss weight")
    smooth1_weight: float = opt(0.0, "unsupervised: first-order edge-aware smoothness weight")
    smooth2_weight: float = opt(2.0, "unsupervised: second-order edge-aware smoothness weight")
    ssim_weight: float = opt(0.0, "unsupervised: SSIM photometric weight")
    occlusion: str = opt("wang", "unsupervised: occlusion estimation wang | brox | none")
    selfsup_weight: float = opt(0.6, "unsupervised: self-supervision weight once switched on")
    selfsup_start_step: int = opt(-1, "unsupervised: optimizer step at which self-supervision starts (-1 = "
                                      "off)")
    selfsup_ramp_steps: int = opt(0, "unsupervised: self-supervision ramp length in steps")
    pwc_width: float = opt(1.0, "model=pwc: channel multiplier (UFlow: 1.0; 0.5 makes the network 2.6x cheaper "
                                "on a CPU, the benchmark's choice)")

    def __post_init__(self) -> None:
        """Method-dependent defaults for what was left empty (an explicit value always wins)."""
        unsupervised = self.method == "unsupervised"
        if self.lr is None:
            self.lr = UNSUPERVISED_LR if unsupervised else SUPERVISED_LR
        if self.warmup_steps is None:
            self.warmup_steps = UNSUPERVISED_WARMUP_STEPS if unsupervised and not self.warmup_epochs else 0
        super().__post_init__()


def synthetic_spec(synth_dir: str, train: int, val: int, size: str, seed: int) -> str:
    """Make (once) the built-in synthetic set and return its ``chairs:DIR`` spec."""
    hw = parse_size(size, "synth_size", minimum=32)
    folder = Path(synth_dir) if synth_dir else (
        cache_root() / "flow_synth" / f"chairs_t{train}_v{val}_{hw[0]}x{hw[1]}_s{seed}")
    return f"chairs:{ensure_synthetic_chairs(folder, train, val, hw, seed)}"


# ------------------------------------------------------------------------------------------- task
class FlowTask(Task):
    name = "flow"
    primary_metric = "epe"
    primary_mode = "min"

    def __init__(self, cfg: FlowTrainConfig):
        super().__init__(cfg)
        if cfg.method not in METHODS:
            raise ConfigError(f"method={cfg.method!r} is not one of {', '.join(METHODS)}")
        if cfg.model not in MODEL_NAMES:
            raise ConfigError(f"model={cfg.model!r} is not one of {', '.join(MODEL_NAMES)}")
        if cfg.method == "unsupervised" and cfg.model != PWC_NAME:
            raise ConfigError(f"method=unsupervised needs forward and backward flow from one model: use "
                              f"model={PWC_NAME} (got model={cfg.model})")
        if cfg.method == "supervised" and cfg.model == PWC_NAME:
            raise ConfigError(f"model={PWC_NAME} is trained with method=unsupervised; supervised training "
                              f"uses {' or '.join(RAFT_NAMES)}")
        if cfg.num_flow_updates_train < 1 or cfg.num_flow_updates_eval < 1:
            raise ConfigError("num_flow_updates_train and num_flow_updates_eval must be >= 1")
        if not 0 < cfg.gamma <= 1:
            raise ConfigError(f"gamma={cfg.gamma} must be in (0, 1]")
        if not 0 < cfg.pwc_width <= 4:
            raise ConfigError(f"pwc_width={cfg.pwc_width} must be in (0, 4] (UFlow: 1.0)")
        self.crop = parse_size(cfg.crop, "crop", multiple=8, minimum=128) if cfg.crop else None
        self.objective: UnsupervisedFlowObjective | None = None
        self.unsup_size: tuple[int, int] | None = None
        if cfg.method == "unsupervised":
            if cfg.occlusion not in OCCLUSION_METHODS:
                raise ConfigError(f"occlusion={cfg.occlusion!r} is not one of {', '.join(OCCLUSION_METHODS)}")
            if cfg.unsup_size:
                self.unsup_size = parse_size(cfg.unsup_size, "unsup_size", multiple=PWC_STRIDE, minimum=2 * PWC_STRIDE)
            try:
                self.objective = UnsupervisedFlowObjective(
                    census_weight=cfg.census_weight, smooth1_weight=cfg.smooth1_weight,
                    smooth2_weight=cfg.smooth2_weight, occlusion=cfg.occlusion, ssim_weight=cfg.ssim_weight,
                    selfsup_weight=cfg.selfsup_weight if cfg.selfsup_start_step >= 0 else 0.0,
                    selfsup_start_step=max(0, cfg.selfsup_start_step), selfsup_ramp_steps=cfg.selfsup_ramp_steps)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    # --- engine protocol ----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        if self.cfg.model == PWC_NAME:
            return PWCFlow(channel_multiplier=self.cfg.pwc_width)
        return build_raft(self.cfg.model)

    def load_weights(self, model: nn.Module, path: str) -> None:
        if isinstance(model, PWCFlow):
            super().load_weights(model, path)
        else:
            load_raft_weights(model, path)

    def state_dict(self) -> dict:
        return {"method": self.cfg.method}

    def train_spec(self) -> str:
        cfg = self.cfg
        if cfg.data:
            parse_spec(cfg.data)
            return cfg.data
        return synthetic_spec(cfg.synth_dir, cfg.synth_train, cfg.synth_val, cfg.synth_size, cfg.synth_seed)

    def build_datasets(self):
        if self.cfg.method == "unsupervised":
            return self._unsupervised_datasets()
        cfg = self.cfg
        spec = self.train_spec()
        augment = FlowAugment(cfg.aug, self.crop)
        train = open_flow_dataset(spec, "train", augment=augment, seed=cfg.seed)
        if cfg.method == "supervised" and not train.has_flow:
            raise ConfigError(f"data={spec}: no ground-truth flow files; supervised training needs them "
                              f"(pairs:DIR wants <name>_flow.flo next to each pair)")
        if cfg.val_data:
            val = open_flow_dataset(cfg.val_data, "val" if has_split(cfg.val_data, "val") else "train")
        elif has_split(spec, "val"):
            val = open_flow_dataset(spec, "val")
        else:
            log.warning("flow: %s has no val split and val_data is empty: training without validation", spec)
            val = None
        if val is not None and not val.has_flow:
            raise ConfigError(f"val_data={val.name}: no ground-truth flow to evaluate against")
        check_flow_datasets([("train", train), ("val", val)])  # every file, before step 1
        return train, val

    def _unsupervised_datasets(self):
        """Training pairs without ground truth (sides multiples of 32) and the validation set with it."""
        cfg = self.cfg
        spec = cfg.data
        unlabeled = spec.partition(":")[0] in UNLABELED_KINDS
        if unlabeled:
            base = unlabeled_dataset(spec)
        else:
            spec = self.train_spec()
            base = open_flow_dataset(spec, "train", seed=cfg.seed)
        train = UnlabeledPairs(base, self.unsup_size)
        if cfg.val_data:
            val = open_flow_dataset(cfg.val_data, "val" if has_split(cfg.val_data, "val") else "train")
        elif not unlabeled and has_split(spec, "val"):
            val = open_flow_dataset(spec, "val")
        else:
            log.warning("flow: %s has no val split and val_data is empty: training without validation", spec)
            val = None
        if val is not None and not val.has_flow:
            raise ConfigError(f"val_data={val.name}: no ground-truth flow to evaluate against")
        check_flow_datasets([("train", train), ("val", val)])  # every file, before step 1
        return train, val

    def collate(self, samples: list) -> dict:
        return collate_flow(samples, pad=True)

    def training_step(self, model: nn.Module, batch: dict, info: StepInfo) -> dict[str, torch.Tensor]:
        if self.cfg.method == "unsupervised":
            return self._unsupervised_step(model, batch, info.step)
        return self._supervised_step(model, batch)

    def _supervised_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        preds = raft_forward(model, batch["image1"], batch["image2"], self.cfg.num_flow_updates_train)
        loss = sequence_loss(preds, batch["flow"], batch["valid"], self.cfg.gamma, self.cfg.max_flow)
        return {"sequence_l1": loss}

    def _unsupervised_step(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """UFlow objective on ``batch["image1"], batch["image2"]`` ``[B, 3, H, W]`` (ground truth unused) at
        optimizer step ``step`` (it switches self-supervision on)."""
        assert self.objective is not None
        device = next(model.parameters()).device
        return self.objective(model, batch["image1"].to(device), batch["image2"].to(device), step)

    def predict_flow(self, model: nn.Module, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        """Final flow ``[B, 2, H, W]`` for ``[0, 1]`` images ``[B, 3, H, W]``."""
        if isinstance(model, PWCFlow):
            return pwc_forward_padded(model, image1, image2)
        return raft_forward(model, image1, image2, self.cfg.num_flow_updates_eval)[-1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        device = next(model.parameters()).device
        meter = FlowMetrics()
        for batch in loader:
            if batch["flow"] is None:
                raise ConfigError("evaluation data has no ground-truth flow")
            pred = self.predict_flow(model, batch["image1"].to(device), batch["image2"].to(device))
            meter.update(pred, batch["flow"].to(device), batch["valid"].to(device))
        return meter.compute()

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict, out_dir: Path) -> None:
        device = next(model.parameters()).device
        pred = self.predict_flow(model, batch["image1"][:1].to(device), batch["image2"][:1].to(device))
        save_png(Path(out_dir) / "flow_val.png", figure_for(batch, 0, pred[0], self.cfg.vis_max_error))


def pwc_forward_padded(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor,
                       backward: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Forward flow ``[B, 2, H, W]`` of a PWC model for images of any size: padded at the bottom/right by
    edge replication to multiples of 32 (at least 64), ``model(a, b, backward=False)["flow_fw"]``, cropped.
    ``backward=True`` returns ``(flow_fw, flow_bw)`` from one call."""
    height, width = image1.shape[-2:]
    pad_h = max(2 * PWC_STRIDE, -(-height // PWC_STRIDE) * PWC_STRIDE) - height
    pad_w = max(2 * PWC_STRIDE, -(-width // PWC_STRIDE) * PWC_STRIDE) - width
    if pad_h or pad_w:
        image1 = torch.nn.functional.pad(image1, (0, pad_w, 0, pad_h), mode="replicate")
        image2 = torch.nn.functional.pad(image2, (0, pad_w, 0, pad_h), mode="replicate")
    out = model(image1, image2, backward=backward)
    if not backward:
        return out["flow_fw"][..., :height, :width]
    return out["flow_fw"][..., :height, :width], out["flow_bw"][..., :height, :width]


@torch.no_grad()
def occlusion_of(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor, method: str) -> torch.Tensor:
    """Occlusion mask ``[B, 1, H, W]`` (1 = pixel of image 1 hidden in image 2) of a PWC model's forward and
    backward flow, by ``method`` (``brox``: forward-backward consistency; ``wang``: range map)."""
    from visiontrain.flow.losses.occlusion import estimate_occlusion

    if method not in ("brox", "wang"):
        raise ConfigError(f"occlusion={method!r}: choose brox or wang")
    flow_fw, flow_bw = pwc_forward_padded(model, image1, image2, backward=True)
    return estimate_occlusion(flow_fw, flow_bw, method)


class UnlabeledPairs(torch.utils.data.Dataset):
    """Image pairs of ``base`` with ground truth dropped and sides made multiples of 32 for PWC.

    ``size=(H, W)``: both images are resized to it (bilinear, antialiased). ``None``: both are
    centre-cropped to the largest multiples of 32; pairs smaller than 64 x 64 are an error.
    Samples: ``{"image1", "image2": [3, H, W] in [0, 1], "flow": None, "valid": None, "id"}``."""

    def __init__(self, base: torch.utils.data.Dataset, size: tuple[int, int] | None = None):
        self.base = base
        self.size = size

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _fit(self, image: torch.Tensor, ident: str) -> torch.Tensor:
        height, width = image.shape[-2:]
        if self.size is not None:
            if (height, width) == self.size:
                return image
            return torch.nn.functional.interpolate(image[None], size=self.size, mode="bilinear",
                                                   align_corners=False, antialias=True)[0].clamp(0, 1)
        new_h, new_w = height // PWC_STRIDE * PWC_STRIDE, width // PWC_STRIDE * PWC_STRIDE
        if min(new_h, new_w) < 2 * PWC_STRIDE:
            raise ConfigError(f"pair {ident}: image size {height}x{width} is smaller than the 64x64 the PWC "
                              f"model needs; use larger frames or unsup_size=HxW (multiples of 32) to resize")
        top, left = (height - new_h) // 2, (width - new_w) // 2
        return image[:, top:top + new_h, left:left + new_w]

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        ident = str(sample.get("id", index))
        return {"image1": self._fit(sample["image1"], ident), "image2": self._fit(sample["image2"], ident),
                "flow": None, "valid": None, "id": ident}


def figure_for(batch: dict, i: int, pred: torch.Tensor, max_error: float = 10.0) -> np.ndarray:
    """The side-by-side figure of sample ``i`` of a collated batch, with prediction ``pred [2, H, W]``."""
    h, w = batch["sizes"][i] if "sizes" in batch else batch["image1"].shape[-2:]
    image = batch["image1"][i, :, :h, :w].permute(1, 2, 0).cpu().numpy()
    flow = pred[:, :h, :w].permute(1, 2, 0).float().cpu().numpy()
    gt = valid = None
    if batch.get("flow") is not None:
        gt = batch["flow"][i, :, :h, :w].permute(1, 2, 0).cpu().numpy()
        valid = batch["valid"][i, :h, :w].cpu().numpy()
    return side_by_side(image, flow, gt, valid, max_error)


# ------------------------------------------------------------------------------------------ verbs
@dataclass
class FlowEvalConfig:
    weights: str = opt("", "checkpoint (ours) or torchvision RAFT state dict; required")
    model: str = opt("", "raft_small | raft_small_convex | raft_large | pwc; empty = from the checkpoint (or inferred from its keys)")
    data: str = opt("", "data spec to evaluate; empty = the built-in synthetic set's val split")
    split: str = opt("val", "val | train: which split of data (datasets without a val split use train)")
    num_flow_updates: int = opt(12, "RAFT refinement steps")
    batch_size: int = opt(1, "evaluation batch size (mixed-size data is padded; 1 gives exact per-image numbers)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    out: str = opt("runs/flow_eval", "folder for metrics.json and pictures")
    pictures: int = opt(4, "side-by-side PNGs to write (first N samples)")
    vis_max_error: float = opt(10.0, "end-point error shown as the brightest colour")
    occlusion: str = opt("brox", "PWC models: occlusion mask PNGs by brox (forward-backward check) or wang")
    synth_seed: int = opt(0, "seed of the built-in synthetic set (when data is empty)")
    synth_dir: str = opt("", "built-in synthetic set folder (when data is empty); see train")


@dataclass
class FlowPredictConfig:
    weights: str = opt("", "checkpoint (ours) or torchvision RAFT state dict; required")
    model: str = opt("", "raft_small | raft_small_convex | raft_large | pwc; empty = from the checkpoint (or inferred from its keys)")
    image1: str = opt("", "first image; required")
    image2: str = opt("", "second image; required")
    gt: str = opt("", "optional ground-truth flow (.flo, .pfm, KITTI .png): adds EPE and a side-by-side PNG")
    out: str = opt("runs/flow_predict", "output folder (flow.flo, flow.png)")
    num_flow_updates: int = opt(12, "RAFT refinement steps")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    occlusion: str = opt("brox", "PWC models: occlusion.png by brox (forward-backward check) or wang")


@dataclass
class FlowExportConfig:
    weights: str = opt("", "checkpoint of a PWC model (method=unsupervised); required")
    format: str = opt("onnx", "export format (onnx)")
    out: str = opt("", "output file (default: next to weights, .onnx)")
    size: str = opt("", "input size HxW, multiples of 32 (default: the training size unsup_size, else 384x512)")
    opset: int = opt(17, "ONNX opset")
    check: bool = opt(True, "run the exported graph in ONNX Runtime and compare with PyTorch")


@dataclass
class FlowSynthConfig:
    out: str = opt("data/flow_synth", "output folder (FlyingChairs layout: data/, FlyingChairs_train_val.txt)")
    train: int = opt(400, "training pairs")
    val: int = opt(40, "validation pairs")
    size: str = opt("288x352", "image size HxW")
    seed: int = opt(0, "random seed (pair i depends only on seed and i)")
    max_translation: float = opt(14.0, "largest foreground translation in pixels")


def pwc_width_of(state: dict) -> float | None:
    """The channel multiplier of a PWC state dict (its coarsest decoder's first layer has 128·m filters),
    or None when ``state`` is not a PWC model's."""
    weight = state.get("decoders.0.layers.0.0.weight")
    return None if weight is None else weight.shape[0] / 128


def load_model_for_inference(weights: str, model_name: str, device: torch.device) -> tuple[nn.Module, str]:
    """Build the right model (RAFT or PWC) for ``weights`` and load it: the name comes from ``model_name``,
    else from an engine checkpoint's config, else from the variant whose parameter shapes fit the file."""
    from visiontrain.engine.checkpoint import (
        extract_model_state,
        load_checkpoint,
        load_model_weights,
        match_state_dict,
        strip_wrapper_prefixes,
    )

    if not weights:
        raise ConfigError("weights= is required (a visiontrain checkpoint or a torchvision RAFT .pth)")
    if model_name and model_name not in MODEL_NAMES:
        raise ConfigError(f"model={model_name!r} is not one of {', '.join(MODEL_NAMES)}")
    ckpt = load_checkpoint(weights)  # read once: the name, the PWC width and the weights all come from it
    saved = (ckpt.get("config") or {}) if "format_version" in ckpt else {}
    model_name = model_name or saved.get("model", "")
    width = saved.get("pwc_width")
    if not model_name or (model_name == PWC_NAME and width is None):
        state = strip_wrapper_prefixes(extract_model_state(ckpt))
        width = width or pwc_width_of(state) or 1.0
        if not model_name:
            candidates = {n: (lambda n=n: build_raft(n)) for n in RAFT_NAMES}
            candidates[PWC_NAME] = lambda: PWCFlow(channel_multiplier=width)
            fits = [n for n, build in candidates.items() if not any(match_state_dict(build(), state))]
            model_name = fits[0] if fits else "raft_small"  # no fit: load reports the keys
    model = PWCFlow(channel_multiplier=float(width)) if model_name == PWC_NAME else build_raft(model_name)
    load_model_weights(model, weights, task="flow", ckpt=ckpt)
    return model.to(device).eval(), model_name


def _inference_task(model_name: str, num_flow_updates: int, max_error: float = 10.0) -> FlowTask:
    method = "unsupervised" if model_name == PWC_NAME else "supervised"
    return FlowTask(FlowTrainConfig(model=model_name, method=method, num_flow_updates_eval=num_flow_updates,
                                    vis_max_error=max_error, crop=""))


def eval_verb(cfg: FlowEvalConfig) -> int:
    device = _device(cfg.device)
    model, model_name = load_model_for_inference(cfg.weights, cfg.model, device)
    defaults = FlowTrainConfig()
    spec = cfg.data or synthetic_spec(cfg.synth_dir, defaults.synth_train, defaults.synth_val,
                                      defaults.synth_size, cfg.synth_seed)
    split = cfg.split if has_split(spec, cfg.split) else "train"
    dataset = open_flow_dataset(spec, split)
    if not dataset.has_flow:
        raise ConfigError(f"data={spec}: no ground-truth flow to evaluate against")
    check_flow_datasets([(split, dataset)])
    task = _inference_task(model_name, cfg.num_flow_updates, cfg.vis_max_error)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=task.collate)
    metrics = task.evaluate(model, loader)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for i in range(min(cfg.pictures, len(dataset))):
            batch = collate_flow([dataset[i]])
            pred = task.predict_flow(model, batch["image1"].to(device), batch["image2"].to(device))
            save_png(out / f"sample_{i:03d}.png", figure_for(batch, 0, pred[0], cfg.vis_max_error))
            if model_name == PWC_NAME:
                occ = occlusion_of(model, batch["image1"].to(device), batch["image2"].to(device), cfg.occlusion)
                save_mask_png(occ[0], out / f"occlusion_{i:03d}.png")
    report = {**{k: metrics[k] for k in METRIC_NAMES}, **{k: v for k, v in metrics.items() if k not in METRIC_NAMES},
              "data": spec, "split": split, "weights": cfg.weights, "model": model_name,
              "num_flow_updates": cfg.num_flow_updates}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(format_metrics_table(metrics, f"{spec} ({split}, {int(metrics['images'])} images)"))
    print(f"wrote {out / 'metrics.json'}")
    return 0


def predict_verb(cfg: FlowPredictConfig) -> int:
    if not cfg.image1 or not cfg.image2:
        raise ConfigError("image1= and image2= are required")
    device = _device(cfg.device)
    model, model_name = load_model_for_inference(cfg.weights, cfg.model, device)
    spec = f"pair:{cfg.image1},{cfg.image2}" + (f",{cfg.gt}" if cfg.gt else "")
    dataset = open_flow_dataset(spec)
    check_flow_datasets([("input", dataset)])
    sample = dataset[0]
    batch = collate_flow([sample])
    task = _inference_task(model_name, cfg.num_flow_updates)
    with torch.no_grad():
        pred = task.predict_flow(model, batch["image1"].to(device), batch["image2"].to(device))[0]
    flow = pred.permute(1, 2, 0).cpu().numpy()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_flo(out / "flow.flo", flow)
    save_png(out / "flow.png", flow_to_color(flow))
    print(f"wrote {out / 'flow.flo'} and {out / 'flow.png'} ({flow.shape[1]}x{flow.shape[0]}, "
          f"max |flow| {np.linalg.norm(flow, axis=-1).max():.2f} px)")
    if model_name == PWC_NAME:
        occ = occlusion_of(model, batch["image1"].to(device), batch["image2"].to(device), cfg.occlusion)
        save_mask_png(occ[0], out / "occlusion.png")
        print(f"wrote {out / 'occlusion.png'} ({cfg.occlusion}: {100 * float(occ.mean()):.1f}% of pixels occluded)")
    if batch["flow"] is not None:
        save_png(out / "side_by_side.png", figure_for(batch, 0, pred))
        meter = FlowMetrics()
        meter.update(pred[None], batch["flow"].to(device), batch["valid"].to(device))
        m = meter.compute()
        print(f"EPE {m['epe']:.3f} px; EPE below 1 / 3 / 5 px: {100 * m['1px']:.1f} / {100 * m['3px']:.1f} / "
              f"{100 * m['5px']:.1f} % of pixels; Fl-all outliers {100 * m['fl_all']:.1f} %; "
              f"wrote {out / 'side_by_side.png'}")
    return 0


def synth_verb(cfg: FlowSynthConfig) -> int:
    size = parse_size(cfg.size, "size", minimum=32)
    out = write_synthetic_chairs(cfg.out, cfg.train, cfg.val, size, cfg.seed, cfg.max_translation)
    print(f"wrote {cfg.train} train + {cfg.val} val pairs ({size[0]}x{size[1]}) to {out}; "
          f"train with data=chairs:{out}")
    return 0


def export_verb(cfg: FlowExportConfig) -> int:
    from visiontrain.engine.checkpoint import load_checkpoint
    from visiontrain.flow.models.pwc import export_flow_onnx

    if cfg.format != "onnx":
        raise ConfigError(f"format={cfg.format!r}: flow models export to onnx only")
    if not cfg.weights:
        raise ConfigError("weights= is required (a checkpoint of `visiontrain train flow method=unsupervised model=pwc`)")
    model, model_name = load_model_for_inference(cfg.weights, "", torch.device("cpu"))
    if model_name != PWC_NAME:
        raise ConfigError(f"{cfg.weights} holds a {model_name} model; ONNX export is offered for the PWC model "
                          f"(torchvision's RAFT loops over a data-dependent number of updates and is not exported)")
    size_text = cfg.size or ((load_checkpoint(cfg.weights).get("config") or {}).get("unsup_size") or "384x512")
    size = parse_size(size_text, "size", multiple=PWC_STRIDE, minimum=2 * PWC_STRIDE)
    out = Path(cfg.out) if cfg.out else Path(cfg.weights).with_suffix(".onnx")
    export_flow_onnx(model, out, size, opset=cfg.opset)
    print(f"wrote {out} (inputs image1, image2 [B, 3, {size[0]}, {size[1]}] in [0, 1]; "
          f"outputs flow_fw, flow_bw [B, 2, {size[0]}, {size[1]}] in pixels)")
    if cfg.check:
        import onnxruntime as ort

        gen = torch.Generator().manual_seed(0)
        image1, image2 = (torch.rand(2, 3, *size, generator=gen) for _ in range(2))
        with torch.no_grad():
            ref = model(image1, image2, backward=True)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image1": image1.numpy(), "image2": image2.numpy()})
        diff = max(float(np.abs(g - ref[k].numpy()).max()) for g, k in zip(got, ("flow_fw", "flow_bw")))
        print(f"ONNX Runtime vs PyTorch on a batch of 2: max abs difference {diff:.2e} px")
        if diff > 1e-3:
            raise RuntimeError(f"{out}: ONNX Runtime's flow differs from PyTorch's by {diff:.2e} px (> 1e-3)")
    return 0


def train_verb(cfg: FlowTrainConfig) -> int:
    from visiontrain.engine.trainer import fit

    result = fit(FlowTask(cfg))
    metrics = result.get("metrics") or {}
    if metrics and result["is_main"]:
        print(format_metrics_table(metrics, f"final validation ({result['out']})"))
    return 0


VERBS = {
    "train": (FlowTrainConfig, train_verb),
    "eval": (FlowEvalConfig, eval_verb),
    "predict": (FlowPredictConfig, predict_verb),
    "synth": (FlowSynthConfig, synth_verb),
    "export": (FlowExportConfig, export_verb),
}
