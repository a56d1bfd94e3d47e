"""A restricted unpickler for Ultralytics ``.pt`` files: no pickled code runs, ultralytics is never imported.

Ultralytics checkpoints are pickled ``DetectionModel`` objects (under ``ema`` or ``model``, usually fp16).
:func:`restricted_pickle_module` gives ``torch.load`` an Unpickler that rebuilds tensors, storages and
plain containers, turns every ``ultralytics.*`` / ``torch.nn.modules.*`` class into an inert
:class:`PickledObject` that only records its state, and refuses every other global (``os.system``,
``builtins.eval``, ``subprocess.Popen`` …) with :class:`UnsafePickleError` naming the global and the file.
The one caller is :func:`visiontrain.detect.inference.read_weights`; :mod:`visiontrain.detect.weights`
walks the resulting stub tree into a state dict.
"""

from __future__ import annotations

import _compat_pickle
import datetime
import pathlib
import pickle
import re
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from visiontrain.engine.checkpoint import CheckpointError


class UnsafePickleError(CheckpointError):
    """The pickle references a global outside the allow-list; nothing from it was executed."""


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
