"""The flow verbs as users call them: synth, predict, eval and their output folders, reports and printing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from visiontrain.cli import main
from visiontrain.flow import cli
from visiontrain.flow.cli import VERBS
from visiontrain.flow.config import FlowEvalConfig, FlowExportConfig, FlowPredictConfig, FlowSynthConfig
from visiontrain.flow.data import collate_flow, open_flow_dataset
from visiontrain.flow.inference import load_flow_model
from visiontrain.flow.io import read_flo, read_image
from visiontrain.flow.models.pwc import PWCFlow
from visiontrain.flow.models.raft import raft_forward
from visiontrain.flow.task import FlowTask


@pytest.fixture(scope="module")
def pwc_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "pwc.pt"
    torch.save(PWCFlow(channel_multiplier=0.25).state_dict(), path)
    return path


def test_synth_verb_writes_the_chairs_layout(tmp_path, capsys):
    assert main(["synth", "flow", f"out={tmp_path / 'chairs'}", "train=2", "val=1", "size=32x48", "seed=3"]) == 0
    assert f"wrote 2 train + 1 val pairs (32×48, layered generator) to {tmp_path / 'chairs'}" in capsys.readouterr().out
    assert len(list((tmp_path / "chairs/data").glob("*_flow.flo"))) == 3
    assert read_flo(tmp_path / "chairs/data/00001_flow.flo")[0].shape == (32, 48, 2)
    assert (tmp_path / "chairs/FlyingChairs_train_val.txt").read_text().split() == ["1", "1", "2"]


def test_synth_predict_and_eval_verbs(tmp_path, synth_dir, tv_weights):
    assert len(list((synth_dir / "data").glob("*_flow.flo"))) == 5
    img1, img2, gt = (synth_dir / "data/00005_img1.ppm", synth_dir / "data/00005_img2.ppm",
                      synth_dir / "data/00005_flow.flo")
    out = tmp_path / "pred"
    VERBS["predict"][1](FlowPredictConfig(weights=str(tv_weights), image1=str(img1), image2=str(img2), gt=str(gt),
                                          out=str(out), num_flow_updates=1, device="cpu"))
    flow, valid = read_flo(out / "flow.flo")
    assert flow.shape == (128, 128, 2) and valid.all()
    assert read_image(out / "flow.png").shape == (128, 128, 3)
    assert read_image(out / "side_by_side.png").shape == (256, 256, 3)
    # the written flow is what the model predicts
    model = load_flow_model(tv_weights).model
    sample = collate_flow([open_flow_dataset(f"pair:{img1},{img2}")[0]])
    with torch.no_grad():
        expected = raft_forward(model, sample["image1"], sample["image2"], 1)[-1][0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(flow, expected, atol=1e-4)

    eval_out = tmp_path / "eval"
    VERBS["eval"][1](FlowEvalConfig(weights=str(tv_weights), data=f"chairs:{synth_dir}", num_flow_updates=1,
                                    out=str(eval_out), pictures=1, device="cpu"))
    metrics = json.loads((eval_out / "metrics.json").read_text())
    for k in ("epe", "1px", "3px", "5px", "fl_all", "epe_per_image"):
        assert np.isfinite(metrics[k])
    assert metrics["images"] == 1 and metrics["source"]["model"] == "raft_small"
    assert metrics["source"]["split"] == "val"
    gt_flow = read_flo(gt)[0]
    assert metrics["epe"] > 0.1 * np.linalg.norm(gt_flow, axis=-1).mean()  # an untrained model is not perfect
    assert (eval_out / "sample_000.png").is_file()


def test_eval_report_and_fresh_output_folders(tmp_path, synth_dir, tv_weights, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "sample_007.png").write_bytes(b"an older result")
    args = ["eval", "flow", f"weights={tv_weights}", f"data=chairs:{synth_dir}", "num_flow_updates=1",
            f"out={out}", "pictures=1", "device=cpu"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"{out} already holds results; writing to {tmp_path / 'eval2'}" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["sample_007.png"]  # the old folder is left as it was
    report = json.loads((tmp_path / "eval2/metrics.json").read_text())
    assert {"epe", "1px", "3px", "5px", "fl_all", "epe_per_image", "images"} <= set(report)  # top level
    source = report["source"]
    assert source["weights"] == str(tv_weights) and source["data"] == f"chairs:{synth_dir}"
    assert (source["split"], source["model"], source["num_flow_updates"]) == ("val", "raft_small", 1)
    assert {"visiontrain", "torch", "command"} <= set(source)
    # the table says which rates are accuracies and which is an error rate
    assert "% of pixels with EPE < 1 px (higher is better)" in captured.out
    assert "KITTI Fl-all; lower is better" in captured.out
    assert main(args) == 0 and (tmp_path / "eval3/metrics.json").is_file()


def test_predict_writes_a_new_folder_each_time_and_prints_height_first(tmp_path, synth_dir, tv_weights, capsys):
    import cv2

    image = read_image(synth_dir / "data/00001_img1.ppm")[:, :96]  # 128 high, 96 wide
    cv2.imwrite(str(tmp_path / "a.png"), (image[..., ::-1] * 255).astype(np.uint8))
    args = ["predict", "flow", f"weights={tv_weights}", f"image1={tmp_path / 'a.png'}",
            f"image2={tmp_path / 'a.png'}", f"out={tmp_path / 'pred'}", "num_flow_updates=1", "device=cpu"]
    assert main(args) == 0
    assert "(128×96, max |flow|" in capsys.readouterr().out
    assert main(args) == 0
    assert read_flo(tmp_path / "pred/flow.flo")[0].shape == (128, 96, 2)
    assert read_flo(tmp_path / "pred2/flow.flo")[0].shape == (128, 96, 2)


class Recorder:
    """Stands in for a verb config and records which keys the verb reads (``size_hw`` reads ``size``)."""

    def __init__(self, cfg):
        object.__setattr__(self, "cfg", cfg)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name.removesuffix("_hw"))
        return getattr(self.cfg, name)


def _keys_read(verb: str, cfg) -> set[str]:
    recorder = Recorder(cfg)
    assert VERBS[verb][1](recorder) == 0
    return recorder.read


def test_help_lists_only_keys_the_verb_reads(tmp_path, synth_dir, tv_weights, pwc_weights, monkeypatch, capsys):
    """Each verb runs with RAFT and PWC weights (and without data= for eval); every key its --help lists is
    read. None of them builds a training FlowTask."""
    img1, img2, gt = (synth_dir / "data/00001_img1.ppm", synth_dir / "data/00001_img2.ppm",
                      synth_dir / "data/00001_flow.flo")
    small = f"chairs:{synth_dir}"
    monkeypatch.setattr(cli, "synthetic_chairs_spec", lambda *args: small)  # data= empty, without 440 pairs

    def no_task(*args, **kwargs):
        raise AssertionError("an inference verb built a training FlowTask")

    monkeypatch.setattr(FlowTask, "__init__", no_task)
    runs = {
        "eval": [FlowEvalConfig(weights=str(tv_weights), data=small, num_flow_updates=1, pictures=1, device="cpu",
                                out=str(tmp_path / "e")),
                 FlowEvalConfig(weights=str(pwc_weights), pictures=1, device="cpu", out=str(tmp_path / "e"))],
        "predict": [FlowPredictConfig(weights=str(tv_weights), image1=str(img1), image2=str(img2), gt=str(gt),
                                      num_flow_updates=1, device="cpu", out=str(tmp_path / "p")),
                    FlowPredictConfig(weights=str(pwc_weights), image1=str(img1), image2=str(img2), device="cpu",
                                      out=str(tmp_path / "p"))],
        "export": [FlowExportConfig(weights=str(pwc_weights), out=str(tmp_path / "x.onnx"), size="64x64",
                                    check=False)],
        "synth": [FlowSynthConfig(out=str(tmp_path / "s"), train=1, val=0, size="32x32")],
    }
    for verb, configs in runs.items():
        read = set().union(*(_keys_read(verb, cfg) for cfg in configs))
        listed = {f.name for f in dataclasses.fields(VERBS[verb][0])}
        assert listed <= read, f"{verb} --help lists keys it never reads: {sorted(listed - read)}"
        capsys.readouterr()
        assert main([verb, "flow", "--help"]) == 0
        shown = {line.split()[0].split(".")[0] for line in capsys.readouterr().out.splitlines()[2:]}  # gen.x -> gen
        assert shown == listed


def test_eval_and_predict_with_hflip_tta(tmp_path, synth_dir, tv_weights, capsys):
    """``tta=hflip`` reaches eval and predict: the report says so, and the figures are those of the averaged
    flow (an independent computation here), not of the plain one."""
    from visiontrain.flow.inference import predict_flow
    from visiontrain.flow.metrics import FlowMetrics

    common = [f"weights={tv_weights}", "num_flow_updates=2", "device=cpu"]
    for tta in ("none", "hflip"):
        assert main(["eval", "flow", *common, f"data=chairs:{synth_dir}", f"tta={tta}", "pictures=0",
                     f"out={tmp_path / tta}"]) == 0
    plain, flipped = (json.loads((tmp_path / t / "metrics.json").read_text()) for t in ("none", "hflip"))
    assert (plain["source"]["tta"], flipped["source"]["tta"]) == ("none", "hflip")
    model = load_flow_model(tv_weights, "", "cpu").model.eval()
    meter = FlowMetrics()
    for sample in open_flow_dataset(f"chairs:{synth_dir}", "val"):
        batch = collate_flow([sample])
        with torch.no_grad():
            pred = predict_flow(model, batch["image1"], batch["image2"], 2, tta="hflip")
        meter.update(pred, batch["flow"], batch["valid"])
    assert flipped["epe"] == pytest.approx(meter.compute()["epe"], rel=1e-6)
    assert abs(flipped["epe"] - plain["epe"]) > 1e-4
    image1, image2 = synth_dir / "data/00001_img1.ppm", synth_dir / "data/00001_img2.ppm"
    assert main(["predict", "flow", *common, f"image1={image1}", f"image2={image2}", "tta=hflip",
                 f"out={tmp_path / 'pred'}"]) == 0
    sample = collate_flow([open_flow_dataset(f"pair:{image1},{image2}")[0]])
    with torch.no_grad():
        expected = predict_flow(model, sample["image1"], sample["image2"], 2, tta="hflip")[0].permute(1, 2, 0)
    np.testing.assert_allclose(read_flo(tmp_path / "pred/flow.flo")[0], expected.numpy(), atol=1e-5)
    capsys.readouterr()
    assert main(["eval", "flow", *common, f"data=chairs:{synth_dir}", "tta=rot90"]) == 2
    assert "tta" in capsys.readouterr().err
