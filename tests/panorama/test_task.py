"""The panorama task: reproducible evaluation, baseline metrics, EMA evaluation through the engine."""

from __future__ import annotations

import math

import pytest
import torch

from visiontrain.engine.task import StepInfo
from visiontrain.panorama.config import PanoramaTrainConfig
from visiontrain.panorama.inference import Sampler, current_rank, evaluation_generator
from visiontrain.panorama.task import PanoramaTask


def loader_of(dataset, batch_size: int = 2):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def test_evaluation_is_reproducible_and_distinct_per_rank(tmp_path, tiny_config) -> None:
    task = PanoramaTask(tiny_config(tmp_path))
    _, val = task.build_datasets()
    assert (tmp_path / "synth" / ".visiontrain_synth.json").is_file() and len(val) == 4
    torch.manual_seed(0)
    model = task.build_model().eval()
    first = task.evaluate(model, loader_of(val))
    again = task.evaluate(model, loader_of(val))
    assert first == again
    other_rank = task.evaluate(model, loader_of(val), rank=1)
    assert other_rank["psnr"] != first["psnr"] and other_rank["val_flow"] != first["val_flow"]
    assert other_rank["baseline_psnr"] == first["baseline_psnr"]  # the baseline has no noise
    assert PanoramaTask(tiny_config(tmp_path, "seed=1")).evaluate(model, loader_of(val))["psnr"] != first["psnr"]
    # baseline metrics are sane: near-exact where seen, poor where unseen
    assert first["baseline_psnr_seen"] > 25 > first["baseline_psnr_unseen"] > 5
    assert 0 < first["baseline_ssim_unseen"] < first["baseline_ssim_seen"] <= 1
    for key in ("psnr", "psnr_seen", "psnr_unseen", "ssim", "ssim_seen", "ssim_unseen", "mse", "mae"):
        assert math.isfinite(first[key]) and math.isfinite(first["baseline_" + key])
    assert current_rank() == 0
    assert torch.equal(torch.randn(3, generator=evaluation_generator(5)),
                       torch.randn(3, generator=evaluation_generator(5, 0)))


def test_training_step_and_visualize(tmp_path, tiny_config) -> None:
    task = PanoramaTask(tiny_config(tmp_path))
    train, val = task.build_datasets()
    model = task.build_model()
    batch = task.collate([train[i] for i in range(2)])
    terms = task.training_step(model, batch, StepInfo())
    assert set(terms) == {"flow"} and terms["flow"].requires_grad and math.isfinite(float(terms["flow"].detach()))
    task.visualize(model.eval(), task.collate([val[0]]), tmp_path / "plots")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["panorama_sample0.png"]


def test_defaults_follow_the_issue() -> None:
    cfg = PanoramaTrainConfig()
    assert cfg.ema.enabled and cfg.ema.decay == 0.999
    assert (cfg.xi, cfg.focal, cfg.view_size, cfg.sample_steps, cfg.t_pow_shift) == (0.85, 220.0, 128, 12, 2.0)
    assert cfg.latent_channels == 4


def test_fit_evaluates_with_ema_weights(tiny_run) -> None:
    from visiontrain.engine.checkpoint import load_checkpoint

    task = PanoramaTask(tiny_run.cfg)
    ckpt = load_checkpoint(tiny_run.weights)
    _, val = task.build_datasets()
    with_ema, with_raw = task.build_model(), task.build_model()
    with_ema.load_state_dict(ckpt["ema"]["module"])
    with_raw.load_state_dict(ckpt["model"])
    ema_metrics = task.evaluate(with_ema.eval(), loader_of(val, tiny_run.cfg.batch_size))
    raw_metrics = task.evaluate(with_raw.eval(), loader_of(val, tiny_run.cfg.batch_size))
    assert tiny_run.result["metrics"]["psnr"] == pytest.approx(ema_metrics["psnr"], abs=1e-9)
    assert raw_metrics["psnr"] != pytest.approx(ema_metrics["psnr"], abs=1e-6)


def test_evaluate_with_another_sampler_leaves_the_config_alone(tmp_path, tiny_config) -> None:
    """Evaluation at other sampler settings (the benchmark's steps and temperatures; a one-step student)
    is an argument, not a change to the task's config."""
    cfg = tiny_config(tmp_path)
    task = PanoramaTask(cfg)
    _, val = task.build_datasets()
    torch.manual_seed(0)
    model = task.build_model().eval()
    default = task.evaluate(model, loader_of(val))
    one_step = task.evaluate(model, loader_of(val), sampler=Sampler(steps=1, t_pow_shift=2.0, temperature=0.0))
    assert one_step["psnr"] != default["psnr"] and one_step["baseline_psnr"] == default["baseline_psnr"]
    assert (cfg.sample_steps, cfg.temperature) == (2, 1.0) and task.sampler == Sampler(2, 2.0, 1.0)
    assert task.evaluate(model, loader_of(val)) == default


def test_lpips_term_on_the_predicted_clean_panorama(tmp_path, tiny_config, monkeypatch) -> None:
    """``aux.lpips_weights``: a weighted ``lpips`` term whose gradient reaches the model (and not the LPIPS
    network); without the file a config error says which file and that nothing is downloaded."""
    import torchvision

    from visiontrain.config import ConfigError
    from visiontrain.panorama.metrics import lpips_distance

    with pytest.raises(ConfigError, match=r"aux.lpips_weights=.*missing.pth: no such file.*alexnet-owt-7be5be79"
                                          r".pth.*Nothing is downloaded"):
        tiny_config(tmp_path, f"aux.lpips_weights={tmp_path / 'missing.pth'}")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("LPIPS must not download anything"))
    path = tmp_path / "alexnet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)  # random weights: a stand-in
    task = PanoramaTask(tiny_config(tmp_path, f"aux.lpips_weights={path}", "aux.lpips=0.5"))
    train, _ = task.build_datasets()
    model = task.build_model()
    batch = task.collate([train[i] for i in range(2)])
    torch.manual_seed(1)
    terms = task.training_step(model, batch, StepInfo())
    assert set(terms) == {"flow", "lpips"} and float(terms["lpips"].detach()) > 0
    torch.manual_seed(1)
    assert torch.equal(terms["flow"], PanoramaTask(tiny_config(tmp_path)).training_step(model, batch, StepInfo())["flow"])
    terms["lpips"].backward()
    assert model.unet.conv_out.weight.grad is not None and model.unet.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in task.lpips.parameters())
    x = batch["panorama"]
    assert float(lpips_distance(task.lpips, x, x).abs().max()) < 1e-6  # 0 for identical images
    assert (lpips_distance(task.lpips, x, -x) > 0).all()
