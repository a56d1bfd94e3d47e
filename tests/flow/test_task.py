from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.optical_flow import raft_large, raft_small

from visiontrain.cli import main
from visiontrain.config import ConfigError, load_config
from visiontrain.engine.checkpoint import CheckpointError
from visiontrain.engine.task import StepInfo
from visiontrain.flow.cli import VERBS
from visiontrain.flow.config import FlowEvalConfig, FlowSynthConfig, FlowTrainConfig
from visiontrain.flow.data import FlowDataError
from visiontrain.flow.inference import load_flow_model, load_flow_weights
from visiontrain.flow.io import read_image
from visiontrain.flow.models.raft import build_raft, raft_forward
from visiontrain.flow.task import FlowTask

SMALL = "128x128"


@pytest.fixture(autouse=True)
def one_thread():
    """RAFT on a CPU shared by many processes: OpenMP threads spinning against each other cost several
    times more than one thread does, so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Recorder(nn.Module):
    """Stands in for RAFT: records its inputs and returns a flow that encodes the padded position."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, image1, image2, num_flow_updates=12):
        self.seen.append((image1, image2, num_flow_updates))
        b, _, h, w = image1.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        grid = torch.stack([xs, ys])[None].expand(b, 2, h, w)
        return [grid + i + self.w for i in range(num_flow_updates)]


def test_raft_forward_normalises_pads_and_crops_back():
    rec = _Recorder()
    image1, image2 = torch.rand(2, 3, 131, 150), torch.rand(2, 3, 131, 150)
    preds = raft_forward(rec, image1, image2, num_flow_updates=3)
    seen1, seen2, n = rec.seen[0]
    assert n == 3 and len(preds) == 3 and preds[-1].shape == (2, 2, 131, 150)
    assert seen1.shape == (2, 3, 136, 152)  # H, W padded to multiples of 8, centred
    torch.testing.assert_close(seen1[:, :, 2:133, 1:151], image1 * 2 - 1)  # [0, 1] -> [-1, 1]
    torch.testing.assert_close(seen2[:, :, 2:133, 1:151], image2 * 2 - 1)
    assert preds[0][0, 0, 0, 0] == 1 and preds[0][0, 1, 0, 0] == 2  # the crop is the un-padded window
    small = raft_forward(rec, torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96), 1)
    assert rec.seen[-1][0].shape[-2:] == (128, 128) and small[0].shape[-2:] == (64, 96)


def test_real_raft_runs_on_odd_sizes_and_separate_update_counts():
    torch.manual_seed(0)
    model = build_raft("raft_small").eval()
    with torch.no_grad():
        preds = raft_forward(model, torch.rand(1, 3, 100, 130), torch.rand(1, 3, 100, 130), num_flow_updates=2)
    assert len(preds) == 2 and preds[-1].shape == (1, 2, 100, 130) and torch.isfinite(preds[-1]).all()
    assert not torch.equal(preds[0], preds[1])
    cfg = FlowTrainConfig(num_flow_updates_train=2, num_flow_updates_eval=3, crop="128x160")
    task = FlowTask(cfg)
    counts = []
    rec = _Recorder()
    rec.forward = lambda a, b, num_flow_updates=12: counts.append(num_flow_updates) or _Recorder.forward(rec, a, b,
                                                                                                          num_flow_updates)
    batch = {"image1": torch.rand(2, 3, 128, 160), "image2": torch.rand(2, 3, 128, 160),
             "flow": torch.randn(2, 2, 128, 160), "valid": torch.ones(2, 128, 160, dtype=torch.bool)}
    terms = task.training_step(rec, batch, StepInfo())
    task.predict_flow(rec, batch["image1"], batch["image2"])
    assert counts == [2, 3] and set(terms) == {"sequence_l1"} and torch.isfinite(terms["sequence_l1"])


def test_train_end_to_end_then_eval_checkpoint(tmp_path, synth_dir, capsys):
    from visiontrain.engine.trainer import fit

    cfg = load_config(FlowTrainConfig, overrides=[
        f"out={tmp_path / 'run'}", f"data=chairs:{synth_dir}", f"crop={SMALL}", "max_steps=1", "batch_size=1",
        "num_flow_updates_train=1", "num_flow_updates_eval=1", "device=cpu", "tensorboard=false", "plots=false",
        "progress=false", "eval_every_steps=1", "log_every=1"])
    result = fit(FlowTask(cfg))
    run = tmp_path / "run"
    assert result["step"] == 1 and np.isfinite(result["metrics"]["epe"])
    assert (run / "checkpoints/best.pt").is_file()
    # our checkpoint loads back for evaluation, model name taken from its config
    VERBS["eval"][1](FlowEvalConfig(weights=str(run / "checkpoints/best.pt"), data=f"chairs:{synth_dir}",
                                    num_flow_updates=1, out=str(tmp_path / "ev"), pictures=0, device="cpu"))
    metrics = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert metrics["epe"] == pytest.approx(result["metrics"]["epe"], rel=1e-4)
    assert "pixel-weighted" in capsys.readouterr().out


