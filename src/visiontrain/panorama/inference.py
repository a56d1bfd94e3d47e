"""The one way to load a trained panorama model, and the one way to draw panoramas with a model.

* :func:`load_trained` reads a checkpoint written by ``visiontrain train panorama`` (``best.pt``, ``last.pt``,
  or a file with the same header such as the benchmark's ``ema.pt``) and returns a :class:`TrainedPanorama`:
  the model built from the architecture keys of the checkpoint's saved config (keys an older config lacks
  take the behaviour checkpoints had before the key existed, :data:`LEGACY_MODEL_VALUES`), holding the EMA
  weights when the file has them, in eval mode; and the saved config, which supplies the sampler and camera
  settings an ``eval`` / ``predict`` config leaves empty (a distilled one-step student samples with 1 step). A checkpoint of another task is refused with one
  message naming what it is. ``eval`` and ``predict`` use it.
* :class:`Sampler` draws panoramas ``[B, 3, H, 2H]`` in [−1, 1] from views: Euler steps of the flow-matching
  ODE (:func:`.flow_matching.euler_sample`), then :meth:`PanoramaFlowModel.finalize`. ``eval``, ``predict``,
  the training task's evaluation and pictures and the benchmark all sample through it.

Noise: evaluation and prediction draw it from :func:`evaluation_generator` ``(seed, rank)``, a CPU generator,
so the same seed gives the same panoramas on every device and different ranks draw different noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visiontrain.engine.checkpoint import check_task, load_checkpoint, load_model_weights, unwrap
from visiontrain.engine.task import stable_hash
from visiontrain.panorama.config import MODEL_KEYS, PanoramaTrainConfig, default_sample_steps, model_config
from visiontrain.panorama.data import CameraSpec
from visiontrain.panorama.flow_matching import euler_sample
from visiontrain.panorama.model import PanoramaFlowModel, PanoramaModelConfig

TASK = "panorama"
NEEDS = "a panorama checkpoint (best.pt or last.pt of `visiontrain train panorama`)"
LEGACY_MODEL_VALUES = {"prediction": "velocity", "keep_seen": False, "wrap_x": False}
"""Architecture keys a saved config may lack, with the behaviour checkpoints had before the key existed:
``prediction`` (before the x̂ parametrisation: velocity), ``keep_seen`` (before seen pixels were kept),
``wrap_x`` (before the convolutions wrapped around the seam)."""


def current_rank() -> int:
    """``torch.distributed`` rank when a process group is initialised, else 0."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def evaluation_generator(seed: int, rank: int | None = None) -> torch.Generator:
    """CPU generator for evaluation and prediction noise: a function of ``(seed, rank)`` only."""
    rank = current_rank() if rank is None else rank
    return torch.Generator("cpu").manual_seed(stable_hash("panorama-eval", seed, rank) % (2**63 - 1))


@dataclass(frozen=True)
class Sampler:
    """How panoramas are drawn: ``steps`` Euler steps on ``linspace(1, 0, steps + 1) ** t_pow_shift`` from
    Gaussian noise × ``temperature`` (1 = true samples, 0 = the deterministic path from zero noise)."""

    steps: int = 12
    t_pow_shift: float = 2.0
    temperature: float = 1.0

    @classmethod
    def of(cls, cfg: Any) -> Sampler:
        """The sampler a training config (``sample_steps``, ``t_pow_shift``, ``temperature``) describes."""
        return cls(cfg.sample_steps, cfg.t_pow_shift, cfg.temperature)

    @torch.no_grad()
    def sample(self, model: nn.Module, cond: Tensor, generator: torch.Generator | None,
               noise: Tensor | None = None) -> Tensor:
        """Panoramas ``[B, 3, H, 2H]`` in [−1, 1] for a conditioning tensor ``[B, C, H, 2H]`` of
        :meth:`PanoramaFlowModel.condition` (``model`` may be DDP-wrapped); ``noise [B, 3, H, 2H]`` replaces
        the draw from ``generator`` (before the temperature)."""
        model = unwrap(model)
        h = model.cfg.pano_size
        x = euler_sample(model, cond, (cond.shape[0], 3, h, 2 * h), self.steps, self.t_pow_shift, generator,
                         device=cond.device, dtype=cond.dtype, noise=noise, temperature=self.temperature)
        return model.finalize(x, cond).clamp(-1, 1)

    @torch.no_grad()
    def generate(self, model: nn.Module, views: Tensor, cameras: Tensor, generator: torch.Generator) -> Tensor:
        """Panoramas ``[B, 3, H, 2H]`` on the model's device for ``views [B, 4, 3, s, s]`` in [−1, 1] and
        ``cameras [B, 4, 5]`` rows ``(xi, f, yaw, pitch, roll)``."""
        model = unwrap(model)
        device = next(model.parameters()).device
        return self.sample(model, model.condition(views.to(device), cameras.to(device)), generator)


