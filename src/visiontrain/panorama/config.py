"""Every config of the panorama task: ``train``, ``eval``, ``predict`` and ``synth``.

Values are checked when a config is built (``__post_init__``, run by :func:`visiontrain.config.load_config`),
so a wrong setting is reported, naming the key and the fix, before anything is synthesised, read or written.

``eval`` and ``predict`` take the architecture from the checkpoint (:mod:`.inference`); they list only the keys
they use. Their sampler and camera keys (``sample_steps``, ``temperature``, ``t_pow_shift``, ``xi``,
``focal``) left empty take the checkpoint's values (``sample_steps``: 1 for a distilled one-step student,
:func:`default_sample_steps`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontrain.config import ConfigError, opt
from visiontrain.engine.config import EMAConfig, TrainConfig, check_choice, check_device
from visiontrain.panorama.model import PREDICTIONS, PanoramaModelConfig, check_model_config

MODEL_KEYS = tuple(f.name for f in dataclasses.fields(PanoramaModelConfig))


def model_config(cfg: Any) -> PanoramaModelConfig:
    """The architecture part (:data:`MODEL_KEYS`) of a config object or of a dict of them."""
    values = {k: (cfg[k] if isinstance(cfg, dict) else getattr(cfg, k)) for k in MODEL_KEYS}
    values["encoder_channels"] = [int(c) for c in values["encoder_channels"]]
    values["unet_channels"] = [int(c) for c in values["unet_channels"]]
    return PanoramaModelConfig(**values)


# ---- checks shared by several configs ------------------------------------------------------------------------

def _setting(cfg: Any, key: str) -> str:
    """``key=value`` as a user writes it (``focal=0``, not ``focal=0.0``)."""
    value = getattr(cfg, key)
    return f"{key}={int(value) if isinstance(value, float) and value.is_integer() else value}"


def _at_least(cfg: Any, key: str, low: float, strict: bool = False, why: str = "") -> None:
    value = getattr(cfg, key)
    if value is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{_setting(cfg, key)}: must be {'>' if strict else '>='} {low:g}{why}")


def check_synthetic_set(cfg: Any, prefix: str) -> None:
    """The synthetic-set keys ``<prefix>train``, ``<prefix>val``, ``<prefix>size`` (``synth_*`` or ``synth``'s)."""
    for key in ("train", "val"):
        _at_least(cfg, prefix + key, 1 if prefix else 0, why=" (panoramas to write)")
    size = getattr(cfg, prefix + "size")
    if size < 8 or size % 2:
        raise ConfigError(f"{prefix}size={size}: the panorama height must be even and >= 8 (width 2×), "
                          f"e.g. {prefix}size={max(8, size + size % 2)}")


def check_data_keys(cfg: Any) -> None:
    """``data``, ``val_fraction``, ``eval_images`` and (when ``data`` is empty) the ``synth_*`` keys."""
    if cfg.data and not Path(cfg.data).is_dir():
        raise ConfigError(f"data={cfg.data}: no such folder; give a folder of 2:1 panoramas (with train/ and "
                          f"val/, or split by val_fraction), or leave data empty for the synthetic set")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"{_setting(cfg, 'val_fraction')}: must be in [0, 1), e.g. 0.1")
    _at_least(cfg, "eval_images", 0, why=" (0 = all)")
    if not cfg.data:
        check_synthetic_set(cfg, "synth_")


def check_sampler_keys(cfg: Any) -> None:
    """``sample_steps``, ``t_pow_shift``, ``temperature`` (``None`` = the checkpoint's, in eval and predict)."""
    _at_least(cfg, "sample_steps", 1, why=" (Euler steps of the sampler)")
    _at_least(cfg, "t_pow_shift", 0, strict=True, why=" (sampler times linspace(1, 0, steps + 1) ** t_pow_shift)")
    _at_least(cfg, "temperature", 0, why=": the sampler's noise scale (1 = true samples, 0 = deterministic)")


def check_camera_keys(cfg: Any) -> None:
    """``xi`` (UCM, 0 = pinhole) and ``focal`` (``None`` = the checkpoint's, in eval and predict)."""
    _at_least(cfg, "xi", 0, why=" (UCM xi; 0 is a pinhole camera)")
    _at_least(cfg, "focal", 0, strict=True, why=" (focal length in pixels for 128-pixel views)")


