"""The one way to load a trained flow model from a file, and to run it.

Accepted files (``weights=`` of ``eval``, ``predict``, ``export`` and of a training run):

* a visiontrain flow checkpoint (``best.pt``, ``last.pt``): its EMA weights when it has them, the model
  name and PWC width from its saved config;
* a torchvision RAFT state dict (``raft_small_C_T_V2-*.pth``), or one saved from a model built here;
* a PWC state dict (e.g. ``torch.save(model.state_dict())`` of a :class:`PWCFlow`);

``module.`` / ``_orig_mod.`` prefixes are accepted. Without a name (``model=`` empty, a plain state dict)
the model is the variant whose parameter names and shapes fit the file, and a PWC's channel multiplier
comes from its layer widths. A checkpoint of another task (detect, panorama) gets one clear message.

Running: :func:`predict_flow` takes ``[0, 1]`` images ``[B, 3, H, W]`` of any size for both families
(RAFT pads to multiples of 8 and at least 128 in :func:`raft_forward`; PWC inputs are padded here to
multiples of 32, at least 64) and returns the final flow ``[B, 2, H, W]`` in pixels; :func:`occlusion_of`
gives a PWC model's occlusion mask; :func:`evaluate_flow` the metrics over a data loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visiontrain.config import ConfigError
from visiontrain.engine.checkpoint import (
    CheckpointError,
    check_task,
    extract_model_state,
    load_checkpoint,
    load_state_dict_checked,
    match_state_dict,
    strip_wrapper_prefixes,
)
from visiontrain.flow.config import MASK_METHODS, MODEL_NAMES, PWC_NAME, TTA_MODES, WEIGHTS_HELP
from visiontrain.flow.losses.occlusion import estimate_occlusion
from visiontrain.flow.metrics import FlowMetrics
from visiontrain.flow.models.pwc import PWC_MIN_SIZE, PWC_STRIDE, PWCFlow
from visiontrain.flow.models.raft import RAFT_NAMES, build_raft, raft_forward

NEEDS = "a flow checkpoint or a torchvision RAFT / PWC state dict"


@dataclass
class FlowWeights:
    """What a weights file holds: ``state`` (the model's state dict, EMA when present, wrapper prefixes
    removed) and ``config`` (the saved training config; empty for a plain state dict)."""

    path: str
    state: dict[str, torch.Tensor]
    config: dict


@dataclass
class LoadedFlowModel:
    """A model ready for inference (``eval()`` mode, on its device), its name and the file's config."""

    model: nn.Module
    name: str
    config: dict


def read_flow_weights(path: str | Path) -> FlowWeights:
    """Read ``path`` once (``weights_only``), refuse another task's checkpoint, and take its weights."""
    if not str(path):
        raise ConfigError(f"weights= is required: {WEIGHTS_HELP}")
    ckpt = load_checkpoint(path)
    check_task(ckpt, path, "flow", needs=NEEDS)
    try:
        state = strip_wrapper_prefixes(extract_model_state(ckpt, prefer_ema=True))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}; flow needs {NEEDS}") from None
    config = (ckpt.get("config") or {}) if "format_version" in ckpt else {}
    return FlowWeights(str(path), state, config)


def build_flow_model(name: str, pwc_width: float = 1.0) -> nn.Module:
    """A freshly initialised ``name`` (one of :data:`MODEL_NAMES`); ``pwc_width``: the PWC channel multiplier."""
    if name == PWC_NAME:
        return PWCFlow(channel_multiplier=float(pwc_width))
    if name not in RAFT_NAMES:
        raise ConfigError(f"model={name!r} is not one of {', '.join(MODEL_NAMES)}")
    return build_raft(name)


def pwc_width_of(state: dict[str, torch.Tensor]) -> float | None:
    """The channel multiplier of a PWC state dict (its coarsest decoder's first layer has 128·m filters),
    or None when ``state`` is not a PWC model's."""
    weight = state.get("decoders.0.layers.0.0.weight")
    return None if weight is None else weight.shape[0] / 128


def infer_model(state: dict[str, torch.Tensor]) -> tuple[str, float] | None:
    """``(name, pwc_width)`` of the variant whose parameter names and shapes all fit ``state``, else None."""
    width = pwc_width_of(state)
    names = (PWC_NAME,) if width is not None else RAFT_NAMES
    for name in names:
        if not any(match_state_dict(build_flow_model(name, width or 1.0), state)):
            return name, width or 1.0
    return None


def _describe(name: str, width: float) -> str:
    return f"{name} model with pwc_width={width:g}" if name == PWC_NAME else f"{name} model"


def _load_into(model: nn.Module, name: str, width: float, weights: FlowWeights) -> None:
    """Load ``weights`` into ``model`` (a ``name`` of ``width``); a file of another variant is named."""
    try:
        load_state_dict_checked(model, weights.state, source=weights.path)
    except CheckpointError:
        fits = infer_model(weights.state)
        if fits is not None and fits != (name, width):
            raise CheckpointError(
                f"{weights.path} holds a {_describe(*fits)} (its parameter shapes fit it), not the "
                f"{_describe(name, width)} asked for: set model={fits[0]}"
                + (f" pwc_width={fits[1]:g}" if fits[0] == PWC_NAME else "")
                + ", or give weights of this model") from None
        raise


