"""Supervised flow (RAFT-small) figures.

    python benchmarks/flow_supervised.py overhead [--steps 12] [--repeats 3]
    python benchmarks/flow_supervised.py epe [--cpu-minutes 20] [--train 1000] [--val 40]
    python benchmarks/flow_supervised.py baselines --data DIR
    python benchmarks/flow_supervised.py realcheck [--weights CKPT ...] [--pictures 6]
    python benchmarks/flow_supervised.py upsample --model raft_small_convex [--iters-train 6] [--steps 12]

``overhead``: seconds per optimizer step of RAFT-small in visiontrain's Trainer (FlowTask) vs a bare
PyTorch loop over the same torchvision model, data, augmentation, loss, optimizer and gradient clipping.
Both run in this process, alternating, best of ``repeats`` each, with the same deterministic setting.

``epe``: validation EPE on synthetic FlyingChairs-layout pairs after ``--cpu-minutes`` of training
RAFT-small from scratch on the CPU, side by side with zero flow and OpenCV's DIS (medium preset) on the
same validation pairs. The budget is *process CPU time* (all threads; one thread by default), so a busy
shared machine changes the wall time but not the amount of training: the cost of one step is measured
first and ``max_steps`` set from it, then re-planned every 50 steps from the cost measured in the run
itself (the cosine schedule follows the planned total); the CPU time actually used is printed.

``upsample``: CPU seconds per Trainer step with ``upsample_train=all`` (the convex mask at every update,
as torchvision's RAFT) and ``last`` (the mask only for the last prediction), alternating; and one pair's
inference time both ways (the library's inference always uses ``last``: the same output).

``baselines``: only the zero-flow and DIS rows, on the validation pairs of ``--data`` (e.g. a held-out
set written with another seed; score trained checkpoints on it with ``visiontrain eval flow``).

``realcheck``: the real-texture check (:mod:`visiontrain.flow.synth.realcheck`: 24 photograph pairs,
192x256, under known layered motion, exact flow; never trained or tuned on): zero flow, OpenCV DIS fast
and medium, and every ``--weights`` checkpoint; pictures (frames, GT and predictions as colour wheels)
go to ``benchmarks/results/flow_realcheck/``. ``epe`` scores its trained model there too.

The synthetic training data is the built-in layered generator's unless ``--gen style=legacy`` (the
generator every figure before issue 18 was made with); ``--gen KEY=VALUE`` sets any ``gen.*`` key.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from visiontrain.config import load_config
from visiontrain.engine.runtime import cpu_bf16_speedup, cpu_description
from visiontrain.engine.trainer import Trainer
from visiontrain.flow.augment import FlowAugment
from visiontrain.flow.config import FlowTrainConfig
from visiontrain.flow.data import collate_flow, open_flow_dataset
from visiontrain.flow.inference import evaluate_flow, load_flow_model, predict_flow
from visiontrain.flow.losses.supervised import sequence_loss
from visiontrain.flow.metrics import FlowMetrics, format_comparison
from visiontrain.flow.models.raft import build_raft, raft_forward
from visiontrain.flow.sizes import parse_size
from visiontrain.flow.synth import FlowGenConfig
from visiontrain.flow.synthetic import write_synthetic_chairs
from visiontrain.flow.task import FlowTask
from visiontrain.flow.viz import flow_to_color, save_png

RESULTS = Path(__file__).resolve().parent / "results"
DIS_PRESETS = {"fast": cv2.DISOPTICAL_FLOW_PRESET_FAST, "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


def gen_config(settings: list[str]) -> FlowGenConfig:
    """A generator config from ``KEY=VALUE`` strings (``gen.`` prefix optional)."""
    return load_config(FlowGenConfig, None, [x.removeprefix("gen.") for x in settings])


def train_config(out: str, data: Path, a: argparse.Namespace, max_steps: int, **extra: str) -> FlowTrainConfig:
    overrides = [f"out={out}", f"data=chairs:{data}", f"model={a.model}", f"crop={a.crop}", f"max_steps={max_steps}",
                 f"batch_size={a.batch}", f"num_flow_updates_train={a.iters_train}",
                 f"num_flow_updates_eval={a.iters_eval}", f"lr={a.lr}", "device=cpu", "tensorboard=false",
                 "plots=false", "progress=false", "eval_every=0", "log_every=50", f"seed={a.seed}", f"amp={a.amp}"]
    overrides += [f"{k}={v}" for k, v in extra.items()] + list(a.set)
    return load_config(FlowTrainConfig, None, overrides)


# ------------------------------------------------------------------------------------ overhead
def bare_loop(cfg: FlowTrainConfig, steps: int) -> float:
    """The same work as the Trainer does per step, written as a plain loop."""
    torch.manual_seed(cfg.seed)
    model = build_raft(cfg.model).train()
    params_decay = [p for p in model.parameters() if p.ndim >= 2]
    params_no = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": params_decay, "weight_decay": cfg.weight_decay},
                                   {"params": params_no, "weight_decay": 0.0}], lr=cfg.lr)
    dataset = open_flow_dataset(cfg.data, "train", FlowAugment(cfg.aug, cfg.crop_hw), cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=lambda s: collate_flow(s, pad=True))
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        for batch in loader:
            preds = raft_forward(model, batch["image1"], batch["image2"], cfg.num_flow_updates_train)
            loss = sequence_loss(preds, batch["flow"], batch["valid"], cfg.gamma, cfg.max_flow)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - t0) / steps


class TrainOnlyFlowTask(FlowTask):
    """No validation set, so ``fit`` times training steps only (the bare loop evaluates nothing either)."""

    def build_datasets(self):
        return super().build_datasets()[0], None


def trainer_loop(cfg: FlowTrainConfig) -> float:
    trainer = Trainer(TrainOnlyFlowTask(cfg))
    t0 = time.perf_counter()
    trainer.fit()
    return (time.perf_counter() - t0) / cfg.max_steps


def run_overhead(a: argparse.Namespace, data: Path) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)  # what the Trainer sets (deterministic=true)
    bare, ours = [], []
    for r in range(a.repeats):
        with tempfile.TemporaryDirectory() as d:
            cfg = train_config(f"{d}/run", data, a, a.steps)
            bare.append(bare_loop(cfg, a.steps))
            ours.append(trainer_loop(cfg))
        print(f"repeat {r + 1}: bare {bare[-1]:.3f} s/step, Trainer {ours[-1]:.3f} s/step", flush=True)
    b, o = min(bare), min(ours)
    print(f"\nRAFT-small training step, batch {a.batch}, crop {a.crop}, {a.iters_train} updates, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':<22}{'s/step':>10}")
    print(f"{'bare PyTorch loop':<22}{b:>10.3f}")
    print(f"{'visiontrain Trainer':<22}{o:>10.3f}")
    print(f"ratio Trainer/bare: {o / b:.3f}  (goal <= 1.05)")


def run_upsample(a: argparse.Namespace, data: Path) -> None:
    """``upsample_train=all`` vs ``last`` (convex models): CPU seconds per Trainer step, alternating repeats (best
    kept), and the inference time of one pair with the mask at every update vs once."""
    from visiontrain.flow.models.raft import build_raft, raft_forward

    cost: dict[str, list[float]] = {"all": [], "last": []}
    for r in range(a.repeats):
        for mode in cost:
            with tempfile.TemporaryDirectory() as d:
                cfg = train_config(f"{d}/run", data, a, a.steps, upsample_train=mode)
                trainer = Trainer(TrainOnlyFlowTask(cfg))
                t0 = time.process_time()
                trainer.fit()
                cost[mode].append((time.process_time() - t0) / a.steps)
        print(f"repeat {r + 1}: " + ", ".join(f"{m} {v[-1]:.3f}" for m, v in cost.items()) + " CPU-s/step", flush=True)
    model = build_raft(a.model).eval()
    image1, image2 = torch.rand(1, 3, *parse_size(a.size, "size")), torch.rand(1, 3, *parse_size(a.size, "size"))
    infer: dict[str, list[float]] = {"all": [], "last": []}
    with torch.no_grad():
        for _ in range(5):
            for mode in infer:
                t0 = time.process_time()
                raft_forward(model, image1, image2, a.iters_eval, upsample=mode)
                infer[mode].append(time.process_time() - t0)
    tr = {m: min(v) for m, v in cost.items()}
    inf = {m: min(v) for m, v in infer.items()}
    print(f"\n{a.model}, batch {a.batch}, crop {a.crop}, {a.iters_train} updates training / {a.iters_eval} at "
          f"inference ({a.size}), {torch.get_num_threads()} threads; CPU seconds (best of the repeats)")
    print(f"{'':<34}{'all':>8}{'last':>8}{'last/all':>10}")
    print(f"{'training step (Trainer)':<34}{tr['all']:>8.3f}{tr['last']:>8.3f}{tr['last'] / tr['all']:>10.3f}")
    print(f"{'inference, one pair':<34}{inf['all']:>8.3f}{inf['last']:>8.3f}{inf['last'] / inf['all']:>10.3f}")


# ----------------------------------------------------------------------------------------- EPE
class TimedFlowTask(FlowTask):
    """FlowTask that records the process CPU time at every training step (``train_only``: no val set).

    With ``budget`` (CPU seconds) and ``trainer`` set, it re-plans the run's length every
    ``REPLAN_EVERY`` steps from the CPU cost per step measured so far, so the run spends its budget
    even when the short calibration run misjudged the step cost (up to 7 % typically, 18 % once, with two
    runs side by side). The learning-rate schedule is a function of the planned total, so it follows."""

    REPLAN_EVERY = 50

    def __init__(self, cfg, train_only: bool = False, budget: float = 0.0):
        super().__init__(cfg)
        self.stamps: list[float] = []
        self.train_only = train_only
        self.budget = budget
        self.trainer: Trainer | None = None
        self.replans = 0

    def build_datasets(self):
        train, val = super().build_datasets()
        return train, (None if self.train_only else val)

    def training_step(self, model, batch, info):
        self.stamps.append(time.process_time())
        done = len(self.stamps) - 1  # steps finished before this one
        if self.budget and self.trainer is not None and done >= self.REPLAN_EVERY and done % self.REPLAN_EVERY == 0:
            cost = (self.stamps[-1] - self.stamps[1]) / (done - 1)  # skip the first step (warm-up)
            left = self.budget - (self.stamps[-1] - self.stamps[0])
            total = done + max(1, round(left / cost))
            self.trainer.total_steps = total
            self.trainer.epochs = -(-total // self.trainer.steps_per_epoch)
            self.replans += 1
        return super().training_step(model, batch, info)


def dis_flow(image1: np.ndarray, image2: np.ndarray, preset: str = "medium") -> np.ndarray:
    """OpenCV DIS (``fast`` or ``medium`` preset) on 8-bit grey images -> ``[H, W, 2]``."""
    def grey(x: np.ndarray) -> np.ndarray:
        return cv2.cvtColor((x * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY)

    dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
    return dis.calc(grey(image1), grey(image2), None)


def baseline_metrics(data: Path) -> dict[str, dict[str, float]]:
    """Zero flow, DIS fast and DIS medium on the val split of the chairs-layout folder ``data``."""
    val = open_flow_dataset(f"chairs:{data}", "val")
    meters = {"zero flow": FlowMetrics(), "OpenCV DIS (fast)": FlowMetrics(), "OpenCV DIS (medium)": FlowMetrics()}
    seconds = dict.fromkeys(DIS_PRESETS, 0.0)
    for i in range(len(val)):
        s = val.load(i)
        gt = torch.from_numpy(s["flow"]).permute(2, 0, 1)[None]
        valid = torch.from_numpy(s["valid"])[None]
        meters["zero flow"].update(torch.zeros_like(gt), gt, valid)
        for preset in DIS_PRESETS:
            t0 = time.perf_counter()
            flow = dis_flow(s["image1"], s["image2"], preset)
            seconds[preset] += time.perf_counter() - t0
            meters[f"OpenCV DIS ({preset})"].update(torch.from_numpy(flow).permute(2, 0, 1)[None], gt, valid)
    out = {name: meter.compute() for name, meter in meters.items()}
    for preset in DIS_PRESETS:
        out[f"OpenCV DIS ({preset})"]["seconds_per_pair"] = seconds[preset] / len(val)
    return out


def model_metrics(model: torch.nn.Module, data: Path, iters: int) -> dict[str, float]:
    """EPE etc. of ``model`` on the val split of ``data`` (batch 1: exact per-image numbers)."""
    val = open_flow_dataset(f"chairs:{data}", "val")
    loader = torch.utils.data.DataLoader(val, batch_size=1, shuffle=False, collate_fn=collate_flow)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = evaluate_flow(model, loader, iters)
    model.train(was_training)
    return metrics


def realcheck_dir(where: Path) -> Path:
    """The real-texture check written into ``where`` (once; reused when complete)."""
    from visiontrain.flow.synth.realcheck import CHECK_PAIRS, write_real_texture_check

    if len(list((where / "data").glob("*_flow.flo"))) != CHECK_PAIRS:
        write_real_texture_check(where)
    return where


def realcheck_pictures(data: Path, models: dict[str, torch.nn.Module], iters: int, count: int,
                       out: Path = RESULTS / "flow_realcheck") -> list[Path]:
    """For the first ``count`` check pairs: one PNG per pair, a row of frame 1, frame 2, GT and then
    each prediction (DIS fast, DIS medium, ``models``) as colour wheels on the GT's scale."""
    val = open_flow_dataset(f"chairs:{data}", "val")
    written = []
    for i in range(min(count, len(val))):
        s = val.load(i)
        scale = float(np.linalg.norm(s["flow"], axis=-1).max())
        flows = {preset: dis_flow(s["image1"], s["image2"], preset) for preset in DIS_PRESETS}
        batch = collate_flow([val[i]])
        with torch.no_grad():
            for name, model in models.items():
                flows[name] = predict_flow(model.eval(), batch["image1"], batch["image2"], iters)[0].permute(
                    1, 2, 0).numpy()
        panels = [(s["image1"] * 255).round().astype(np.uint8), (s["image2"] * 255).round().astype(np.uint8),
                  flow_to_color(s["flow"], scale)] + [flow_to_color(f, scale) for f in flows.values()]
        path = out / f"pair_{i + 1:02d}.png"
        save_png(path, np.hstack(panels))
        written.append(path)
    (out / "README.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "README.txt").write_text("pair_NN.png: frame 1 | frame 2 | ground truth | " + " | ".join(
        [f"DIS {p}" for p in DIS_PRESETS] + list(models)) + " (colour wheel, saturation on the GT's largest |flow|)\n")
    return written


