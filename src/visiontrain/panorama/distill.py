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

**Cached targets** (``distill.cache=N``, :class:`TeacherTargets`): the teacher's multi-step sample costs about
two thirds of a distillation step on a CPU (64×128, batch 4, one thread, profiled: 1.9 s of teacher against
1.0 s of student forward + backward). With ``distill.cache=N`` the run computes ``N``
``(views, cameras, ε, x_T)`` tuples once — entry ``j`` is the training image ``j mod len`` with the
augmentation of epoch ``j div len`` and noise drawn from a generator seeded by ``(seed, j)`` — writes them to
``<run>/distill_cache.pt`` (rank 0; the others wait and read it; a resumed run reads it back when its
teacher, seed and data settings match) and then trains on that fixed set, as offline distillation does
(Luhman & Luhman 2021). Each step then costs only the student; the price is a finite set of noise draws.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visiontrain.engine import distributed as D
from visiontrain.engine.checkpoint import CheckpointError, atomic_save
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
        if "target" in batch:  # distill.cache: computed once by TeacherTargets
            noise, target = batch["noise"], batch["target"]
        else:
            panorama = batch["panorama"]
            noise = torch.randn(panorama.shape, device=panorama.device, dtype=panorama.dtype)
            target = self.target(batch["views"], batch["cameras"], noise)
        cond = {"views": batch["views"], "cameras": batch["cameras"]}
        pred = one_step_sample(model, noise, cond)
        return F.mse_loss(pred.float(), target.float()), pred


def entry_noise(seed: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """The noise of cache entry ``index``: a generator seeded by ``(seed, index)``, so it is never stored."""
    gen = torch.Generator().manual_seed((seed * 2 ** 32 + index) % 2 ** 63)
    return torch.randn(shape, generator=gen)


class TeacherTargets(torch.utils.data.Dataset):
    """``distill.cache=N``: ``N`` fixed training tuples ``{views, cameras, panorama, index, noise, target}``
    with the teacher's sample precomputed (see the module docstring). Views and panoramas are kept in
    float16 (the teacher sees the same rounded views the student will), targets in float32; the noise and
    the image index of entry ``j`` (``j mod len(base)``) are derived, not stored.

    Args:
        base: the training :class:`.data.PanoramaDataset` (its ``set_epoch`` picks the augmentation).
        distiller: the frozen teacher.
        size: ``N``.
        seed: the run's seed (the noise of entry ``j`` is :func:`entry_noise`).
        path: where the cache is written and read back (``<run>/distill_cache.pt``).
        batch_size: entries per teacher call; ``device``: where the teacher runs.
    """

    def __init__(self, base: Any, distiller: OneStepDistiller, size: int, seed: int, path: str | Path,
                 batch_size: int = 8, device: torch.device | str = "cpu", progress: bool = True):
        self.seed, self.size, self.images = seed, size, len(base)
        self.key = {"teacher": _file_key(distiller.trained.path), "steps": distiller.sampler.steps,
                    "t_pow_shift": distiller.sampler.t_pow_shift, "size": size, "seed": seed,
                    "data": [str(p) for p in base.paths], "pano_size": base.pano_size,
                    "camera": repr(base.camera), "augment": (base.augment_yaw, base.augment_flip)}
        path = Path(path)
        if D.rank() == 0:
            data = _read_cache(path, self.key)
            if data is None:
                data = self._compute(base, distiller, batch_size, torch.device(device), progress)
                atomic_save({"key": self.key, **data}, path)
        D.barrier()
        if D.rank() != 0:
            data = _read_cache(path, self.key)
            if data is None:
                raise RuntimeError(f"{path}: rank 0 wrote no distillation cache matching this run")
        self.views, self.cameras, self.panorama, self.target = (
            data[k] for k in ("views", "cameras", "panorama", "target"))

    def _compute(self, base: Any, distiller: OneStepDistiller, batch_size: int, device: torch.device,
                 progress: bool) -> dict[str, Tensor]:
        from tqdm import tqdm

        out: dict[str, list[Tensor]] = {k: [] for k in ("views", "cameras", "panorama", "target")}
        epoch = base.epoch
        bar = tqdm(total=self.size, desc=f"distill.cache: teacher samples ({distiller.sampler.steps} steps)",
                   unit="pano", disable=not progress, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        for start in range(0, self.size, batch_size):
            items = []
            for j in range(start, min(start + batch_size, self.size)):
                base.set_epoch(j // len(base))
                items.append(base[j % len(base)])
            views = torch.stack([it["views"] for it in items]).half()
            cameras = torch.stack([it["cameras"] for it in items])
            noise = torch.stack([entry_noise(self.seed, j, tuple(items[0]["panorama"].shape))
                                 for j in range(start, start + len(items))])
            target = distiller.target(views.float().to(device), cameras.to(device), noise.to(device)).float().cpu()
            out["views"].append(views)
            out["cameras"].append(cameras)
            out["panorama"].append(torch.stack([it["panorama"] for it in items]).half())
            out["target"].append(target)
            bar.update(len(items))
        bar.close()
        base.set_epoch(epoch)
        return {k: torch.cat(v) for k, v in out.items()}

    def set_epoch(self, epoch: int) -> None:
        """A fixed set: nothing changes between epochs."""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> dict[str, Tensor]:
        return {"views": self.views[j].float(), "cameras": self.cameras[j], "panorama": self.panorama[j].float(),
                "index": torch.tensor(j % self.images), "noise": entry_noise(self.seed, j, tuple(self.target.shape[1:])),
                "target": self.target[j]}


def _file_key(path: str | Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def _read_cache(path: Path, key: dict) -> dict[str, Tensor] | None:
    """The cache at ``path`` when it was written for ``key`` (else ``None``: it is recomputed)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file is recomputed, never trusted
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None