def test_training_images_smaller_than_the_crop_stop_the_run_before_step_1(tmp_path, synth_dir, capsys):
    """128×128 images and crop=128x160: they used to be upscaled to the crop without a word."""
    with pytest.raises(FlowDataError) as e:
        FlowTask(FlowTrainConfig(data=f"chairs:{synth_dir}", crop="128x160")).build_datasets()
    message = str(e.value)
    assert message.startswith("8 images are smaller than 128×160 (H×W), which crop=128x160 needs; images are never "
                              "upscaled to fit:")
    assert f"train data chairs:{synth_dir} (8):" in message and "00001_img1.ppm: 128×128" in message
    assert message.endswith("Set a smaller crop: crop=128x128 (fits every image), or crop= (empty) to train on "
                            "whole images.")
    rc = main(["train", "flow", f"data=chairs:{synth_dir}", "crop=136x128", "max_steps=1", "device=cpu",
               f"out={tmp_path / 'run'}", "tensorboard=false", "plots=false", "progress=false"])
    assert rc == 2 and "which crop=136x128 needs" in capsys.readouterr().err
    assert not list((tmp_path / "run").rglob("*.pt"))


def test_a_crop_below_128_trains_on_crops_of_that_size(synth_dir, caplog):
    """torchvision's RAFT takes 128×128 at least: a 64×96 crop is padded inside the model call, and said so."""
    task = FlowTask(FlowTrainConfig(data=f"chairs:{synth_dir}", crop="64x96", num_flow_updates_train=1))
    with caplog.at_level("WARNING"):
        train, _ = task.build_datasets()
    assert "crop=64x96 is below the 128×128 torchvision's RAFT takes" in caplog.text
    batch = task.collate([train[0], train[1]])
    assert batch["image1"].shape == (2, 3, 64, 96) and batch["flow"].shape == (2, 2, 64, 96)
    torch.manual_seed(0)
    terms = task.training_step(task.build_model(), batch, StepInfo())
    assert torch.isfinite(terms["sequence_l1"])


def test_visualize_writes_side_by_side(tmp_path, synth_dir, tv_weights):
    task = FlowTask(FlowTrainConfig(data=f"chairs:{synth_dir}", crop=SMALL, num_flow_updates_eval=1))
    _, val = task.build_datasets()
    batch = task.collate([val[0]])
    task.visualize(load_flow_model(tv_weights).model, batch, tmp_path / "plots")
    picture = read_image(tmp_path / "plots/flow_val.png")
    assert picture.shape == (256, 256, 3)
    tile_error = np.abs(picture[:128, :128] - batch["image1"][0].permute(1, 2, 0).numpy())
    assert np.median(tile_error) < 0.01  # top left is image 1 (under a small label)


def test_train_without_data_synthesises_into_synth_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTRAIN_CACHE", str(tmp_path / "cache"))
    task = FlowTask(FlowTrainConfig(synth_train=3, synth_val=1, synth_size=SMALL, crop=SMALL))
    train, val = task.build_datasets()
    assert len(train) == 3 and len(val) == 1
    made = [p for p in (tmp_path / "cache/flow_synth").iterdir() if not p.name.startswith(".")]  # not the lock
    assert len(made) == 1 and (made[0] / "FlyingChairs_train_val.txt").is_file()
    first = (made[0] / "data/00001_flow.flo").stat().st_mtime_ns
    FlowTask(FlowTrainConfig(synth_train=3, synth_val=1, synth_size=SMALL, crop=SMALL)).build_datasets()
    assert (made[0] / "data/00001_flow.flo").stat().st_mtime_ns == first  # reused, not rewritten
    sample = train[0]
    assert sample["image1"].shape == (3, 128, 128) and sample["valid"].all()