def run_realcheck(a: argparse.Namespace, where: Path) -> None:
    data = realcheck_dir(where)
    rows = baseline_metrics(data)
    models = {}
    for weights in a.weights:
        loaded = load_flow_model(weights, "", "cpu")
        name = f"{loaded.name} ({weights})"
        models[name] = loaded.model
        rows[name] = model_metrics(loaded.model, data, a.iters_eval)
    print(f"real-texture check: {int(rows['zero flow']['images'])} photograph pairs (192x256, exact layered flow), "
          f"RAFT with {a.iters_eval} updates")
    print(format_comparison(rows, width=48))
    if a.pictures:
        paths = realcheck_pictures(data, models, a.iters_eval, a.pictures)
        print(f"wrote {len(paths)} pictures to {paths[0].parent}")


def run_epe(a: argparse.Namespace, data: Path, out_dir: Path) -> None:
    budget = 60.0 * a.cpu_minutes
    # 1. the CPU cost of one training step (median over steps 3..N of a short run)
    calib = TimedFlowTask(train_config(str(out_dir / "calibrate"), data, a, a.calibration_steps), train_only=True)
    Trainer(calib).fit()
    step_cpu = statistics.median(np.diff(calib.stamps[2:]).tolist())
    steps = max(1, int(budget / step_cpu))
    print(f"one step costs {step_cpu:.2f} CPU-s -> {steps} steps in {a.cpu_minutes} CPU-minutes", flush=True)
    # 2. train for that many steps, then evaluate (the Trainer evaluates at the end)
    task = TimedFlowTask(train_config(str(out_dir / "run"), data, a, steps, warmup_steps=str(a.warmup)),
                         budget=budget)
    trainer = Trainer(task)
    task.trainer = trainer
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = trainer.fit()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    train_cpu = task.stamps[-1] - task.stamps[0] + step_cpu
    print(f"trained {result['step']} steps (planned {steps}; re-planned {task.replans} times from the measured "
          f"step cost): {train_cpu / 60:.1f} CPU-min in training steps, "
          f"{cpu / 60:.1f} CPU-min / {wall / 60:.1f} wall-min including evaluation", flush=True)
    rows = baseline_metrics(data)
    real = baseline_metrics(realcheck_dir(out_dir / "realcheck"))
    real_model = model_metrics(trainer.ema.module if trainer.ema is not None else trainer.model,
                               out_dir / "realcheck", a.iters_eval)  # the model the Trainer evaluated
    amp = ", bf16" if a.amp == "bf16" else ""
    if a.set:
        print("training overrides: " + " ".join(a.set))
    rows[f"{a.model}, {a.cpu_minutes:g} CPU-min{amp} ({result['step']} steps)"] = result["metrics"]
    n = int(rows["zero flow"]["images"])
    print(f"\nvalidation: {n} synthetic chairs-layout pairs {a.size}, RAFT eval with {a.iters_eval} updates; "
          f"bf16/fp32 convolution speed on this CPU {cpu_bf16_speedup():.2f}x (it sets how many steps "
          f"a CPU-minute buys with --amp bf16)\nCPU: {cpu_description()}")
    print(format_comparison(rows, width=40))
    real[f"{a.model}, {a.cpu_minutes:g} CPU-min{amp} ({result['step']} steps)"] = real_model
    print(f"\nreal-texture check ({int(real['zero flow']['images'])} photograph pairs, 192x256):")
    print(format_comparison(real, width=40))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["overhead", "epe", "both", "baselines", "realcheck", "upsample"])
    ap.add_argument("--data", default="", help="existing chairs-layout folder (default: synthesise into a temp dir)")
    ap.add_argument("--train", type=int, default=1000, help="synthetic training pairs")
    ap.add_argument("--val", type=int, default=40, help="synthetic validation pairs")
    ap.add_argument("--size", default="192x256", help="synthetic image size HxW")
    ap.add_argument("--crop", default="128x160", help="training crop HxW")
    ap.add_argument("--model", default="raft_small", help="raft_small | raft_small_convex | raft_large")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak lr (1e-3 learns fastest in short budgets)")
    ap.add_argument("--warmup", type=int, default=20, help="lr warmup steps (epe)")
    ap.add_argument("--iters-train", type=int, default=4, help="RAFT updates while training")
    ap.add_argument("--iters-eval", type=int, default=12, help="RAFT updates at evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12, help="overhead: steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="overhead: alternating repeats (best kept)")
    ap.add_argument("--cpu-minutes", type=float, default=20.0,
                    help="epe: training budget (issue 5's figure: 20; 30 gives the 'same time' row of issue 6)")
    ap.add_argument("--amp", choices=["off", "bf16"], default="off", help="autocast while training (evaluation: fp32)")
    ap.add_argument("--calibration-steps", type=int, default=24, help="epe: steps of the timing run (the median of all but the first two sets the step count)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra training-config override, repeatable (e.g. --set aug.scale_prob=0)")
    ap.add_argument("--out", default="", help="epe: run folder (default: temp dir)")
    ap.add_argument("--gen", action="append", default=[], metavar="KEY=VALUE",
                    help="generator setting for the synthetic data, repeatable (e.g. --gen style=legacy)")
    ap.add_argument("--weights", nargs="*", default=[], help="realcheck: checkpoints to score")
    ap.add_argument("--pictures", type=int, default=6, help="realcheck: pairs to draw (0 = none)")
    ap.add_argument("--check-dir", default="", help="realcheck: where the check is written (default: temp dir)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared CPU, OpenMP threads spinning against other "
                         "processes cost several times more CPU per step; 0 = torch's default)")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.part == "baselines":
        if not a.data:
            ap.error("baselines needs --data DIR (a chairs-layout folder with validation pairs)")
        rows = baseline_metrics(Path(a.data))
        print(f"validation pairs of {a.data}: {int(rows['zero flow']['images'])}")
        print(format_comparison(rows, width=40))
        return 0
    if a.part == "realcheck":
        with tempfile.TemporaryDirectory() as tmp:
            run_realcheck(a, Path(a.check_dir) if a.check_dir else Path(tmp) / "realcheck")
        return 0
    if a.cpu_minutes > 20:
        print(f"note: {a.cpu_minutes:g} CPU-minutes is beyond issue 5's 20-minute figure", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else Path(tmp) / "chairs"
        if not a.data:
            t0 = time.perf_counter()
            n_train = a.train if a.part not in ("overhead", "upsample") else max(a.batch * a.steps, 16)
            write_synthetic_chairs(data, n_train, a.val, parse_size(a.size, "size"), seed=a.seed, gen=gen_config(a.gen))
            print(f"synthesised {n_train} + {a.val} pairs ({a.size}, {gen_config(a.gen).style} generator) in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        if a.part in ("overhead", "both"):
            run_overhead(a, data)
        if a.part == "upsample":
            run_upsample(a, data)
        if a.part in ("epe", "both"):
            run_epe(a, data, Path(a.out) if a.out else Path(tmp) / "runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
