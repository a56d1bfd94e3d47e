"""What a checkpoint holds of a run, and how a run is put back from it.

``last.pt`` (:func:`training_state`) holds everything a resumed run needs to continue as if never
stopped: weights, EMA, optimizer (with each parameter's name), scaler, every rank's random streams, the
position in the epoch, best-metric bookkeeping and the precision ``amp=auto`` chose. ``best.pt``
(:func:`weights_state`) holds what inference needs: weights, EMA, config, task state and metrics.
Both are dicts of tensors and primitives (``torch.load(weights_only=True)`` reads them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visiontrain.engine import distributed as D
from visiontrain.engine.checkpoint import (
    CheckpointError,
    capture_rng,
    check_task,
    checkpoint_header,
    load_checkpoint,
    load_state_dict_checked,
    restore_rng,
    unwrap,
)
from visiontrain.engine.ema import ModelEMA
from visiontrain.engine.optim import load_optimizer_state, param_names
from visiontrain.engine.runtime import AMP_DTYPES

Trainer = Any  # a visiontrain.engine.trainer.Trainer (not imported: it imports this module)


def weights_state(t: Trainer) -> dict:
    return {**checkpoint_header(t.task), "task_state": t.task.state_dict(), "model": unwrap(t.model).state_dict(),
            "ema": t.ema.state_dict() if t.ema is not None else None, "step": t.step, "epoch": t.epoch,
            "metrics": dict(t.metrics), "amp": t.amp}


def training_state(t: Trainer) -> dict:
    """Collective under DDP (every rank's random state is gathered)."""
    rngs = D.all_gather_object(capture_rng())
    return {
        **weights_state(t),
        "optimizer": t.optimizer.state_dict(),
        "optimizer_names": param_names(t.optimizer, unwrap(t.model)),
        "scheduler": {"name": t.cfg.schedule, "step": t.step, "total_steps": t.total_steps},
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "rng": rngs,
        "batch_in_epoch": t.batch_in_epoch,
        "best": t.best,
        "best_step": t.best_step,
        "last_eval_step": t.last_eval_step,
        "nan_consecutive": t.guard.consecutive,
    }


def restore(t: Trainer, path: Path) -> None:
    """Put the trainer ``t`` (built for the same task and model) in the state ``path`` holds."""
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise CheckpointError(f"{path}: holds weights only, not a training state; use weights={path}")
    check_task(ckpt, path, t.task.name, t.task.model_signature())
    load_state_dict_checked(t.model, ckpt["model"], source=str(path))
    load_optimizer_state(t.optimizer, unwrap(t.model), ckpt["optimizer"], ckpt.get("optimizer_names"), str(path))
    if t.ema is not None:
        if ckpt.get("ema"):
            t.ema.load_state_dict(ckpt["ema"])
        else:
            t.ema = ModelEMA(t.model, t.cfg.ema.decay, t.cfg.ema.warmup, t.cfg.ema.start_step)
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    t.step, t.epoch, t.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
    t.best, t.best_step = ckpt.get("best"), ckpt.get("best_step", -1)
    t.last_eval_step = ckpt.get("last_eval_step", -1)
    t.last_save_step = t.step
    rngs = ckpt["rng"]
    if len(rngs) != t.dist.world:
        t.log.info(f"checkpoint was written by {len(rngs)} ranks, resuming on {t.dist.world}: "
                   "weights and optimizer are exact, random streams are not")
    restore_rng(rngs[min(t.dist.rank, len(rngs) - 1)])
    t.guard.consecutive = ckpt.get("nan_consecutive", 0)
    if t.cfg.amp == "auto" and ckpt.get("amp") in ("off", "bf16") and t.amp in ("off", "bf16"):
        # a resumed run keeps the precision it started with, whatever today's probe says
        t.amp, t.amp_why, t.amp_dtype = ckpt["amp"], "as when the run started", AMP_DTYPES[ckpt["amp"]]
    t.task.load_state_dict(ckpt.get("task_state") or {})
    t.log.info(f"resumed from {path} at step {t.step} (epoch {t.epoch + 1}, "
               f"batch {t.batch_in_epoch}/{t.batches_per_epoch})")
    if t.step >= t.total_steps:
        t.log.info(f"checkpoint is already at step {t.step} ≥ {t.total_steps} planned steps; "
                   "raise epochs= or max_steps= to train further")
