"""The one loading path for trained flow models (visiontrain.flow.inference), used by eval, predict, export
and ``weights=`` of training, and the padded PWC inference."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.optical_flow import raft_large

from visiontrain.cli import main
from visiontrain.config import ConfigError
from visiontrain.engine.checkpoint import CheckpointError
from visiontrain.flow.config import FlowTrainConfig
from visiontrain.flow.inference import (
    NEEDS,
    build_flow_model,
    load_flow_model,
    load_flow_weights,
    predict_flow,
    pwc_forward_padded,
    read_flow_weights,
)
from visiontrain.flow.models.pwc import PWCFlow
from visiontrain.flow.models.raft import build_raft
from visiontrain.flow.synthetic import write_synthetic_chairs
from visiontrain.flow.task import FlowTask


def test_weights_torchvision_ours_and_mismatch(tmp_path, tv_weights):
    model = build_raft("raft_small")
    load_flow_weights(model, "raft_small", tv_weights)
    ref = torch.load(tv_weights, weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    # a DDP-prefixed dict loads too
    torch.save({"module." + k: v for k, v in ref.items()}, tmp_path / "ddp.pth")
    load_flow_weights(build_raft("raft_small"), "raft_small", tmp_path / "ddp.pth")
    # a raft_large file into raft_small names the file and the model it holds; inference picks raft_large
    torch.save(raft_large().state_dict(), tmp_path / "large.pth")
    with pytest.raises(CheckpointError, match=r"large\.pth holds a raft_large model .* not the raft_small model "
                                              r"asked for: set model=raft_large"):
        load_flow_weights(build_raft("raft_small"), "raft_small", tmp_path / "large.pth")
    assert load_flow_model(tmp_path / "large.pth").name == "raft_large"
    assert load_flow_model(tv_weights).name == "raft_small"
    # a file that fits no variant: the keys are named
    torch.save({k: v for k, v in ref.items() if not k.startswith("update_block.")}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"cut\.pth does not fit this model: \d+ missing keys: update_block"):
        load_flow_weights(build_raft("raft_small"), "raft_small", tmp_path / "cut.pth")
    with pytest.raises(ConfigError, match="weights= is required"):
        read_flow_weights("")


def test_a_state_dict_of_no_flow_model_is_named(tmp_path):
    torch.save({"backbone.conv.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: its 1 tensors \(backbone.conv.weight, \.\.\.\) fit none "
                                              r"of raft_small, raft_large, raft_small_convex, pwc; flow needs"):
        load_flow_model(tmp_path / "other.pt")


def test_our_checkpoint_loads_its_ema_weights_and_its_model_name(tmp_path):
    torch.manual_seed(0)
    model, ema = build_flow_model("pwc", 0.25), build_flow_model("pwc", 0.25)
    for p in ema.parameters():
        p.data.add_(1.0)
    cfg = {"model": "pwc", "pwc_width": 0.25, "method": "unsupervised"}
    torch.save({"format_version": 1, "task": "flow", "config": cfg, "model": model.state_dict(),
                "ema": {"module": ema.state_dict(), "updates": 5}}, tmp_path / "best.pt")
    loaded = load_flow_model(tmp_path / "best.pt")
    assert loaded.name == "pwc" and loaded.config["pwc_width"] == 0.25 and not loaded.model.training
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, ema.state_dict()[k])  # EMA preferred
    # a training run's weights= goes through the same reader (EMA too)
    fresh = FlowTask(FlowTrainConfig(method="unsupervised", model="pwc", pwc_width=0.25)).build_model()
    FlowTask(FlowTrainConfig(method="unsupervised", model="pwc", pwc_width=0.25)).load_weights(fresh, str(tmp_path / "best.pt"))
    torch.testing.assert_close(fresh.state_dict(), ema.state_dict())
    with pytest.raises(CheckpointError, match=r"holds a pwc model with pwc_width=0.25 .* set model=pwc pwc_width=0.25"):
        FlowTask(FlowTrainConfig(method="unsupervised", model="pwc")).load_weights(
            build_flow_model("pwc", 1.0), str(tmp_path / "best.pt"))


def test_pwc_width_is_configurable_saved_and_inferred(tmp_path):
    """pwc_width builds a narrower PWC; a plain state dict of it is recognised by its shapes (not mistaken for
    RAFT), and a bad width is a config error."""
    from visiontrain.config import load_config

    task = FlowTask(load_config(FlowTrainConfig, overrides=["method=unsupervised", "model=pwc", "pwc_width=0.5"]))
    model = task.build_model()
    assert model.decoders[0].layers[0][0].out_channels == 64
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    loaded = load_flow_model(tmp_path / "plain.pt")
    assert loaded.name == "pwc" and loaded.model.decoders[0].layers[0][0].out_channels == 64
    loaded = load_flow_model(tmp_path / "plain.pt", "pwc")
    assert loaded.model.decoders[0].layers[0][0].out_channels == 64
    with pytest.raises(ConfigError, match="pwc_width"):
        load_config(FlowTrainConfig, overrides=["method=unsupervised", "model=pwc", "pwc_width=0"])


def test_pwc_forward_padded_crops_back():
    class Echo(torch.nn.Module):
        """Returns the padded first image's first two channels as 'flow', to check padding and crop."""

        def forward(self, a, b, backward=True):
            assert a.shape[-2] % 32 == 0 and a.shape[-1] % 32 == 0 and min(a.shape[-2:]) >= 64
            assert not backward
            return {"flow_fw": a[:, :2]}

    image = torch.rand(1, 3, 40, 70)
    flow = pwc_forward_padded(Echo(), image, image)
    torch.testing.assert_close(flow, image[:, :2])