def check_metric_weights(cfg: Any) -> None:
    """``lpips_weights`` / ``fid_weights``: local files when set (nothing is downloaded)."""
    from visiontrain.panorama.metrics import FID_HELP, LPIPS_HELP

    for key, help_text in (("lpips_weights", LPIPS_HELP), ("fid_weights", FID_HELP)):
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}={path}: no such file. {help_text}")


# ---- train ---------------------------------------------------------------------------------------------------

@dataclass
class PanoramaDistillConfig:
    """``distill.*``: one-step distillation of a trained teacher (:mod:`.distill`)."""

    teacher: str = opt("", "teacher checkpoint (best.pt / last.pt of `visiontrain train panorama`): enables "
                           "one-step distillation; the student starts as the teacher and has its architecture")
    steps: int = opt(12, "Euler steps of the teacher's sampler the one-step student learns to reproduce")
    cache: int = opt(0, "precompute this many (views, noise, teacher sample) tuples once, into "
                        "<run>/distill_cache.pt, and train on them (each step then costs only the student); "
                        "0 = a fresh teacher sample for every batch")

    def check(self, prefix: str = "distill.") -> None:
        if self.steps < 1:
            raise ConfigError(f"{prefix}steps={self.steps}: must be >= 1 (the teacher's Euler steps)")
        if self.cache < 0:
            raise ConfigError(f"{prefix}cache={self.cache}: must be >= 0 (0 = no cache)")
        if self.cache and not self.teacher:
            raise ConfigError(f"{prefix}cache={self.cache} caches a teacher's samples: set {prefix}teacher too")
        if self.teacher and not Path(self.teacher).is_file():
            raise ConfigError(f"{prefix}teacher={self.teacher}: no such file; give a checkpoint written by "
                              f"`visiontrain train panorama` (checkpoints/best.pt or last.pt)")


@dataclass
class PanoramaAuxConfig:
    """``aux.*``: extra loss terms on the predicted clean panorama."""

    lpips_weights: str = opt("", "local torchvision ImageNet AlexNet weights file: adds an LPIPS term on the "
                                 "predicted clean panorama (empty = none; nothing is downloaded)")
    lpips: float = opt(0.1, "weight of the LPIPS term (with aux.lpips_weights)")

    def check(self, prefix: str = "aux.") -> None:
        from visiontrain.panorama.metrics import LPIPS_HELP

        if self.lpips_weights and not Path(self.lpips_weights).is_file():
            raise ConfigError(f"{prefix}lpips_weights={self.lpips_weights}: no such file. {LPIPS_HELP}")
        if self.lpips < 0:
            raise ConfigError(f"{prefix}lpips={self.lpips:g}: must be >= 0")


def is_one_step(saved: dict) -> bool:
    """Whether a checkpoint's saved training config describes a distilled one-step student."""
    return bool((saved.get("distill") or {}).get("teacher"))


def default_sample_steps(saved: dict, fallback: int) -> int:
    """The sampler steps a checkpoint's model is meant for: 1 for a one-step student (:func:`is_one_step`),
    else its ``sample_steps`` (``fallback`` when the config lacks it)."""
    return 1 if is_one_step(saved) else int(saved.get("sample_steps", fallback))


@dataclass
class PanoramaDataKeys:
    """Where ``train`` and ``eval`` find their panoramas (checked by :func:`check_data_keys`)."""

    data: str = opt("", "folder of 2:1 equirectangular images (with train/ and val/, or split by val_fraction); "
                        "empty = the synthetic set synth_* describe, written once")
    val_fraction: float = opt(0.1, "share of images used for validation when data has no train/ val/")
    synth_dir: str = opt("", "where the synthetic set goes when data is empty; empty = $VISIONTRAIN_CACHE "
                             "(~/.cache/visiontrain)/panorama-synth-<settings>")
    synth_train: int = opt(512, "synthetic training panoramas")
    synth_val: int = opt(32, "synthetic validation panoramas")
    synth_size: int = opt(256, "synthetic panorama height (width 2×)")
    synth_seed: int = opt(0, "seed of the synthetic scenes")


