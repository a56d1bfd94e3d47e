"""Config errors a user makes, and the CLI's help."""

from __future__ import annotations

import pytest
from toy_task import ToyConfig

from visiontrain.cli import main
from visiontrain.config import ConfigError, config_help, load_config, save_config


def test_overrides_yaml_and_nested_keys(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 7\nema:\n  decay: 0.5\nfreeze: [backbone]\n")
    cfg = load_config(ToyConfig, y, ["lr=0.1", "ema.enabled=true"])
    assert (cfg.epochs, cfg.ema.decay, cfg.ema.enabled, cfg.lr, cfg.freeze) == (7, 0.5, True, 0.1, ["backbone"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(ToyConfig, tmp_path / "saved.yaml").ema.decay == 0.5


@pytest.mark.parametrize("override, message", [
    ("epochz=3", "unknown key 'epochz'. Did you mean 'epochs'"),
    ("decay=0.9", "unknown key 'decay'. Did you mean 'ema.decay'"),
    ("ema.decy=0.9", "Did you mean 'ema.decay'"),
    ("epochs=three", "bad value for 'epochs'"),
    ("epochs", "not of the form key=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(ToyConfig, None, [override])


def test_string_keys_keep_the_text_as_written(tmp_path):
    """amp=off must stay 'off' (YAML 1.1 reads off/on/yes/no as booleans); numbers-looking text stays text."""
    cfg = load_config(ToyConfig, None, ["amp=off", "out=0012", "nan_policy=skip"])
    assert (cfg.amp, cfg.out, cfg.nan_policy) == ("off", "0012", "skip")
    assert load_config(ToyConfig, None, ["amp=bf16"]).amp == "bf16"
    y = tmp_path / "c.yaml"
    y.write_text("amp: off\n")
    with pytest.raises(ConfigError, match=r"'amp' takes text.*quote it"):
        load_config(ToyConfig, y)
    y.write_text('amp: "off"\n')
    assert load_config(ToyConfig, y).amp == "off"


def test_bad_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 3\nbatch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'batch_sise'. Did you mean 'batch_size'"):
        load_config(ToyConfig, y)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ToyConfig, tmp_path / "nope.yaml")


def test_help_lists_every_key_with_default_and_doc():
    text = config_help(ToyConfig)
    for key in ("epochs", "ema.decay", "nan_policy", "freeze", "noise"):
        assert f"  {key} " in text
    assert "per-sample augmentation noise" in text and "0.9999" in text


def test_cli_errors_exit_2_with_message(capsys):
    assert main(["train", "detekt"]) == 2
    assert "unknown task 'detekt'. Did you mean 'detect'" in capsys.readouterr().err
    assert main(["--help"]) == 0
