"""Flow configs are checked when they are built: a bad value fails at load, before data or folders exist."""

from __future__ import annotations

import pytest

from visiontrain.cli import main
from visiontrain.config import ConfigError, load_config
from visiontrain.flow.cli import VERBS
from visiontrain.flow.config import (
    FlowEvalConfig,
    FlowExportConfig,
    FlowPredictConfig,
    FlowSynthConfig,
    FlowTrainConfig,
)
from visiontrain.flow.task import FlowTask


def test_config_keys_and_validation():
    cfg = load_config(FlowTrainConfig, overrides=["crop=128x160", "aug.hflip_prob=0.25", "gamma=0.85",
                                                  "num_flow_updates_eval=24", "model=raft_large"])
    assert (cfg.crop, cfg.aug.hflip_prob, cfg.gamma, cfg.num_flow_updates_eval) == ("128x160", 0.25, 0.85, 24)
    assert cfg.crop_hw == (128, 160) and FlowTask(cfg).crop == (128, 160)
    with pytest.raises(ConfigError, match="hflip_prob"):
        load_config(FlowTrainConfig, overrides=["hflip_prob=0.3"])
    for bad, match in (("crop=100x160", "multiples of 8"), ("crop=12", "HxW"), ("method=selfish", "method"),
                       ("model=raft_tiny", "raft_small"), ("gamma=1.5", "gamma")):
        with pytest.raises(ConfigError, match=match):
            load_config(FlowTrainConfig, overrides=[bad])  # at load: no task needed to find it
    cfg = load_config(FlowTrainConfig, overrides=["method=unsupervised"])  # RAFT fine-tuned without ground truth
    assert cfg.model == "raft_small" and cfg.lr == pytest.approx(1e-4)
    assert set(VERBS) == {"train", "eval", "predict", "synth", "export"}


def test_unsupervised_config_errors():
    assert FlowTrainConfig(method="unsupervised", model="raft_small_convex", unsup_crop="96x128").unsup_crop_hw == (96, 128)
    for bad, match in ((dict(model="pwc", unsup_crop="96x100"), "multiples of 32"), (dict(mask_floor=1.0), "mask_floor"),
                       (dict(mask_guard_steps=-1), "mask_guard_steps"), (dict(mask_guard_share=-0.1), "mask_guard_share")):
        with pytest.raises(ConfigError, match=match):
            FlowTrainConfig(method="unsupervised", **bad)
    with pytest.raises(ConfigError, match="method=unsupervised"):
        FlowTrainConfig(method="supervised", model="pwc")
    with pytest.raises(ConfigError, match="occlusion"):
        FlowTrainConfig(method="unsupervised", model="pwc", occlusion="bogus")
    with pytest.raises(ConfigError, match="unsup_size"):
        FlowTrainConfig(method="unsupervised", model="pwc", unsup_size="100x100")


