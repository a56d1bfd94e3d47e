"""Panorama from four fisheye views: the flow-matching model after N CPU-minutes of training vs the direct
back-projection baseline, on synthetic panoramas.

What it does:
  1. synthesises panoramas (``visiontrain.panorama.synthetic``) unless ``--data`` is given;
  2. trains ``PanoramaTask``'s model for ``--minutes`` of *process CPU time* (``time.process_time``, all
     threads; on a shared machine wall time would measure the neighbours), AdamW with a linear warmup and a
     cosine decay over the CPU budget, weight EMA (the engine's ``ModelEMA``, decay 0.999);
  3. evaluates the EMA model with the task's own ``evaluate`` (same seed → same noise) at 12 Euler steps
     (and 1 and 4; and at 12 steps with sampler temperature 0.5 and 0), and the back-projection baseline
     on the same panoramas: PSNR / SSIM over the whole panorama, the seen and the unseen region;
  4. times sampling per panorama (batch 1: conditioning + N steps) at 1, 4 and 12 steps;
  5. writes ``samples/*.png`` (views, generated, baseline, ground truth), ``results.json`` and
     ``results.md`` under ``--out``.

The loop is a plain one (not ``engine.trainer.fit``) because it stops on a CPU-time budget rather than a
step count; it uses the task's datasets, ``training_step`` and ``evaluate`` unchanged.

Usage: python benchmarks/panorama.py [--minutes 30] [--threads 2] [--out runs/bench_panorama] [key=value ...]
       (key=value: any PanoramaTrainConfig key, e.g. pano_size=64 view_size=128 batch_size=8)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from visiontrain.config import load_config, to_dict
from visiontrain.engine.checkpoint import atomic_save, checkpoint_header
from visiontrain.engine.ema import ModelEMA
from visiontrain.engine.optim import default_param_groups
from visiontrain.engine.task import StepInfo
from visiontrain.panorama.baseline import backprojection_baseline
from visiontrain.panorama.config import PanoramaTrainConfig
from visiontrain.panorama.inference import Sampler, evaluation_generator
from visiontrain.panorama.metrics import REGIONS
from visiontrain.panorama.task import PanoramaTask
from visiontrain.panorama.viz import save_panorama_figure


def train_for(task: PanoramaTask, model: torch.nn.Module, cpu_seconds: float, log_every: int = 20) -> dict:
    cfg = task.cfg
    start_cpu, start_wall = time.process_time(), time.time()
    train, _ = task.build_datasets()  # with distill.cache this runs the teacher: inside the budget
    prep = time.process_time() - start_cpu
    if prep > 1:
        print(f"datasets ready after {prep / 60:.1f} CPU-min (counted in the budget)")
    opt = torch.optim.AdamW(default_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.momentum, 0.999))
    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.warmup, cfg.ema.start_step)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, epoch, losses = 0, 0, []
    model.train()
    while True:
        train.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                             generator=gen, num_workers=cfg.workers, collate_fn=task.collate)
        for batch in loader:
            used = time.process_time() - start_cpu
            if used >= cpu_seconds:
                wall = time.time() - start_wall
                print(f"stopped after {step} steps ({epoch} epochs), {used / 60:.1f} CPU-min, {wall / 60:.1f} wall-min")
                return {"steps": step, "epochs": epoch, "cpu_minutes": used / 60, "wall_minutes": wall / 60,
                        "prep_cpu_minutes": prep / 60,
                        "final_loss": statistics.mean(losses[-50:]) if losses else math.nan, "ema": ema}
            frac = (used - prep) / max(cpu_seconds - prep, 1e-9)  # the schedule spans the training part
            warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            lr = cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = sum(task.training_step(model, batch, StepInfo()).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            step += 1
            ema.update(model, step)
            losses.append(float(loss.detach()))
            if step % log_every == 0:
                print(f"step {step:5d}  loss {statistics.mean(losses[-log_every:]):.4f}  lr {lr:.2e}  "
                      f"cpu {used / 60:.1f} min")
        epoch += 1


@torch.no_grad()
def sampling_latency(task: PanoramaTask, model: torch.nn.Module, val, sampler: Sampler, repeats: int = 3) -> float:
    """Median seconds per panorama at batch 1 (conditioning + ``sampler.steps`` Euler steps)."""
    sample = task.collate([val[0]])
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        sampler.generate(model, sample["views"], sample["cameras"], evaluation_generator(r, 0))
        if r:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget in process CPU-minutes")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default="runs/bench_panorama")
    ap.add_argument("--samples", type=int, default=4, help="sample figures to write")
    ap.add_argument("overrides", nargs="*", help="PanoramaTrainConfig key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = load_config(PanoramaTrainConfig, None, ["device=cpu", f"synth_dir={out / 'synth'}", "synth_train=512",
                                                  "synth_val=32", *args.overrides])
    torch.manual_seed(cfg.seed)
    task = PanoramaTask(cfg)
    model = task.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {task.model_signature()}: {n_params / 1e6:.2f} M parameters; {args.threads} threads")
    run = train_for(task, model, args.minutes * 60)
    ema_model = run.pop("ema").module.eval()
    out.mkdir(parents=True, exist_ok=True)
    atomic_save({**checkpoint_header(task), "model": ema_model.state_dict(), "step": run["steps"]}, out / "ema.pt")
    print(f"wrote {out / 'ema.pt'} (EMA weights; `visiontrain eval panorama weights={out / 'ema.pt'}` "
          f"data={cfg.synth_dir} re-evaluates them)")

    _, val = task.build_datasets()
    loader = torch.utils.data.DataLoader(val, batch_size=cfg.batch_size, shuffle=False, collate_fn=task.collate)
    by_steps = {}
    for steps in (1, 4, 12):
        t0 = time.time()
        by_steps[steps] = task.evaluate(ema_model, loader, sampler=Sampler(steps, cfg.t_pow_shift, 1.0))
        print(f"evaluated {len(val)} panoramas at {steps} steps in {time.time() - t0:.0f}s")
    by_temperature = {1.0: by_steps[12]}
    for temp in (0.5, 0.0):
        by_temperature[temp] = task.evaluate(ema_model, loader, sampler=Sampler(12, cfg.t_pow_shift, temp))
        print(f"evaluated {len(val)} panoramas at 12 steps, temperature {temp}")
    latency = {s: sampling_latency(task, ema_model, val, Sampler(s, cfg.t_pow_shift, 1.0)) for s in (1, 4, 12)}

    samples = out / "samples"
    batch = task.collate([val[i] for i in range(min(args.samples, len(val)))])
    pred = Sampler(12, cfg.t_pow_shift, 1.0).generate(ema_model, batch["views"], batch["cameras"],
                                                      evaluation_generator(cfg.seed, 0))
    base, seen = backprojection_baseline(batch["views"], batch["cameras"], cfg.pano_size)
    for i in range(pred.shape[0]):
        save_panorama_figure(samples / f"sample{i}.png", batch["views"][i],
                             {"generated (12 steps, EMA)": pred[i], "back-projection baseline": base[i],
                              "ground truth": batch["panorama"][i]}, seen[i])

    m = by_steps[12]
    lines = [f"# Panorama benchmark ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"{args.threads} threads)", "",
             f"Training: {run['steps']} steps, {run['cpu_minutes']:.1f} CPU-min ({run['wall_minutes']:.1f} wall-min), "
             f"batch {cfg.batch_size}, panorama {cfg.pano_size}×{2 * cfg.pano_size}, views {cfg.view_size}², "
             f"{n_params / 1e6:.2f} M parameters, final loss {run['final_loss']:.4f}. "
             f"Validation: {len(val)} synthetic panoramas, fixed cameras (xi {cfg.xi}, f {cfg.focal} @128 px).", "",
             "| region | PSNR model | PSNR baseline | SSIM model | SSIM baseline |", "|---|---|---|---|---|"]
    for r in REGIONS:
        k = "" if r == "whole" else f"_{r}"
        lines.append(f"| {r} | {m['psnr' + k]:.2f} | {m['baseline_psnr' + k]:.2f} | {m['ssim' + k]:.3f} | "
                     f"{m['baseline_ssim' + k]:.3f} |")
    lines += ["", "| Euler steps | PSNR whole | PSNR unseen | SSIM whole | s / panorama (batch 1) |",
              "|---|---|---|---|---|"]
    for s in (1, 4, 12):
        b = by_steps[s]
        lines.append(f"| {s} | {b['psnr']:.2f} | {b['psnr_unseen']:.2f} | {b['ssim']:.3f} | {latency[s]:.3f} |")
    lines += ["", "| temperature (12 steps) | PSNR whole | PSNR unseen | SSIM whole | SSIM unseen |",
              "|---|---|---|---|---|"]
    for temp, b in by_temperature.items():
        lines.append(f"| {temp:g} | {b['psnr']:.2f} | {b['psnr_unseen']:.2f} | {b['ssim']:.3f} | "
                     f"{b['ssim_unseen']:.3f} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({
        "training": run, "metrics_by_steps": by_steps,
        "metrics_by_temperature": {str(k): v for k, v in by_temperature.items()},
        "seconds_per_panorama": latency, "threads": args.threads, "parameters": n_params, "config": to_dict(cfg)}, indent=2))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {samples}/")


if __name__ == "__main__":
    main()
