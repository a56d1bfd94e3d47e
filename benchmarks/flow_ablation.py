"""Which generator factors make a flow model transfer to real textures: one factor off at a time.

    python benchmarks/flow_ablation.py [--cpu-minutes 3] [--train 240] [--variants full,legacy,...]
    python benchmarks/flow_ablation.py --stats [--pairs 40]

For every variant the same RAFT-small (same seed, batch, crop, schedule) is trained from scratch for the
same CPU budget on a synthetic set written by the built-in generator with one ``gen.*`` factor switched
off (``legacy``: the generator before issue 18), then scored on

* the real-texture check (:mod:`visiontrain.flow.synth.realcheck`; reported, never tuned on), and
* the built-in validation set: pairs of the full layered generator written with another seed,

beside zero flow and OpenCV DIS fast / medium. The budget is process CPU time (one thread by default;
``flow_supervised.py``'s re-planning: the step count follows the cost measured in the run). With a
longer budget and ``--variants full,legacy`` this is the headline comparison of the new generator with
the old one. Results go to ``--out`` (``results.json``) and are printed as a table.

``--stats`` trains nothing: it compares what the data look like (motion magnitudes, visible share,
spectral slope of frame 1) for the legacy and layered generators and the real-texture check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flow_supervised import (
    TimedFlowTask,
    baseline_metrics,
    model_metrics,
    realcheck_dir,
    train_config,
)

from visiontrain.engine.trainer import Trainer
from visiontrain.flow.sizes import parse_size
from visiontrain.flow.synth import FlowGenConfig
from visiontrain.flow.synthetic import write_synthetic_chairs

PHOTOMETRIC = {"motion_blur": False, "lighting": False, "noise": False, "jpeg": False}
VARIANTS: dict[str, dict] = {
    "full": {},
    "legacy": {"style": "legacy"},
    "no_long_tail": {"long_tail": False},
    "no_rotation_zoom": {"rotation_zoom": False},
    "no_nonrigid": {"nonrigid": False},
    "one_layer": {"min_layers": 1, "max_layers": 1},
    "noise_textures": {"textures": "noise"},
    "no_camera_effects": PHOTOMETRIC,
    "no_motion_blur": {"motion_blur": False},
    "no_lighting": {"lighting": False},
    "no_noise": {"noise": False},
    "no_jpeg": {"jpeg": False},
}
DEFAULT_VARIANTS = "full,legacy,no_long_tail,no_rotation_zoom,no_nonrigid,one_layer,noise_textures,no_camera_effects"


def train_variant(name: str, gen: FlowGenConfig, a: argparse.Namespace, work: Path, budget: float | None = None,
                  weights: str = "", run: str = "", fixed_steps: int = 0) -> tuple[torch.nn.Module, dict]:
    """Train on ``name``'s data for ``budget`` CPU seconds (default ``--cpu-minutes``), from ``weights``;
    with ``fixed_steps``, for exactly that many steps instead (no re-planning)."""
    data = work / f"data_{name}"
    t0 = time.process_time()
    if not (data / "FlyingChairs_train_val.txt").is_file():
        write_synthetic_chairs(data, a.train, 1, parse_size(a.size, "size"), seed=a.data_seed, gen=gen)
    gen_cpu = time.process_time() - t0
    budget = 60.0 * a.cpu_minutes if budget is None else budget
    steps = fixed_steps or max(1, int(budget / a.step_cpu))
    extra = {"warmup_steps": str(a.warmup), **({"weights": weights} if weights else {})}
    task = TimedFlowTask(train_config(str(work / f"run_{run or name}"), data, a, steps, **extra),
                         train_only=True, budget=0.0 if fixed_steps else budget)
    trainer = Trainer(task)
    task.trainer = trainer
    trainer.fit()
    train_cpu = task.stamps[-1] - task.stamps[0] + a.step_cpu
    model = trainer.ema.module if trainer.ema is not None else trainer.model
    return model, {"steps": len(task.stamps), "train_cpu_min": train_cpu / 60, "data_cpu_s": gen_cpu}


def train_curriculum(name: str, a: argparse.Namespace, work: Path) -> tuple[torch.nn.Module, dict]:
    """``A>B``: ``--first-share`` of the budget on variant A's data, the rest on B's, starting from A's final
    weights (a fresh optimizer and warm-up + cosine schedule per stage, as FlyingChairs -> Things schedules
    do); the same total CPU budget as a one-stage variant."""
    stages = name.split(">")
    shares = [a.first_share] + [(1 - a.first_share) / (len(stages) - 1)] * (len(stages) - 1)
    weights, info = "", {"steps": 0, "train_cpu_min": 0.0, "data_cpu_s": 0.0}
    fixed = a.steps or [0] * len(stages)
    if len(fixed) != len(stages):
        raise SystemExit(f"--steps gives {len(fixed)} step counts for the {len(stages)} stages of {name}")
    model = None
    for k, (stage, share) in enumerate(zip(stages, shares)):
        run = f"{'_then_'.join(stages[:k + 1])}"
        model, part = train_variant(stage, FlowGenConfig(**VARIANTS[stage]), a, work, 60.0 * a.cpu_minutes * share,
                                    weights, run, fixed[k])
        weights = str(work / f"run_{run}" / "checkpoints" / "last.pt")
        for key in info:
            info[key] += part[key]
    assert model is not None
    return model, info


def calibrate(a: argparse.Namespace, work: Path) -> float:
    """CPU seconds of one training step (median of steps 3..N of a short run on the full generator's data)."""
    data = work / "data_calibration"
    write_synthetic_chairs(data, max(a.batch * a.calibration_steps, 16), 1, parse_size(a.size, "size"), seed=99)
    task = TimedFlowTask(train_config(str(work / "calibrate"), data, a, a.calibration_steps), train_only=True)
    Trainer(task).fit()
    return statistics.median(np.diff(task.stamps[2:]).tolist())


def table(rows: dict[str, dict], baselines: dict[str, dict[str, dict]]) -> str:
    lines = [f"{'variant':<22}{'steps':>7}{'CPU-min':>9}{'real EPE':>10}{'real 3px':>10}{'val EPE':>9}{'val 3px':>9}"]
    for name, r in baselines["real"].items():
        v = baselines["val"][name]
        lines.append(f"{name:<22}{'':>7}{'':>9}{r['epe']:>10.3f}{100 * r['3px']:>9.1f}%{v['epe']:>9.3f}"
                     f"{100 * v['3px']:>8.1f}%")
    for name, r in rows.items():
        lines.append(f"{name:<22}{r['steps']:>7}{r['train_cpu_min']:>9.1f}{r['real']['epe']:>10.3f}"
                     f"{100 * r['real']['3px']:>9.1f}%{r['val']['epe']:>9.3f}{100 * r['val']['3px']:>8.1f}%")
    lines.append("(real: the real-texture check, 24 photograph pairs 192x256; val: built-in validation pairs of the "
                 "full layered generator, another seed; EPE in px; 3px: % of pixels with EPE below 3 px)")
    return "\n".join(lines)


def data_stats(pairs: list) -> dict[str, float]:
    """|flow| percentiles, share of pixels moving > 16 px, visible share, spectral slope of frame 1."""
    mags = np.concatenate([np.linalg.norm(p.flow, axis=-1).ravel() for p in pairs])
    slopes = []
    for p in pairs:
        grey = p.image1.mean(-1)
        grey = (grey - grey.mean()) * np.hanning(grey.shape[0])[:, None] * np.hanning(grey.shape[1])[None]
        power = np.abs(np.fft.fft2(grey)) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(grey.shape[0]), np.fft.fftfreq(grey.shape[1]), indexing="ij")
        f = np.hypot(fx, fy)
        bins = np.geomspace(0.02, 0.25, 10)
        idx = np.digitize(f, bins)
        centres = [np.sqrt(bins[k - 1] * bins[k]) for k in range(1, len(bins))]
        slopes.append(np.polyfit(np.log(centres), np.log([power[idx == k].mean() for k in range(1, len(bins))]), 1)[0])
    return {"p50": float(np.percentile(mags, 50)), "p90": float(np.percentile(mags, 90)),
            "p99": float(np.percentile(mags, 99)), "max": float(mags.max()), "over16": float((mags > 16).mean()),
            "visible": float(np.mean([p.visible.mean() for p in pairs])), "slope": float(np.median(slopes))}


