"""The panorama task: reproducible evaluation, baseline metrics, EMA evaluation through the engine, verbs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from visiontrain.config import load_config
from visiontrain.engine.task import StepInfo
from visiontrain.panorama.task import (
    VERBS,
    PanoramaEvalConfig,
    PanoramaPredictConfig,
    PanoramaTask,
    PanoramaTrainConfig,
    SynthConfig,
    current_rank,
    evaluation_generator,
)

TRAINER = Path(__file__).parents[2] / "src" / "visiontrain" / "engine" / "trainer.py"


def tiny(tmp_path: Path, *extra: str, schema: type = PanoramaTrainConfig):
    return load_config(schema, None, [
        f"out={tmp_path / 'run'}", f"synth_dir={tmp_path / 'synth'}", "synth_train=8", "synth_val=4",
        "synth_size=32", "pano_size=16", "view_size=32", "encoder_channels=[8,8,8]", "fused_channels=4",
        "unet_channels=[8,16]", "norm_groups=4", "batch_size=4", "sample_steps=2", "device=cpu",
        "tensorboard=false", "plots=false", "progress=false", *extra])


def loader_of(dataset, batch_size: int = 2):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def test_evaluation_is_reproducible_and_distinct_per_rank(tmp_path) -> None:
    task = PanoramaTask(tiny(tmp_path))
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
    task.cfg.seed = 1
    assert task.evaluate(model, loader_of(val))["psnr"] != first["psnr"]
    # baseline metrics are sane: near-exact where seen, poor where unseen
    assert first["baseline_psnr_seen"] > 25 > first["baseline_psnr_unseen"] > 5
    assert 0 < first["baseline_ssim_unseen"] < first["baseline_ssim_seen"] <= 1
    for key in ("psnr", "psnr_seen", "psnr_unseen", "ssim", "ssim_seen", "ssim_unseen", "mse", "mae"):
        assert math.isfinite(first[key]) and math.isfinite(first["baseline_" + key])
    assert current_rank() == 0
    assert torch.equal(torch.randn(3, generator=evaluation_generator(5)),
                       torch.randn(3, generator=evaluation_generator(5, 0)))


def test_training_step_and_visualize(tmp_path) -> None:
    task = PanoramaTask(tiny(tmp_path))
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


@pytest.mark.skipif(not TRAINER.is_file(), reason="engine trainer not present")
def test_fit_evaluates_with_ema_weights_then_eval_and_predict_verbs(tmp_path) -> None:
    from visiontrain.engine.checkpoint import load_checkpoint
    from visiontrain.engine.trainer import fit

    # decay 0.999 without warmup: after 3 steps the EMA is still close to the initial weights, far from the model
    cfg = tiny(tmp_path, "max_steps=3", "lr=3e-3", "ema.warmup=0")
    task = PanoramaTask(cfg)
    result = fit(task)
    ckpt = load_checkpoint(Path(result["out"]) / "checkpoints" / "last.pt")
    _, val = task.build_datasets()
    with_ema, with_raw = task.build_model(), task.build_model()
    with_ema.load_state_dict(ckpt["ema"]["module"])
    with_raw.load_state_dict(ckpt["model"])
    ema_metrics = task.evaluate(with_ema.eval(), loader_of(val, cfg.batch_size))
    raw_metrics = task.evaluate(with_raw.eval(), loader_of(val, cfg.batch_size))
    assert result["metrics"]["psnr"] == pytest.approx(ema_metrics["psnr"], abs=1e-9)
    assert raw_metrics["psnr"] != pytest.approx(ema_metrics["psnr"], abs=1e-6)

    weights = str(Path(result["out"]) / "checkpoints" / "last.pt")
    # eval verb: table + metrics.json with the baseline; architecture keys come from the checkpoint
    eval_cfg = tiny(tmp_path, f"weights={weights}", f"out={tmp_path / 'eval'}", "unet_channels=[16,32]",
                    schema=PanoramaEvalConfig)
    assert VERBS["eval"][0] is PanoramaEvalConfig and VERBS["eval"][1](eval_cfg) == 0
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["metrics"]["psnr"] == pytest.approx(ema_metrics["psnr"], abs=1e-9)
    assert "baseline_psnr_unseen" in record["metrics"]

    # predict from a panorama (renders the views, shows ground truth), then from those four views
    pano = sorted((tmp_path / "synth" / "val").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    pcfg = load_config(PanoramaPredictConfig, None, [f"weights={weights}", f"panorama={pano}", f"out={out}",
                                                     "device=cpu"])
    assert VERBS["predict"][1](pcfg) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["figure.png", "panorama.png", "view_back.png", "view_front.png", "view_left.png",
                     "view_right.png"]
    views = ",".join(str(out / f"view_{n}.png") for n in ("front", "right", "back", "left"))
    out2 = tmp_path / "pred2"
    pcfg = load_config(PanoramaPredictConfig, None, [f"weights={weights}", f"views={views}", f"out={out2}",
                                                     "device=cpu"])
    assert VERBS["predict"][1](pcfg) == 0
    import cv2

    assert cv2.imread(str(out2 / "panorama.png")).shape == (16, 32, 3)

    # a checkpoint written before keep_seen existed loads with the behaviour it was trained with
    from visiontrain.panorama.task import load_trained

    assert load_trained(weights, cfg, torch.device("cpu"))[0].cfg.keep_seen is True
    del ckpt["config"]["keep_seen"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_trained(str(tmp_path / "old.pt"), cfg, torch.device("cpu"))[0].cfg.keep_seen is False


def test_synth_verb_and_cli(tmp_path, capsys) -> None:
    from visiontrain.cli import main

    assert main(["synth", "panorama", f"out={tmp_path / 's'}", "train=2", "val=1", "size=16", "seed=3"]) == 0
    assert len(list((tmp_path / "s" / "train").glob("*.jpg"))) == 2
    assert VERBS["synth"][0] is SynthConfig
    assert main(["predict", "panorama", f"out={tmp_path / 'p'}"]) == 2
    assert "exactly one of views=F,R,B,L" in capsys.readouterr().err