def _train_default(key: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(PanoramaTrainConfig)}[key]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def saved_model_config(saved: dict) -> PanoramaModelConfig:
    """The architecture a checkpoint's saved training config describes. A key it lacks takes
    :data:`LEGACY_MODEL_VALUES` (a config saved before the key existed), else today's default (also for a
    bare state dict, which has no config)."""
    fallback = LEGACY_MODEL_VALUES if saved else {}
    return model_config({k: saved[k] if k in saved else fallback.get(k, _train_default(k)) for k in MODEL_KEYS})


@dataclass
class TrainedPanorama:
    """A trained model (eval mode, on its device), its checkpoint file and the training config saved in it."""

    model: PanoramaFlowModel
    config: dict
    path: str

    def setting(self, key: str, given: Any = None) -> Any:
        """``given`` unless it is ``None``, else the checkpoint's value of ``key``, else today's default."""
        if given is not None:
            return given
        return self.config[key] if key in self.config else _train_default(key)

    def sampler(self, steps: int | None = None, t_pow_shift: float | None = None,
                temperature: float | None = None) -> Sampler:
        """The checkpoint's sampler with the settings given here (``None`` = the checkpoint's; the steps of a
        distilled one-step student are 1, :func:`.config.default_sample_steps`)."""
        steps = default_sample_steps(self.config, _train_default("sample_steps")) if steps is None else steps
        return Sampler(steps, self.setting("t_pow_shift", t_pow_shift), self.setting("temperature", temperature))

    def camera(self, xi: float | None = None, focal: float | None = None) -> CameraSpec:
        """The fixed evaluation cameras at the model's view size (``None`` = the checkpoint's xi / focal)."""
        return CameraSpec(xi=self.setting("xi", xi), focal=self.setting("focal", focal),
                          view_size=self.model.cfg.view_size)


def read_panorama_checkpoint(weights: str | Path) -> dict:
    """The contents of ``weights`` (an engine checkpoint or a bare state dict), refused with one message
    naming the file when it is missing, unreadable or another task's checkpoint (detect, flow)."""
    ckpt = load_checkpoint(weights)
    check_task(ckpt, weights, TASK, needs=NEEDS)
    return ckpt


def load_weights_into(model: nn.Module, weights: str | Path, ckpt: dict | None = None) -> None:
    """Load the weights of a panorama checkpoint (EMA preferred) or a state dict into ``model``; keys that
    do not fit are named (:func:`~visiontrain.engine.checkpoint.load_state_dict_checked`). ``train
    weights=W`` uses it for initial weights, :func:`load_trained` for a model of the saved architecture."""
    ckpt = read_panorama_checkpoint(weights) if ckpt is None else ckpt
    load_model_weights(model, weights, task=TASK, prefer_ema=True, ckpt=ckpt)


def load_trained(weights: str | Path, device: torch.device | str = "cpu") -> TrainedPanorama:
    """Load a trained panorama model from ``weights`` (see the module docstring): EMA weights preferred,
    architecture from the saved config. Raises :class:`~visiontrain.engine.checkpoint.CheckpointError`
    naming the file for a missing, foreign (detect, flow) or mismatching file."""
    ckpt = read_panorama_checkpoint(weights)
    saved = ckpt.get("config") or {}
    model = PanoramaFlowModel(saved_model_config(saved))
    load_weights_into(model, weights, ckpt)
    return TrainedPanorama(model.to(device).eval(), saved, str(weights))


def resumed_model_keys(cfg: PanoramaTrainConfig) -> PanoramaTrainConfig:
    """Resuming a checkpoint saved before a model key existed (e.g. ``wrap_x``) continues that checkpoint's
    behaviour (:data:`~visiontrain.panorama.inference.LEGACY_MODEL_VALUES`) instead of today's default, which
    would build another model. Returns a new config; ``cfg`` is not changed."""
    from visiontrain.engine.checkpoint import resume_path

    path = resume_path(cfg.resume, cfg.out)
    if path is None:
        return cfg
    saved = load_checkpoint(path).get("config") or {}
    legacy = {k: v for k, v in LEGACY_MODEL_VALUES.items() if saved and k not in saved and getattr(cfg, k) != v}
    if legacy:
        print(f"{path} was saved before {', '.join(legacy)} existed; resuming with "
              f"{' '.join(f'{k}={str(v).lower()}' for k, v in legacy.items())} as it was trained")
    return dataclasses.replace(cfg, **legacy) if legacy else cfg
