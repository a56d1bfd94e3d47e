"""Settings are checked when a config is built: a bad value fails at load, before data is synthesised or read
and before an output or run folder exists; nested keys are named as the user writes them (``synth.imgsz``)."""

from __future__ import annotations

import pytest

from visiontrain.cli import main


@pytest.mark.parametrize("argv, message", [
    (["train", "detect", "imgsz=100"], "imgsz=100 must be a positive multiple of 32 (e.g. 96)"),
    (["train", "detect", "model=yolov9n"], "model='yolov9n': expected yolov8n"),
    (["train", "detect", "conf=1.5"], "conf=1.5 must be between 0 and 1"),
    (["train", "detect", "aug.mosaic=2"], "aug.mosaic=2.0 must be between 0 and 1"),
    (["train", "detect", "synth.imgsz=32"], "synth.imgsz=32 must be >= 64"),
    (["train", "detect", "distill.tau=0"], "distill.tau=0.0 must be > 0"),
    (["train", "detect", "backbone_only=true"], "backbone_only=true loads the backbone of weights=FILE"),
    (["eval", "detect", "weights=w.pt", "data=d", "imgsz=33"], "imgsz=33 must be a positive multiple of 32"),
    (["eval", "detect", "weights=w.pt", "data=d", "iou=-1"], "iou=-1.0 must be between 0 and 1"),
    (["predict", "detect", "weights=w.pt", "source=s", "max_det=0"], "max_det=0 must be >= 1"),
    (["export", "detect", "weights=w.pt", "format=tflite"], "format='tflite' is not one of onnx"),
    (["synth", "detect", "train=0"], "train=0 must be >= 1"),
    (["split", "detect", "data=d", "out=o", "base=A1", "shots=0"], "shots=0"),
])
def test_bad_values_fail_at_load(tmp_path, capsys, argv, message):
    synth_out = tmp_path / "synth"
    extra = [f"synth.out={synth_out}", f"out={tmp_path / 'run'}"] if argv[0] == "train" else []
    extra += [f"out={tmp_path / 'syn'}"] if argv[0] == "synth" else []
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not synth_out.exists() and not (tmp_path / "run").exists() and not (tmp_path / "syn").exists()
