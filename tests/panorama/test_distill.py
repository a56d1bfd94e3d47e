"""One-step distillation: the loss against a float64 reference, a student of an exact-velocity oracle, the task
(frozen teacher outside the student, one-step checkpoints, exact resume), the checks on the keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visiontrain.config import ConfigError
from visiontrain.engine.checkpoint import CheckpointError, load_checkpoint
from visiontrain.engine.task import StepInfo
from visiontrain.panorama.distill import distillation_loss, one_step_sample
from visiontrain.panorama.flow_matching import euler_sample, time_grid


def toy_teacher(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A nonlinear toy velocity field ``v(x, t, c) = c·tanh(0.3 − x)·(1 + t)``."""
    return cond * torch.tanh(0.3 - x) * (1 + t.reshape(-1, 1))


def test_distillation_loss_equals_a_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    cond = torch.rand(4, 6, generator=gen, dtype=torch.float64) + 0.5
    a, b = 0.7, -0.2

    def student(x, t, c):
        return a * x + b * c * t.reshape(-1, 1)

    steps, shift = 5, 2.0
    # reference, all float64, written out: Euler on t_k = (1 − k/N)^shift, then one student step from t = 1
    x = noise.clone()
    for k in range(steps):
        t_now, t_next = (1 - k / steps) ** shift, (1 - (k + 1) / steps) ** shift
        x = x + (t_now - t_next) * cond * torch.tanh(0.3 - x) * (1 + t_now)
    student_x = noise + a * noise + b * cond
    reference = ((student_x - x) ** 2).mean()
    # the library: the teacher's sampler (float32, as in training) and the loss
    assert time_grid(steps, shift).tolist() == pytest.approx([(1 - k / steps) ** shift for k in range(steps + 1)])
    target = euler_sample(toy_teacher, cond.float(), tuple(noise.shape), steps, shift, noise=noise.float())
    loss = distillation_loss(student, noise.float(), cond.float(), target)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(reference), rel=1e-5)
    target64 = euler_sample(toy_teacher, cond, tuple(noise.shape), steps, shift, noise=noise, dtype=torch.float64)
    loss64 = distillation_loss(student, noise, cond, target64)
    assert loss64.dtype == torch.float64 and float(loss64) == pytest.approx(float(reference), rel=1e-12)


