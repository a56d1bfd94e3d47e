"""The one loading path (EMA weights, architecture from the saved config, legacy fallbacks) and the sampler."""

from __future__ import annotations

import pytest
import torch

from visiontrain.engine.checkpoint import CheckpointError, load_checkpoint
from visiontrain.panorama.inference import Sampler, evaluation_generator, load_trained, saved_model_config


def test_load_trained_builds_the_saved_architecture_with_ema_weights(tiny_run) -> None:
    trained = load_trained(tiny_run.weights)
    ckpt = load_checkpoint(tiny_run.weights)
    m = trained.model.cfg
    assert (m.pano_size, m.view_size, m.unet_channels, m.keep_seen) == (16, 32, [8, 16], True)
    assert not trained.model.training
    state = trained.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["ema"]["module"].items())
    assert not all(torch.equal(state[k], v) for k, v in ckpt["model"].items())
    # sampler and camera: given values win, else the checkpoint's, else today's default
    assert trained.sampler() == Sampler(steps=2, t_pow_shift=2.0, temperature=1.0)
    assert trained.sampler(steps=5, temperature=0.0) == Sampler(5, 2.0, 0.0)
    camera = trained.camera()
    assert (camera.xi, camera.focal, camera.view_size) == (0.8, 220.0, 32)
    assert trained.camera(xi=0.9).xi == 0.9
    assert trained.setting("logit_mean") == 1.0


def test_checkpoints_saved_before_a_key_existed_keep_their_behaviour(tiny_run, tmp_path) -> None:
    ckpt = load_checkpoint(tiny_run.weights)
    del ckpt["config"]["keep_seen"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_trained(tmp_path / "old.pt").model.cfg.keep_seen is False
    saved = {k: v for k, v in ckpt["config"].items() if k != "prediction"}
    assert saved_model_config(saved).prediction == "velocity"
    assert saved_model_config({}).prediction == "sample"  # no saved config: today's defaults


def test_a_bare_state_dict_loads_with_the_default_architecture(tiny_run, tmp_path) -> None:
    from visiontrain.panorama.config import PanoramaTrainConfig, model_config
    from visiontrain.panorama.model import PanoramaFlowModel

    torch.manual_seed(0)
    default = PanoramaFlowModel(model_config(PanoramaTrainConfig()))
    torch.save(default.state_dict(), tmp_path / "state.pt")
    trained = load_trained(tmp_path / "state.pt")
    assert trained.config == {} and trained.model.cfg.pano_size == 64
    assert torch.equal(trained.model.unet.conv_in.weight, default.unet.conv_in.weight)
    # the tiny model's weights do not fit the default architecture: named keys, the file named
    torch.save(load_checkpoint(tiny_run.weights)["model"], tmp_path / "tiny_state.pt")
    with pytest.raises(CheckpointError, match=r"tiny_state\.pt does not fit this model: .*shape-mismatched"):
        load_trained(tmp_path / "tiny_state.pt")


def test_sampler_is_deterministic_per_seed_and_skips_nothing(tiny_run) -> None:
    trained = load_trained(tiny_run.weights)
    views = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    cams = torch.from_numpy(trained.camera().fixed()).float()[None].expand(2, 4, 5)
    sampler = trained.sampler()
    a = sampler.generate(trained.model, views, cams, evaluation_generator(3, 0))
    b = sampler.generate(trained.model, views, cams, evaluation_generator(3, 0))
    c = sampler.generate(trained.model, views, cams, evaluation_generator(4, 0))
    assert a.shape == (2, 3, 16, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_initial_training_weights_come_through_the_same_path(tiny_run) -> None:
    from visiontrain.panorama.task import PanoramaTask

    task = PanoramaTask(tiny_run.cfg)
    model = task.build_model()
    task.load_weights(model, str(tiny_run.weights))
    ema = load_checkpoint(tiny_run.weights)["ema"]["module"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
