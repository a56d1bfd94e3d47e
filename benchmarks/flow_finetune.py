"""Unsupervised fine-tuning of a supervised RAFT on the target frames (issue 18): does it help, without GT?

    python benchmarks/flow_finetune.py --weights run/checkpoints/last.pt [--model raft_small_convex]
        [--cpu-minutes 10] [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/flow_finetune.py --summarize DIR [DIR ...] [--plot mask_kept.png]

``--summarize`` trains nothing: it reads the ``--out`` folders of earlier runs (one per seed or setting) and
prints one row per run (steps, target EPE before/after, share of the gap closed, check EPE, the mask's kept
share) and, with ``--plot``, draws every run's ``stat/mask_kept`` over its steps in one figure.

* Target: a held-out real-texture set — pairs made exactly like the real-texture check
  (:mod:`visiontrain.flow.synth.realcheck`: photographs under known layered motion) but with another seed,
  so the check itself stays untouched. Its frames are linked into a ``pairs:`` folder **without** the
  ``.flo`` files: the run cannot read ground truth even by mistake.
* Run: ``visiontrain train flow method=unsupervised`` (census + smoothness + occlusion masks on every RAFT
  iteration, full-image warping of an ``unsup_crop``; the README's fine-tuning recipe) from ``--weights``,
  for ``--cpu-minutes`` of process CPU time (the step count follows the measured cost, as in
  ``flow_supervised.py``).
* Scored before and after on the held-out set (with its GT) and on the real-texture check, beside zero
  flow and OpenCV DIS fast / medium. The goal of the issue: fine-tuning closes at least half of the gap
  between the model and DIS medium on the target.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import torch
from flow_supervised import TimedFlowTask, baseline_metrics, model_metrics, realcheck_dir
from flow_unsupervised import plot_mask_kept

from visiontrain.config import load_config
from visiontrain.engine.trainer import Trainer
from visiontrain.flow.config import FlowTrainConfig
from visiontrain.flow.inference import load_flow_model
from visiontrain.flow.synth.realcheck import CHECK_SEED, write_real_texture_check

HELDOUT_SEED = CHECK_SEED + 1000


def heldout(work: Path, pairs: int) -> tuple[Path, Path]:
    """``(chairs-layout folder with GT, pairs: folder of the same frames without GT)``."""
    gt = work / "heldout"
    if len(list((gt / "data").glob("*_flow.flo"))) != pairs:
        write_real_texture_check(gt, pairs=pairs, seed=HELDOUT_SEED)
    frames = work / "heldout_frames"
    frames.mkdir(parents=True, exist_ok=True)
    for image in sorted((gt / "data").glob("*_img[12].ppm")):
        link = frames / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
    return gt, frames


def gap_closed(target: dict[str, dict]) -> float:
    """Share of the before-fine-tuning EPE gap to DIS medium that fine-tuning closed on the target."""
    gap = target["supervised (before)"]["epe"] - target["OpenCV DIS (medium)"]["epe"]
    gain = target["supervised (before)"]["epe"] - target["fine-tuned, no GT (after)"]["epe"]
    return gain / gap if gap > 0 else float("nan")


def gap_text(target: dict[str, dict]) -> str:
    """``gap_closed`` in words; a model already ahead of DIS medium before fine-tuning has no gap to close."""
    closed = gap_closed(target)
    if closed == closed:  # not NaN
        return f"{100 * closed:.0f} %"
    before, after = target["supervised (before)"]["epe"], target["fine-tuned, no GT (after)"]["epe"]
    return f"no gap (ahead of DIS medium before: {before:.3f} vs {target['OpenCV DIS (medium)']['epe']:.3f}; after {after:.3f})"


def mask_kept(run: Path) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the logged ``train/stat/mask_kept`` of a run folder, in step order."""
    with open(run / "metrics.csv", newline="") as f:
        rows = sorted((int(r["step"]), float(r["value"])) for r in csv.DictReader(f)
                      if r["key"] == "train/stat/mask_kept")
    return [s for s, _ in rows], [v for _, v in rows]


