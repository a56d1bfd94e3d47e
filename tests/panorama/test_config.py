"""Config values are checked when a config is loaded: a bad one fails, naming the key and the fix, before
anything is synthesised or written."""

from __future__ import annotations

import pytest

from visiontrain.cli import main
from visiontrain.config import ConfigError, load_config
from visiontrain.panorama.config import (
    PanoramaEvalConfig,
    PanoramaPredictConfig,
    PanoramaSynthConfig,
    PanoramaTrainConfig,
)

TRAIN_ERRORS = [
    ("temperature=-0.5", "temperature=-0.5: must be >= 0"),
    ("pano_size=12", "pano_size=12: pano_size and view_size must be multiples of 8 .* e.g. pano_size=16"),
    ("view_size=30", "view_size=30: .*multiples of 8"),
    ("prediction=sampel", "prediction='sampel' is not one of sample, velocity. Did you mean 'sample'"),
    ("backprojection=false", "needs backprojection=True"),
    ("unet_channels=[8,10]", r"unet_channels=\[8, 10\]: every width must be divisible by norm_groups=4 \(GroupNorm\); \[10\] are not"),
    ("encoder_channels=[8,8]", "give 3 widths"),
    ("pano_size=8", "must be divisible by 16 for a 5-level UNet"),
    ("sample_steps=0", "sample_steps=0: must be >= 1"),
    ("t_pow_shift=0", "t_pow_shift=0: must be > 0"),
    ("t_min=0", "t_min=0: must be > 0"),
    ("logit_std=0", "logit_std=0: must be > 0"),
    ("focal=0", "focal=0: must be > 0"),
    ("xi=-0.1", "xi=-0.1: must be >= 0"),
    ("jitter_xi=1.2", r"jitter_xi=1.2: a relative jitter in \[0, 1\)"),
    ("val_fraction=1.5", r"val_fraction=1.5: must be in \[0, 1\)"),
    ("synth_size=33", "synth_size=33: the panorama height must be even and >= 8"),
    ("synth_val=0", "synth_val=0: must be >= 1"),
    ("lpips_weights=/nonexistent/alexnet.pth", "lpips_weights=/nonexistent/alexnet.pth: no such file.*Nothing is "
                                               "downloaded"),
    ("data=/nonexistent/panoramas", "data=/nonexistent/panoramas: no such folder"),
]


@pytest.mark.parametrize(("override", "message"), TRAIN_ERRORS)
def test_bad_training_values_fail_at_load(override, message, tmp_path) -> None:
    extra = ["unet_channels=[8,8,8,8,16]"] if override == "pano_size=8" else []
    with pytest.raises(ConfigError, match=message):
        load_config(PanoramaTrainConfig, None, [f"synth_dir={tmp_path / 'synth'}", "pano_size=16", "view_size=32",
                                                "encoder_channels=[8,8,8]", "unet_channels=[8,16]", "norm_groups=4",
                                                *extra, override])
    assert not (tmp_path / "synth").exists()


def test_a_bad_model_size_fails_before_the_synthetic_set_is_written(tmp_path, capsys) -> None:
    synth, out = tmp_path / "synth", tmp_path / "run"
    assert main(["train", "panorama", f"synth_dir={synth}", f"out={out}", "synth_train=2", "synth_val=1",
                 "synth_size=16", "pano_size=12", "device=cpu"]) == 2
    assert "pano_size=12" in capsys.readouterr().err
    assert not synth.exists() and not out.exists()


def test_the_default_training_config_is_valid() -> None:
    cfg = load_config(PanoramaTrainConfig)
    assert (cfg.prediction, cfg.temperature, cfg.pano_size) == ("sample", 1.0, 64)


def test_eval_and_predict_settings(tmp_path) -> None:
    views = ["views=a.png,b.png,c.png,d.png"]
    # empty = the checkpoint's; the old spellings of that (predict's former defaults 0) still work
    cfg = load_config(PanoramaPredictConfig, None, ["weights=w.pt", *views, "sample_steps=0", "focal=0"])
    assert (cfg.sample_steps, cfg.temperature, cfg.t_pow_shift, cfg.xi, cfg.focal) == (None,) * 5
    assert cfg.view_paths() == ["a.png", "b.png", "c.png", "d.png"]
    cfg = load_config(PanoramaPredictConfig, None, ["weights=w.pt", *views, "xi=0", "temperature=0"])
    assert (cfg.xi, cfg.temperature) == (0.0, 0.0)  # a pinhole camera, the deterministic sampler
    for override, message in (("temperature=-1", "temperature=-1: must be >= 0"),
                              ("t_pow_shift=-2", "t_pow_shift=-2: must be > 0"),
                              ("xi=-1", "xi=-1: must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(PanoramaPredictConfig, None, ["weights=w.pt", *views, override])
    with pytest.raises(ConfigError, match="exactly one of views=F,R,B,L"):
        load_config(PanoramaPredictConfig, None, ["weights=w.pt", *views, "panorama=p.jpg"])
    with pytest.raises(ConfigError, match="views=a.png,b.png: give four images"):
        load_config(PanoramaPredictConfig, None, ["weights=w.pt", "views=a.png,b.png"])
    with pytest.raises(ConfigError, match="weights= is required"):
        load_config(PanoramaPredictConfig, None, views)
    with pytest.raises(ConfigError, match="weights= is required"):
        load_config(PanoramaEvalConfig, None, [])
    for override, message in (("batch_size=0", "batch_size=0: must be >= 1"),
                              ("synth_size=7", "synth_size=7: the panorama height must be even"),
                              (f"fid_weights={tmp_path / 'inception.pth'}", "fid_weights=.*: no such file"),
                              (f"data={tmp_path / 'missing'}", "no such folder")):
        with pytest.raises(ConfigError, match=message):
            load_config(PanoramaEvalConfig, None, ["weights=w.pt", override])


def test_synth_settings() -> None:
    with pytest.raises(ConfigError, match="size=7: the panorama height must be even and >= 8"):
        load_config(PanoramaSynthConfig, None, ["size=7"])
    with pytest.raises(ConfigError, match="train=-1: must be >= 0"):
        load_config(PanoramaSynthConfig, None, ["train=-1"])
    assert load_config(PanoramaSynthConfig, None, ["val=0"]).val == 0
