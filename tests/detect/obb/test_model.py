"""YOLOv8-OBB forward equals Ultralytics' OBBModel (n and s, two input sizes, randomised BatchNorm), loaded
from an Ultralytics-style ``.pt`` through the restricted unpickler."""

from __future__ import annotations

import math

import pytest
import torch

from visiontrain.detect.inference import load_ultralytics
from visiontrain.detect.obb.model import YOLOv8OBB, dist_to_rbox, rbox_to_dist
from visiontrain.detect.weights import WeightsMismatchError


def build_ultralytics_obb(scale: str, nc: int, seed: int, ultra):
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import OBBModel

    torch.manual_seed(seed)
    model = OBBModel(f"yolov8{scale}-obb.yaml", nc=nc, verbose=False)
    model.names = {i: f"plane{i}" for i in range(nc)}
    ultra.randomise_batchnorm(model, seed)
    return model


@pytest.mark.parametrize("scale, sizes", [("n", [(256, 256), (224, 320)]), ("s", [(160, 192), (256, 224)])])
def test_forward_equals_ultralytics(scale, sizes, ultra, tmp_path):
    theirs = build_ultralytics_obb(scale, 6, seed=3, ultra=ultra)
    path = ultra.save(theirs, tmp_path / f"yolov8{scale}-obb.pt")
    oracle = ultra.oracle(path)
    ours = load_ultralytics(path)
    assert isinstance(ours, YOLOv8OBB) and ours.nc == 6 and ours.names == [f"plane{i}" for i in range(6)]
    ours.eval()
    for h, w in sizes:
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
        with torch.no_grad():
            ref = oracle(x)
            out = ours(x)
        ref = ref[0] if isinstance(ref, (list, tuple)) else ref
        assert out.shape == (2, 4 + 6 + 1, sum((h // s) * (w // s) for s in (8, 16, 32)))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
        angle = out[:, -1]
        assert angle.min() >= -math.pi / 4 and angle.max() < 3 * math.pi / 4
    # the raw maps (the training-mode output) decode to the eval output
    with torch.no_grad():
        _, raw = ours.forward_with_features(x)
        assert [r.shape[1] for r in raw] == [4 * 16 + 6 + 1] * 3
        torch.testing.assert_close(ours.head.decode(raw), ours(x))


def test_obb_checkpoint_into_horizontal_model_is_refused(ultra, tmp_path):
    from visiontrain.detect.model import YOLOv8

    path = ultra.save(build_ultralytics_obb("n", 3, seed=0, ultra=ultra), tmp_path / "obb.pt")
    with pytest.raises(WeightsMismatchError, match="oriented-box"):
        load_ultralytics(path, model=YOLOv8("n", nc=3))


def test_dist_rbox_roundtrip():
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(50, 4, generator=g) * 10
    angle = (torch.rand(50, 1, generator=g) - 0.25) * math.pi
    anchors = torch.rand(50, 2, generator=g) * 40
    boxes = dist_to_rbox(dist, angle, anchors)
    torch.testing.assert_close(rbox_to_dist(boxes, angle, anchors), dist, atol=1e-5, rtol=0)
