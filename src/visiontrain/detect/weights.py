"""Load YOLOv8 weights from Ultralytics ``.pt`` files, plain state dicts and visiontrain checkpoints.

Ultralytics checkpoints are pickled ``DetectionModel`` objects (under ``ema`` or ``model``, usually fp16).
They are read **without importing ultralytics and without running pickled code**: a restricted unpickler
rebuilds tensors, storages and plain containers, turns every ``ultralytics.*`` / ``torch.nn.modules.*``
class into an inert :class:`PickledObject` that only records its state, and refuses every other global
(``os.system``, ``builtins.eval``, ``subprocess.Popen`` …) with an error naming the global and the file.
The module tree is then walked (``_parameters``, ``_buffers``, ``_modules``) into a state dict whose keys are
mapped onto ours by :func:`visiontrain.detect.model.ultralytics_key_to_ours`.

Usage::

    model = load_ultralytics("yolov8n.pt")                  # scale and nc inferred from tensor shapes
    model = load_ultralytics("yolov8n.pt", nc=20)           # class branch re-initialised (warns)
    model = load_ultralytics("yolov8s.pt", nc=20, backbone_only=True)
"""

from __future__ import annotations

import _compat_pickle
import datetime
import logging
import pathlib
import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
from visiontrain.engine.checkpoint import CheckpointError as EngineCheckpointError
from visiontrain.engine.checkpoint import strip_wrapper_prefixes

log = logging.getLogger(__name__)


class CheckpointError(EngineCheckpointError):
    """A weights file that cannot be used; the message names the file and what is wrong with it."""


class UnsafePickleError(CheckpointError):
    """The pickle references a global outside the allow-list; nothing from it was executed."""


class WeightsMismatchError(CheckpointError):
    """Checkpoint tensors that do not fit the model (missing, unexpected or shape-mismatched keys)."""


class ClassBranchResetWarning(UserWarning):
    """Loading into a different number of classes re-initialised the class branch."""


# --- restricted unpickling ---------------------------------------------------------------------------


class PickledObject:
    """Inert stand-in for a pickled ultralytics / ``torch.nn`` object: records state, runs nothing.

    ``pickled_class`` is ``"module.QualName"`` of the original class; the pickled ``__dict__`` is this
    object's ``__dict__`` (so ``stub._modules``, ``stub._parameters`` … are plain dicts).
    """

    pickled_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE path: keep the arguments, do nothing
        if args or kwargs:
            self.__dict__["_reduce_args"] = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_class}>"


_STUB_MODULE_PREFIXES = ("ultralytics.", "torch.nn.modules.")
_stub_classes: dict[str, type[PickledObject]] = {}


def _stub_class(module: str, name: str) -> type[PickledObject]:
    full = f"{module}.{name}"
    cls = _stub_classes.get(full)
    if cls is None:
        cls = type(name, (PickledObject,), {"pickled_class": full, "__module__": __name__})
        _stub_classes[full] = cls
    return cls


def _check_hooks(hooks: Any) -> None:
    if hooks:
        raise UnsafePickleError("a pickled tensor carries backward hooks; refusing to restore them")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_hooks(backward_hooks)
    return torch._utils._rebuild_tensor_v2(
        storage, offset, size, stride, requires_grad, OrderedDict(), metadata
    )


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_hooks(backward_hooks)
    return torch._utils._rebuild_tensor_v3(
        storage, offset, size, stride, requires_grad, OrderedDict(), dtype, metadata
    )


def _rebuild_parameter(data, requires_grad, backward_hooks):
    _check_hooks(backward_hooks)
    return nn.Parameter(data, requires_grad)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    _check_hooks(backward_hooks)
    return nn.Parameter(data, requires_grad)  # python attributes on parameters are not restored


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter) or new_type not in (
        torch.Tensor,
        nn.Parameter,
    ):
        raise UnsafePickleError(f"refusing to rebuild a tensor of type {new_type!r} via {func!r}")
    ret = func(*args)
    return ret if type(ret) is new_type else ret.as_subclass(new_type)


