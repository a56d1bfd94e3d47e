"""ONNX export: outputs equal PyTorch's at two batch sizes (dynamic batch), metadata, input checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from visiontrain.detect.export import ExportError, OnnxDetector, export_onnx
from visiontrain.detect.model import YOLOv8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = YOLOv8("n", nc=6, names=[f"plane{i}" for i in range(6)]).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None and m.weight.requires_grad:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))  # spread the class probabilities
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "yolov8n.onnx", imgsz=(256, 320))
    return model, path


def test_onnx_matches_pytorch_at_two_batch_sizes(exported):
    model, path = exported
    assert any(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
    )  # the caller's model is not fused
    fused = copy.deepcopy(model).fuse()
    det = OnnxDetector(path)
    assert det.dynamic_batch and det.nc == 6 and det.names[5] == "plane5" and det.imgsz == (256, 320)
    for batch in (1, 3):
        x = torch.rand(batch, 3, 256, 320, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref, ref_fused = model(x), fused(x)
        out = det(x)
        assert isinstance(out, torch.Tensor) and out.shape == ref.shape == (batch, 10, 1680)
        assert (
            out[:, 4:].max() > 0.5 and (out[:, 4:] - ref[:, 4:]).abs().max().item() <= 1e-4
        )  # probabilities
        # boxes are pixels up to ~350, where float32 steps are 3e-5: 1e-4 + 1e-6 * |x|
        torch.testing.assert_close(out, ref_fused, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(det(x.numpy()), out.numpy())  # numpy in, numpy out


def test_onnx_input_checks(exported, tmp_path):
    _, path = exported
    det = OnnxDetector(path)
    with pytest.raises(ExportError, match=r"expects images \[B, 3, 256, 320\], got \(1, 3, 320, 320\)"):
        det(np.zeros((1, 3, 320, 320), np.float32))
    with pytest.raises(ExportError, match="multiples of 32"):
        export_onnx(YOLOv8("n", nc=1), tmp_path / "x.onnx", imgsz=(250, 320))
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="not a loadable ONNX model"):
        OnnxDetector(tmp_path / "junk.onnx")


def test_dynamo_exporter_needs_opset_18(tmp_path):
    with pytest.raises(ExportError, match="opset >= 18"):
        export_onnx(YOLOv8("n", nc=1), tmp_path / "x.onnx", imgsz=64, dynamo=True, opset=17)


@pytest.mark.slow
def test_dynamo_exporter_matches_pytorch(tmp_path):
    model = YOLOv8("n", nc=3).eval()
    det = OnnxDetector(export_onnx(model, tmp_path / "d.onnx", imgsz=(128, 160), dynamo=True))
    for batch in (1, 2):
        x = torch.rand(batch, 3, 128, 160)
        with torch.no_grad():
            torch.testing.assert_close(det(x), model(x), rtol=1e-6, atol=1e-4)


def test_dynamo_exporter_without_onnxscript_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    with pytest.raises(ExportError, match="pip install onnxscript"):
        export_onnx(YOLOv8("n", nc=1), tmp_path / "x.onnx", imgsz=64, dynamo=True)
    assert not (tmp_path / "x.onnx").exists()