def summarize(dirs: list[str], plot: str) -> int:
    """``--summarize``: one row per earlier run folder, and optionally the mask plot of all of them."""
    curves, steps = {}, {}
    print("| run | lr | seed | steps | target EPE before → after | gap to DIS medium closed | check EPE after "
          "| mask kept (min / last) |")
    print("|---|---|---|---|---|---|---|---|")
    for d in map(Path, dirs):
        res = json.loads((d / "finetune.json").read_text())
        sets = dict(kv.split("=", 1) for kv in res["args"]["set"])
        target, check = res["rows"]["held-out (target)"], res["rows"]["real-texture check"]
        at, kept = mask_kept(d / "run")
        label = f"{d.name} (lr {sets.get('lr', 'default')}, seed {sets.get('seed', '0')})"
        curves[label], steps[label] = kept, at
        print(f"| {d.name} | {sets.get('lr', 'default')} | {sets.get('seed', '0')} | {res['steps']} | "
              f"{target['supervised (before)']['epe']:.2f} → {target['fine-tuned, no GT (after)']['epe']:.2f} | "
              f"{gap_text(target)} | {check['fine-tuned, no GT (after)']['epe']:.2f} | "
              f"{min(kept):.2f} / {kept[-1]:.2f} |")
    if plot:
        plot_mask_kept(curves, Path(plot), steps)
        print(f"wrote {plot}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summarize", nargs="+", metavar="DIR", help="summarize earlier runs' --out folders")
    ap.add_argument("--plot", default="", help="with --summarize: write the mask_kept plot here")
    ap.add_argument("--weights", help="the supervised checkpoint to fine-tune (required unless --summarize)")
    ap.add_argument("--model", default="raft_small_convex")
    ap.add_argument("--cpu-minutes", type=float, default=10.0)
    ap.add_argument("--pairs", type=int, default=24, help="held-out real-texture pairs (the target frames)")
    ap.add_argument("--step-cpu", type=float, default=2.5, help="first guess of CPU-s per step (re-planned)")
    ap.add_argument("--iters-eval", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training-config override")
    a = ap.parse_args()
    if a.summarize:
        return summarize(a.summarize, a.plot)
    if not a.weights:
        ap.error("--weights is required")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.out) if a.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        target, frames = heldout(work, a.pairs)
        check = realcheck_dir(work / "realcheck")
        sets = {"held-out (target)": target, "real-texture check": check}
        rows: dict[str, dict[str, dict]] = {name: baseline_metrics(path) for name, path in sets.items()}
        before = load_flow_model(a.weights, a.model).model
        for name, path in sets.items():
            rows[name]["supervised (before)"] = model_metrics(before, path, a.iters_eval)
        budget = 60.0 * a.cpu_minutes
        overrides = [f"out={work / 'run'}", "method=unsupervised", f"model={a.model}", f"weights={a.weights}",
                     f"data=pairs:{frames}", "unsup_crop=128x192", "num_flow_updates_train=6",
                     f"num_flow_updates_eval={a.iters_eval}", f"max_steps={max(1, int(budget / a.step_cpu))}",
                     "batch_size=2", "warmup_steps=20", "device=cpu", "tensorboard=false", "plots=false",
                     "progress=false", "eval_every=0", "log_every=20", "amp=off", *a.set]
        task = TimedFlowTask(load_config(FlowTrainConfig, None, overrides), train_only=True, budget=budget)
        trainer = Trainer(task)
        task.trainer = trainer
        trainer.fit()
        steps, cpu_min = len(task.stamps), (task.stamps[-1] - task.stamps[0]) / 60
        after = load_flow_model(work / "run" / "checkpoints" / "last.pt", a.model).model
        for name, path in sets.items():
            rows[name]["fine-tuned, no GT (after)"] = model_metrics(after, path, a.iters_eval)
        (work / "finetune.json").write_text(json.dumps({"args": vars(a), "steps": steps, "cpu_min": cpu_min,
                                                         "rows": rows}, indent=1, default=str))
    print(f"{a.model} from {a.weights}: unsupervised fine-tuning on {a.pairs} held-out real-texture pairs "
          f"(no GT), {steps} steps, {cpu_min:.1f} CPU-min")
    print(f"{'method':<30}" + "".join(f"{n + ' EPE':>26}{'3px':>8}" for n in sets))
    for method in rows["held-out (target)"]:
        print(f"{method:<30}" + "".join(f"{rows[n][method]['epe']:>26.3f}{100 * rows[n][method]['3px']:>7.1f}%"
                                        for n in sets))
    print(f"share of the gap to DIS medium closed on the target: {gap_text(rows['held-out (target)'])} "
          f"(goal: at least 50 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
