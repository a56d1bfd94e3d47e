"""YOLOv8 model: sizes per scale, key mapping onto Ultralytics, training/eval outputs, decoding, fusion."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from visiontrain.detect.blocks import DFL, fuse_conv_bn
from visiontrain.detect.model import (
    KeyMappingError,
    ScaleError,
    YOLOv8,
    flatten_raw,
    ours_key_to_ultralytics,
    ultralytics_key_to_ours,
)

#: parameter counts of the nc=80 models, from the comments of Ultralytics' yolov8.yaml
ULTRALYTICS_PARAMS = {"n": 3157200, "s": 11166560, "m": 25902640, "l": 43691520, "x": 68229648}


@pytest.mark.parametrize("scale", list(ULTRALYTICS_PARAMS))
def test_parameter_count_matches_ultralytics_summary(scale):
    with torch.device("meta"):
        model = YOLOv8(scale, nc=80)
    assert sum(p.numel() for p in model.parameters()) == ULTRALYTICS_PARAMS[scale]
    assert model.scale == scale and model.nc == 80 and model.reg_max == 16
    assert model.head.strides == (8.0, 16.0, 32.0)


@pytest.mark.parametrize("scale", ["n", pytest.param("m", marks=pytest.mark.slow)])
def test_state_dict_maps_key_by_key_onto_ultralytics(scale, ultra):
    um = ultra.build(f"yolov8{scale}.yaml", nc=20)
    theirs = um.state_dict()
    ours = YOLOv8(scale, nc=20).state_dict()
    mapped = {ultralytics_key_to_ours(k): v.shape for k, v in theirs.items()}
    assert mapped == {k: v.shape for k, v in ours.items()}
    assert {ours_key_to_ultralytics(k) for k in ours} == set(theirs)


def test_key_mapping_examples_and_errors():
    assert ultralytics_key_to_ours("model.0.conv.weight") == "backbone.stem.conv.weight"
    assert ultralytics_key_to_ours("model.9.cv2.bn.running_var") == "backbone.sppf.cv2.bn.running_var"
    assert ultralytics_key_to_ours("model.15.m.0.cv1.conv.weight") == "neck.topdown_p3.m.0.cv1.conv.weight"
    assert ultralytics_key_to_ours("model.22.dfl.conv.weight") == "head.dfl.conv.weight"
    assert ours_key_to_ultralytics("head.cv3.2.2.bias") == "model.22.cv3.2.2.bias"
    for bad in ("model.10.weight", "model.23.cv2.weight", "backbone.stem.conv.weight", "foo"):
        with pytest.raises(KeyMappingError, match="not a key"):
            ultralytics_key_to_ours(bad)
    with pytest.raises(KeyMappingError):
        ours_key_to_ultralytics("neck.nothing.weight")


def test_freeze_prefix_backbone_is_layers_0_to_9(ultra):
    um = ultra.build("yolov8n.yaml", nc=20)
    theirs = sum(p.numel() for i in range(10) for p in um.model[i].parameters())
    model = YOLOv8("n", nc=20)
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.")) == theirs


def test_training_output_matches_ultralytics_raw_output(ultra):
    """Training mode: three raw maps [B, 4R + nc, H_i, W_i]; flattened they are Ultralytics' boxes/scores."""
    um = ultra.build("yolov8n.yaml", nc=20).train()
    model = YOLOv8("n", nc=20).train()
    model.load_state_dict({ultralytics_key_to_ours(k): v for k, v in um.state_dict().items()})
    x = torch.rand(2, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = um(x)
        raw = model(x)
    assert [tuple(r.shape) for r in raw] == [(2, 84, 32, 40), (2, 84, 16, 20), (2, 84, 8, 10)]
    boxes, scores = flatten_raw(raw, model.reg_max)
    torch.testing.assert_close(boxes, theirs["boxes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, theirs["scores"], rtol=0, atol=1e-5)


def test_decode_matches_float64_reference():
    """Eval output = DFL expectation -> ltrb distances -> xywh * stride, sigmoid classes (float64 reference)."""
    torch.manual_seed(0)
    model = YOLOv8("n", nc=3).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        feats, raw = model.forward_with_features(x)
        out = model(x)
    assert [tuple(f.shape[2:]) for f in feats] == [(8, 12), (4, 6), (2, 3)]
    torch.testing.assert_close(model.head.decode(raw), out, rtol=0, atol=0)
    flat = torch.cat([r.flatten(2) for r in raw], 2).double()[0]  # [4R + nc, A]
    cols = []
    for a in range(flat.shape[1]):  # one anchor at a time, written out from the definition
        level = 0 if a < 96 else 1 if a < 96 + 24 else 2
        local = a - (0, 96, 120)[level]
        width, stride = (12, 6, 3)[level], (8, 16, 32)[level]
        cx, cy = local % width + 0.5, local // width + 0.5
        bins = torch.arange(16, dtype=torch.float64)
        left, top, right, bottom = (torch.softmax(flat[16 * k : 16 * k + 16, a], 0) @ bins for k in range(4))
        x1, y1, x2, y2 = cx - left, cy - top, cx + right, cy + bottom
        box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) * stride
        cols.append(torch.cat([box, torch.sigmoid(flat[64:, a])]))
    ref = torch.stack(cols, 1)
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-5, atol=1e-4)


def test_anchors_are_cached_per_shape():
    head = YOLOv8("n", nc=2).head
    shapes = [(8, 12), (4, 6), (2, 3)]
    a1 = head.anchors(shapes, torch.device("cpu"), torch.float32)
    assert head.anchors(shapes, torch.device("cpu"), torch.float32) is a1
    assert head.anchors([(4, 4), (2, 2), (1, 1)], torch.device("cpu"), torch.float32) is not a1
    points, strides = head.anchors([(2, 3), (1, 1), (1, 1)], torch.device("cpu"), torch.float64)
    assert points.dtype == torch.float64
    assert points.tolist() == [
        [0.5, 1.5, 2.5, 0.5, 1.5, 2.5, 0.5, 0.5],
        [0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 0.5, 0.5],
    ]
    assert strides.tolist() == [[8.0] * 6 + [16.0, 32.0]]


def test_dfl_is_the_expectation_over_bins():
    x = torch.randn(2, 64, 7, dtype=torch.float64)
    got = DFL(16).double()(x)
    probs = x.view(2, 4, 16, 7).softmax(2)
    ref = (probs * torch.arange(16, dtype=torch.float64).view(1, 1, 16, 1)).sum(2)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_head_bias_init_and_class_reset():
    model = YOLOv8("n", nc=20)
    for i, s in enumerate((8, 16, 32)):
        assert torch.all(model.head.cv2[i][2].bias == 1.0)
        torch.testing.assert_close(
            model.head.cv3[i][2].bias, torch.full((20,), math.log(5 / 20 / (640 / s) ** 2))
        )
    box_before = copy.deepcopy(model.head.cv2.state_dict())
    model.head.reset_class_branch(120)
    assert model.nc == 120 and model.head.cv3[0][0].conv.weight.shape[0] == 100  # width capped at 100
    assert all(torch.equal(v, model.head.cv2.state_dict()[k]) for k, v in box_before.items())
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 124, 21)