def test_predict_flow_runs_both_families_on_any_size():
    torch.manual_seed(0)
    image1, image2 = torch.rand(1, 3, 40, 70), torch.rand(1, 3, 40, 70)
    with torch.no_grad():
        for model in (PWCFlow(channel_multiplier=0.25).eval(), build_raft("raft_small").eval()):
            flow = predict_flow(model, image1, image2, num_flow_updates=1)
            assert flow.shape == (1, 2, 40, 70) and torch.isfinite(flow).all()


def test_one_clear_message_for_another_tasks_checkpoint_in_every_verb(tmp_path, capsys):
    chairs = write_synthetic_chairs(tmp_path / "chairs", 2, 1, (32, 48), 0)
    image = chairs / "data/00001_img1.ppm"
    for task in ("detect", "panorama"):
        path = tmp_path / f"{task}.pt"
        torch.save({"format_version": 1, "task": task, "model": {}, "config": {}}, path)
        expected = f"{path} is a {task} checkpoint (from `visiontrain train {task}`); flow needs {NEEDS}"
        for argv in (
            ["eval", "flow", f"weights={path}", f"data=chairs:{chairs}", f"out={tmp_path / 'eval'}", "device=cpu"],
            ["predict", "flow", f"weights={path}", f"image1={image}", f"image2={image}", f"out={tmp_path / 'p'}",
             "device=cpu"],
            ["export", "flow", f"weights={path}", f"out={tmp_path / 'x.onnx'}"],
            ["train", "flow", f"weights={path}", f"data=chairs:{chairs}", "crop=", "max_steps=1", "device=cpu",
             f"out={tmp_path / 'run'}", "tensorboard=false", "plots=false", "progress=false"],
        ):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert expected in err, (argv, err)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "p").exists()  # nothing written


def _mirror(flow: torch.Tensor) -> torch.Tensor:
    """The flow of the mirrored pair: columns reversed and the horizontal component negated."""
    flow = flow.flip(-1)
    return torch.cat([-flow[:, :1], flow[:, 1:]], dim=1)


def test_hflip_tta_averages_the_direct_and_mirrored_estimates_for_both_families():
    torch.manual_seed(0)
    image1, image2 = torch.rand(1, 3, 40, 70), torch.rand(1, 3, 40, 70)
    with torch.no_grad():
        for model in (PWCFlow(channel_multiplier=0.25).eval(), build_raft("raft_small").eval()):
            for p in model.parameters():  # PWC starts by predicting zero flow everywhere
                p.add_(0.05 * torch.randn_like(p))
            direct = predict_flow(model, image1, image2, 2)
            on_mirror = predict_flow(model, image1.flip(-1), image2.flip(-1), 2)
            averaged = predict_flow(model, image1, image2, 2, tta="hflip")
            torch.testing.assert_close(averaged, 0.5 * (direct + _mirror(on_mirror)))
            # a random network is not mirror-symmetric, so the average is a different estimate...
            assert (averaged - direct).abs().max() > 1e-3
            # ...and it is: the averaged flow of the mirrored pair is the mirrored averaged flow
            torch.testing.assert_close(predict_flow(model, image1.flip(-1), image2.flip(-1), 2, tta="hflip"),
                                       _mirror(averaged), atol=1e-5, rtol=1e-5)


def test_hflip_tta_of_a_perfect_model_keeps_its_flow():
    """A model that returns the true flow of a horizontal shift keeps it under flip averaging: the
    mirrored pair's flow is the negated shift, so a wrong sign would return zero."""

    class Shift(torch.nn.Module):  # "estimates" the shift of image2 against image1 by brute force
        def forward(self, a, b, backward=False):
            errors = [((torch.roll(a, s, dims=-1) - b)[..., 8:-8].abs().mean(), s) for s in range(-5, 6)]
            shift = float(min(errors)[1])
            flow = torch.zeros(a.shape[0], 2, *a.shape[-2:])
            flow[:, 0] = shift
            return {"flow_fw": flow}

    model = PWCFlow(channel_multiplier=0.25)
    model.forward = Shift().forward  # PWC's padded path, with the brute-force estimate
    image1 = torch.rand(1, 3, 64, 64)
    image2 = torch.roll(image1, 3, dims=-1)
    flow = predict_flow(model, image1, image2, tta="hflip")
    torch.testing.assert_close(flow[:, 0], torch.full((1, 64, 64), 3.0))
    torch.testing.assert_close(flow[:, 1], torch.zeros(1, 64, 64))


def test_unknown_tta_is_refused():
    with pytest.raises(ConfigError, match="tta='vflip': choose none or hflip"):
        predict_flow(build_raft("raft_small"), torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), 1, tta="vflip")
