"""The training loop: one Trainer for every task.

Reads top to bottom: set up (ranks, seeds, run dir, model, data, optimizer, EMA, resume), then
``fit()`` runs epochs of optimizer steps. Each step: micro-batches (accumulation), autocast,
backward, NaN guard, clipping, optimizer, EMA, then the step-granular bookkeeping — logs,
evaluation, checkpoints. Everything a resumed run needs is in the checkpoint, so a run killed at any
step and resumed ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from visiontrain.config import ConfigError
from visiontrain.engine import distributed as D
from visiontrain.engine.checkpoint import atomic_save, keep_step_copy, unwrap
from visiontrain.engine.ema import ModelEMA
from visiontrain.engine.freeze import batchnorm_eval, set_frozen
from visiontrain.engine.guard import NaNGuard, NonFiniteLossError, grads_finite, nonfinite_reason
from visiontrain.engine.interrupt import (
    StopSignals,
    TrainingInterrupted,
    ignore_stop_signals,
    resume_command,
    signal_name,
    stop_message,
)
from visiontrain.engine.logging import RunLogger, TrainClock, describe_error, format_value
from visiontrain.engine.optim import build_optimizer, default_param_groups
from visiontrain.engine.plan import make_plan
from visiontrain.engine.rundir import choose_run_dir, elastic_key, mark_elastic_run, restart_count
from visiontrain.engine.runtime import (
    AMP_DTYPES,
    resolve_amp,
    seed_everything,
    set_deterministic,
    tune_allocator,
)
from visiontrain.engine.sampler import ResumableSampler
from visiontrain.engine.schedule import lr_factor
from visiontrain.engine.syncbn import convert_sync_batchnorm
from visiontrain.engine.task import STAT_PREFIX, StepInfo, Task
from visiontrain.engine.trainstate import restore, training_state, weights_state


class Trainer:
    def __init__(self, task: Task):
        self.task = task
        cfg = self.cfg = task.cfg
        if cfg.amp == "fp16" and not (cfg.device.startswith("cuda") or torch.cuda.is_available()):
            raise ConfigError("amp=fp16 needs a CUDA device; on CPU use amp=bf16")
        self.dist = D.init_distributed(cfg.device)
        self.device = self.dist.device
        if cfg.deterministic:
            set_deterministic()
        seed_everything(cfg.seed)  # the same initial model on every rank

        # --- the run directory (created only once the inputs have been validated) -----------------
        self.elastic = elastic_key()
        out, resume_from = choose_run_dir(cfg.out, cfg.resume, self.elastic) if self.dist.is_main else (None, None)
        out, resume_from = D.broadcast_object((str(out), resume_from and str(resume_from)))
        self.out, resume_from = Path(out), resume_from and Path(resume_from)
        cfg.out = str(self.out)
        main = self.dist.is_main
        self.log = RunLogger(self.out if main else None, tensorboard=cfg.tensorboard)
        self.ckpt_dir = self.out / "checkpoints"
        try:
            self._build(resume_from)
        except BaseException as e:
            self.log.error(f"error: {describe_error(e)}")
            self.log.close()
            raise

    def _build(self, resume_from: Path | None) -> None:
        cfg, main = self.cfg, self.dist.is_main
        if cfg.resume == "auto" and resume_from is None:
            self.log.info(f"resume=auto: no checkpoint in {self.ckpt_dir}; starting a new run in {self.out}")
        if restart_count() > 0:
            self.log.info(f"torchrun restart {restart_count()}: "
                          + (f"continuing from {resume_from}" if resume_from else "no checkpoint yet, starting over"))

        # --- model, data, optimizer ---------------------------------------------------------------
        self.model = self.task.build_model().to(self.device)
        # parameters built without requires_grad (a fixed projection, say) are not trainable: freezing
        # and unfreezing leave them alone, and the optimizer never holds them
        self.fixed = frozenset(n for n, p in self.model.named_parameters() if not p.requires_grad)
        if cfg.weights and resume_from is None:
            self.task.load_weights(self.model, cfg.weights)
            self.log.info(f"initial weights from {cfg.weights}")
        if cfg.sync_bn and self.dist.world > 1:
            self.model, n_bn = convert_sync_batchnorm(self.model, self.device)
            if n_bn:
                self.log.info(f"sync_bn: {n_bn} BatchNorm layers normalise over the global batch of "
                              f"{self.dist.world} ranks")
        self.train_set, self.val_set = self.task.build_datasets()
        self.plan = make_plan(cfg, len(self.train_set), self.dist.world)
        self.batches_per_epoch, self.steps_per_epoch = self.plan.batches_per_epoch, self.plan.steps_per_epoch
        self.total_steps, self.epochs, self.warmup_steps = self.plan.total_steps, self.plan.epochs, self.plan.warmup_steps
        self.rank_batch = cfg.batch_size // self.dist.world
        self.sampler = ResumableSampler(self.train_set, num_replicas=self.dist.world, rank=self.dist.rank,
                                        shuffle=True, seed=cfg.seed, drop_last=True)
        self.loader_gen = torch.Generator()
        self.train_loader = self._loader(self.train_set, sampler=self.sampler, drop_last=True,
                                         generator=self.loader_gen, pin_memory=self.device.type == "cuda")

        groups = self.task.param_groups(self.model) or default_param_groups(self.model, cfg.weight_decay)
        self.optimizer = build_optimizer(cfg, groups)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # amp=auto: decided once on rank 0 (a timing probe on CPU) and shared, so every rank agrees
        self.amp, self.amp_why = D.broadcast_object(resolve_amp(cfg.amp, self.device.type))
        self.amp_dtype = AMP_DTYPES[self.amp]
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.ema = (ModelEMA(self.model, cfg.ema.decay, cfg.ema.warmup, cfg.ema.start_step)
                    if cfg.ema.enabled else None)
        self.guard = NaNGuard(cfg.nan_policy, cfg.nan_max_skips)
        self._frozen: tuple[str, ...] | None = None
        self.ddp: nn.Module = self.model
        self.stop = StopSignals(announce=main)
        self._stop_agreed = self._time_save_agreed = False  # decisions all ranks share (see _optimizer_step)
        self._last_save_time = time.monotonic()

        # --- state that resume restores -----------------------------------------------------------
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best: float | None = None
        self.best_step = self.last_eval_step = self.last_save_step = -1
        self.metrics: dict[str, float] = {}
        seed_everything(cfg.seed + 1000003 * self.dist.rank)  # then a distinct stream per rank
        if resume_from is not None:
            restore(self, resume_from)

        # --- inputs are valid: now the run folder --------------------------------------------------
        if main:
            self.log.open()
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            mark_elastic_run(self.out, self.elastic)
            from visiontrain.config import save_config

            save_config(cfg, self.out / "config.yaml")

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return training_state(self)

    def save_weights(self, name: str = "best.pt") -> None:
        """``best.pt`` and the like (rank 0): weights without optimizer state; see :mod:`trainstate`."""
        if self.dist.is_main:
            atomic_save(weights_state(self), self.ckpt_dir / name)

    def save(self, name: str = "last.pt", state: dict | None = None) -> Path | None:
        """Every rank calls this (the RNG gather is collective); rank 0 writes."""
        state = state if state is not None else self.state_dict()
        path = self.ckpt_dir / name
        if self.dist.is_main:
            atomic_save(state, path)
            if name == "last.pt" and self.cfg.keep_last > 0:
                keep_step_copy(path, self.step, self.cfg.keep_last)
        if name == "last.pt":
            self.last_save_step = self.step
            self._last_save_time = time.monotonic()
        return path if self.dist.is_main else None

    # ------------------------------------------------------------------------------------------
    def info(self) -> StepInfo:
        """Where training stands, for the task (the step about to be computed)."""
        return StepInfo(step=self.step, epoch=self.epoch, total_steps=self.total_steps, total_epochs=self.epochs,
                        steps_per_epoch=self.steps_per_epoch)

    def _apply_freeze(self, epoch: int) -> None:
        """Freeze ``freeze=`` prefixes (until ``unfreeze_epoch``) and the task's own for this epoch."""
        cfg = self.cfg
        active = cfg.unfreeze_epoch < 0 or epoch < cfg.unfreeze_epoch
        prefixes = tuple(str(p) for p in cfg.freeze) if active else ()
        at = dataclasses.replace(self.info(), epoch=epoch)
        prefixes += tuple(p for p in self.task.frozen_prefixes(at) if p not in prefixes)
        if prefixes == self._frozen:
            return
        n_frozen = set_frozen(unwrap(self.model), prefixes, self.fixed)
        if self._frozen is not None or prefixes:
            what = f"froze {n_frozen} tensors under {list(prefixes)}" if prefixes else "unfroze all parameters"
            self.log.info(f"epoch {epoch + 1}: {what}")
        self._frozen = prefixes
        self.ddp = D.wrap_ddp(self.model, self.device)  # DDP registers the parameters that train now

    def _set_train_mode(self) -> None:
        self.model.train()
        if self._frozen and self.cfg.freeze_bn:
            batchnorm_eval(unwrap(self.model), self._frozen)

    def _set_lr(self) -> None:
        for g in self.optimizer.param_groups:
            f = lr_factor(self.step, self.total_steps, self.warmup_steps, self.cfg, g["warmup_start"])
            g["lr"] = g["initial_lr"] * f

    # ------------------------------------------------------------------------------------------
    def _micro_step(self, batch: Any, n_micro: int, sync: bool) -> dict[str, torch.Tensor]:
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else nullcontext())
        no_sync = self.ddp.no_sync() if (not sync and self.ddp is not self.model) else nullcontext()
        with no_sync:
            with autocast:
                terms = self.task.training_step(self.ddp, batch, self.info())
            losses = [t.float() for k, t in terms.items() if not k.startswith(STAT_PREFIX)]
            if not losses:
                raise RuntimeError(f"task '{self.task.name}' training_step returned no loss terms")
            loss = sum(losses) / n_micro
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return terms

    def _optimizer_step(self, bad_terms: list[str]) -> bool:
        """Guard, clip, step. Returns False when the step was skipped."""
        cfg = self.cfg
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._clip_stats: dict[str, float] = {}  # logged: the norm before clipping, whether clipping acted
        if cfg.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
            finite = bool(torch.isfinite(norm))
            self._clip_stats = {f"{STAT_PREFIX}grad_norm": float(norm),
                                f"{STAT_PREFIX}clipped": float(norm > cfg.clip_grad)}
        else:
            finite = grads_finite(self.params)
        bad = bool(bad_terms) or not finite
        self._stop_agreed, self._time_save_agreed = self.stop.requested, self._time_save_due()
        if D.is_dist():  # every rank takes the same decisions: skip this step, stop after it, save after it
            flags = torch.tensor([float(bad), float(self._stop_agreed), float(self._time_save_agreed)],
                                 device=self.device)
            bad, self._stop_agreed, self._time_save_agreed = (v > 0 for v in D.all_reduce_max(flags).tolist())
        if bad and (self.scaler is None or bad_terms):
            what = nonfinite_reason(bad_terms, finite, unwrap(self.model))
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            try:
                self.log.info(self.guard.bad(self.step + 1, f"(epoch {self.epoch + 1}) {what}"))
            except NonFiniteLossError as e:
                name = f"nan_step{self.step + 1:07d}.pt"
                self.save(name)
                raise NonFiniteLossError(
                    f"{e}. nan_policy={cfg.nan_policy}: wrote {self.ckpt_dir / name} (the state before "
                    "this step). Lower lr, check the data and the loss, or use nan_policy=skip.") from None
            return False
        self.guard.ok()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _time_save_due(self) -> bool:
        minutes = self.cfg.save_every_minutes
        return minutes > 0 and time.monotonic() - self._last_save_time >= 60.0 * minutes

    # ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Evaluate on rank 0 over the full val set (EMA weights when enabled); others wait."""
        with self.clock.paused():
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.val_set is not None and self.dist.is_main:
            model = self.ema.module if self.ema is not None else unwrap(self.model)
            was_training = model.training
            model.eval()
            loader = self._loader(self.val_set, shuffle=False)
            t0 = time.time()
            metrics = {k: float(v) for k, v in self.task.evaluate(model, loader).items()}
            if self.task.primary_metric not in metrics:
                raise RuntimeError(f"task '{self.task.name}' evaluate() did not return its primary metric "
                                   f"'{self.task.primary_metric}' (got {sorted(metrics)})")
            vis_batch = next(iter(loader), None) if self.cfg.plots else None
            if vis_batch is not None:
                self.task.visualize(model, vis_batch, self.out / "plots")
            model.train(was_training)
            shown = ", ".join(f"{k} {format_value(v)}" for k, v in metrics.items() if "/" not in k)
            self.log.info(f"eval at step {self.step} (epoch {self.epoch + 1}) in {time.time() - t0:.1f}s: {shown}")
        metrics = D.broadcast_object(metrics)
        self.last_eval_step = self.step
        if not metrics:
            return metrics
        self.metrics = metrics
        value = metrics[self.task.primary_metric]
        better = (self.best is None or (value > self.best if self.task.primary_mode == "max" else value < self.best))
        self.log.scalars(self.step, self.epoch, {**{f"val/{k}": v for k, v in metrics.items()}, **self.clock.seconds()})
        if better:
            self.best, self.best_step = value, self.step
            self.save_weights("best.pt")
            self.log.info(f"new best {self.task.primary_metric} {value:.4g} → {self.ckpt_dir / 'best.pt'}")
        if self.cfg.plots and self.dist.is_main:
            from visiontrain.engine.plots import plot_run

            plot_run(self.out)
        return metrics

    def _eval_due(self, end_of_epoch: bool) -> bool:
        if self.val_set is None:
            return False
        if self.cfg.eval_every_steps > 0:
            return self.step % self.cfg.eval_every_steps == 0
        return (end_of_epoch and self.cfg.eval_every > 0 and (self.epoch + 1) % self.cfg.eval_every == 0)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        tune_allocator()  # CPU: keep freed activations in the heap (see engine/runtime.py)
        self.clock = TrainClock()
        self.log.info(f"run dir {self.out} | task {self.task.name} | {self.dist.world} rank(s) on "
                      f"{self.device} | {len(self.train_set)} train samples, batch {cfg.batch_size}"
                      f"×{cfg.accumulate} | {self.total_steps} steps ({self.steps_per_epoch}/epoch)"
                      + (f" | amp=auto -> {self.amp} ({self.amp_why})" if cfg.amp == "auto" else ""))
        try:
            with self.stop:
                while self.step < self.total_steps:
                    self._train_epoch()
                if self.val_set is not None and self.last_eval_step != self.step:
                    self.evaluate()
                if self.last_save_step != self.step:
                    self.save()
                if self.val_set is None:  # nothing to choose by: the final weights are the ones to use
                    self.save_weights("best.pt")
                    self.log.info(f"no validation data: {self.ckpt_dir / 'best.pt'} holds the final weights")
        except KeyboardInterrupt as e:  # a stop signal (TrainingInterrupted) or an unhandled Ctrl-C
            self.log.info(stop_message(e, self.step, self.ckpt_dir / "last.pt", self.resume_command()))
            raise
        except BaseException as e:
            self.log.error(f"error at step {self.step}: {describe_error(e)}")
            raise
        finally:
            self.log.close()
            D.cleanup()  # torchrun: release the process group this trainer created
        return {"out": str(self.out), "step": self.step, "best": self.best, "best_step": self.best_step,
                "metrics": self.metrics, "nan_skipped": self.guard.total_skipped, "is_main": self.dist.is_main}

    def resume_command(self) -> str:
        return resume_command(self.task.name, self.out, self.dist.world)

    def _interrupt(self) -> None:
        """Every rank agreed to stop after this step: keep it in last.pt, then end the run."""
        if self.last_save_step != self.step:
            self.save()
        raise TrainingInterrupted(self.stop.signum or 2, self.step, saved=True,
                                  message=f"{signal_name(self.stop.signum)} received")

    def _train_epoch(self) -> None:
        cfg = self.cfg
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        epoch = self.epoch
        self._apply_freeze(epoch)
        self.task.on_epoch_start(unwrap(self.model), self.info())
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.skip = self.batch_in_epoch * self.rank_batch
        self.loader_gen.manual_seed(cfg.seed * 100003 + epoch)
        self._set_train_mode()

        from visiontrain.engine.progress import EpochProgress

        bar = EpochProgress(self.log, enabled=cfg.progress and self.dist.is_main, epoch=epoch,
                            epochs=self.epochs, total=self.batches_per_epoch, start=self.batch_in_epoch)
        sums: dict[str, float] = {}
        n_logged = 0
        t_log = time.time()
        it = iter(self.train_loader)
        while self.batch_in_epoch < self.batches_per_epoch and self.step < self.total_steps:
            # the micro-batches of this optimizer step (the last step of an epoch may have fewer)
            n_micro = min(cfg.accumulate, self.batches_per_epoch - self.batch_in_epoch)
            bad: list[str] = []
            step_terms: dict[str, float] = {}
            self._set_lr()
            for i in range(n_micro):
                batch = next(it)
                terms = self._micro_step(D.to_device(batch, self.device), n_micro, sync=i == n_micro - 1)
                values = torch.stack([t.detach().float().reshape(()) for t in terms.values()]).tolist()
                for k, v in zip(terms, values):  # one device sync for all terms
                    if not math.isfinite(v) and k not in bad and not k.startswith(STAT_PREFIX):
                        bad.append(k)
                    step_terms[k] = step_terms.get(k, 0.0) + v / n_micro
            self.batch_in_epoch += n_micro
            stepped = self._optimizer_step(bad)
            self.step += 1
            self.stop.step = self.step
            if stepped:
                if self.ema is not None:
                    self.ema.update(unwrap(self.model), self.step)
                step_terms.update(self._clip_stats)
                for k, v in step_terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_logged += 1
            lr = self.optimizer.param_groups[0]["lr"]
            bar.update(n_micro, {**step_terms, "lr": lr})
            end_of_epoch = self.batch_in_epoch >= self.batches_per_epoch
            if (self.step % cfg.log_every == 0 or end_of_epoch) and n_logged:
                means = {f"train/{k}": v / n_logged for k, v in sums.items()}
                means = D.reduce_means(means, self.device)
                rate = n_logged / max(1e-9, time.time() - t_log)
                self.log.scalars(self.step, epoch, {**means, "lr": lr, "train/steps_per_s": rate})
                shown = " ".join(f"{k[6:]} {v:.4g}" for k, v in means.items())
                line = (f"epoch {epoch + 1}/{self.epochs} step {self.step}/{self.total_steps} "
                        f"{shown} lr {lr:.3g} {rate:.2f} it/s")
                if bar.live:  # the bar shows the values; log.txt still gets the line
                    self.log.write(line)
                else:
                    self.log.info(line)
                sums, n_logged, t_log = {}, 0, time.time()
            if self._eval_due(end_of_epoch):
                bar.pause()
                self.evaluate()
                bar.resume()
            # one rank's view is every rank's decision under DDP (agreed in _optimizer_step)
            stop = self._stop_agreed if D.is_dist() else self.stop.requested
            time_due = self._time_save_agreed if D.is_dist() else self._time_save_due()
            if ((cfg.save_every_steps > 0 and self.step % cfg.save_every_steps == 0) or end_of_epoch
                    or time_due) and self.last_save_step != self.step:
                self.save()
            if stop:
                bar.close()
                self._interrupt()
        bar.close()

    def _loader(self, dataset: Any, **kw: Any) -> DataLoader:
        """A DataLoader with this run's batch per rank, collate and workers (which leave stop signals
        to this process)."""
        workers = self.cfg.workers
        return DataLoader(dataset, batch_size=self.rank_batch, collate_fn=self.task.collate, num_workers=workers,
                          worker_init_fn=ignore_stop_signals if workers else None, **kw)


def fit(task: Task) -> dict[str, Any]:
    """Train ``task`` with its config; returns ``{out, step, best, best_step, metrics, nan_skipped}``."""
    trainer = Trainer(task)
    return trainer.fit()