def load_flow_weights(model: nn.Module, name: str, path: str | Path, pwc_width: float = 1.0) -> None:
    """Initialise a freshly built ``model`` (``name``, ``pwc_width``) from ``path`` (training's ``weights=``)."""
    _load_into(model, name, float(pwc_width), read_flow_weights(path))


def load_flow_model(path: str | Path, model_name: str = "", device: torch.device | str = "cpu") -> LoadedFlowModel:
    """Build the right model for ``path`` and load it. The name comes from ``model_name``, else from the
    checkpoint's config, else from the variant whose parameter shapes fit the file."""
    weights = read_flow_weights(path)
    name = model_name or weights.config.get("model", "")
    width = weights.config.get("pwc_width") or pwc_width_of(weights.state) or 1.0
    if not name:
        fits = infer_model(weights.state)
        if fits is None:
            keys = ", ".join(list(weights.state)[:3])
            raise CheckpointError(f"{path}: its {len(weights.state)} tensors ({keys}, ...) fit none of "
                                  f"{', '.join(MODEL_NAMES)}; flow needs {NEEDS}")
        name, width = fits
    model = build_flow_model(name, width)
    _load_into(model, name, float(width), weights)
    return LoadedFlowModel(model.to(device).eval(), name, weights.config)


def device_of(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------ running
def pwc_forward_padded(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor,
                       backward: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Forward flow ``[B, 2, H, W]`` of a PWC model for images ``[B, 3, H, W]`` of any size: padded at the
    bottom/right by edge replication to multiples of 32 (at least 64), run, and cropped back.
    ``backward=True`` returns ``(flow_fw, flow_bw)`` from one call."""
    height, width = image1.shape[-2:]
    pad_h = max(PWC_MIN_SIZE, -(-height // PWC_STRIDE) * PWC_STRIDE) - height
    pad_w = max(PWC_MIN_SIZE, -(-width // PWC_STRIDE) * PWC_STRIDE) - width
    if pad_h or pad_w:
        image1 = F.pad(image1, (0, pad_w, 0, pad_h), mode="replicate")
        image2 = F.pad(image2, (0, pad_w, 0, pad_h), mode="replicate")
    out = model(image1, image2, backward=backward)
    if not backward:
        return out["flow_fw"][..., :height, :width]
    return out["flow_fw"][..., :height, :width], out["flow_bw"][..., :height, :width]


def predict_flow(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor,
                 num_flow_updates: int = 12, tta: str = "none") -> torch.Tensor:
    """Final flow ``[B, 2, H, W]`` (pixels) of a RAFT (``num_flow_updates`` refinement steps) or PWC model
    for ``[0, 1]`` images ``[B, 3, H, W]`` of any size.

    ``tta="hflip"``: the mean of the model's flow and the mirror image of its flow on the mirrored pair (the
    mirrored flow's ``u`` changes sign). Two forward passes; the estimate is then exactly mirror-symmetric,
    and the two passes' errors partly cancel (BENCHMARKS.md, "Flip averaging at test time")."""
    if tta not in TTA_MODES:
        raise ConfigError(f"tta={tta!r}: choose {' or '.join(TTA_MODES)}")
    if tta == "hflip":
        direct = predict_flow(model, image1, image2, num_flow_updates)
        mirrored = predict_flow(model, image1.flip(-1), image2.flip(-1), num_flow_updates).flip(-1)
        return 0.5 * (direct + torch.cat([-mirrored[:, :1], mirrored[:, 1:]], dim=1))
    if isinstance(model, PWCFlow):
        return pwc_forward_padded(model, image1, image2)
    return raft_forward(model, image1, image2, num_flow_updates, upsample="last")[-1]


@torch.no_grad()
def occlusion_of(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor, method: str) -> torch.Tensor:
    """Occlusion mask ``[B, 1, H, W]`` (1 = pixel of image 1 hidden in image 2) of a PWC model's forward and
    backward flow, by ``method`` (``brox``: forward-backward consistency; ``wang``: range map)."""
    if method not in MASK_METHODS:
        raise ConfigError(f"occlusion={method!r}: choose {' or '.join(MASK_METHODS)}")
    flow_fw, flow_bw = pwc_forward_padded(model, image1, image2, backward=True)
    return estimate_occlusion(flow_fw, flow_bw, method)


@torch.no_grad()
def evaluate_flow(model: nn.Module, loader, num_flow_updates: int = 12, tta: str = "none") -> dict[str, float]:
    """:class:`FlowMetrics` of ``model`` over every batch of ``loader`` (collated flow batches with
    ground truth): ``epe``, ``1px``, ``3px``, ``5px``, ``fl_all``, their ``*_per_image`` and counts.
    ``tta``: as in :func:`predict_flow`."""
    device = next(model.parameters()).device
    meter = FlowMetrics()
    for batch in loader:
        if batch["flow"] is None:
            raise ConfigError("evaluation data has no ground-truth flow")
        pred = predict_flow(model, batch["image1"].to(device), batch["image2"].to(device), num_flow_updates, tta)
        meter.update(pred, batch["flow"].to(device), batch["valid"].to(device))
    return meter.compute()