@pytest.mark.parametrize("bad, match", [
    ("pwc_width=0", r"pwc_width=0\.0 must be in \(0, 4\]"),
    ("max_flow=0", "max_flow"),
    ("num_flow_updates_train=0", "num_flow_updates_train=0 must be >= 1"),
    ("aug.scale_prob=2", r"aug.scale_prob=2.0 must be in \[0, 1\]"),
    ("aug.min_scale=1", "aug.min_scale=1.0 is above aug.max_scale"),
    ("census_weight=-1", "census_weight"),
    ("synth_size=8x8", "synth_size=8x8: height and width must be >= 32"),
    ("selfsup_start_step=-2", "selfsup_start_step"),
    ("data=chairz:/data", "dataset spec 'chairz:/data' is not KIND:PATH"),
    ("data=frames:/data", "frames: pairs have no ground-truth flow; method=supervised trains on ground truth"),
    ("val_data=video:a.mp4", "val_data=video:a.mp4: video: pairs have no ground-truth flow"),
])
def test_bad_values_fail_when_the_train_config_is_built(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(FlowTrainConfig, overrides=[bad])


def test_unsupervised_accepts_unlabeled_data_and_needs_a_photometric_term():
    cfg = load_config(FlowTrainConfig, overrides=["method=unsupervised", "model=pwc", "data=frames:/x"])
    assert cfg.data == "frames:/x"
    with pytest.raises(ConfigError, match="census_weight=0 and ssim_weight=0"):
        load_config(FlowTrainConfig, overrides=["method=unsupervised", "model=pwc", "census_weight=0"])


def test_any_crop_that_is_a_multiple_of_8_is_accepted_and_the_error_says_why():
    assert load_config(FlowTrainConfig, overrides=["crop=64x96"]).crop_hw == (64, 96)  # used to be refused (< 128)
    assert load_config(FlowTrainConfig, overrides=["crop=8x8"]).crop_hw == (8, 8)
    assert load_config(FlowTrainConfig, overrides=["crop="]).crop_hw is None
    with pytest.raises(ConfigError, match=r"crop=60x96: height and width must be >= 8 and multiples of 8 \(RAFT "
                                          r"works on 1/8-resolution features; sides below 128 are padded to 128, "
                                          r"the least torchvision's RAFT takes\)"):
        load_config(FlowTrainConfig, overrides=["crop=60x96"])


def test_verb_configs_are_checked_when_built():
    for schema, overrides, match in (
        (FlowEvalConfig, [], "weights= is required"),
        (FlowEvalConfig, ["weights=w.pt", "split=test"], "split='test' is not one of val, train"),
        (FlowEvalConfig, ["weights=w.pt", "model=raft_tiny"], "model='raft_tiny' is not one of"),
        (FlowEvalConfig, ["weights=w.pt", "occlusion=none"], "occlusion='none' is not one of brox, wang"),
        (FlowEvalConfig, ["weights=w.pt", "data=frames:/x"], "no ground-truth flow; eval compares"),
        (FlowEvalConfig, ["weights=w.pt", "num_flow_updates=0"], "num_flow_updates=0 must be >= 1"),
        (FlowPredictConfig, ["weights=w.pt"], "image1= and image2= are required"),
        (FlowExportConfig, [], "weights= is required"),
        (FlowExportConfig, ["weights=w.pt", "format=tflite"], "format='tflite' is not one of onnx"),
        (FlowExportConfig, ["weights=w.pt", "size=100x100"], "multiples of 32"),
        (FlowExportConfig, ["weights=w.pt", "opset=15"], "opset=15 must be >= 16"),
        (FlowSynthConfig, ["train=0", "val=0"], "nothing to write"),
        (FlowSynthConfig, ["size=16x64"], "size=16x64: height and width must be >= 32"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(schema, overrides=overrides)
    assert load_config(FlowExportConfig, overrides=["weights=w.pt", "size=64x96"]).size_hw == (64, 96)


def test_a_bad_value_stops_before_any_data_is_synthesised_or_folder_made(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISIONTRAIN_CACHE", str(tmp_path / "cache"))
    assert main(["train", "flow", f"out={tmp_path / 'run'}", "gamma=2", "max_steps=1"]) == 2
    assert "gamma=2.0 must be in (0, 1]" in capsys.readouterr().err
    assert main(["eval", "flow", f"weights={tmp_path / 'w.pt'}", "split=test", f"out={tmp_path / 'eval'}"]) == 2
    assert "split='test'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


def test_method_dependent_defaults_are_resolved_in_the_config_and_an_explicit_value_wins():
    assert (load_config(FlowTrainConfig).lr, load_config(FlowTrainConfig).warmup_steps) == (4e-4, 0)
    unsup = load_config(FlowTrainConfig, overrides=["method=unsupervised", "model=pwc"])
    assert (unsup.lr, unsup.warmup_steps) == (1e-4, 200)
    explicit = load_config(FlowTrainConfig, overrides=["method=unsupervised", "model=pwc", "lr=4e-4",
                                                       "warmup_steps=0"])
    assert (explicit.lr, explicit.warmup_steps) == (4e-4, 0)
    task = FlowTask(explicit)
    assert (task.cfg.lr, task.cfg.warmup_steps) == (4e-4, 0)  # the task does not change its config