def test_supervised_training_needs_ground_truth(tmp_path, synth_dir):
    for i in (1, 2):
        (tmp_path / f"x_img{i}.ppm").write_bytes((synth_dir / f"data/00001_img{i}.ppm").read_bytes())
    with pytest.raises(ConfigError, match="no ground-truth flow"):
        FlowTask(FlowTrainConfig(data=f"pairs:{tmp_path}", crop=SMALL)).build_datasets()


def test_a_model_stuck_at_zero_flow_is_named_at_evaluation(synth_dir, caplog):
    """A RAFT whose flow head outputs nothing (a run that never started learning) scores exactly zero flow's
    EPE; the evaluation says so, with both numbers and what to change."""
    from visiontrain.flow.task import not_learning_message

    task = FlowTask(FlowTrainConfig(data=f"chairs:{synth_dir}", crop=SMALL, num_flow_updates_eval=2,
                                    device="cpu"))
    model = task.build_model().eval()
    head = model.update_block.flow_head.conv2
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    _, val = task.build_datasets()
    loader = torch.utils.data.DataLoader(val, batch_size=2, collate_fn=task.collate)
    with caplog.at_level(logging.WARNING, logger="visiontrain.flow.task"):
        metrics = task.evaluate(model, loader)
    zero = np.mean(np.concatenate([np.linalg.norm(val.load(i)["flow"], axis=-1).ravel() for i in range(len(val))]))
    assert metrics["zero_epe"] == pytest.approx(zero, rel=1e-5) and metrics["epe"] == pytest.approx(zero, rel=1e-5)
    assert "no better than predicting zero motion" in caplog.text and f"{zero:.3f}" in caplog.text
    assert not_learning_message({"epe": 0.9 * metrics["zero_epe"], "zero_epe": metrics["zero_epe"]}) == ""
    assert not_learning_message({"epe": float("nan"), "zero_epe": 3.0}) == ""


@pytest.mark.slow
def test_short_training_lowers_validation_epe(tmp_path, caplog):
    """~2.5 CPU-minutes: RAFT-small from scratch on synthetic chairs-layout data beats its initial EPE and
    zero flow (observed: zero flow 4.17, initial 5.26, after 160 steps 3.2)."""
    from visiontrain.engine.trainer import fit

    data = tmp_path / "chairs"
    VERBS["synth"][1](FlowSynthConfig(out=str(data), train=64, val=8, size="128x160", seed=1, max_translation=10))
    cfg = load_config(FlowTrainConfig, overrides=[
        f"out={tmp_path / 'run'}", f"data=chairs:{data}", "crop=128x160", "max_steps=160", "batch_size=4",
        "num_flow_updates_train=4", "num_flow_updates_eval=8", "device=cpu", "tensorboard=false", "plots=false",
        "progress=false", "eval_every=0", "lr=1e-3", "warmup_steps=5", "aug.scale_prob=0", "aug.vflip_prob=0"])
    task = FlowTask(cfg)
    torch.manual_seed(cfg.seed)
    initial = task.build_model().eval()
    _, val = task.build_datasets()
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=task.collate)
    with caplog.at_level(logging.WARNING, logger="visiontrain.flow.task"):
        before = task.evaluate(initial, loader)["epe"]
        warned_before = "no better than predicting zero motion" in caplog.text
        caplog.clear()
        zero_flow = np.mean([np.linalg.norm(val.load(i)["flow"], axis=-1).mean() for i in range(len(val))])
        after = fit(task)["metrics"]["epe"]
    print(f"val EPE: zero flow {zero_flow:.3f}, initial {before:.3f}, after 160 steps {after:.3f}")
    assert after < 0.8 * before and after < 0.9 * zero_flow
    assert warned_before and "no better than predicting zero motion" not in caplog.text


def test_flow_colours_match_torchvision_and_error_maps():
    from torchvision.utils import flow_to_image

    from visiontrain.flow.viz import error_to_color, flow_to_color, side_by_side

    flow = np.random.default_rng(0).normal(0, 6, (20, 30, 2)).astype(np.float32)
    ours = flow_to_color(flow)
    theirs = flow_to_image(torch.from_numpy(flow).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, theirs)
    # a fixed max_flow: the same vector gets the same colour whatever else is in the field
    a = flow_to_color(np.array([[[3.0, 4.0]]], np.float32), max_flow=10.0)
    b = flow_to_color(np.array([[[3.0, 4.0], [50.0, 0.0]]], np.float32), max_flow=10.0)
    np.testing.assert_array_equal(a[0, 0], b[0, 0])
    epe = np.array([[0.0, 5.0, 20.0]])
    colours = error_to_color(epe, np.array([[True, True, False]]), max_error=10.0)
    assert colours[0, 0].sum() < colours[0, 1].sum() and (colours[0, 2] == 128).all()
    figure = side_by_side(np.zeros((20, 30, 3), np.float32), flow, flow + 1)
    assert figure.shape == (40, 60, 3) and figure.dtype == np.uint8


