"""The engine's part of every training config. Task configs subclass :class:`TrainConfig`.

Values are checked when a config is built (``__post_init__``, which :func:`visiontrain.config.load_config`
runs), so a wrong setting is reported before any data is read or written. A task config that adds keys
extends ``__post_init__`` (calling this one first) to check them and to fill task-dependent defaults left
empty, so what a run uses is in the saved config and ``--help`` says how it is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visiontrain.config import ConfigError, opt

CHOICES = {"optimizer": ("sgd", "adamw"), "amp": ("off", "bf16", "fp16", "auto"), "nan_policy": ("skip", "stop"),
           "schedule": ("cosine", "linear", "step", "constant")}


def check_device(device: str, key: str = "device") -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (what every verb's ``device=`` takes)."""
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    hint = " (use cuda, or cuda:N for one GPU of several)" if device.lower() in ("gpu", "cuda0", "nvidia") else ""
    raise ConfigError(f"{key}={device!r} is not one of auto, cpu, cuda, cuda:N{hint}")


def check_choice(cfg: Any, key: str, allowed: tuple[str, ...]) -> None:
    """A :class:`ConfigError` naming the key, the value and the choices, with a did-you-mean."""
    value = getattr(cfg, key)
    if value not in allowed:
        import difflib

        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}.{hint}")


@dataclass
class EMAConfig:
    enabled: bool = opt(False, "keep an exponential moving average of the weights; eval and best.pt use it")
    decay: float = opt(0.9999, "EMA decay once warmed up")
    warmup: float = opt(2000.0, "ramp time constant in steps: decay * (1 - exp(-updates / warmup)); 0 = none")
    start_step: int = opt(0, "first optimizer step that updates the EMA (before it, EMA copies the model)")


@dataclass
class TrainConfig:
    # run
    out: str = opt("runs/train", "run directory (config.yaml, log.txt, metrics.csv, checkpoints/, plots/)")
    seed: int = opt(0, "global seed; per-rank and per-sample seeds are derived from it")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    deterministic: bool = opt(True, "deterministic algorithms (needed for bit-exact resume)")
    resume: str = opt("", "checkpoint to resume from, or 'auto' for the latest in <out>/checkpoints")
    weights: str = opt("", "initial weights (a checkpoint or a task-specific format)")
    # length and batches
    epochs: int = opt(10, "number of epochs (ignored when max_steps > 0)")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = use epochs)")
    batch_size: int = opt(8, "global batch size (split evenly across ranks)")
    accumulate: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    workers: int = opt(0, "DataLoader worker processes")
    # optimizer and schedule
    optimizer: str = opt("adamw", "sgd (nesterov) | adamw")
    lr: float = opt(1e-3, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum / AdamW beta1")
    weight_decay: float = opt(5e-4, "weight decay (never applied to biases and norm weights)")
    schedule: str = opt("cosine", "cosine | linear | step | constant, after warmup")
    min_lr_ratio: float = opt(0.01, "final lr as a fraction of lr (cosine, linear)")
    step_milestones: list = opt([], "step schedule: fractions of training (e.g. [0.6,0.9]) where lr *= step_gamma")
    step_gamma: float = opt(0.1, "step schedule factor")
    warmup_steps: int = opt(0, "linear lr warmup length in optimizer steps")
    warmup_epochs: float = opt(0.0, "warmup length in epochs (used when warmup_steps is 0)")
    warmup_start: float = opt(0.0, "lr factor at the first warmup step")
    clip_grad: float = opt(0.0, "clip the global gradient norm to this value (0 = off)")
    amp: str = opt("off", "off | bf16 (autocast, CPU or GPU) | fp16 (GPU, with GradScaler) | auto (GPU: bf16 "
                          "where supported, else fp16; CPU: bf16 where a 0.1 s probe finds it faster, else off)")
    ema: EMAConfig = opt(EMAConfig, "weight EMA")
    # several processes (torchrun)
    sync_bn: bool = opt(True, "under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm; "
                              "CPU too), so N processes train like one with the same batch_size; false = "
                              "per-process statistics (no extra communication)")
    # freezing
    freeze: list = opt([], "parameter-name prefixes to freeze, e.g. [backbone]")
    unfreeze_epoch: int = opt(-1, "epoch at which frozen prefixes are unfrozen (-1 = never)")
    freeze_bn: bool = opt(True, "keep BatchNorm statistics of frozen modules fixed")
    # NaN guard
    nan_policy: str = opt("skip", "skip (drop the step, stop after nan_max_skips in a row) | stop")
    nan_max_skips: int = opt(10, "consecutive non-finite steps tolerated under 'skip'")
    # evaluation, checkpoints, logs
    eval_every: int = opt(1, "evaluate every N epochs (0 = only at the end)")
    eval_every_steps: int = opt(0, "evaluate every N optimizer steps (0 = by epochs)")
    save_every_steps: int = opt(0, "write last.pt every N optimizer steps (0 = at epoch ends only)")
    save_every_minutes: float = opt(10.0, "also write last.pt when this many minutes passed since the last save, "
                                          "so a hard kill loses at most that much (0 = off; SIGINT/SIGTERM always "
                                          "save the step they stop at)")
    keep_last: int = opt(0, "also keep the K most recent step checkpoints (step_XXXXXXX.pt); 0 = none")
    log_every: int = opt(10, "log training losses every N optimizer steps")
    progress: bool = opt(True, "tqdm progress bar on a terminal (plain lines otherwise)")
    tensorboard: bool = opt(True, "write TensorBoard events under <out>/tensorboard")
    plots: bool = opt(True, "refresh loss / metric PNG curves in <out>/plots at each evaluation")

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            check_choice(self, key, allowed)
        check_device(self.device)
        if self.amp == "fp16" and not self.device.startswith("cuda") and self.device != "auto":
            raise ConfigError(f"amp=fp16 needs a CUDA device (device={self.device}); on CPU use amp=bf16")
        for key in ("batch_size", "accumulate"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        for key in ("epochs", "max_steps", "workers", "warmup_steps", "save_every_steps", "keep_last",
                    "eval_every", "eval_every_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 0")
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("epochs=0 and max_steps=0: nothing to train; set one of them")
        if self.log_every < 1:
            raise ConfigError(f"log_every={self.log_every} must be >= 1")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
