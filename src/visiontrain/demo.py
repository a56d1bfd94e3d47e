"""``visiontrain demo``: the detection workflow end to end on built-in (synthetic MAR20) data.

synth → train yolov8n → eval (table, metrics.json, PR curve, confusion matrix) → predict (drawn
images, predictions.json) → export ONNX, in a few CPU minutes. Every step is the CLI verb a user
would run; the commands are printed so they can be copied.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from visiontrain.config import load_config, opt


def race_winner(epochs: int) -> list[str]:
    """Ultralytics' optimizer settings, which won the end-to-end race of issue 20 (BENCHMARKS.md: on the demo's
    data and 16 epochs, final mAP50-95 0.614 against 0.540 with the task's defaults and Ultralytics' 0.578), for
    an ``epochs``-long run: the warm-up leaves the last epoch alone, as Ultralytics' does."""
    return ["momentum=0.937", f"warmup_epochs={min(3, max(epochs - 1, 0))}", "warmup_bias_lr=0.1", "schedule=linear"]


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "demo folder (data/, train/, eval/, predict/); replaced on each run")
    train: int = opt(800, "synthetic training images")
    val: int = opt(100, "synthetic validation images")
    imgsz: int = opt(256, "image size")
    epochs: int = opt(32, "training epochs (1600 steps with the defaults)")
    batch_size: int = opt(16, "batch size")
    amp: str = opt("auto", "off | bf16 | auto (bf16 autocast where this CPU runs it faster than float32: "
                           "~2x on most recent CPUs, slower on some)")
    seed: int = opt(0, "seed")


def _run(argv: list[str]) -> None:
    from visiontrain.verbs import run_verb

    print("\n$ visiontrain " + " ".join(argv), flush=True)
    rc = run_verb(argv[0], argv[1], argv[2:])
    if rc:
        raise SystemExit(rc)


def main(argv: list[str]) -> int:
    cfg = load_config(DemoConfig, None, argv)
    t0 = time.time()
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    data, run_dir = out / "data", out / "train"
    _run(["synth", "detect", f"out={data}", f"train={cfg.train}", f"val={cfg.val}", f"imgsz={cfg.imgsz}",
          f"seed={cfg.seed}"])
    _run(["train", "detect", f"data={data}", f"out={run_dir}", f"imgsz={cfg.imgsz}", f"epochs={cfg.epochs}",
          f"batch_size={cfg.batch_size}", f"amp={cfg.amp}", f"seed={cfg.seed}", "eval_every=4",
          f"aug.close_mosaic={max(1, cfg.epochs // 6)}", *race_winner(cfg.epochs)])
    best = run_dir / "checkpoints" / "best.pt"
    _run(["eval", "detect", f"weights={best}", f"data={data}", f"out={out / 'eval'}"])
    val_images = data / "JPEGImages"
    sample = out / "sample_images"
    sample.mkdir()
    ids = (data / "ImageSets" / "Main" / "test.txt").read_text().split()[:8]
    for i in ids:
        shutil.copy(val_images / f"{i}.jpg", sample / f"{i}.jpg")
    _run(["predict", "detect", f"weights={best}", f"source={sample}", f"out={out / 'predict'}"])
    _run(["export", "detect", f"weights={best}", f"out={out / 'yolov8n.onnx'}"])
    import json

    m = json.loads((out / "eval" / "metrics.json").read_text())
    minutes = (time.time() - t0) / 60
    print(f"\ndemo done in {minutes:.1f} min: mAP50 {m['mAP50']:.3f}, mAP50-95 {m['mAP50-95']:.3f} on "
          f"{cfg.val} synthetic validation images")
    print(f"look at: {run_dir / 'plots'}/*.png (curves), {out / 'eval'}/pr_curve.png, {out / 'predict'}/*.jpg")
    return 0