def _numpy_globals() -> dict[str, Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return {}
    out: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{core}.scalar"] = np._core.multiarray.scalar
        out[f"{core}._reconstruct"] = np._core.multiarray._reconstruct
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            out[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return out


#: globals a checkpoint may reference, each mapped to the (safe) object the unpickler returns for it
ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.range": range,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "_codecs.encode": __import__("codecs").encode,  # how protocol 2 pickles bytes
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": torch.Tensor,
    "torch.nn.parameter.Parameter": nn.Parameter,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "datetime.datetime": datetime.datetime,
    "datetime.date": datetime.date,
    "datetime.timedelta": datetime.timedelta,
    "datetime.timezone": datetime.timezone,
    "pathlib.Path": pathlib.Path,
    "pathlib.PosixPath": pathlib.PurePosixPath,
    "pathlib.WindowsPath": pathlib.PureWindowsPath,
    "pathlib.PurePosixPath": pathlib.PurePosixPath,
    "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
    "types.SimpleNamespace": types.SimpleNamespace,
    **_numpy_globals(),
}


def restricted_pickle_module(source: str) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler only resolves allowed globals.

    ``source`` (the file name) is used in error messages.
    """

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names written by protocol 2
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            full = f"{module}.{name}"
            if full in ALLOWED_GLOBALS:
                return ALLOWED_GLOBALS[full]
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if module.startswith(_STUB_MODULE_PREFIXES) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
                return _stub_class(module, name)
            raise UnsafePickleError(
                f"{source}: refused to load global '{full}' from the pickle (not a tensor, container or model "
                "class). The file may be malicious; nothing from it was executed. If you trust it, convert it "
                "to a plain state dict with torch.save(model.state_dict(), ...) first."
            )

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    mod = types.ModuleType("visiontrain_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return mod


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` a file safely: ``weights_only=True`` first, the restricted unpickler if that refuses."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # pickled objects (an Ultralytics model): retry with stubs below
    except Exception as e:
        raise _not_a_checkpoint(path, e) from e
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=restricted_pickle_module(str(path)), weights_only=False
        )
    except CheckpointError:
        raise
    except Exception as e:
        raise _not_a_checkpoint(path, e) from e


def _not_a_checkpoint(path: Path, e: Exception) -> CheckpointError:
    kind = "zip" if zipfile.is_zipfile(path) else "non-zip"
    return CheckpointError(
        f"{path}: not a readable PyTorch checkpoint ({kind} file; {type(e).__name__}: {str(e).splitlines()[0][:200]})"
    )


# --- from a loaded object to our state dict ----------------------------------------------------------


@dataclass
class CheckpointWeights:
    """A checkpoint reduced to our keys: ``state`` (our names), class ``names`` and BatchNorm ``eps`` overrides."""

    state: dict[str, torch.Tensor]
    source: str  # "ultralytics" | "visiontrain" | "state_dict"
    names: list[str] | None = None
    bn_eps: dict[str, float] = field(default_factory=dict)


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
    if root != "DetectionModel":
        raise CheckpointError(
            f"{path}: an Ultralytics {root}, not a DetectionModel; only YOLOv8 detection checkpoints can be loaded"
        )
    if isinstance(model, nn.Module):  # a real module (e.g. loaded by a caller that allow-listed ultralytics)
        raw, eps = dict(model.state_dict()), {}
        layers = list(model.model)
    else:
        raw, eps = {}, {}
        _stub_state_dict(model, "", raw, eps)
        seq = (model.__dict__.get("_modules") or {}).get("model")
        layers = list((seq.__dict__.get("_modules") or {}).values()) if seq is not None else []
    found = [_class_name(m) for m in layers]
    if found != ULTRALYTICS_LAYER_TYPES:
        diff = next(
            (
                f"layer {i} is {a} (expected {b})"
                for i, (a, b) in enumerate(zip(found, ULTRALYTICS_LAYER_TYPES))
                if a != b
            ),
            f"it has {len(found)} layers (expected {len(ULTRALYTICS_LAYER_TYPES)})",
        )
        raise CheckpointError(f"{path}: not a YOLOv8 detection model: {diff}")
    state = {_map_key(k, path): v for k, v in raw.items()}
    bn_eps = {_map_key(k + ".weight", path)[: -len(".weight")]: v for k, v in eps.items()}
    names = getattr(model, "names", None) if isinstance(model, nn.Module) else model.__dict__.get("names")
    if isinstance(names, Mapping):
        names = [str(names[i]) for i in sorted(names)]
    return CheckpointWeights(
        state, "ultralytics", list(names) if isinstance(names, (list, tuple)) else None, bn_eps
    )


def _map_key(key: str, path: Path) -> str:
    try:
        return ultralytics_key_to_ours(key)
    except KeyMappingError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


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
            raise WeightsMismatchError(
                f"{path}: Ultralytics-style keys with no YOLOv8 counterpart: {_list(unmappable)}"
            )
        return CheckpointWeights(out, "ultralytics")
    return CheckpointWeights(dict(sd), source)


def checkpoint_weights(obj: Any, path: str | Path) -> CheckpointWeights:
    """Reduce what :func:`read_checkpoint` returned to our state dict (any of the accepted layouts)."""
    path = Path(path)
    if (
        isinstance(obj, Mapping) and "format_version" in obj and "model" in obj
    ):  # visiontrain engine checkpoint
        task = obj.get("task")
        if task not in (None, "detect"):
            raise CheckpointError(f"{path}: a visiontrain '{task}' checkpoint, not a detection one")
        ema = obj.get("ema")
        state = (
            ema["module"] if isinstance(ema, Mapping) and _is_state_dict(ema.get("module")) else obj["model"]
        )
        if not _is_state_dict(state):
            raise CheckpointError(f"{path}: visiontrain checkpoint whose 'model' entry is not a state dict")
        return _state_dict_weights(state, path, "visiontrain")
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
    what = (
        f"a dict with keys {sorted(map(str, obj))[:8]}"
        if isinstance(obj, Mapping)
        else f"a {type(obj).__name__}"
    )
    raise CheckpointError(
        f"{path}: not a detection checkpoint ({what}); expected an Ultralytics .pt ('model'/'ema'), "
        "a visiontrain checkpoint ('format_version', 'model') or a state dict of tensors"
    )


# --- architecture inference and loading --------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    scale: str
    nc: int
    reg_max: int


def infer_architecture(state: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> Architecture:
    """Scale, number of classes and ``reg_max`` of a YOLOv8 state dict (our keys) from tensor shapes."""
    needed = (
        "backbone.stem.conv.weight",
        "backbone.sppf.cv2.conv.weight",
        "head.cv2.0.2.weight",
        "head.cv3.0.2.weight",
    )
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
            return Architecture(
                scale, int(state["head.cv3.0.2.weight"].shape[0]), state["head.cv2.0.2.weight"].shape[0] // 4
            )
    raise CheckpointError(
        f"{path}: stem width {stem}, top width {top} and depth {depth} match no YOLOv8 scale ({', '.join(SCALES)})"
    )


def _list(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


_CLASS_OUT = re.compile(r"^head\.cv3\.\d+\.2\.")  # the final 1×1 class convs


def load_state_into(
    model: YOLOv8, weights: CheckpointWeights, path: str | Path, ckpt_nc: int, backbone_only: bool = False
) -> None:
    """Copy ``weights`` into ``model``; a differing nc re-initialises the class branch, with a warning."""
    if getattr(model, "fused", False):
        raise CheckpointError(f"{path}: cannot load weights into a fused model; load first, then fuse()")
    own = model.state_dict()
    state = weights.state
    if backbone_only:
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
        expected = [k for k in own if k.startswith("backbone.")]
    else:
        expected = list(own)
    reset: list[str] = []
    if not backbone_only and ckpt_nc != model.nc:
        reset = [
            k
            for k in state
            if k.startswith("head.cv3.")
            and (_CLASS_OUT.match(k) or k not in own or state[k].shape != own[k].shape)
        ]
        state = {k: v for k, v in state.items() if k not in reset}
        expected = [k for k in expected if not (k.startswith("head.cv3.") and k not in state)]
        msg = (
            f"{path}: checkpoint has nc={ckpt_nc} classes, model has nc={model.nc}: class branch re-initialised "
            f"({len(reset)} checkpoint tensors of head.cv3 not loaded: {_list(reset, 6)})"
        )
        warnings.warn(msg, ClassBranchResetWarning, stacklevel=3)
        log.warning(msg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{name}: {_list(keys)}"
            for name, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise WeightsMismatchError(
            f"{path}: weights do not fit YOLOv8{model.scale} (nc={model.nc}): " + "; ".join(parts)
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    modules = dict(model.named_modules())
    for name, eps in weights.bn_eps.items():
        if name in modules and (not backbone_only or name.startswith("backbone.")):
            modules[name].eps = eps
    if backbone_only:
        log.info(
            "%s: loaded %d backbone tensors; neck and head keep their fresh initialisation", path, len(state)
        )


def load_ultralytics(
    path: str | Path, nc: int | None = None, backbone_only: bool = False, model: YOLOv8 | None = None
) -> YOLOv8:
    """A YOLOv8 with the weights of ``path``: an Ultralytics ``.pt``, a state dict (ours or Ultralytics keys,
    ``module.`` prefix allowed) or a visiontrain checkpoint.

    ``nc``: classes of the returned model (default: the checkpoint's, or ``model.nc`` when ``model`` is
    given); a different nc re-initialises the class branch and warns (:class:`ClassBranchResetWarning`).
    ``backbone_only``: load only ``backbone.*``; neck and head keep their fresh initialisation.
    ``model``: load into this model instead of building one (its scale must match the checkpoint's).
    """
    path = Path(path)
    weights = checkpoint_weights(read_checkpoint(path), path)
    arch = infer_architecture(weights.state, path)
    if model is None:
        model = YOLOv8(arch.scale, nc=nc if nc is not None else arch.nc, reg_max=arch.reg_max)
    elif nc is not None and nc != model.nc:
        model.head.reset_class_branch(nc)
    if model.scale != arch.scale:
        raise WeightsMismatchError(
            f"{path}: checkpoint is YOLOv8{arch.scale}, the model is YOLOv8{model.scale}"
        )
    load_state_into(model, weights, path, arch.nc, backbone_only)
    if weights.names is not None and len(weights.names) == model.nc and not backbone_only:
        model.names = weights.names
    return model


def save_state_dict(model: YOLOv8, path: str | Path, ultralytics_keys: bool = False) -> None:
    """Write ``model.state_dict()`` (optionally with Ultralytics key names) as a plain tensor file."""
    sd = model.state_dict()
    if ultralytics_keys:
        sd = {ours_key_to_ultralytics(k): v for k, v in sd.items()}
    torch.save(sd, path)
