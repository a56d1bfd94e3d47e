"""Checkpoints: atomic writes, ``weights_only`` loading, unwrapped weights and checked key matching.

A checkpoint is a dict of tensors and primitives only (so ``torch.load(weights_only=True)`` reads it
and no pickled code ever runs)::

    format_version, task, model_signature, config, model, ema, optimizer, scheduler, scaler,
    rng (one entry per rank), step, epoch, batch_in_epoch, best, best_step, versions
"""

from __future__ import annotations

import os
import platform
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontrain.config import to_dict

FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and the reason."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` to a temp file in the same folder, fsync, then rename over
    ``path``: a reader (or a crash) sees either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def keep_step_copy(last: Path, step: int, keep: int) -> None:
    """Keep ``step_XXXXXXX.pt`` beside ``last`` for the ``keep`` newest steps: a hard link to the file just
    written (no second serialisation; the next atomic replace of ``last`` makes a new file, so the link
    keeps this step's content)."""
    step_file = last.parent / f"step_{step:07d}.pt"
    step_file.unlink(missing_ok=True)
    os.link(last, step_file)
    for old in sorted(last.parent.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", hint: str = "") -> dict:
    """Read a checkpoint with ``weights_only=True``. Clear errors for missing or foreign files; ``hint``
    (the caller's) says what to do with a file that is not ours (e.g. detection's safe Ultralytics
    importer)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be read as a visiontrain checkpoint or state dict with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})" + (f". {hint}" if hint else "")
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    return ckpt


def resume_path(resume: str, out: str | Path) -> Path | None:
    """The checkpoint a ``resume=`` setting names: ``auto`` is ``<out>/checkpoints/last.pt`` when it exists
    (else ``None``: a new run in exactly ``out``, as a requeued cluster job needs); any other non-empty
    value must be a checkpoint file. The one place that resolves it (CLI config and trainer)."""
    if not resume:
        return None
    if resume == "auto":
        path = Path(out) / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"resume={resume}: no such checkpoint file (resume=auto continues the run in out=)")
    return path


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes from every key."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = v
    return out


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """``(missing, unexpected, mismatched)`` key lists; ``mismatched`` holds ``(key, ckpt, model)`` shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


def _describe(missing: list, unexpected: list, mismatched: list, limit: int = 8) -> str:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title} keys: {', '.join(items[:limit])}{more}")
    if mismatched:
        shown = ", ".join(f"{k} {a}≠{b}" for k, a, b in mismatched[:limit])
        parts.append(f"{len(mismatched)} shape-mismatched keys (checkpoint≠model): {shown}")
    return "; ".join(parts)


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True,
                            source: str = "checkpoint") -> tuple[list, list, list]:
    """Load ``state`` (``module.``-prefixed keys accepted) and report problems by key name.

    ``strict=True`` raises :class:`CheckpointError` on any missing, unexpected or mismatched key;
    ``strict=False`` loads every key that fits and returns the three lists.
    """
    state = strip_wrapper_prefixes(state)
    missing, unexpected, mismatched = match_state_dict(model, state)
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(f"{source} does not fit this model: {_describe(missing, unexpected, mismatched)}")
    bad = {k for k, *_ in mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k not in bad and k not in unexpected}, strict=False)
    return missing, unexpected, mismatched


def extract_model_state(ckpt: dict, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights in an engine checkpoint (EMA when present and asked for) or a plain state dict."""
    if "format_version" in ckpt:
        if prefer_ema and ckpt.get("ema"):
            return ckpt["ema"]["module"]
        return ckpt["model"]
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise CheckpointError("no model weights found (expected an engine checkpoint or a state dict)")


def check_task(ckpt: dict, path: str | Path, task: str | None, signature: str | None = None,
               needs: str = "") -> None:
    """Clear errors for a checkpoint written by another task or another architecture. ``needs`` says what
    the caller accepts (e.g. "a detect checkpoint, an Ultralytics .pt or a state dict")."""
    if "format_version" not in ckpt:
        return
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {ckpt['format_version']} is newer than this "
                              f"visiontrain understands ({FORMAT_VERSION}); upgrade visiontrain")
    if task is not None and ckpt.get("task") != task:
        other = ckpt.get("task")
        raise CheckpointError(f"{path} is a {other} checkpoint (from `visiontrain train {other}`); {task} needs "
                              f"{needs or f'a {task} checkpoint'}")
    if signature is not None and ckpt.get("model_signature") not in (None, signature):
        raise CheckpointError(f"{path}: checkpoint model is '{ckpt.get('model_signature')}' but this run "
                              f"builds '{signature}'; set model={ckpt.get('model_signature')} or start fresh")


def checkpoint_header(task: Any) -> dict:
    """The entries every engine checkpoint starts with, for a :class:`~visiontrain.engine.task.Task`:
    ``format_version``, ``task``, ``model_signature``, ``config``, ``versions``. Add ``model`` (and
    optionally ``ema``, ``step``…) for a weights file that ``load_model_weights`` and the verbs read."""
    return {"format_version": FORMAT_VERSION, "task": task.name, "model_signature": task.model_signature(),
            "config": to_dict(task.cfg), "versions": library_versions()}


def load_model_weights(model: nn.Module, path: str | Path, task: str | None = None, strict: bool = True,
                       prefer_ema: bool = True, ckpt: dict | None = None) -> tuple[list, list, list]:
    """Load weights from an engine checkpoint or a plain state dict file into ``model``. ``ckpt``: the file's
    contents when the caller has already loaded them (``path`` then only names it in messages)."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    check_task(ckpt, path, task)
    try:
        state = extract_model_state(ckpt, prefer_ema)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return load_state_dict_checked(model, state, strict=strict, source=str(path))


# ---- RNG state, stored as tensors and primitives so weights_only loading works ----------------------

def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def library_versions() -> dict:
    import torchvision

    from visiontrain import __version__

    return {"visiontrain": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": str(np.__version__), "python": platform.python_version()}