def test_raft_small_convex_is_raft_small_with_convex_upsampling(tmp_path):
    torch.manual_seed(0)
    small, convex = build_raft("raft_small"), build_raft("raft_small_convex")
    extra = set(convex.state_dict()) - set(small.state_dict())
    assert extra and all(k.startswith("mask_predictor.") for k in extra)
    assert set(small.state_dict()) <= set(convex.state_dict())
    calls = []  # torchvision's RAFT upsamples convexly with the mask predictor at every update
    convex.mask_predictor.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        preds = raft_forward(convex.eval(), torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128), 2)
    assert len(calls) == 2 and preds[-1].shape == (1, 2, 128, 128) and torch.isfinite(preds[-1]).all()
    assert small.mask_predictor is None
    torch.save(convex.state_dict(), tmp_path / "convex.pth")
    assert load_flow_model(tmp_path / "convex.pth").name == "raft_small_convex"  # from the mask_predictor keys
    with pytest.raises(CheckpointError, match="convex.pth holds a raft_small_convex model"):
        load_flow_weights(build_raft("raft_small"), "raft_small", tmp_path / "convex.pth")


def test_convex_upsampling_starts_as_bilinear():
    from torchvision.models.optical_flow._utils import upsample_flow

    model = build_raft("raft_small_convex")
    h, w = 6, 7
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    coarse = torch.stack([0.3 * xx - 0.2 * yy + 1.0, 0.1 * xx + 0.25 * yy - 2.0])[None]  # an affine field, 1/8 px
    mask = model.mask_predictor(torch.randn(1, 96, h, w))  # any hidden state gives the same masks
    up = upsample_flow(coarse, mask, factor=8)  # torchvision's convex upsampling
    # the same field evaluated at the full-resolution pixel centres, in full-resolution pixels
    fy, fx = torch.meshgrid((torch.arange(8 * h) + 0.5) / 8 - 0.5, (torch.arange(8 * w) + 0.5) / 8 - 0.5, indexing="ij")
    expected = 8 * torch.stack([0.3 * fx - 0.2 * fy + 1.0, 0.1 * fx + 0.25 * fy - 2.0])[None]
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # the border cells see torchvision's zero padding
    torch.testing.assert_close(up[inner], expected[inner], atol=2e-2, rtol=0)
    assert (up - expected)[..., :4, :].abs().max() > 0.1  # the zero-padded border is not exact (and the test can fail)


def test_correlation_volume_stays_float32_under_bf16_autocast():
    from torchvision.models.optical_flow.raft import CorrBlock

    torch.manual_seed(0)
    fmap1, fmap2 = torch.randn(1, 32, 16, 20), torch.randn(1, 32, 16, 20)
    ours, plain = build_raft("raft_small").corr_block, CorrBlock(num_levels=4, radius=3)
    ours.build_pyramid(fmap1, fmap2)  # without autocast: torchvision's block exactly
    plain.build_pyramid(fmap1, fmap2)
    for a, b in zip(ours.corr_pyramid, plain.corr_pyramid, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    reference = [v.clone() for v in plain.corr_pyramid]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours.build_pyramid(fmap1.bfloat16(), fmap2.bfloat16())  # the encoder's bf16 output
        plain.build_pyramid(fmap1.bfloat16(), fmap2.bfloat16())
    assert all(v.dtype == torch.float32 for v in ours.corr_pyramid)
    assert plain.corr_pyramid[0].dtype == torch.bfloat16  # what torchvision's block gives (the test can fail)
    # rounding the features to bf16 is all that is left; the products and sums stay float32
    exact = CorrBlock(num_levels=4, radius=3)
    exact.build_pyramid(fmap1.bfloat16().float(), fmap2.bfloat16().float())
    for a, b in zip(ours.corr_pyramid, exact.corr_pyramid, strict=True):
        torch.testing.assert_close(a, b)
    assert (plain.corr_pyramid[0].float() - reference[0]).abs().max() > (ours.corr_pyramid[0] - reference[0]).abs().max()


@pytest.mark.parametrize("name, builder", [("raft_small", raft_small), ("raft_large", raft_large)])
def test_our_raft_is_torchvisions_raft_in_float32(name, builder):
    """build_raft swaps in Float32CorrBlock (with the builder's radius); without autocast the flow is
    torchvision's, bit for bit."""
    torch.manual_seed(0)
    reference = builder().eval()
    ours = build_raft(name).eval()
    ours.load_state_dict(reference.state_dict())
    assert ours.corr_block.radius == reference.corr_block.radius
    image1, image2 = torch.rand(1, 3, 128, 136) * 2 - 1, torch.rand(1, 3, 128, 136) * 2 - 1
    with torch.no_grad():
        expected = reference(image1, image2, num_flow_updates=2)
        got = ours(image1, image2, num_flow_updates=2)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["raft_small_convex", "raft_large"])
