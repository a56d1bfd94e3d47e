"""The optical-flow task the engine trains: supervised RAFT, or unsupervised PWC (UFlow) / RAFT (SMURF).

``method=supervised`` trains a torchvision RAFT with the sequence loss on ground truth, on random crops
(``crop=HxW``) of augmented pairs. ``method=unsupervised`` (``model=pwc``) trains UFlow's PWC network with
:class:`~visiontrain.flow.unsupervised.UnsupervisedFlowObjective` (census, second-order smoothness, ``wang``
occlusion, optional self-supervision switched on at ``selfsup_start_step``, counted in optimizer steps the
engine hands over) on pairs without ground truth: ``data=frames:DIR``, ``data=video:FILE`` or any
supervised spec, whose ground truth is then used only for validation. ``model=raft_small|raft_small_convex``
with ``method=unsupervised`` fine-tunes a RAFT (``weights=``) the SMURF way: every iteration in the loss,
and with ``unsup_crop=HxW`` random crops whose photometric loss warps the whole frame. Each step's kept
mask share goes to a :class:`~visiontrain.flow.collapse.MaskCollapseGuard`, which stops a run whose
mask stays nearly empty. Its training pairs are centre-cropped
to multiples of 32 (or resized to ``unsup_size=HxW``). Without ``data=`` a small FlyingChairs-layout set is
synthesised once and used.

Before step 1 every image and flow file is checked (:mod:`visiontrain.flow.checks`) and every training
image measured: an image smaller than the crop (or than the 64×64 PWC needs) is an error naming it;
nothing is ever upscaled to fit. Without validation data the run trains without validation and the
engine's ``best.pt`` holds the final weights. Loading and running models (also for ``weights=``) is
:mod:`visiontrain.flow.inference`; the verbs are in :mod:`visiontrain.flow.cli`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from visiontrain.config import ConfigError
from visiontrain.engine.distributed import all_reduce_mean
from visiontrain.engine.task import StepInfo, Task
from visiontrain.flow.augment import FlowAugment
from visiontrain.flow.checks import check_flow_datasets, check_image_sizes
from visiontrain.flow.collapse import MaskCollapseGuard
from visiontrain.flow.config import CROP_MULTIPLE, PWC_NAME, UNLABELED_KINDS, FlowTrainConfig
from visiontrain.flow.data import collate_flow, has_split, open_flow_dataset
from visiontrain.flow.frames import UnlabeledPairs, unlabeled_dataset
from visiontrain.flow.inference import build_flow_model, evaluate_flow, load_flow_weights, predict_flow
from visiontrain.flow.losses.full_frame import FullFrame
from visiontrain.flow.losses.supervised import sequence_loss
from visiontrain.flow.models.pwc import PWC_MIN_SIZE
from visiontrain.flow.models.raft import RAFT_MIN_SIZE, raft_forward
from visiontrain.flow.models.raft_pair import RaftPair
from visiontrain.flow.sizes import format_size
from visiontrain.flow.synthetic import synthetic_chairs_spec
from visiontrain.flow.unsupervised import UnsupervisedFlowObjective
from visiontrain.flow.viz import batch_figure, save_png

log = logging.getLogger(__name__)

NOT_LEARNING_RATIO = 0.95  # validation EPE at or above this share of zero flow's: the model has learned nothing


def not_learning_message(metrics: dict[str, float]) -> str:
    """A warning when the validation EPE is no better than predicting no motion at all, else ``""``."""
    epe, zero = metrics.get("epe", float("nan")), metrics.get("zero_epe", float("nan"))
    if not (zero > 0 and epe >= NOT_LEARNING_RATIO * zero):  # NaN compares False: no warning without numbers
        return ""
    return (f"flow: validation EPE {epe:.3f} is no better than predicting zero motion ({zero:.3f} on the same "
            f"pixels): the model has not learned yet. RAFT trained from scratch can stay stuck at zero flow (one seed "
            f"in four with the README recipe's settings did, BENCHMARKS.md); if it still is at the next evaluation, "
            f"restart with another seed=, a longer warmup_steps= or a lower lr=, and train on small motions first "
            f"(gen.long_tail=false, README 'Small motions first')")


def crop_fix(smallest: tuple[int, int], crop: tuple[int, int]) -> str:
    """What to do when training images are smaller than ``crop``: the largest crop (multiples of 8) that
    fits the ``smallest`` height and width found, or whole images."""
    fits = [min(c, s) // CROP_MULTIPLE * CROP_MULTIPLE for c, s in zip(crop, smallest)]
    suggestion = f"crop={fits[0]}x{fits[1]} (fits every image), " if min(fits) >= CROP_MULTIPLE else ""
    return f"Set a smaller crop: {suggestion}or crop= (empty) to train on whole images."


class FlowTask(Task):
    name = "flow"
    primary_metric = "epe"
    primary_mode = "min"

    def __init__(self, cfg: FlowTrainConfig):
        super().__init__(cfg)  # the config was checked when it was built (FlowTrainConfig.__post_init__)
        self.crop = cfg.crop_hw
        self.unsup_size = cfg.unsup_hw
        self.objective: UnsupervisedFlowObjective | None = None
        if cfg.unsupervised:
            self.objective = UnsupervisedFlowObjective(
                census_weight=cfg.census_weight, smooth1_weight=cfg.smooth1_weight,
                smooth2_weight=cfg.smooth2_weight, occlusion=cfg.occlusion, ssim_weight=cfg.ssim_weight,
                selfsup_weight=cfg.selfsup_weight if cfg.selfsup_start_step >= 0 else 0.0,
                selfsup_start_step=max(0, cfg.selfsup_start_step), selfsup_ramp_steps=cfg.selfsup_ramp_steps,
                mask_floor=cfg.mask_floor, sequence_gamma=cfg.gamma)
        self.mask_guard = MaskCollapseGuard(cfg.mask_guard_share, cfg.mask_guard_steps)

    # --- model --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return build_flow_model(self.cfg.model, self.cfg.pwc_width)

    def load_weights(self, model: nn.Module, path: str) -> None:
        """``weights=``: a flow checkpoint (EMA preferred) or a RAFT / PWC state dict of this model."""
        load_flow_weights(model, self.cfg.model, path, self.cfg.pwc_width)

    def state_dict(self) -> dict:
        return {"method": self.cfg.method}

    # --- data ---------------------------------------------------------------------------------
    def train_spec(self) -> str:
        """``data=``, or the built-in synthetic set's spec (written once) when it is empty."""
        cfg = self.cfg
        if cfg.data:
            return cfg.data
        return synthetic_chairs_spec(cfg.synth_dir, cfg.synth_train, cfg.synth_val, cfg.synth_hw, cfg.synth_seed,
                                     cfg.gen)

    def _val_dataset(self, spec: str, labeled_train: bool):
        """``val_data``, else the val split of the training ``spec`` when it has one, else None."""
        cfg = self.cfg
        if cfg.val_data:
            val = open_flow_dataset(cfg.val_data, "val" if has_split(cfg.val_data, "val") else "train")
        elif labeled_train and has_split(spec, "val"):
            val = open_flow_dataset(spec, "val")
        else:
            log.warning("flow: %s has no val split and val_data is empty: training without validation "
                        "(best.pt will hold the final weights)", spec)
            return None
        if not val.has_flow:
            raise ConfigError(f"val_data={val.name}: no ground-truth flow to evaluate against")
        return val

    def build_datasets(self):
        """``(train, val)``, every file checked and every training image measured before step 1."""
        if self.cfg.unsupervised:
            train, val = self._unsupervised_datasets()
            check_flow_datasets([("train", train), ("val", val)])
            if self.unsup_size is None:  # pairs are centre-cropped, not resized: they must be large enough
                check_image_sizes([("train", train)], (PWC_MIN_SIZE, PWC_MIN_SIZE),
                                  "the PWC model" if self.cfg.model == PWC_NAME else "unsupervised training",
                                  lambda _: "Use larger frames, or unsup_size=HxW (multiples of 32) to resize "
                                            "every training pair to that size.")
            crop = self.cfg.unsup_crop_hw
            if crop is not None and self.unsup_size is None:
                check_image_sizes([("train", train)], crop, f"unsup_crop={self.cfg.unsup_crop}",
                                  lambda _: "Set a smaller unsup_crop, or unsup_crop= (empty) for whole pairs.")
            elif crop is not None and (crop[0] > self.unsup_size[0] or crop[1] > self.unsup_size[1]):
                raise ConfigError(f"unsup_crop={self.cfg.unsup_crop} is larger than unsup_size={self.cfg.unsup_size}")
            return train, val
        spec = self.train_spec()
        train = open_flow_dataset(spec, "train", augment=FlowAugment(self.cfg.aug, self.crop), seed=self.cfg.seed)
        if not train.has_flow:
            raise ConfigError(f"data={spec}: no ground-truth flow files; supervised training needs them "
                              f"(pairs:DIR wants <name>_flow.flo next to each pair)")
        val = self._val_dataset(spec, labeled_train=True)
        check_flow_datasets([("train", train), ("val", val)])
        if self.crop is not None:
            check_image_sizes([("train", train)], self.crop, f"crop={self.cfg.crop}",
                              lambda smallest: crop_fix(smallest, self.crop))
            if min(self.crop) < RAFT_MIN_SIZE:
                log.warning("flow: crop=%s is below the %s torchvision's RAFT takes; every batch is padded to "
                            "at least that (edge replication) inside the model call and the prediction cropped "
                            "back", self.cfg.crop, format_size(RAFT_MIN_SIZE, RAFT_MIN_SIZE))
        return train, val

    def _unsupervised_datasets(self):
        """Training pairs without ground truth (sides multiples of 32) and the validation set with it."""
        spec = self.cfg.data
        labeled = spec.partition(":")[0] not in UNLABELED_KINDS
        if labeled:
            spec = self.train_spec()
            base = open_flow_dataset(spec, "train", seed=self.cfg.seed)
        else:
            base = unlabeled_dataset(spec)
        if labeled and not base.has_flow and not self.cfg.val_data:  # e.g. pair:A,B: nothing to validate on
            log.warning("flow: %s has no ground truth and val_data is empty: training without validation "
                        "(best.pt will hold the final weights)", spec)
            return UnlabeledPairs(base, self.unsup_size), None
        return UnlabeledPairs(base, self.unsup_size), self._val_dataset(spec, labeled_train=labeled)

    def collate(self, samples: list) -> dict:
        return collate_flow(samples, pad=True)

    # --- training and evaluation ------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: dict, info: StepInfo) -> dict[str, torch.Tensor]:
        if self.objective is not None:
            return self._unsupervised_step(model, batch, info.step)
        preds = raft_forward(model, batch["image1"], batch["image2"], self.cfg.num_flow_updates_train,
                             self.cfg.upsample_train)
        return {"sequence_l1": sequence_loss(preds, batch["flow"], batch["valid"], self.cfg.gamma, self.cfg.max_flow)}

    def _unsupervised_step(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """UFlow / SMURF objective on ``batch["image1"], batch["image2"]`` ``[B, 3, H, W]`` (ground truth unused)
        at optimizer step ``step`` (it switches self-supervision on). With ``unsup_crop`` the model sees a
        random crop (the same for the batch, drawn from ``(seed, step)``) and the loss warps the whole frame.
        The mask's kept share (``stat/mask_kept``, averaged over ranks) goes to the collapse guard."""
        assert self.objective is not None
        device = next(model.parameters()).device
        image1, image2 = batch["image1"].to(device), batch["image2"].to(device)
        net = model if self.cfg.model == PWC_NAME else RaftPair(model, self.cfg.num_flow_updates_train)
        full = None
        crop = self.cfg.unsup_crop_hw
        if crop is not None and tuple(image1.shape[-2:]) != crop:
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
            top = int(torch.randint(0, image1.shape[-2] - crop[0] + 1, (1,), generator=generator))
            left = int(torch.randint(0, image1.shape[-1] - crop[1] + 1, (1,), generator=generator))
            full = FullFrame(image1, image2, top, left)
            image1, image2 = full.crop(*crop)
        terms = self.objective(net, image1, image2, step, full)
        share = all_reduce_mean(terms["stat/mask_kept"].detach().float())
        self.mask_guard.update(float(share), step)
        return terms

    def predict_flow(self, model: nn.Module, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        """Final flow ``[B, 2, H, W]`` for ``[0, 1]`` images ``[B, 3, H, W]`` with ``num_flow_updates_eval``."""
        return predict_flow(model, image1, image2, self.cfg.num_flow_updates_eval)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        metrics = evaluate_flow(model, loader, self.cfg.num_flow_updates_eval)
        message = not_learning_message(metrics)
        if message:
            log.warning(message)
        return metrics

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict, out_dir: Path) -> None:
        device = next(model.parameters()).device
        pred = self.predict_flow(model, batch["image1"][:1].to(device), batch["image2"][:1].to(device))
        save_png(Path(out_dir) / "flow_val.png", batch_figure(batch, 0, pred[0], self.cfg.vis_max_error))