def run_stats(a: argparse.Namespace) -> None:
    from visiontrain.flow.synth import flow_pair
    from visiontrain.flow.synth.realcheck import real_texture_pair
    from visiontrain.flow.synthetic import pair_rng

    size = parse_size(a.size, "size")
    sets = {"legacy generator": [flow_pair(pair_rng(0, i), size, FlowGenConfig(style="legacy"))
                                 for i in range(1, a.pairs + 1)],
            "layered generator": [flow_pair(pair_rng(0, i), size) for i in range(1, a.pairs + 1)],
            "real-texture check": [real_texture_pair(i, size) for i in range(1, min(a.pairs, 24) + 1)]}
    print(f"{a.pairs} pairs each ({a.size}; the check has 24)")
    print(f"{'data':<22}{'|flow| p50':>11}{'p90':>7}{'p99':>7}{'max':>7}{'>16 px':>8}{'visible':>9}{'slope':>7}")
    for name, pairs in sets.items():
        s = data_stats(pairs)
        print(f"{name:<22}{s['p50']:>11.1f}{s['p90']:>7.1f}{s['p99']:>7.1f}{s['max']:>7.1f}{100 * s['over16']:>7.1f}%"
              f"{100 * s['visible']:>8.1f}%{s['slope']:>7.2f}")
    print("(|flow| in px; >16 px: share of pixels; visible: share of frame-1 pixels visible in frame 2; slope: "
          "log-log slope of frame 1's power spectrum over 0.02-0.25 cycles/px)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated, from {', '.join(VARIANTS)}; A>B: a curriculum (A's data first, then B's, "
                         f"from A's weights, within the same budget)")
    ap.add_argument("--first-share", type=float, default=0.5, help="A>B: share of the budget spent on A")
    ap.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[],
                    help="fixed step counts instead of the CPU budget, one per stage of A>B (e.g. 5200,5400): "
                         "the same training on any machine")
    ap.add_argument("--cpu-minutes", type=float, default=3.0, help="training budget per variant (process CPU)")
    ap.add_argument("--train", type=int, default=240, help="training pairs per variant")
    ap.add_argument("--val", type=int, default=20, help="built-in validation pairs (full generator, seed 1)")
    ap.add_argument("--size", default="192x256", help="synthetic image size HxW")
    ap.add_argument("--crop", default="128x160", help="training crop HxW")
    ap.add_argument("--model", default="raft_small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters-train", type=int, default=4)
    ap.add_argument("--iters-eval", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="training seed (the same for every variant)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the training sets")
    ap.add_argument("--amp", choices=["off", "bf16"], default="off")
    ap.add_argument("--calibration-steps", type=int, default=12)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training-config override")
    ap.add_argument("--out", default="", help="work folder (data, runs, results.json); default: temp dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats", action="store_true", help="only compare the data (no training)")
    ap.add_argument("--pairs", type=int, default=40, help="--stats: pairs per generator")
    a = ap.parse_args()
    if a.stats:
        run_stats(a)
        return 0
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if any(part not in VARIANTS for part in n.split(">"))]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.out) if a.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        real = realcheck_dir(work / "realcheck")
        val = work / "val_full_s1"
        if not (val / "FlyingChairs_train_val.txt").is_file():
            write_synthetic_chairs(val, 0, a.val, parse_size(a.size, "size"), seed=1)
        baselines = {"real": baseline_metrics(real), "val": baseline_metrics(val)}
        a.step_cpu = calibrate(a, work)
        print(f"one step costs {a.step_cpu:.2f} CPU-s -> ~{int(60 * a.cpu_minutes / a.step_cpu)} steps per variant"
              + (f" (fixed instead: {'+'.join(map(str, a.steps))})" if a.steps else ""), flush=True)
        rows: dict[str, dict] = {}
        for name in names:
            if ">" in name:
                model, info = train_curriculum(name, a, work)
            else:
                model, info = train_variant(name, FlowGenConfig(**VARIANTS[name]), a, work,
                                            fixed_steps=sum(a.steps))
            info["real"] = model_metrics(model, real, a.iters_eval)
            info["val"] = model_metrics(model, val, a.iters_eval)
            rows[name] = info
            print(f"{name}: {info['steps']} steps, {info['train_cpu_min']:.1f} CPU-min; real EPE "
                  f"{info['real']['epe']:.3f}, val EPE {info['val']['epe']:.3f}", flush=True)
            (work / "results.json").write_text(json.dumps({"args": vars(a), "baselines": baselines, "rows": rows},
                                                          indent=1, default=str))
        print(f"\n{a.model}, {a.cpu_minutes:g} CPU-min per variant, batch {a.batch}, crop {a.crop}, "
              f"{a.train} training pairs {a.size}, {a.iters_eval} updates at evaluation")
        print(table(rows, baselines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
