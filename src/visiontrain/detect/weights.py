"""From a loaded weights file to our YOLOv8's state dict, and from that state dict into a model.

:func:`checkpoint_weights` reduces whatever :func:`visiontrain.detect.inference.read_weights` loaded to
:class:`CheckpointWeights` with our key names:

* our checkpoint (``format_version``; EMA weights when present, a distilled student's
  ``distill_adapters`` dropped, class names and image size from ``task_state``);
* an Ultralytics ``.pt``: a pickled ``DetectionModel`` (inert stubs from :mod:`visiontrain.detect.unpickle`)
  under ``ema`` or ``model``, walked (``_parameters``, ``_buffers``, ``_modules``) into a state dict whose
  keys are mapped by :func:`visiontrain.detect.model.ultralytics_key_to_ours`; BatchNorm ``eps`` kept;
* a plain state dict (ours or Ultralytics keys, ``module.`` prefix allowed).

:func:`infer_architecture` reads scale, classes and ``reg_max`` from tensor shapes, and
:func:`load_state_into` copies the weights into a model (a different class count re-initialises the class
branch, with a warning; ``backbone_only`` loads ``backbone.*`` only), with the engine's key matching.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontrain.detect.config import WEIGHT_FILES
from visiontrain.detect.model import (
    SCALES,
    ULTRALYTICS_LAYER_TYPES,
    KeyMappingError,
    YOLOv8,
    ours_key_to_ultralytics,
    scale_channels,
    scale_depth,
    ultralytics_key_to_ours,
)
from visiontrain.detect.unpickle import PickledObject
from visiontrain.engine.checkpoint import (
    CheckpointError,
    check_task,
    extract_model_state,
    load_state_dict_checked,
    strip_wrapper_prefixes,
)

log = logging.getLogger(__name__)
ADAPTERS = "distill_adapters"  # a distilled student's training-only 1×1 adapters (never part of a detector)


class WeightsMismatchError(CheckpointError):
    """Checkpoint tensors that do not fit the model (missing, unexpected or shape-mismatched keys)."""


class ClassBranchResetWarning(UserWarning):
    """Loading into a different number of classes re-initialised the class branch."""


@dataclass
class CheckpointWeights:
    """A weights file reduced to our keys: ``state``, class ``names``, BatchNorm ``eps`` overrides and, for our
    checkpoints, the image size it was trained at."""

    state: dict[str, torch.Tensor]
    source: str  # "ultralytics" | "visiontrain" | "state_dict"
    names: list[str] | None = None
    bn_eps: dict[str, float] = field(default_factory=dict)
    imgsz: int | None = None


@dataclass(frozen=True)
class Architecture:
    scale: str
    nc: int
    reg_max: int
    obb: bool = False  # an oriented-box model (YOLOv8-OBB: the head has the angle branch ``head.cv4``)
    class_parts: tuple[int, ...] = ()  # a class branch in parts (``distill.frozen_base``): classes of each part


def _list(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


# --- from a loaded object to our state dict ----------------------------------------------------------


def _class_name(obj: Any) -> str:
    if isinstance(obj, PickledObject):
        return obj.pickled_class.rsplit(".", 1)[-1]
    return type(obj).__name__


def _stub_state_dict(obj: Any, prefix: str, out: dict[str, torch.Tensor], eps: dict[str, float]) -> None:
    """Walk a pickled module tree (``_parameters``, ``_buffers``, ``_modules``) like ``nn.Module.state_dict``."""
    state = obj.__dict__
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value.detach()
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    if _class_name(obj) == "BatchNorm2d" and isinstance(state.get("eps"), float):
        eps[prefix.rstrip(".")] = state["eps"]
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _stub_state_dict(child, f"{prefix}{name}.", out, eps)


def _ultralytics_weights(model: Any, path: Path) -> CheckpointWeights:
    root = _class_name(model)
    if root not in ("DetectionModel", "OBBModel"):
        raise CheckpointError(
            f"{path}: an Ultralytics {root}, not a DetectionModel or OBBModel; only YOLOv8 detection and OBB "
            "checkpoints can be loaded"
        )
    expected = ULTRALYTICS_LAYER_TYPES[:-1] + (["OBB"] if root == "OBBModel" else ["Detect"])
    if isinstance(model, nn.Module):  # a real module (e.g. loaded by a caller that allow-listed ultralytics)
        raw, eps = dict(model.state_dict()), {}
        layers = list(model.model)
    else:
        raw, eps = {}, {}
        _stub_state_dict(model, "", raw, eps)
        seq = (model.__dict__.get("_modules") or {}).get("model")
        layers = list((seq.__dict__.get("_modules") or {}).values()) if seq is not None else []
    found = [_class_name(m) for m in layers]
    if found != expected:
        diff = next(
            (f"layer {i} is {a} (expected {b})" for i, (a, b) in enumerate(zip(found, expected)) if a != b),
            f"it has {len(found)} layers (expected {len(expected)})",
        )
        raise CheckpointError(f"{path}: not a YOLOv8 {'OBB' if root == 'OBBModel' else 'detection'} model: {diff}")
    state = {_map_key(k, path): v for k, v in raw.items()}
    bn_eps = {_map_key(k + ".weight", path)[: -len(".weight")]: v for k, v in eps.items()}
    names = getattr(model, "names", None) if isinstance(model, nn.Module) else model.__dict__.get("names")
    if isinstance(names, Mapping):
        names = [str(names[i]) for i in sorted(names)]
    return CheckpointWeights(state, "ultralytics", list(names) if isinstance(names, (list, tuple)) else None, bn_eps)


def _map_key(key: str, path: Path) -> str:
    try:
        return ultralytics_key_to_ours(key)
    except KeyMappingError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _state_dict_weights(sd: Mapping[str, torch.Tensor], path: Path, source: str) -> CheckpointWeights:
    sd = strip_wrapper_prefixes(dict(sd))
    if any(k.startswith("model.") for k in sd):
        unmappable = []
        out = {}
        for k, v in sd.items():
            try:
                out[ultralytics_key_to_ours(k)] = v
            except KeyMappingError:
                unmappable.append(k)
        if unmappable:
            raise WeightsMismatchError(f"{path}: Ultralytics-style keys with no YOLOv8 counterpart: {_list(unmappable)}")
        return CheckpointWeights(out, "ultralytics")
    return CheckpointWeights(dict(sd), source)


def _our_checkpoint_weights(ckpt: Mapping, path: Path, needs: str) -> CheckpointWeights:
    """A checkpoint written by the engine: ``task`` checked, EMA weights preferred, adapters dropped."""
    check_task(dict(ckpt), path, "detect" if ckpt.get("task") is not None else None, needs=needs)
    try:
        state = extract_model_state(dict(ckpt), prefer_ema=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not _is_state_dict(state):
        raise CheckpointError(f"{path}: visiontrain checkpoint whose 'model' entry is not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith(ADAPTERS + ".")}
    weights = _state_dict_weights(state, path, "visiontrain")
    info = ckpt.get("task_state") or {}
    weights.names = [str(n) for n in info["names"]] if info.get("names") else None
    weights.imgsz = int(info["imgsz"]) if info.get("imgsz") else None
    return weights


def checkpoint_weights(obj: Any, path: str | Path, needs: str = WEIGHT_FILES) -> CheckpointWeights:
    """Reduce a loaded weights file to our state dict (any of the accepted layouts, see the module docstring).
    ``needs`` says what the caller accepts, for the message about a file of the wrong kind."""
    path = Path(path)
    if isinstance(obj, Mapping) and "format_version" in obj:
        return _our_checkpoint_weights(obj, path, needs)
    if isinstance(obj, Mapping) and ("ema" in obj or "model" in obj):  # Ultralytics checkpoint
        model = obj.get("ema") or obj.get("model")
        if isinstance(model, (PickledObject, nn.Module)):
            return _ultralytics_weights(model, path)
        if _is_state_dict(model):
            return _state_dict_weights(model, path, "state_dict")
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
        return _state_dict_weights(obj["state_dict"], path, "state_dict")
    if isinstance(obj, (PickledObject, nn.Module)):
        return _ultralytics_weights(obj, path)
    if _is_state_dict(obj):
        return _state_dict_weights(obj, path, "state_dict")
    what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise CheckpointError(f"{path}: not a detection checkpoint ({what}); detect needs {needs}")


# --- architecture inference and loading --------------------------------------------------------------


def infer_architecture(state: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> Architecture:
    """Scale, number of classes and ``reg_max`` of a YOLOv8 state dict (our keys) from tensor shapes."""
    split = "head.cv3.0.perm" in state  # a split class branch (SplitClassBranch)
    needed = ("backbone.stem.conv.weight", "backbone.sppf.cv2.conv.weight", "head.cv2.0.2.weight",
              "head.cv3.0.parts.0.2.weight" if split else "head.cv3.0.2.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(
            f"{path}: not a YOLOv8 detection state dict: missing {_list(absent)} (first keys: {_list(list(state), 5)})"
        )
    stem = state["backbone.stem.conv.weight"].shape[0]
    top = state["backbone.sppf.cv2.conv.weight"].shape[0]
    depth = len({k.split(".")[3] for k in state if k.startswith("backbone.c2f2.m.")})
    for scale in SCALES:
        ch = scale_channels(scale)
        if (ch["c64"], ch["c1024"], scale_depth(scale, 3)) == (stem, top, depth):
            nc = state["head.cv3.0.perm"].numel() if split else int(state["head.cv3.0.2.weight"].shape[0])
            parts = []
            while split and f"head.cv3.0.parts.{len(parts)}.2.weight" in state:
                parts.append(int(state[f"head.cv3.0.parts.{len(parts)}.2.weight"].shape[0]))
            return Architecture(scale, nc, state["head.cv2.0.2.weight"].shape[0] // 4,
                                "head.cv4.0.2.weight" in state, tuple(parts))
    raise CheckpointError(
        f"{path}: stem width {stem}, top width {top} and depth {depth} match no YOLOv8 scale ({', '.join(SCALES)})"
    )


_CLASS_OUT = re.compile(r"^head\.cv3\.\d+\.2\.")  # the final 1×1 class convs


def load_state_into(model: YOLOv8, weights: CheckpointWeights, arch: Architecture, path: str | Path,
                    backbone_only: bool = False) -> None:
    """Copy ``weights`` (of architecture ``arch``) into ``model``.

    A class count other than the model's re-initialises the class branch (the ``head.cv3`` tensors that do
    not fit keep the model's values) and warns with :class:`ClassBranchResetWarning`; ``backbone_only``
    loads ``backbone.*`` and leaves neck and head as they are. Every other tensor must fit: missing,
    unexpected and shape-mismatched keys are reported by name (:class:`WeightsMismatchError`)."""
    if getattr(model, "fused", False):
        raise CheckpointError(f"{path}: cannot load weights into a fused model; load first, then fuse()")
    if model.scale != arch.scale:
        raise WeightsMismatchError(f"{path}: checkpoint is YOLOv8{arch.scale}, the model is YOLOv8{model.scale}")
    model_obb = hasattr(model.head, "cv4")
    if arch.obb != model_obb and not backbone_only:
        kinds = {True: "an oriented-box (OBB) model", False: "a horizontal-box detector"}
        raise WeightsMismatchError(f"{path}: checkpoint is {kinds[arch.obb]}, the model is {kinds[model_obb]}; "
                                   f"use model=yolov8{arch.scale}{'-obb' if arch.obb else ''}")
    parts = model.head.class_parts
    if arch.class_parts and not backbone_only and parts != arch.class_parts:
        if arch.nc != model.nc or parts:
            raise WeightsMismatchError(
                f"{path}: checkpoint has a class branch in parts of {list(arch.class_parts)} classes (distill."
                f"frozen_base=true), the model has nc={model.nc}" + (f" in parts of {list(parts)}" if parts else "")
                + "; load it into a model with the same classes")
        model.head.split_class_branch(arch.class_parts)  # the checkpoint's structure; its perm sets the order
    elif parts and not arch.class_parts and not backbone_only:
        raise WeightsMismatchError(f"{path}: the model has a class branch in parts (distill.frozen_base=true), the "
                                   "checkpoint a plain one; load it into a model without frozen_base")
    own = model.state_dict()
    state = weights.state
    if backbone_only:
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
        kept = [k for k in own if not k.startswith("backbone.")]
    elif arch.nc != model.nc:
        reset = [k for k in state if k.startswith("head.cv3.")
                 and (_CLASS_OUT.match(k) or k not in own or state[k].shape != own[k].shape)]
        state = {k: v for k, v in state.items() if k not in reset}
        kept = [k for k in own if k.startswith("head.cv3.") and k not in state]
        msg = (f"{path}: checkpoint has nc={arch.nc} classes, model has nc={model.nc}: class branch re-initialised "
               f"({len(reset)} checkpoint tensors of head.cv3 not loaded: {_list(reset, 6)})")
        warnings.warn(msg, ClassBranchResetWarning, stacklevel=3)
        log.warning(msg)
    else:
        kept = []
    try:  # the tensors deliberately not loaded are given their own values, so everything else must fit
        load_state_dict_checked(model, {**{k: own[k] for k in kept}, **state}, source=str(path))
    except CheckpointError as e:
        raise WeightsMismatchError(f"{e} (the model is YOLOv8{model.scale} with nc={model.nc})") from None
    modules = dict(model.named_modules())
    for name, eps in weights.bn_eps.items():
        if name in modules and (not backbone_only or name.startswith("backbone.")):
            modules[name].eps = eps
    if backbone_only:
        log.info("%s: loaded %d backbone tensors; neck and head keep their fresh initialisation", path, len(state))


def save_state_dict(model: YOLOv8, path: str | Path, ultralytics_keys: bool = False) -> None:
    """Write ``model.state_dict()`` (optionally with Ultralytics key names) as a plain tensor file."""
    sd = model.state_dict()
    if ultralytics_keys and model.head.class_parts:
        raise ValueError("a model with a split class branch (distill.frozen_base=true) has no Ultralytics layout; "
                         "save it with our keys (ultralytics_keys=False) or export it to ONNX")
    if ultralytics_keys:
        sd = {ours_key_to_ultralytics(k): v for k, v in sd.items()}
    torch.save(sd, path)
