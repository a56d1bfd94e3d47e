"""The panorama verbs: eval and predict through the one loading path (architecture and sampler settings from
the checkpoint), fresh output folders, metrics.json, clear messages for other tasks' checkpoints, --help."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest

from visiontrain.cli import main
from visiontrain.config import load_config
from visiontrain.panorama.cli import VERBS, format_metrics_table
from visiontrain.panorama.config import (
    PanoramaEvalConfig,
    PanoramaPredictConfig,
    PanoramaSynthConfig,
    PanoramaTrainConfig,
)

LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy"


def eval_config(tiny_run, out: Path, *extra: str) -> PanoramaEvalConfig:
    return load_config(PanoramaEvalConfig, None, [f"weights={tiny_run.weights}", f"data={tiny_run.synth}",
                                                  f"out={out}", "device=cpu", *extra])


def test_verbs_table() -> None:
    assert {verb: schema for verb, (schema, _) in VERBS.items()} == {
        "synth": PanoramaSynthConfig, "train": PanoramaTrainConfig, "eval": PanoramaEvalConfig,
        "predict": PanoramaPredictConfig}
    assert [fn.__name__ for _, fn in VERBS.values()] == ["synth_verb", "train_verb", "eval_verb", "predict_verb"]


def test_eval_takes_the_model_and_sampler_from_the_checkpoint_and_writes_a_report(tiny_run, tmp_path) -> None:
    out = tmp_path / "eval"
    assert VERBS["eval"][1](eval_config(tiny_run, out)) == 0
    record = json.loads((out / "metrics.json").read_text())
    # the engine's evaluation at the end of training used the same EMA weights, sampler, cameras and seed
    assert record["psnr"] == pytest.approx(tiny_run.result["metrics"]["psnr"], abs=1e-9)
    assert "baseline_psnr_unseen" in record and "metrics" not in record
    source = record["source"]
    assert source["weights"] == str(tiny_run.weights) and source["data"] == str(tiny_run.synth)
    assert (source["split"], source["images"], source["size"], source["seed"]) == ("val", 4, "16×32", 0)
    # empty sampler and camera keys are the checkpoint's (sample_steps=2, xi=0.8), not today's defaults
    assert (source["sample_steps"], source["temperature"], source["t_pow_shift"]) == (2, 1.0, 2.0)
    assert (source["xi"], source["focal"]) == (0.8, 220.0)
    assert "visiontrain" in source and "torch" in source and "command" in source

    # given settings win; a second eval into the same out goes to out2 and leaves the first report alone
    first = (out / "metrics.json").read_text()
    assert VERBS["eval"][1](eval_config(tiny_run, out, "sample_steps=1", "temperature=0", "xi=0.85")) == 0
    assert (out / "metrics.json").read_text() == first
    again = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert (again["source"]["sample_steps"], again["source"]["temperature"], again["source"]["xi"]) == (1, 0.0, 0.85)
    assert again["psnr"] != record["psnr"] and again["baseline_psnr"] != record["baseline_psnr"]  # other cameras


def test_predict_from_a_panorama_then_from_its_views(tiny_run, tmp_path) -> None:
    import cv2

    pano = sorted((tiny_run.synth / "val").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    cfg = load_config(PanoramaPredictConfig, None, [f"weights={tiny_run.weights}", f"panorama={pano}", f"out={out}",
                                                    "device=cpu"])
    assert VERBS["predict"][1](cfg) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["figure.png", "panorama.png", "view_back.png", "view_front.png", "view_left.png",
                     "view_right.png"]
    views = ",".join(str(out / f"view_{n}.png") for n in ("front", "right", "back", "left"))
    cfg = load_config(PanoramaPredictConfig, None, [f"weights={tiny_run.weights}", f"views={views}", f"out={out}",
                                                    "device=cpu"])
    assert VERBS["predict"][1](cfg) == 0  # out holds results: a fresh out2, the first files untouched
    assert sorted(p.name for p in out.iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "pred2").iterdir()) == ["figure.png", "panorama.png"]
    assert cv2.imread(str(tmp_path / "pred2" / "panorama.png")).shape == (16, 32, 3)


@pytest.mark.parametrize("other", ["detect", "flow_pwc"])
def test_another_tasks_checkpoint_gets_one_clear_message(other, tiny_run, tmp_path, capsys) -> None:
    ckpt = tmp_path / f"{other}.pt"
    ckpt.write_bytes(lzma.decompress((LEGACY / f"{other}_last.pt.xz").read_bytes()))
    task = other.split("_")[0]
    pano = sorted((tiny_run.synth / "val").glob("*.jpg"))[0]
    for verb, inputs in (("eval", f"data={tiny_run.synth}"), ("predict", f"panorama={pano}")):
        out = tmp_path / verb
        assert main([verb, "panorama", f"weights={ckpt}", inputs, f"out={out}", "device=cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"{ckpt} is a {task} checkpoint (from `visiontrain train {task}`); panorama needs a "
                            f"panorama checkpoint (best.pt or last.pt of `visiontrain train panorama`)"), err
        assert err.count("\n") == 0 and not out.exists()
    # the same message for initial training weights
    assert main(["train", "panorama", f"weights={ckpt}", f"data={tiny_run.synth}", f"out={tmp_path / 'run'}",
                 "device=cpu", "max_steps=1", "tensorboard=false", "plots=false", "progress=false"]) == 2
    assert f"{ckpt} is a {task} checkpoint (from `visiontrain train {task}`); panorama needs a panorama " \
           f"checkpoint" in capsys.readouterr().err


def keys_in_help(verb: str, capsys) -> set[str]:
    assert main([verb, "panorama", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0] for line in lines[2:]}


def test_help_of_eval_and_predict_lists_only_their_keys(capsys) -> None:
    sampling = {"weights", "device", "seed", "sample_steps", "temperature", "t_pow_shift", "xi", "focal"}
    assert keys_in_help("eval", capsys) == sampling | {
        "data", "val_fraction", "synth_dir", "synth_train", "synth_val", "synth_size", "synth_seed", "eval_images",
        "batch_size", "workers", "lpips_weights", "fid_weights", "out"}
    assert keys_in_help("predict", capsys) == sampling | {"views", "panorama", "out"}
    assert {"epochs", "lr", "pano_size", "unet_channels"} <= keys_in_help("train", capsys)


def test_synth_verb_prints_sizes_as_height_by_width(tmp_path, capsys) -> None:
    assert main(["synth", "panorama", f"out={tmp_path / 's'}", "train=2", "val=1", "size=16", "seed=3"]) == 0
    assert len(list((tmp_path / "s" / "train").glob("*.jpg"))) == 2
    assert "wrote 2 train and 1 val panoramas (16×32) to" in capsys.readouterr().out
    assert main(["predict", "panorama", f"out={tmp_path / 'p'}"]) == 2
    assert "exactly one of views=F,R,B,L" in capsys.readouterr().err


def test_metrics_table_rounds_to_four_significant_digits() -> None:
    table = format_metrics_table({"psnr": 23.456789, "psnr_seen": 40.0, "baseline_ssim_unseen": 0.123456789,
                                  "val_flow": 1.23456})
    rows = {line[:16].strip(): line[16:].split() for line in table.splitlines()[1:]}
    assert rows["model psnr"] == ["23.46", "40", "nan"]
    assert rows["baseline ssim"][2] == "0.1235" and rows["val_flow"] == ["1.235"]