def test_upsample_last_runs_the_mask_once_and_keeps_the_last_prediction(name):
    """``upsample="last"``: the last prediction is torchvision's (convex) one bit for bit, the earlier ones are
    the bilinear upsampling torchvision does without a mask predictor, and the mask head runs once."""
    torch.manual_seed(0)
    model = build_raft(name).eval()
    for p in model.mask_predictor.parameters():  # a mask far from the bilinear start
        nn.init.normal_(p, std=0.05)
    image1, image2 = torch.rand(2, 3, 100, 130), torch.rand(2, 3, 100, 130)
    calls = []
    hook = model.mask_predictor.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        convex_all = raft_forward(model, image1, image2, 3)
        assert len(calls) == 3
        last = raft_forward(model, image1, image2, 3, upsample="last")
        assert len(calls) == 4
        hook.remove()
        mask, model.mask_predictor = model.mask_predictor, None
        bilinear = raft_forward(model, image1, image2, 3)
        model.mask_predictor = mask
    torch.testing.assert_close(last[-1], convex_all[-1], atol=0, rtol=0)
    for got, want in zip(last[:-1], bilinear[:-1], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (last[-1] - bilinear[-1]).abs().max() > 0.1  # the mask does change the last prediction


def test_upsample_train_last_trains_the_mask_and_is_checked(tmp_path, synth_dir):
    """``upsample_train=last`` reaches the training step; the mask head still gets gradients (from the last
    prediction); an unknown mode is refused by the config."""
    cfg = load_config(FlowTrainConfig, overrides=[
        f"out={tmp_path / 'run'}", f"data=chairs:{synth_dir}", f"crop={SMALL}", "model=raft_small_convex",
        "num_flow_updates_train=2", "upsample_train=last", "device=cpu"])
    task = FlowTask(cfg)
    torch.manual_seed(0)
    model = task.build_model().train()
    train, _ = task.build_datasets()
    batch = task.collate([train[0]])
    calls = []
    model.mask_predictor.register_forward_hook(lambda *_: calls.append(1))
    losses = task.training_step(model, batch, StepInfo(step=0, epoch=0))
    sum(losses.values()).backward()
    assert len(calls) == 1
    assert model.mask_predictor.conv.weight.grad.abs().sum() > 0
    assert model.update_block.flow_head.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="upsample_train='every' must be one of all, last"):
        load_config(FlowTrainConfig, overrides=["upsample_train=every"])


def test_upsample_last_reaches_the_model_through_ddp(tmp_path):
    """The trainer hands training_step a DistributedDataParallel wrapper under torchrun; ``upsample`` must
    reach the RAFT inside through DDP's forward (not be dropped, not bypass DDP's gradient hooks)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_raft("raft_small_convex")
        ddp = DistributedDataParallel(model)
        calls, through_ddp = [], []
        model.mask_predictor.register_forward_hook(lambda *_: calls.append(1))
        ddp.register_forward_pre_hook(lambda *_: through_ddp.append(1))  # DDP's forward prepares its reducer
        image1, image2 = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
        for step in range(2):
            preds = raft_forward(ddp, image1, image2, 3, upsample="last")
            assert len(calls) == step + 1 and len(through_ddp) == step + 1
            sum(p.abs().mean() for p in preds).backward()
        assert model.mask_predictor.conv.weight.grad.abs().sum() > 0
        with torch.no_grad():
            torch.testing.assert_close(raft_forward(ddp, image1, image2, 3, upsample="last")[-1],
                                       raft_forward(model, image1, image2, 3)[-1], atol=0, rtol=0)
    finally:
        dist.destroy_process_group()
