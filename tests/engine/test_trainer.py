"""The engine on a small real task: learning, exact resume after SIGKILL, NaN guard, freezing, DDP."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_task import ToyConfig, ToyTask

from visiontrain.config import load_config
from visiontrain.engine.checkpoint import CheckpointError, load_checkpoint
from visiontrain.engine.guard import NonFiniteLossError
from visiontrain.engine.schedule import lr_factor
from visiontrain.engine.trainer import Trainer

TOY = str(Path(__file__).with_name("toy_task.py"))
QUIET = ["tensorboard=false", "plots=false", "progress=false"]


def make(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'run'}", *QUIET, *overrides])
    return Trainer(ToyTask(cfg))


def tensors_of(ckpt: dict) -> dict[str, torch.Tensor]:
    """Every tensor that defines the training state: weights, EMA, optimizer moments."""
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    if ckpt.get("ema"):
        out.update({f"ema.{k}": v for k, v in ckpt["ema"]["module"].items()})
    for pid, st in ckpt["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def test_loss_falls_and_run_dir_is_complete(tmp_path):
    result = make(tmp_path, "epochs=4", "lr=3e-3").fit()
    run = Path(result["out"])
    mse = [float(line.split(",")[3]) for line in (run / "metrics.csv").read_text().splitlines()
           if ",val/mse," in line]
    assert len(mse) == 4
    assert mse[-1] < 0.75 * mse[0]
    from visiontrain.engine.logging import read_metrics

    cpu = [v for _, v in read_metrics(run / "metrics.csv")["time/train_cpu_s"]]  # with each evaluation
    assert len(cpu) == 4 and all(b > a > 0 for a, b in zip(cpu, cpu[1:]))
    for f in ("config.yaml", "log.txt", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / f).exists(), f
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["task"] == "toy" and ckpt["step"] == result["step"] == 4 * 32
    assert ckpt["config"]["epochs"] == 4 and "torch" in ckpt["versions"]
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config(ToyConfig, None, ["schedule=cosine", "min_lr_ratio=0.1"])
    assert lr_factor(0, 100, 10, cfg, 0.0) == 0.0
    assert lr_factor(5, 100, 10, cfg, 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, cfg, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, cfg, 0.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, 10, cfg, 0.0) == pytest.approx(0.1)
    cfg = load_config(ToyConfig, None, ["schedule=step", "step_milestones=[0.5,0.75]", "step_gamma=0.1"])
    assert [lr_factor(s, 100, 0, cfg, 0.0) for s in (10, 50, 80)] == pytest.approx([1, 0.1, 0.01])


def _run_toy(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOY, *QUIET, *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("extra", [["ema.enabled=true", "ema.warmup=5", "accumulate=2", "warmup_steps=4"]])
def test_resume_after_sigkill_is_bit_exact(tmp_path, extra):
    common = ["epochs=3", "n_train=160", "save_every_steps=1", "eval_every_steps=7", "optimizer=sgd",
              "lr=0.05", *extra]
    ref = _run_toy([f"out={tmp_path / 'ref'}", *common])
    assert ref.returncode == 0, ref.stderr
    total = load_checkpoint(tmp_path / "ref/checkpoints/last.pt")["step"]

    kill_at = random.Random().randint(3, 2 * total - 4)  # a random micro-batch call, any step
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, TOY, *QUIET, f"out={run}", "print_steps=true", "sleep=0.02", *common],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= kill_at:
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_step = load_checkpoint(run / "checkpoints/last.pt")["step"]
    assert 0 < killed_step < total

    res = _run_toy([f"out={run}", "resume=auto", *common])
    assert res.returncode == 0, res.stderr
    assert f"resumed from {run}/checkpoints/last.pt at step {killed_step}" in res.stderr
    a = tensors_of(load_checkpoint(tmp_path / "ref/checkpoints/last.pt"))
    b = tensors_of(load_checkpoint(run / "checkpoints/last.pt"))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"killed at call {kill_at} (saved step {killed_step}), differs in {diff[:5]}"


def test_resume_can_extend_epochs_and_keeps_config(tmp_path):
    first = make(tmp_path, "epochs=2", "lr=2e-3").fit()
    cfg_args = [f"out={first['out']}", "resume=auto", "epochs=3"]
    from visiontrain.verbs import build_train_config

    cfg = build_train_config(ToyConfig, None, cfg_args + QUIET)
    assert cfg.lr == 2e-3 and cfg.epochs == 3  # saved config kept, override wins
    result = Trainer(ToyTask(cfg)).fit()
    assert result["out"] == first["out"] and result["step"] == 3 * 32


def test_resume_auto_without_checkpoint_starts_in_exactly_out_and_new_runs_never_overwrite(tmp_path, capsys):
    out = tmp_path / "x2"
    (out / "checkpoints").mkdir(parents=True)  # what a start that failed early may leave behind
    a = make(tmp_path, "epochs=1", "resume=auto", f"out={out}").fit()  # a requeued job's first start
    assert a["out"] == str(out)
    assert f"resume=auto: no checkpoint in {out}/checkpoints; starting a new run in {out}" in capsys.readouterr().err
    b = make(tmp_path, "epochs=1", f"out={out}").fit()  # without resume= a finished run is never overwritten
    assert b["out"] == str(tmp_path / "x22")
    again = make(tmp_path, "epochs=2", "resume=auto", f"out={out}")  # the requeued job's second start
    assert again.step == 32 and str(again.out) == str(out)


def test_nan_guard_stop_names_the_term_and_writes_emergency_checkpoint(tmp_path):
    trainer = make(tmp_path, "epochs=1", "nan_at_step=5", "nan_policy=stop")
    with pytest.raises(NonFiniteLossError, match=r"step 5: .*loss term 'reg' is not finite") as e:
        trainer.fit()
    assert "nan_step0000005.pt" in str(e.value)
    ckpt = load_checkpoint(trainer.ckpt_dir / "nan_step0000005.pt")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_guard_skip_drops_the_step_and_continues(tmp_path):
    trainer = make(tmp_path, "epochs=1", "nan_at_step=5", "nan_policy=skip")
    result = trainer.fit()
    assert result["nan_skipped"] == 1 and result["step"] == 32
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert "loss term 'reg' is not finite — step skipped" in (Path(result["out"]) / "log.txt").read_text()


def test_nan_guard_names_parameter_with_nonfinite_gradient(tmp_path):
    trainer = make(tmp_path, "epochs=1", "nan_policy=stop")
    trainer.model[1].weight.register_hook(lambda g: g * float("inf") if trainer.task.calls == 3 else g)
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*gradient of 1\.weight is not finite"):
        trainer.fit()


def test_freeze_then_unfreeze_keeps_bn_stats(tmp_path):
    trainer = make(tmp_path, "epochs=2", "freeze=[0]", "unfreeze_epoch=1", "max_steps=33")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    at_epoch = {}
    trainer.task.on_epoch_start = lambda model, info: at_epoch.setdefault(
        info.epoch, {k: v.clone() for k, v in model.state_dict().items()})
    trainer.fit()  # 32 steps of epoch 0 frozen, then one step of epoch 1 unfrozen
    end0 = at_epoch[1]
    for k in before:  # weights and BatchNorm running stats of the frozen prefix
        if k.startswith("0."):
            assert torch.equal(before[k], end0[k]), f"{k} changed while frozen"
    assert not torch.equal(before["1.weight"], end0["1.weight"])
    after = trainer.model.state_dict()
    assert not torch.equal(end0["0.0.weight"], after["0.0.weight"])
    assert not torch.equal(end0["0.1.running_mean"], after["0.1.running_mean"])


def test_freeze_unknown_prefix_is_a_clear_error(tmp_path):
    from visiontrain.config import ConfigError

    with pytest.raises(ConfigError, match="prefix 'backbone' matches no parameter"):
        make(tmp_path, "epochs=1", "freeze=[backbone]").fit()


def test_resume_rejects_checkpoint_of_another_model(tmp_path):
    first = make(tmp_path, "epochs=1").fit()
    with pytest.raises(CheckpointError, match="checkpoint model is 'mlp8x32' but this run builds 'mlp8x64'"):
        make(tmp_path, "epochs=2", "hidden=64", f"resume={first['out']}/checkpoints/last.pt")


def test_eval_uses_ema_weights(tmp_path):
    trainer = make(tmp_path, "epochs=1", "ema.enabled=true", "ema.decay=0.5", "ema.warmup=0")
    seen = []
    original = trainer.task.evaluate
    trainer.task.evaluate = lambda model, loader: (seen.append(model), original(model, loader))[1]
    trainer.fit()
    assert seen and all(m is trainer.ema.module for m in seen)
    ema = trainer.ema.module.state_dict()
    assert not torch.equal(ema["1.weight"], trainer.model.state_dict()["1.weight"])


@pytest.mark.parametrize("batchnorm", ["false", "true"])  # with BatchNorm: sync_bn (the default) makes it hold
def test_two_process_ddp_matches_one_process(tmp_path, batchnorm):
    common = ["epochs=2", "batch_size=16", "dropout=0", f"batchnorm={batchnorm}", "optimizer=sgd", "lr=0.05",
              "eval_every=1", "device=cpu"]
    one = _run_toy([f"out={tmp_path / 'one'}", *common])
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29500 + random.randint(0, 999)), TOY, *QUIET,
                          f"out={tmp_path / 'two'}", *common], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "two/checkpoints/last.pt")
    assert len(b["rng"]) == 2 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k


def test_tasks_get_the_step_and_the_plan_and_can_freeze_by_epoch(tmp_path):
    class Watching(ToyTask):
        def training_step(self, model, batch, info):
            seen.append((info.step, info.epoch, info.total_steps, info.total_epochs, info.steps_per_epoch))
            return super().training_step(model, batch, info)

        def frozen_prefixes(self, info):
            return ("0",) if info.epoch == 0 else ()

    seen: list = []
    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'r'}", *QUIET, "max_steps=6", "n_train=32",
                                        "accumulate=2", "batch_size=8"])
    trainer = Trainer(Watching(cfg))
    first = trainer.model[0][0].weight.detach().clone()
    trainer.fit()
    # 4 batches an epoch, 2 per step: 2 steps an epoch, 6 steps reach into 3 epochs; 2 micro-batches a step
    assert seen == [(s, s // 2, 6, 3, 2) for s in range(6) for _ in range(2)]
    assert not torch.equal(first, trainer.model[0][0].weight)  # frozen in epoch 1 only, trained after


def test_stat_entries_are_logged_but_not_trained_on(tmp_path):
    class WithStat(ToyTask):
        def training_step(self, model, batch, info):
            terms = super().training_step(model, batch, info)
            return {**terms, "stat/huge": torch.tensor(1e6), "stat/nan": torch.tensor(float("nan"))}

    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'a'}", *QUIET, "max_steps=4", "log_every=1"])
    with_stat = Trainer(WithStat(cfg))
    with_stat.fit()
    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'b'}", *QUIET, "max_steps=4", "log_every=1"])
    plain = Trainer(ToyTask(cfg))
    plain.fit()
    for k, v in plain.model.state_dict().items():  # the statistic changed nothing, and no step was skipped
        assert torch.equal(v, with_stat.model.state_dict()[k]), k
    logged = (tmp_path / "a" / "metrics.csv").read_text()
    assert "train/stat/huge,1000000" in logged and with_stat.guard.total_skipped == 0


def test_gradient_norm_and_clipping_share_are_logged(tmp_path):
    """train/stat/grad_norm is the norm before clipping (recomputed here from a plain step); clipped is the
    share of steps where clip_grad acted."""
    from visiontrain.engine.logging import read_metrics

    runs = {}
    for name, clip in (("tight", "1e-6"), ("loose", "1e6")):
        cfg = load_config(ToyConfig, None, [f"out={tmp_path / name}", *QUIET, "max_steps=3", "log_every=1",
                                            f"clip_grad={clip}"])
        Trainer(ToyTask(cfg)).fit()
        runs[name] = read_metrics(tmp_path / name / "metrics.csv")
    assert [v for _, v in runs["tight"]["train/stat/clipped"]] == [1.0, 1.0, 1.0]
    assert [v for _, v in runs["loose"]["train/stat/clipped"]] == [0.0, 0.0, 0.0]
    # step 1 starts from the same weights and batch in both runs: the same gradient, whatever the clipping
    first = runs["tight"]["train/stat/grad_norm"][0][1]
    assert first > 0 and math.isclose(first, runs["loose"]["train/stat/grad_norm"][0][1], rel_tol=1e-6)
    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'manual'}", *QUIET, "max_steps=1"])
    trainer = Trainer(ToyTask(cfg))
    batch = next(iter(trainer.train_loader))
    terms = trainer.task.training_step(trainer.model, batch, trainer.info())
    sum(terms.values()).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert math.isclose(first, float(norm), rel_tol=1e-5)


def test_task_state_is_saved_and_restored_on_resume(tmp_path):
    class Counting(ToyTask):
        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

    cfg = load_config(ToyConfig, None, [f"out={tmp_path / 'r'}", *QUIET, "max_steps=5"])
    first = Trainer(Counting(cfg)).fit()
    cfg = load_config(ToyConfig, None, [f"out={first['out']}", *QUIET, "max_steps=7", "resume=auto"])
    task = Counting(cfg)
    Trainer(task).fit()
    assert task.calls == 7
    assert load_checkpoint(tmp_path / "r/checkpoints/last.pt")["task_state"] == {"calls": 7}


def test_keep_last_keeps_k_step_checkpoints_with_their_own_content(tmp_path):
    result = make(tmp_path, "max_steps=6", "save_every_steps=2", "keep_last=2").fit()
    ckpts = Path(result["out"]) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_0000004.pt", "step_0000006.pt"]
    assert load_checkpoint(ckpts / "step_0000004.pt")["step"] == 4
    assert load_checkpoint(ckpts / "last.pt")["step"] == 6


@pytest.mark.parametrize("speedup, expected", [(2.0, "bf16"), (0.6, "off")])
def test_amp_auto_follows_the_cpu_probe_and_a_resume_keeps_its_choice(tmp_path, monkeypatch, speedup, expected):
    from visiontrain.engine import runtime

    monkeypatch.setitem(runtime._state, "bf16_speedup", speedup)
    trainer = make(tmp_path, "epochs=1", "amp=auto", "max_steps=4")
    assert trainer.amp == expected and trainer.amp_dtype == (torch.bfloat16 if expected == "bf16" else None)
    result = trainer.fit()
    assert load_checkpoint(Path(result["out"]) / "checkpoints" / "last.pt")["amp"] == expected
    assert f"amp=auto -> {expected}" in (Path(result["out"]) / "log.txt").read_text()
    # the same run resumed where the probe says the opposite keeps the precision it started with
    monkeypatch.setitem(runtime._state, "bf16_speedup", 2.6 - speedup)
    resumed = make(tmp_path, "epochs=1", "amp=auto", "max_steps=8", f"out={result['out']}", "resume=auto")
    assert resumed.step == 4 and resumed.amp == expected
    monkeypatch.setitem(runtime._state, "bf16_speedup", 2.6 - speedup)
    assert make(tmp_path / "fresh", "amp=auto").amp != expected  # a new run follows the probe
