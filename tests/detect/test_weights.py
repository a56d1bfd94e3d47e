"""Ultralytics weight import: forward parity with the Ultralytics model, restricted unpickling, nc change,
backbone-only loading, prefixes, engine checkpoints and error messages."""

from __future__ import annotations

import math
import os
import pickle
import warnings

import pytest
import torch

from visiontrain.detect.inference import load_ultralytics
from visiontrain.detect.model import YOLOv8, ours_key_to_ultralytics, ultralytics_key_to_ours
from visiontrain.detect.unpickle import UnsafePickleError
from visiontrain.detect.weights import (
    ClassBranchResetWarning,
    WeightsMismatchError,
    infer_architecture,
    save_state_dict,
)
from visiontrain.engine.checkpoint import CheckpointError


def _state_equal(model: YOLOv8, reference: dict[str, torch.Tensor], prefix: str = "") -> None:
    own = model.state_dict()
    for k, v in reference.items():
        if k.startswith(prefix):
            torch.testing.assert_close(own[k], v.to(own[k].dtype), rtol=0, atol=0, msg=k)


# --- forward parity with Ultralytics ----------------------------------------------------------------


@pytest.mark.parametrize("size", [(640, 640), (320, 480)])
@pytest.mark.parametrize("fixture", ["yolov8n_checkpoint", "yolov8s_checkpoint"])
def test_eval_output_matches_ultralytics(fixture, size, request, ultra):
    path = request.getfixturevalue(fixture)
    oracle = ultra.oracle(path)
    ours = load_ultralytics(path).eval()
    assert (ours.scale, ours.nc, ours.reg_max) == (fixture[6], 20, 16)
    assert ours.names == [f"class{i}" for i in range(20)]
    batch = 1 if size == (640, 640) else 2
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = oracle(x)[0]
        got = ours(x)
    assert (
        got.shape == expected.shape == (batch, 24, sum((size[0] // s) * (size[1] // s) for s in (8, 16, 32)))
    )
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected[:, 4:].max() > 0.01  # the comparison is not between two all-zero score maps


def test_trainer_style_checkpoint_uses_ema(tmp_path, ultra):
    """``last.pt`` layout: model=None, the weights under ``ema``, optimizer state, numpy metrics, a Path."""
    um = ultra.build("yolov8n.yaml", nc=3, seed=5)
    path = ultra.save(um, tmp_path / "last.pt", trainer_style=True)
    ours = load_ultralytics(path).eval()
    reference = {ultralytics_key_to_ours(k): v.half() for k, v in um.state_dict().items()}
    _state_equal(ours, reference)
    assert ours.nc == 3


# --- restricted unpickler ----------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsShell(marker), "ema": None}, path)
    with pytest.raises(UnsafePickleError) as info:
        load_ultralytics(path)
    msg = str(info.value)
    assert "system" in msg and str(path) in msg and "refused" in msg
    assert not marker.exists()


def test_malicious_plain_pickle_and_eval_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _RunsShell(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="system"):
        load_ultralytics(path)
    assert not marker.exists()
    path2 = tmp_path / "eval.pt"
    torch.save(_CallsEval(), path2)
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        load_ultralytics(path2)


# --- nc change, backbone only, prefixes, engine checkpoints ---------------------------------------------


def test_nc_change_reinitialises_class_branch(yolov8n_checkpoint, ultra):
    um = ultra.oracle(yolov8n_checkpoint)
    reference = {ultralytics_key_to_ours(k): v for k, v in um.state_dict().items()}
    with pytest.warns(ClassBranchResetWarning, match=r"nc=20.*nc=5"):
        ours = load_ultralytics(yolov8n_checkpoint, nc=5)
    assert ours.nc == 5
    kept = {k: v for k, v in reference.items() if not k.startswith("head.cv3.")}
    _state_equal(ours, kept)
    # intermediate class convs have the same shape (64 ch for nc<=64) and are kept; the final 1x1 is new
    _state_equal(ours, {k: v for k, v in reference.items() if k.startswith("head.cv3.0.0.")})
    for i, s in enumerate((8, 16, 32)):
        assert ours.head.cv3[i][2].weight.shape[0] == 5
        torch.testing.assert_close(
            ours.head.cv3[i][2].bias, torch.full((5,), math.log(5 / 5 / (640 / s) ** 2)), rtol=0, atol=1e-6
        )
    with torch.no_grad():
        assert ours.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 9, 84)


def test_nc_change_with_different_class_width(tmp_path):
    """nc=80 -> 20 on yolov8n also changes the class-branch width (80 -> 64 channels): those are re-initialised."""
    src = YOLOv8("n", nc=80)
    path = tmp_path / "u80.pt"
    save_state_dict(src, path, ultralytics_keys=True)
    with pytest.warns(ClassBranchResetWarning, match=r"nc=80.*nc=20"):
        ours = load_ultralytics(path, nc=20)
    assert ours.head.cv3[0][0].conv.weight.shape[0] == 64
    _state_equal(ours, {k: v for k, v in src.state_dict().items() if not k.startswith("head.cv3.")})


def test_backbone_only_loads_just_the_backbone(yolov8s_checkpoint, ultra):
    um = ultra.oracle(yolov8s_checkpoint)
    reference = {ultralytics_key_to_ours(k): v for k, v in um.state_dict().items()}
    fresh = YOLOv8("s", nc=7)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no class-branch warning: the head is not loaded at all
        ours = load_ultralytics(yolov8s_checkpoint, backbone_only=True, model=fresh)
    assert ours is fresh and ours.nc == 7
    _state_equal(ours, reference, prefix="backbone.")
    _state_equal(ours, {k: v for k, v in before.items() if not k.startswith("backbone.")})
    assert not torch.equal(
        before["backbone.stem.conv.weight"], ours.state_dict()["backbone.stem.conv.weight"]
    )


@pytest.mark.parametrize("ultralytics_keys", [False, True])
def test_module_prefixed_state_dict(tmp_path, ultralytics_keys):
    src = YOLOv8("n", nc=4)
    sd = src.state_dict()
    if ultralytics_keys:
        sd = {ours_key_to_ultralytics(k): v for k, v in sd.items()}
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "sd.pt")
    ours = load_ultralytics(tmp_path / "sd.pt")
    _state_equal(ours, src.state_dict())


def test_engine_checkpoint(tmp_path):
    src = YOLOv8("n", nc=4)
    ema = YOLOv8("n", nc=4)
    ckpt = {
        "format_version": 1,
        "task": "detect",
        "model": src.state_dict(),
        "ema": {"module": ema.state_dict()},
    }
    torch.save(ckpt, tmp_path / "last.pt")
    _state_equal(load_ultralytics(tmp_path / "last.pt"), ema.state_dict())  # EMA weights preferred
    torch.save({**ckpt, "ema": None}, tmp_path / "noema.pt")
    _state_equal(load_ultralytics(tmp_path / "noema.pt"), src.state_dict())
    torch.save({**ckpt, "task": "flow"}, tmp_path / "flow.pt")
    with pytest.raises(CheckpointError, match="flow.pt is a flow checkpoint .from `visiontrain train flow`.; detect needs"):
        load_ultralytics(tmp_path / "flow.pt")


# --- errors -----------------------------------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable PyTorch checkpoint"):
        load_ultralytics(tmp_path / "notes.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_ultralytics(tmp_path / "missing.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match=r"not a detection checkpoint .*'epoch'"):
        load_ultralytics(tmp_path / "dict.pt")


@pytest.mark.parametrize(
    "cfg, message",
    [
        ("yolov8n-seg.yaml", "SegmentationModel"),
        ("yolov8n-cls.yaml", "ClassificationModel"),
        ("yolo11n.yaml", "layer 2 is C3k2"),
    ],
)
def test_non_yolov8_detection_checkpoint(tmp_path, cfg, message, ultra):
    path = ultra.save(ultra.build(cfg, nc=3), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=message):
        load_ultralytics(path)


def test_mismatches_are_reported_by_name(tmp_path, yolov8s_checkpoint):
    with pytest.raises(WeightsMismatchError, match="checkpoint is YOLOv8s, the model is YOLOv8n"):
        load_ultralytics(yolov8s_checkpoint, model=YOLOv8("n", nc=20))
    sd = YOLOv8("n", nc=4).state_dict()
    del sd["neck.bottomup_p5.cv2.bn.running_var"]
    sd["head.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(WeightsMismatchError) as info:
        load_ultralytics(tmp_path / "bad.pt")
    assert "missing keys: neck.bottomup_p5.cv2.bn.running_var" in str(info.value)
    assert "unexpected keys: head.extra.weight" in str(info.value)
    sd = YOLOv8("n", nc=4).state_dict()
    sd["neck.topdown_p3.cv1.conv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(
        WeightsMismatchError, match=r"shape-mismatched keys .*: neck\.topdown_p3\.cv1\.conv\.weight \(3, 3, 1, 1\)"
    ):
        load_ultralytics(tmp_path / "shape.pt")


def test_infer_architecture_all_scales():
    for scale in "nsmlx":
        with torch.device("meta"):
            sd = YOLOv8(scale, nc=11).state_dict()
        arch = infer_architecture(sd)
        assert (arch.scale, arch.nc, arch.reg_max) == (scale, 11, 16)
    with pytest.raises(CheckpointError, match="missing backbone.stem.conv.weight"):
        infer_architecture({"foo.weight": torch.zeros(1)}, "x.pt")