class GaussianOracle(nn.Module):
    """The exact flow-matching velocity of data ``x ~ N(m, s²)`` (per element): ``E[x − ε | x_t]``."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        t = t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2  # Var[x_t]
        centred = x_t - (1 - t) * self.m
        e_x = self.m + (1 - t) * self.s ** 2 / var * centred
        e_eps = t / var * centred
        return e_x - e_eps


class AffineStudent(nn.Module):
    """``v(x, t) = α·x + β``: one step from noise gives ``(1 + α)·ε + β``."""

    def __init__(self):
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        return self.alpha * x + self.beta


def test_one_step_student_of_an_exact_velocity_oracle_reproduces_its_sample() -> None:
    """The oracle's 12-step Euler sample is affine in the noise (the velocity is linear in x_t), so an affine
    one-step student trained on the distillation loss reproduces it — the Euler result, not the exact ODE
    solution ``m + s·ε`` (which 12 Euler steps miss)."""
    torch.manual_seed(0)
    oracle, student = GaussianOracle(m=0.4, s=0.3), AffineStudent()
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    for _ in range(300):
        noise = torch.randn(64, 8)
        target = euler_sample(oracle, None, tuple(noise.shape), 12, 2.0, noise=noise)
        loss = distillation_loss(student, noise, None, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    teacher = euler_sample(oracle, None, tuple(noise.shape), 12, 2.0, noise=noise)
    one = one_step_sample(student, noise, None).detach()
    assert (one - teacher).abs().max() < 1e-3
    assert (teacher - (0.4 + 0.3 * noise)).abs().max() > 1e-2  # the student learnt the 12-step sampler's answer
    assert (euler_sample(oracle, None, tuple(noise.shape), 1, 2.0, noise=noise) - teacher).abs().max() > 1e-2


# ---- the task ---------------------------------------------------------------------------------------------------

def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_task_distils_a_frozen_teacher_and_saves_a_one_step_model(tmp_path, tiny_config, tiny_run) -> None:
    from visiontrain.engine.trainer import fit
    from visiontrain.panorama.inference import Sampler, load_trained
    from visiontrain.panorama.task import PanoramaTask

    extra = [f"synth_dir={tiny_run.synth}", f"distill.teacher={tiny_run.weights}", "distill.steps=3", "xi=0.8"]
    task = PanoramaTask(tiny_config(tmp_path, *extra))
    assert task.sampler.steps == 1 and task.distiller.sampler.steps == 3
    teacher = task.distiller.teacher
    before = _params(teacher)
    model = task.build_model()
    for k, v in model.state_dict().items():  # the student starts as the teacher (its EMA weights)
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert {id(p) for p in model.parameters()}.isdisjoint(id(p) for p in teacher.parameters())

    # the loss is the one-step student against the teacher's 3-step sample from the same noise
    train, _ = task.build_datasets()
    batch = task.collate([train[i] for i in range(2)])
    torch.manual_seed(5)
    terms = task.training_step(model.train(), batch, StepInfo())
    assert set(terms) == {"distill"} and terms["distill"].requires_grad
    torch.manual_seed(5)
    noise = torch.randn(batch["panorama"].shape)
    target = Sampler(3, 2.0, 1.0).sample(teacher, teacher.condition(batch["views"], batch["cameras"]), None,
                                         noise=noise)
    student = one_step_sample(model, noise, model.condition(batch["views"], batch["cameras"]))
    assert float(terms["distill"].detach()) == pytest.approx(float(((student - target) ** 2).mean().detach()), rel=1e-5)
    terms["distill"].backward()
    assert all(p.grad is None for p in teacher.parameters())

    result = fit(PanoramaTask(tiny_config(tmp_path, *extra, "max_steps=2", "lr=3e-3")))
    after = _params(task.distiller.teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["config"]["distill"] == {"teacher": str(tiny_run.weights), "steps": 3, "cache": 0}
    assert not any(k.startswith("teacher") or ".teacher." in k for k in ckpt["model"])
    trained = load_trained(tmp_path / "run" / "checkpoints" / "last.pt")
    assert trained.sampler().steps == 1 and trained.sampler(steps=4).steps == 4
    assert load_trained(tiny_run.weights).sampler().steps == 2  # the teacher keeps its own
    assert math.isfinite(result["metrics"]["psnr"])


@pytest.mark.slow
def test_distillation_run_resumes_exactly(tmp_path, tiny_config, tiny_run) -> None:
    from visiontrain.engine.trainer import fit
    from visiontrain.panorama.task import PanoramaTask

    common = [f"synth_dir={tiny_run.synth}", f"distill.teacher={tiny_run.weights}", "distill.steps=2", "xi=0.8",
              "max_steps=4", "save_every_steps=1", "keep_last=4", "eval_every=0", "lr=3e-3", "ema.warmup=2"]
    fit(PanoramaTask(tiny_config(tmp_path / "ref", *common)))
    step2 = tmp_path / "ref" / "run" / "checkpoints" / "step_0000002.pt"
    fit(PanoramaTask(tiny_config(tmp_path / "resumed", *common, f"resume={step2}")))
    a, b = (load_checkpoint(tmp_path / d / "run" / "checkpoints" / "last.pt") for d in ("ref", "resumed"))
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), k


def test_distill_keys_are_checked(tmp_path, tiny_config, tiny_run) -> None:
    from visiontrain.panorama.task import PanoramaTask

    with pytest.raises(ConfigError, match=r"distill.teacher=.*nope.pt: no such file"):
        tiny_config(tmp_path, f"distill.teacher={tmp_path / 'nope.pt'}")
    with pytest.raises(ConfigError, match=r"distill.steps=0"):
        tiny_config(tmp_path, "distill.steps=0")
    cfg = tiny_config(tmp_path, f"synth_dir={tiny_run.synth}", f"distill.teacher={tiny_run.weights}",
                      "unet_channels=[8,8]", "fused_channels=8")
    with pytest.raises(CheckpointError, match=r"this run has fused_channels=8, unet_channels=\[8,8\]\. "
                                              r"Add: fused_channels=4 unet_channels=\[8,16\]"):
        PanoramaTask(cfg)
    # wrap_x may differ: same parameters
    assert PanoramaTask(tiny_config(tmp_path, f"synth_dir={tiny_run.synth}", f"distill.teacher={tiny_run.weights}",
                                    "wrap_x=false")).distiller is not None


def test_cached_teacher_targets_are_the_teachers_samples_and_are_reused(tmp_path, tiny_config, tiny_run,
                                                                        monkeypatch) -> None:
    from visiontrain.engine.trainer import fit
    from visiontrain.panorama.distill import TeacherTargets, entry_noise
    from visiontrain.panorama.inference import Sampler
    from visiontrain.panorama.task import PanoramaTask

    extra = [f"synth_dir={tiny_run.synth}", f"distill.teacher={tiny_run.weights}", "distill.steps=3", "xi=0.8"]
    with pytest.raises(ConfigError, match=r"distill.cache=4 caches a teacher's samples: set distill.teacher"):
        tiny_config(tmp_path, "distill.cache=4")
    with pytest.raises(ConfigError, match=r"distill.cache=-1"):
        tiny_config(tmp_path, *extra, "distill.cache=-1")
    plain = PanoramaTask(tiny_config(tmp_path / "plain", *extra))
    base, _ = plain.build_datasets()
    n = len(base) + 3  # wraps around: entries len.. are the same images with the next epoch's augmentation
    task = PanoramaTask(tiny_config(tmp_path, *extra, f"distill.cache={n}", "batch_size=4"))
    train, _ = task.build_datasets()
    assert isinstance(train, TeacherTargets) and len(train) == n
    assert (tmp_path / "run" / "distill_cache.pt").is_file()
    teacher = task.distiller.teacher
    for j in (0, 1, len(base)):
        base.set_epoch(j // len(base))
        want = base[j % len(base)]
        got = train[j]
        assert torch.equal(got["views"], want["views"].half().float())  # stored in float16, as the teacher saw them
        assert torch.equal(got["cameras"], want["cameras"]) and int(got["index"]) == j % len(base)
        assert torch.equal(got["noise"], entry_noise(task.cfg.seed, j, tuple(want["panorama"].shape)))
        views, cams = got["views"][None], got["cameras"][None]
        target = Sampler(3, 2.0, 1.0).sample(teacher, teacher.condition(views, cams), None, noise=got["noise"][None])
        assert torch.allclose(got["target"], target[0], atol=1e-5), j  # computed in batches of 4 there
    assert not torch.equal(train[0]["noise"], train[len(base)]["noise"])  # every entry has its own noise
    assert not torch.equal(train[0]["cameras"], train[len(base)]["cameras"])  # … and its own augmentation

    # the step trains the one-step student on the stored (noise, target): no teacher call
    model = task.build_model().train()
    batch = task.collate([train[i] for i in range(3)])
    monkeypatch.setattr(task.distiller, "target", lambda *a: pytest.fail("the teacher ran on a cached batch"))
    loss = task.training_step(model, batch, StepInfo())["distill"]
    student = one_step_sample(model, batch["noise"], {"views": batch["views"], "cameras": batch["cameras"]})
    assert float(loss.detach()) == pytest.approx(float(((student - batch["target"]) ** 2).mean().detach()), rel=1e-6)

    # read back (a resumed run) without running the teacher; another seed or a torn file is recomputed
    again = PanoramaTask(tiny_config(tmp_path, *extra, f"distill.cache={n}", "batch_size=4"))
    monkeypatch.setattr(again.distiller, "target", lambda *a: pytest.fail("recomputed a matching cache"))
    assert torch.equal(again.build_datasets()[0].target, train.target)
    monkeypatch.undo()
    other = PanoramaTask(tiny_config(tmp_path, *extra, f"distill.cache={n}", "seed=1"))
    assert not torch.equal(other.build_datasets()[0].target, train.target)
    (tmp_path / "run" / "distill_cache.pt").write_bytes(b"torn")
    assert torch.allclose(PanoramaTask(tiny_config(tmp_path, *extra, f"distill.cache={n}", "batch_size=4"))
                          .build_datasets()[0].target, train.target, atol=1e-6)

    result = fit(PanoramaTask(tiny_config(tmp_path / "fit", *extra, "distill.cache=4", "max_steps=2", "lr=3e-3")))
    assert math.isfinite(result["metrics"]["psnr"]) and (tmp_path / "fit" / "run" / "distill_cache.pt").is_file()
