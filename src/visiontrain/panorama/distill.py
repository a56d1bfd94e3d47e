"""One-step sampling by distillation: a student learns to produce in **one** Euler step what a trained teacher's
``N``-step Euler sampler produces from the same noise and the same views.

::

    visiontrain train panorama out=runs/teacher …                                   # the teacher (N-step)
    visiontrain train panorama distill.teacher=runs/teacher/checkpoints/best.pt distill.steps=12 out=runs/one

For a batch ``{views, cameras, panorama}`` and noise ``ε ~ N(0, I)`` ``[B, 3, H, 2H]`` (the engine's RNG, so
resume is exact):

* target ``x_T`` = the teacher's sampler on ``ε`` (:meth:`.inference.Sampler.sample`: ``N`` Euler steps on
  ``linspace(1, 0, N + 1) ** t_pow_shift`` with the teacher's ``t_pow_shift``, then the teacher's
  :meth:`~.model.PanoramaFlowModel.finalize` and the clamp to [−1, 1]), computed without gradients;
* student's one step (:func:`one_step_sample`): ``x_S = ε + v_S(ε, t = 1)`` (for ``prediction=sample`` that
  is the student's ``x̂``);
* loss ``distill`` = ``mean((x_S − x_T)²)`` (:func:`distillation_loss`), the pixel regression of consistency /
  progressive distillation collapsed to one jump (Salimans & Ho 2022; SSDD, Vallaeys et al. 2025, distil
  their decoder the same way, to a single step).

The teacher (:class:`OneStepDistiller`) is frozen: eval mode, ``requires_grad=False``, held by the task and
not inside the student's module tree, so it is in neither the optimizer, DDP's parameters, the EMA nor the
checkpoints; each rank loads its own copy. The student starts as the teacher (unless ``weights=`` is given).
A checkpoint of such a run records ``distill.teacher`` / ``distill.steps`` in its saved config; ``eval``,
``predict`` and the run's own evaluation then sample with one step unless told otherwise
(:func:`.config.default_sample_steps`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visiontrain.engine.checkpoint import CheckpointError
from visiontrain.panorama.config import MODEL_KEYS, model_config
from visiontrain.panorama.inference import Sampler, TrainedPanorama, load_trained

#: architecture keys a student may set differently from its teacher (same parameters, other behaviour)
FREE_KEYS = ("wrap_x",)


def one_step_sample(model: Callable[[Tensor, Tensor, Any], Tensor], noise: Tensor, cond: Any) -> Tensor:
    """One Euler step of the flow-matching ODE from ``t = 1`` to ``t = 0``: ``ε + v(ε, 1)`` ``[B, ...]``
    (exactly what :func:`.flow_matching.euler_sample` does with ``steps=1``, with gradients)."""
    t = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    return noise + model(noise, t, cond).to(noise.dtype)


def distillation_loss(student: Callable[[Tensor, Tensor, Any], Tensor], noise: Tensor, cond: Any,
                      target: Tensor) -> Tensor:
    """``mean((one_step_sample(student, ε, cond) − target)²)`` in float32 (or the inputs' float64).

    ``noise, target [B, ...]``: the noise the teacher started from and the teacher's sample."""
    pred = one_step_sample(student, noise, cond)
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return F.mse_loss(pred.to(dtype), target.to(dtype))


def check_student_architecture(teacher_config: Any, student_config: Any, source: str) -> None:
    """A :class:`CheckpointError` listing the ``key=value`` settings to add when the run's architecture is not
    the teacher's (the student starts as the teacher and is saved with the run's config)."""
    teacher, student = model_config(teacher_config), model_config(student_config)
    diff = [k for k in MODEL_KEYS if k not in FREE_KEYS and getattr(teacher, k) != getattr(student, k)]
    if diff:
        def value(v: Any) -> str:
            return "[" + ",".join(str(x) for x in v) + "]" if isinstance(v, list) else str(v).lower() \
                if isinstance(v, bool) else str(v)
        have = ", ".join(f"{k}={value(getattr(student, k))}" for k in diff)
        fix = " ".join(f"{k}={value(getattr(teacher, k))}" for k in diff)
        raise CheckpointError(f"{source}: the student must have the teacher's architecture (it starts as the "
                              f"teacher); this run has {have}. Add: {fix}")


class OneStepDistiller:
    """The frozen teacher and the loss of a one-step student (see the module docstring).

    ``teacher``: the loaded teacher checkpoint; ``steps``: its Euler steps for the targets."""

    def __init__(self, teacher: TrainedPanorama, steps: int):
        self.trained = teacher
        self.teacher = teacher.model.eval().requires_grad_(False)
        self.sampler = Sampler(steps, teacher.setting("t_pow_shift"), 1.0)

    @classmethod
    def load(cls, path: str, steps: int, student_config: Any) -> OneStepDistiller:
        """The teacher of ``distill.teacher=path``, checked against the run's architecture."""
        teacher = load_trained(path)
        from visiontrain.panorama.inference import saved_model_config

        check_student_architecture(saved_model_config(teacher.config), student_config,
                                   f"distill.teacher={path}")
        return cls(teacher, steps)

    def init_student(self, model: nn.Module) -> None:
        """The student starts as the teacher (same keys and shapes; :data:`FREE_KEYS` do not change them)."""
        model.load_state_dict(self.teacher.state_dict())

    def _teacher_on(self, device: torch.device) -> nn.Module:
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return self.teacher.eval()

    @torch.no_grad()
    def target(self, views: Tensor, cameras: Tensor, noise: Tensor) -> Tensor:
        """The teacher's ``N``-step sample ``[B, 3, H, 2H]`` from ``noise`` for ``views``, ``cameras``."""
        teacher = self._teacher_on(noise.device)
        return self.sampler.sample(teacher, teacher.condition(views, cameras), None, noise=noise)

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(loss, student_sample)`` for a batch; the noise comes from the global RNG (the engine's, stored in
        checkpoints). ``model`` (the student) may be DDP-wrapped: it is called once."""
        panorama = batch["panorama"]
        noise = torch.randn(panorama.shape, device=panorama.device, dtype=panorama.dtype)
        target = self.target(batch["views"], batch["cameras"], noise)
        cond = {"views": batch["views"], "cameras": batch["cameras"]}
        pred = one_step_sample(model, noise, cond)
        return F.mse_loss(pred.float(), target.float()), pred