def _random_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)


def test_fuse_keeps_outputs():
    torch.manual_seed(0)
    model = YOLOv8("n", nc=5).eval()
    _random_bn(model)
    x = torch.rand(2, 3, 192, 256)
    fused = copy.deepcopy(model).fuse()
    assert fused.fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        raw, raw_fused = model.forward_with_features(x)[1], fused.forward_with_features(x)[1]
        out, out_fused = model(x), fused(x)
    for r, rf in zip(raw, raw_fused):
        assert (r - rf).abs().max().item() <= 1e-4
    assert (out[:, 4:] - out_fused[:, 4:]).abs().max().item() <= 1e-4  # class probabilities
    # boxes are in pixels (up to ~300): float32 resolution there is 3e-5, so allow 1e-4 + 1e-6 * |x|
    torch.testing.assert_close(out_fused, out, rtol=1e-6, atol=1e-4)
    # in float64 the folding is exact up to rounding
    m64 = copy.deepcopy(model).double()
    f64 = copy.deepcopy(m64).fuse()
    x64 = x[:1, :, :64, :96].double()
    with torch.no_grad():
        assert (m64(x64) - f64(x64)).abs().max().item() <= 1e-9


def test_fuse_conv_bn_formula():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = torch.nn.BatchNorm2d(6, eps=1e-3).double().eval()
    _random_bn(bn)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fuse_conv_bn(conv, bn)(x), bn(conv(x)), rtol=0, atol=1e-12)


def test_bad_inputs():
    model = YOLOv8("n", nc=2).eval()
    with pytest.raises(ScaleError, match="multiples of 32, got 100x96"):
        model(torch.zeros(1, 3, 100, 96))
    with pytest.raises(ScaleError, match=r"\[B, 3, H, W\]"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ScaleError, match="unknown YOLOv8 scale 'q'"):
        YOLOv8("q")
    with pytest.raises(ValueError, match="nc=0"):
        YOLOv8("n", nc=0)


def test_prepare_for_inference_and_bf16_autocast():
    """Channels-last fused model gives the same output; under bf16 autocast the decode stays float32."""
    torch.manual_seed(0)
    model = YOLOv8("n", nc=4).eval()
    _random_bn(model)
    x = torch.rand(1, 3, 128, 160)
    fast = copy.deepcopy(model).prepare_for_inference()
    assert fast.head.cv2[0][0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(fast(x), ref, rtol=1e-6, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast(x)
    assert low.dtype == torch.float32
    # bf16 features carry ~0.5% relative error; decoded in float32 the boxes move by well under a pixel
    # here, whereas decoding in bf16 would round every coordinate above 128 px to a multiple of 1 px
    assert (low[:, :4] - ref[:, :4]).abs().max().item() < 0.5
    assert (low[:, 4:] - ref[:, 4:]).abs().max().item() < 0.02
