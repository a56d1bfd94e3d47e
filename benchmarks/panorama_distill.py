"""One-step panorama sampling by distillation: a student distilled for N CPU-minutes from a trained teacher vs
that teacher at 12 and at 1 Euler step, and the back-projection baseline, on the same validation set.

What it does:
  1. reads the teacher (``--teacher``: an ``ema.pt`` of ``benchmarks/panorama.py`` or a ``best.pt``) and
     builds the distillation config from the teacher's saved training config (same data, cameras,
     architecture, seed) plus ``distill.teacher``, ``distill.steps`` and the ``key=value`` overrides;
  2. distils for ``--minutes`` of process CPU time with ``PanoramaTask``'s own ``training_step`` (the
     ``distill`` loss: the student's one step from noise ε vs the teacher's N-step Euler sample from the same
     ε and views), AdamW, warmup + cosine over the CPU budget, weight EMA (``benchmarks/panorama.py``'s loop);
  3. evaluates, with the task's ``evaluate`` (same seed → same noise for every model), the EMA student at
     1 step, the teacher at 12 and at 1 step, each at sampler temperature 1 and 0, and the back-projection
     baseline: PSNR / SSIM whole and unseen, the seam ratio;
  4. times sampling per panorama (batch 1: conditioning + steps) for the student (1 step) and the teacher
     (12 steps), one after the other in the same process;
  5. writes ``student.pt`` (``visiontrain eval panorama weights=…/student.pt`` samples it with 1 step),
     ``samples/*.png`` (views | student 1 step | teacher 12 steps | baseline | truth), ``results.json`` and
     ``results.md`` under ``--out``.

Usage: python benchmarks/panorama_distill.py --teacher runs/bench_panorama/ema.pt [--minutes 5] [--steps 12]
       [--threads 1] [--out runs/bench_panorama_distill] [key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import yaml
from panorama import sampling_latency, train_for  # benchmarks/panorama.py: the CPU-budget loop and timing

from visiontrain.config import load_config, to_dict
from visiontrain.engine.checkpoint import atomic_save, checkpoint_header
from visiontrain.panorama.baseline import backprojection_baseline
from visiontrain.panorama.config import PanoramaTrainConfig
from visiontrain.panorama.inference import Sampler, evaluation_generator, read_panorama_checkpoint
from visiontrain.panorama.task import PanoramaTask
from visiontrain.panorama.viz import save_panorama_figure

RUN_KEYS = ("out", "resume", "weights", "distill", "aux")  # of the teacher's config: not carried over


def distill_config(teacher: str, steps: int, out: Path, overrides: list[str]) -> PanoramaTrainConfig:
    """The teacher's saved training config with distillation switched on (and ``overrides`` applied)."""
    saved = read_panorama_checkpoint(teacher).get("config") or {}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "teacher_config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in saved.items() if k not in RUN_KEYS}))
    return load_config(PanoramaTrainConfig, path, ["device=cpu", f"out={out / 'run'}", f"distill.teacher={teacher}",
                                                   f"distill.steps={steps}", *overrides])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher weights (ema.pt of benchmarks/panorama.py, best.pt)")
    ap.add_argument("--minutes", type=float, default=5.0, help="distillation budget in process CPU-minutes")
    ap.add_argument("--steps", type=int, default=12, help="teacher Euler steps the student learns (distill.steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="runs/bench_panorama_distill")
    ap.add_argument("--samples", type=int, default=4, help="sample figures to write")
    ap.add_argument("overrides", nargs="*", help="PanoramaTrainConfig key=value (e.g. lr=2e-4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = distill_config(args.teacher, args.steps, out, args.overrides)
    torch.manual_seed(cfg.seed)
    task = PanoramaTask(cfg)
    teacher = task.distiller.teacher
    student = task.build_model()  # starts as the teacher
    print(f"student {task.model_signature()} from {args.teacher}; learns the teacher's {args.steps}-step sample; "
          f"lr {cfg.lr:g}, batch {cfg.batch_size}, {args.threads} threads")
    run = train_for(task, student, args.minutes * 60, log_every=5)
    student = run.pop("ema").module.eval()
    atomic_save({**checkpoint_header(task), "model": student.state_dict(), "step": run["steps"]}, out / "student.pt")
    print(f"wrote {out / 'student.pt'} (EMA weights; `visiontrain eval panorama weights={out / 'student.pt'} "
          f"data={cfg.synth_dir}` samples them with 1 step)")

    _, val = task.build_datasets()
    loader = torch.utils.data.DataLoader(val, batch_size=cfg.batch_size, shuffle=False, collate_fn=task.collate)
    shift = cfg.t_pow_shift
    rows = {}
    for name, model, steps in (("student", student, 1), ("teacher", teacher, 12), ("teacher", teacher, 1)):
        for temp in (1.0, 0.0):
            t0 = time.process_time()
            rows[f"{name} {steps} step{'s' if steps > 1 else ''}, T={temp:g}"] = task.evaluate(
                model, loader, sampler=Sampler(steps, shift, temp))
            print(f"evaluated {name} at {steps} step(s), temperature {temp:g} ({time.process_time() - t0:.0f} CPU-s)")
    latency = {"student 1 step": sampling_latency(task, student, val, Sampler(1, shift, 1.0), repeats=5),
               "teacher 12 steps": sampling_latency(task, teacher, val, Sampler(12, shift, 1.0), repeats=5),
               "teacher 1 step": sampling_latency(task, teacher, val, Sampler(1, shift, 1.0), repeats=5)}

    samples = out / "samples"
    batch = task.collate([val[i] for i in range(min(args.samples, len(val)))])
    one = Sampler(1, shift, 1.0).generate(student, batch["views"], batch["cameras"], evaluation_generator(cfg.seed, 0))
    many = Sampler(12, shift, 1.0).generate(teacher, batch["views"], batch["cameras"],
                                            evaluation_generator(cfg.seed, 0))  # the same noise
    base, seen = backprojection_baseline(batch["views"], batch["cameras"], cfg.pano_size)
    for i in range(one.shape[0]):
        save_panorama_figure(samples / f"sample{i}.png", batch["views"][i],
                             {"student, 1 step": one[i], "teacher, 12 steps": many[i],
                              "back-projection baseline": base[i], "ground truth": batch["panorama"][i]}, seen[i])

    first = next(iter(rows.values()))
    lines = [f"# Panorama one-step distillation ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"{args.threads} threads)", "",
             f"Distillation: {run['steps']} steps, {run['cpu_minutes']:.1f} CPU-min ({run['wall_minutes']:.1f} "
             f"wall-min), batch {cfg.batch_size}, lr {cfg.lr:g}, teacher {args.steps} Euler steps "
             f"(t_pow_shift {shift:g}), final distill loss {run['final_loss']:.4f}. Validation: {len(val)} panoramas.",
             "", "| sampler | PSNR whole | PSNR unseen | SSIM whole | SSIM unseen | seam ratio | s / panorama |",
             "|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        key = name.split(",")[0]
        lat = f"{latency[key]:.3f}" if name.endswith("T=1") and key in latency else ""
        lines.append(f"| {name} | {m['psnr']:.2f} | {m['psnr_unseen']:.2f} | {m['ssim']:.3f} | {m['ssim_unseen']:.3f} | "
                     f"{m['seam_ratio']:.2f} | {lat} |")
    lines.append(f"| back-projection baseline | {first['baseline_psnr']:.2f} | {first['baseline_psnr_unseen']:.2f} | "
                 f"{first['baseline_ssim']:.3f} | {first['baseline_ssim_unseen']:.3f} | "
                 f"{first['baseline_seam_ratio']:.2f} | |")
    speedup = latency["teacher 12 steps"] / latency["student 1 step"]
    lines += ["", f"Sampling time: student 1 step {latency['student 1 step']:.3f} s, teacher 12 steps "
                  f"{latency['teacher 12 steps']:.3f} s per panorama (batch 1): {speedup:.1f}× less."]
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({
        "distillation": run, "metrics": rows, "seconds_per_panorama": latency, "speedup": speedup,
        "threads": args.threads, "teacher": args.teacher, "config": to_dict(cfg)}, indent=2))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {samples}/")


if __name__ == "__main__":
    main()