@dataclass
class PanoramaTrainConfig(PanoramaDataKeys, TrainConfig):
    """Engine keys, then :class:`PanoramaDataKeys`, then cameras, model, flow matching, evaluation."""

    out: str = opt("runs/panorama", "run directory")
    epochs: int = opt(30, "number of epochs (ignored when max_steps > 0)")
    lr: float = opt(5e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "weight decay (never applied to biases and norm weights)")
    warmup_steps: int = opt(100, "linear lr warmup length in optimizer steps")
    ema: EMAConfig = dataclasses.field(
        default_factory=lambda: EMAConfig(enabled=True, decay=0.999, warmup=500.0),
        metadata={"doc": "weight EMA (on by default here: evaluation and best.pt use it)"})
    # cameras and augmentation
    xi: float = opt(0.85, "UCM xi of the evaluation cameras")
    focal: float = opt(220.0, "focal length in pixels for 128-pixel views (scaled by view_size / 128)")
    jitter_xi: float = opt(0.4, "training: xi × U(1 ± jitter_xi), per view")
    jitter_focal: float = opt(0.1, "training: f × U(1 ± jitter_focal), per view")
    jitter_rotation: float = opt(5.0, "training: yaw, pitch, roll ± this many degrees, per view")
    augment_yaw: bool = opt(True, "training: turn each panorama by a random yaw before rendering views")
    augment_flip: bool = opt(True, "training: mirror panoramas left-right with probability 0.5")
    # model
    pano_size: int = opt(64, "panorama height H (width 2H), a multiple of 8")
    view_size: int = opt(128, "fisheye view side in pixels, a multiple of 8")
    latent_channels: int = opt(4, "channels of each view's latent (8× downsampled)")
    encoder_channels: list = opt([16, 32, 64], "view encoder widths at 1/2, 1/4, 1/8")
    fused_channels: int = opt(8, "channels of the fused 2:1 latent")
    unet_channels: list = opt([16, 32, 64, 128], "UNet2DModel block widths (each divisible by norm_groups)")
    unet_layers: int = opt(1, "resnet layers per UNet block")
    unet_attention: bool = opt(True, "self-attention at the lowest UNet level")
    norm_groups: int = opt(8, "GroupNorm groups")
    backprojection: bool = opt(True, "also condition the decoder on the back-projected views and seen mask")
    prediction: str = opt("sample", "sample: the UNet predicts the panorama as a residual over the "
                          "back-projection (velocity derived from it) | velocity: it predicts x − ε directly")
    t_min: float = opt(0.05, "prediction=sample: velocity = (x̂ − x_t) / max(t, t_min)")
    keep_seen: bool = opt(True, "prediction=sample: seen pixels keep the back-projected colours exactly; "
                          "the network fills only the unseen region")
    wrap_x: bool = opt(True, "convolutions on the panorama grid wrap around the longitude seam (circular "
                       "padding in x, zeros at the poles), so the left and right edges meet")
    # flow matching
    logit_mean: float = opt(1.0, "training t = sigmoid(N(logit_mean, logit_std²)); 1.0 trains the noisy end "
                                 "(t near 1, where the unseen region's layout is decided) more often than "
                                 "SD3's 0.0: in 30 CPU-minutes +4.2 dB PSNR and +0.19 SSIM (BENCHMARKS.md)")
    logit_std: float = opt(1.0, "see logit_mean")
    sample_steps: int = opt(12, "Euler steps of the sampler")
    t_pow_shift: float = opt(2.0, "sampler times linspace(1, 0, steps + 1) ** t_pow_shift")
    temperature: float = opt(1.0, "sampler: initial noise × temperature (1 = true samples; 0 = the "
                             "deterministic path from zero noise: smoother, higher SSIM, less detail)")
    # evaluation
    eval_images: int = opt(0, "evaluate on at most this many val images (0 = all)")
    lpips_weights: str = opt("", "local torchvision AlexNet weights file for LPIPS (empty = no LPIPS)")
    fid_weights: str = opt("", "local torchvision Inception-v3 weights file for FID (empty = no FID)")
    # one-step distillation and auxiliary losses
    distill: PanoramaDistillConfig = opt(PanoramaDistillConfig, "one-step distillation of a teacher")
    aux: PanoramaAuxConfig = opt(PanoramaAuxConfig, "auxiliary loss terms on the predicted clean panorama")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.distill.check()
        self.aux.check()
        check_data_keys(self)
        check_camera_keys(self)
        for key in ("jitter_xi", "jitter_focal"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{_setting(self, key)}: a relative jitter in [0, 1), e.g. 0.1")
        _at_least(self, "jitter_rotation", 0, why=" (degrees)")
        check_choice(self, "prediction", PREDICTIONS)
        try:
            check_model_config(model_config(self))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _at_least(self, "logit_std", 0, strict=True)
        check_sampler_keys(self)
        check_metric_weights(self)


# ---- eval and predict ----------------------------------------------------------------------------------------

@dataclass
class PanoramaSamplingConfig:
    """What ``eval`` and ``predict`` share: the checkpoint, the device and how panoramas are sampled."""

    weights: str = opt("", "checkpoint written by `visiontrain train panorama` (best.pt or last.pt); its "
                           "architecture comes from it and its EMA weights are used when present")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    seed: int = opt(0, "sampling noise seed: the same seed gives the same panoramas")
    sample_steps: int | None = opt(None, "Euler steps of the sampler; empty = the checkpoint's")
    temperature: float | None = opt(None, "sampler: initial noise × temperature (1 = true samples, 0 = "
                                          "deterministic: smoother, less detail); empty = the checkpoint's")
    t_pow_shift: float | None = opt(None, "sampler times linspace(1, 0, steps + 1) ** t_pow_shift; empty = the "
                                          "checkpoint's")
    xi: float | None = opt(None, "UCM xi of the views' cameras (0 = pinhole); empty = the checkpoint's")
    focal: float | None = opt(None, "focal length in pixels for 128-pixel views (scaled with the view size); "
                                    "empty = the checkpoint's")

    def __post_init__(self) -> None:
        check_device(self.device)
        # old spellings of "the checkpoint's" (predict's former defaults): 0 steps and focal 0 are not values
        if self.sample_steps == 0:
            self.sample_steps = None
        if self.focal == 0:
            self.focal = None
        check_sampler_keys(self)
        check_camera_keys(self)

    def check_weights(self, verb: str) -> None:
        if not self.weights:
            raise ConfigError(f"weights= is required: the checkpoint to {verb} with (best.pt or last.pt of "
                              f"`visiontrain train panorama`)")


@dataclass
class PanoramaEvalConfig(PanoramaDataKeys, PanoramaSamplingConfig):
    """:class:`PanoramaSamplingConfig`'s keys, then :class:`PanoramaDataKeys`, then these."""

    eval_images: int = opt(0, "evaluate on at most this many val images (0 = all)")
    batch_size: int = opt(8, "evaluation batch size")
    workers: int = opt(0, "DataLoader worker processes")
    lpips_weights: str = opt("", "local torchvision AlexNet weights file for LPIPS (empty = no LPIPS)")
    fid_weights: str = opt("", "local torchvision Inception-v3 weights file for FID (empty = no FID)")
    out: str = opt("runs/panorama_eval", "folder for metrics.json (a new out2, out3… when it holds results)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_weights("evaluate")
        check_data_keys(self)
        _at_least(self, "batch_size", 1)
        _at_least(self, "workers", 0)
        check_metric_weights(self)


@dataclass
class PanoramaPredictConfig(PanoramaSamplingConfig):
    views: str = opt("", "four square fisheye images front,right,back,left (comma-separated)")
    panorama: str = opt("", "or: a 2:1 panorama to render the four views from (then ground truth is shown)")
    out: str = opt("runs/panorama_predict", "output folder (a new out2, out3… when it holds results)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.views) == bool(self.panorama):
            raise ConfigError("predict needs exactly one of views=F,R,B,L (four images) or panorama=IMG")
        self.check_weights("predict")
        if self.views and len(self.view_paths()) != 4:
            raise ConfigError(f"views={self.views}: give four images front,right,back,left (comma-separated)")

    def view_paths(self) -> list[str]:
        return [p.strip() for p in self.views.split(",") if p.strip()]


# ---- synth ---------------------------------------------------------------------------------------------------

@dataclass
class PanoramaSynthConfig:
    out: str = opt("data/panorama_synth", "output folder (train/ and val/ are created)")
    train: int = opt(512, "training panoramas")
    val: int = opt(32, "validation panoramas")
    size: int = opt(256, "panorama height in pixels (width 2×)")
    seed: int = opt(0, "scene seed; the same seed writes the same files")

    def __post_init__(self) -> None:
        check_synthetic_set(self, "")
