"""The engine's part of every training config. Task configs subclass :class:`TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from visiontrain.config import opt


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
