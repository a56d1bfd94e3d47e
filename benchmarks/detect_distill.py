"""Class-incremental detection on synthetic MAR20: which distillation keeps the old classes best?

1. synthetic MAR20 (20 aircraft classes, VOC layout);
2. teacher: yolov8n trained on the base classes A1..A10 only (``base_classes``), evaluated every few
   epochs so its curve shows it has flattened (``<out>/teacher_curve.png``);
3. per K (shots) and seed: a few-shot split with K images per novel class A11..A20, **no base images and no
   base labels** (``visiontrain split detect ... keep_base=false``), and for the ceiling the joint split
   (``keep_base=true``: every training image with its base labels plus the same K-shot novel labels);
4. per method, the same student schedule (``--student-steps`` optimizer steps, same lr), every student
   starting from the teacher with the class branch grown to 20 classes:

   * ``fine-tune``: plain fine-tuning (``weights=teacher.pt``); ``fine-tune-lr5`` at 5× the lr;
   * ``frozen``: fine-tuning with the backbone frozen throughout; ``frozen-neck`` and ``frozen-trunk`` freeze
     the neck too, and ``frozen-trunk`` the box branch as well (one shared class branch trains), at 1×, 5×
     (``-lr5``) and 10× (``-lr10``) the lr;
   * ``frozen-base*`` (``distill.frozen_base=true``, what ``distill.teacher=`` alone does for a student of the
     teacher's scale): the teacher, frozen, plus a new class branch for the novel classes, trained at 1× or
     5× (``-lr5``) the lr; ``-negN`` adds ``distill.base_negatives=N`` (at 5×); ``frozen-base-neg5`` is the
     default;
   * ``joint``: fine-tuning on base + novel data (the ceiling, it needs the old data): every training image
     with its base labels, novel labels only in the K-shot images (the split tool's ``keep_base=true``);
   * ``full-data``: fine-tuning on every training image with every class labelled (an oracle: it needs
     the old data *and* all novel labels); K plays no part, so it runs once per seed (``K = all``);
   * distillation rows (``distill.teacher=teacher.pt``): the neck term ``distill.feature=cwd|l2|mgd|pkd|none``
     with the response term ``distill.kl``; ``l2`` alone (kl=0) is the method Ultralytics ships;
   * ``pseudo`` / ``pseudo+kl``: the teacher's detections scoring above 0.25 (Ultralytics' ``predict``
     default, not tuned here) label the base objects of every batch (``distill.pseudo=0.25``), alone or
     with the response KL; ``pseudo+kl-skip`` also drops the KL at anchors assigned to a labelled novel
     object (``distill.kl_skip_novel=true``); ``pseudo0.1`` lowers the threshold to 0.1, ``pseudo+kl2`` and
     ``pseudo0.1+kl2`` add a five times smaller KL (``distill.kl=2``): points between the two ends of the
     retention / novel-mAP trade-off; ``pseudo0.1+kl2`` is what ``distill.frozen_base=false`` does with the
     other defaults; every distillation row sets ``frozen_base=false``; ``pseudo0.1+kl`` keeps ``kl=10``; ``kl-skip``, ``pseudo0.1+kl-skip`` and ``cwd+kl-skip``
     add ``distill.kl_skip_novel=true``;

5. every model (final EMA weights) on the full validation split: mAP50-95 / mAP50 on base, novel, all.

Every finished row is appended to ``<out>/grid.json`` at once, so a killed grid continues where it stopped
(run the same command again); several processes may share one ``--out`` (say ``--seeds 1`` and ``--seeds 2``,
once the teacher is there), each merging its rows into the file under a lock. ``--report`` only prints the table (mean ± sd over the seeds present) and writes
``benchmarks/results/detect_distill_grid.{md,png}``::

    python benchmarks/detect_distill.py --out runs/bench-distill-grid --shots 10 --seeds 0     # reduced grid
    python benchmarks/detect_distill.py --out runs/bench-distill-grid --shots 10 30 --seeds 0 1 2
    python benchmarks/detect_distill.py --out runs/bench-distill-grid --report
    python benchmarks/detect_distill.py --quick                                        # a smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from visiontrain.config import load_config
from visiontrain.detect.cli import split
from visiontrain.detect.config import DetectTrainConfig, SplitConfig
from visiontrain.detect.data import DetectionDataset, collate, load_labels
from visiontrain.detect.evaluation import base_novel_metrics, run_evaluation
from visiontrain.detect.inference import build_detector
from visiontrain.detect.synthetic import MAR20_NAMES, write_synthetic_mar20
from visiontrain.detect.task import DetectTask
from visiontrain.engine.trainer import fit

ALL = list(MAR20_NAMES)
BASE, NOVEL = ALL[:10], ALL[10:]
RESULTS = Path(__file__).resolve().parent / "results"

#: row name -> (which split, extra overrides); ``{teacher}`` is replaced by the teacher checkpoint
def _distill(feature: str, kl: float, pseudo: float, *extra: str) -> tuple[str, list[str]]:
    """A distillation row with every choice spelled out, so a change of the defaults cannot change a row."""
    return ("fewshot", ["distill.teacher={teacher}", "distill.frozen_base=false", f"distill.feature={feature}",
                        f"distill.kl={kl}", f"distill.pseudo={pseudo}", *extra])


def _frozen_base(novel_lr_scale: float, base_negatives: float = 0) -> tuple[str, list[str]]:
    """A ``distill.frozen_base=true`` row: the novel class branch trains at ``--student-lr`` × ``novel_lr_scale``
    with the ``distill.base_negatives`` term (both spelled out, so a change of the defaults cannot change a row)."""
    return ("fewshot", ["distill.teacher={teacher}", "distill.frozen_base=true",
                        f"distill.novel_lr_scale={novel_lr_scale:g}", f"distill.base_negatives={base_negatives:g}"])


SKIP = "distill.kl_skip_novel=true"
METHODS: dict[str, tuple[str, list[str]]] = {
    "fine-tune": ("fewshot", ["weights={teacher}"]),
    "frozen": ("fewshot", ["weights={teacher}", "freeze_backbone_epochs=100000"]),
    "joint": ("joint", ["weights={teacher}"]),
    "full-data": ("full", ["weights={teacher}"]),
    "frozen-neck": ("fewshot", ["weights={teacher}", "freeze=[backbone,neck]"]),
    "frozen-trunk": ("fewshot", ["weights={teacher}", "freeze=[backbone,neck,head.cv2]"]),
    "frozen-trunk-lr5": ("fewshot", ["weights={teacher}", "freeze=[backbone,neck,head.cv2]", "lr=0.01"]),
    "frozen-trunk-lr10": ("fewshot", ["weights={teacher}", "freeze=[backbone,neck,head.cv2]", "lr=0.02"]),
    "fine-tune-lr5": ("fewshot", ["weights={teacher}", "lr=0.01"]),
    "frozen-base": _frozen_base(1),
    "frozen-base-lr5": _frozen_base(5),
    "frozen-base-neg1": _frozen_base(5, 1),
    "frozen-base-neg3": _frozen_base(5, 3),
    "frozen-base-neg5": _frozen_base(5, 5),
    "l2": _distill("l2", 0, 0),
    "kl": _distill("none", 10, 0),
    "cwd+kl": _distill("cwd", 10, 0),
    "mgd+kl": _distill("mgd", 10, 0),
    "pkd+kl": _distill("pkd", 10, 0),
    "pseudo": _distill("none", 0, 0.25),
    "pseudo+kl": _distill("none", 10, 0.25),
    "pseudo+kl-skip": _distill("none", 10, 0.25, SKIP),
    "pseudo0.1": _distill("none", 0, 0.1),
    "pseudo+kl2": _distill("none", 2, 0.25),
    "pseudo0.1+kl": _distill("none", 10, 0.1),
    "pseudo0.1+kl2": _distill("none", 2, 0.1),
    "pseudo0.1+l2": _distill("l2", 0, 0.1),
    "pseudo0.1+cwd+kl2": _distill("cwd", 2, 0.1),
    "kl-skip": _distill("none", 10, 0, SKIP),
    "pseudo0.1+kl-skip": _distill("none", 10, 0.1, SKIP),
    "cwd+kl-skip": _distill("cwd", 10, 0, SKIP),
    "l2+kl": _distill("l2", 10, 0),
    "cwd+kl+dfl": _distill("cwd", 10, 0, "distill.dfl=1"),
}
#: run order: the rows the default is judged against first, so a grid cut short has them
DEFAULT_METHODS = ["fine-tune", "frozen-base-neg5", "frozen-base-lr5", "pseudo0.1+kl2", "pseudo0.1", "cwd+kl", "l2",
                   "joint", "fine-tune-lr5", "pkd+kl", "mgd+kl", "kl", "full-data", "frozen"]
COLUMNS = ("mAP50/base", "mAP50-95/base", "mAP50/novel", "mAP50-95/novel", "mAP50/all", "mAP50-95/all")


class ClassesAs(nn.Module):
    """A detector's eval output re-indexed to a larger class list (absent classes score 0):
    ``[B, 4 + nc_model, A] -> [B, 4 + len(names), A]``."""

    def __init__(self, model: nn.Module, model_names: list[str], names: list[str]):
        super().__init__()
        self.model = model
        self.rows = [4 + names.index(n) for n in model_names]
        self.nc = len(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        out = y.new_zeros(y.shape[0], 4 + self.nc, y.shape[2])
        out[:, :4] = y[:, :4]
        out[:, self.rows] = y[:, 4:]
        return out


def evaluate(ckpt: Path, data: Path, imgsz: int, batch: int, multi_label: bool = False) -> dict[str, float]:
    """Final (EMA) weights of ``ckpt`` on the whole val split: base / novel / all mAP (``multi_label``: NMS
    as Ultralytics' validator, a box once per class above the threshold)."""
    model = build_detector(ckpt)
    net = ClassesAs(model, list(model.names), ALL).eval()
    val = DetectionDataset(load_labels(data, "test", class_names=ALL), "test", imgsz, augment=False)
    loader = torch.utils.data.DataLoader(val, batch_size=batch, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        evaluator = run_evaluation(net, loader, ALL, conf=0.001, iou=0.7, max_det=300, multi_label=multi_label)
    return base_novel_metrics(evaluator, BASE)


def train(out: Path, overrides: list[str]) -> tuple[Path, float]:
    """Train a fresh run in ``out`` (an unfinished one is deleted first); returns (last.pt, CPU seconds)."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    t0, c0 = time.time(), time.process_time()
    cfg = load_config(DetectTrainConfig, None, [f"out={out}", "tensorboard=false", "progress=false", *overrides])
    result = fit(DetectTask(cfg))
    cpu = time.process_time() - c0
    print(f"  trained {out.name} in {time.time() - t0:.0f}s wall, {cpu:.0f}s CPU ({result['step']} steps)",
          flush=True)
    return Path(result["out"]) / "checkpoints" / "last.pt", cpu


def load_grid(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_grid(path: Path, grid: dict) -> None:
    """Write ``grid`` atomically, first taking in the rows another process (other seeds, other K) has
    written since we read the file, so several grid processes can share one ``--out``."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = load_grid(path)
        grid["rows"] = {**on_disk.get("rows", {}), **grid["rows"]}
        for key in ("teacher", "args"):
            if key not in grid and key in on_disk:
                grid[key] = on_disk[key]
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(grid, indent=1))
        os.replace(tmp, path)


def teacher_curve(run: Path) -> list[tuple[int, float]]:
    """(epoch, val mAP50) pairs from the teacher's metrics.csv (long format: step, epoch, key, value)."""
    import csv

    rows = csv.DictReader((run / "metrics.csv").open())
    return [(int(r["epoch"]) + 1, float(r["value"])) for r in rows if r["key"] == "val/mAP50"]


def mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def retention(row: dict, teacher: float) -> float:
    """base mAP50 / the teacher's (nan for a teacher that detects nothing)."""
    return row["metrics"]["mAP50/base"] / teacher if teacher > 0 else float("nan")


def report(grid: dict, out: Path) -> str:
    """The table (mean ± sd over seeds, per K and method) as markdown; also the retention plot."""
    teacher = grid["teacher"]["metrics"]["mAP50/base"]
    lines = [f"teacher (A1–A10): base mAP50 {teacher:.3f}, base mAP50-95 "
             f"{grid['teacher']['metrics']['mAP50-95/base']:.3f}", ""]
    head = "| K | method | seeds | " + " | ".join(c.replace("mAP", "") for c in COLUMNS) + " | retention | CPU min |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    by: dict[tuple[int, str], list[dict]] = {}
    for row in grid["rows"].values():
        by.setdefault((row["shots"], row["method"]), []).append(row)
    order = list(METHODS)
    for (k, method), rows in sorted(by.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1])
                                                                 if kv[0][1] in order else 99)):
        cells = []
        for c in COLUMNS:
            m, sd = mean_sd([r["metrics"][c] for r in rows])
            cells.append(f"{m:.3f} ± {sd:.3f}" if len(rows) > 1 else f"{m:.3f}")
        m, sd = mean_sd([retention(r, teacher) for r in rows])
        cells.append(f"{m:.0%} ± {sd:.0%}" if len(rows) > 1 else f"{m:.0%}")
        cpu = sum(r["cpu_s"] for r in rows) / len(rows) / 60
        seeds = ",".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        lines.append(f"| {k or 'all'} | {method} | {seeds} | " + " | ".join(cells) + f" | {cpu:.1f} |")
    scored = [r for r in grid["rows"].values() if "metrics_ml" in r]
    if scored and "metrics_ml" in grid["teacher"]:
        t_ml = grid["teacher"]["metrics_ml"]["mAP50/base"]
        lines += ["", f"Scored again with multi-label NMS (a box once per class above the threshold, as "
                      f"Ultralytics' validator; `--rescore`); teacher base mAP50 {t_ml:.3f}:", "",
                  "| K | method | seeds | 50/base | 50/novel | 50/all | 50-95/all | retention |",
                  "|---|---|---|---|---|---|---|---|"]
        by_ml: dict[tuple[int, str], list[dict]] = {}
        for row in scored:
            by_ml.setdefault((row["shots"], row["method"]), []).append(row)
        for (k, method), rows in sorted(by_ml.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1])
                                                                       if kv[0][1] in order else 99)):
            cells = []
            for c in ("mAP50/base", "mAP50/novel", "mAP50/all", "mAP50-95/all"):
                m, sd = mean_sd([r["metrics_ml"][c] for r in rows])
                cells.append(f"{m:.3f} ± {sd:.3f}" if len(rows) > 1 else f"{m:.3f}")
            m, sd = mean_sd([r["metrics_ml"]["mAP50/base"] / t_ml if t_ml > 0 else float("nan") for r in rows])
            cells.append(f"{m:.0%} ± {sd:.0%}" if len(rows) > 1 else f"{m:.0%}")
            seeds = ",".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
            lines.append(f"| {k or 'all'} | {method} | {seeds} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [1, 1.6]})
        curve = grid["teacher"].get("curve", [])
        if curve:
            axes[0].plot([e for e, _ in curve], [v for _, v in curve], "o-")
        axes[0].set(xlabel="teacher epoch", ylabel="val mAP50 (A1–A10)", title="teacher curve")
        markers = {10: "o", 30: "s"}
        present = [m for m in order if any(r["method"] == m for r in grid["rows"].values())]
        colors = plt.get_cmap("tab20")
        for i, method in enumerate(present):
            for k in sorted({r["shots"] for r in grid["rows"].values()}):
                pts = [(r["metrics"]["mAP50/novel"], retention(r, teacher))
                       for r in grid["rows"].values() if r["method"] == method and r["shots"] == k]
                if pts:
                    axes[1].scatter([p[0] for p in pts], [p[1] for p in pts], color=colors(i % 20),
                                    marker=markers.get(k, "^"), edgecolor="black" if i >= 20 else None,
                                    label=method if k == min(r["shots"] for r in grid["rows"].values()
                                                             if r["method"] == method) else None)
        axes[1].axhline(0.98, color="gray", lw=0.8, ls="--")
        axes[1].set(xlabel="novel mAP50", ylabel="retention (base mAP50 / teacher's)",
                    title="one point per method, K and seed (o K=10, ■ K=30, ▲ all data)")
        axes[1].legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    out.with_suffix(".md").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-distill-grid")
    ap.add_argument("--train", type=int, default=320, help="synthetic training images")
    ap.add_argument("--val", type=int, default=80, help="synthetic validation images")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--teacher-epochs", type=int, default=50)
    ap.add_argument("--teacher-batch", type=int, default=8, help="more, cheaper steps: a from-scratch detector on "
                                                                 "320 images needs the updates")
    ap.add_argument("--student-steps", type=int, default=480, help="120 (the default until 2026-12-03) left "
                    "every student far from converged: fine-tuning's novel mAP50 rose 0.335 -> 0.505 -> 0.582 "
                    "at 120 / 480 / 960 steps (K=10, seed 0)")
    ap.add_argument("--shots", type=int, nargs="+", default=[10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--student-lr", type=float, default=0.002)
    ap.add_argument("--amp", default="off", help="bf16 is ~8x slower than fp32 on CPUs without bf16 units")
    ap.add_argument("--close-mosaic", type=int, default=4, help="epochs without mosaic at the end")
    ap.add_argument("--teacher-only", action="store_true", help="train (or reuse) the teacher and stop")
    ap.add_argument("--report", action="store_true", help="only print the table of what grid.json holds")
    ap.add_argument("--rescore", action="store_true", help="evaluate every finished row (and the teacher) again "
                                                            "with multi-label NMS, as Ultralytics' validator")
    ap.add_argument("--name", default="detect_distill_grid", help="table and plot go to benchmarks/results/NAME.{md,png} "
                    "(a grid with other settings: another name, so it does not overwrite this one)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args()
    if args.quick:
        args.train, args.val, args.imgsz, args.teacher_epochs, args.student_steps = 48, 16, 64, 2, 4
        args.batch, args.teacher_batch, args.shots = 8, 8, [3]
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_path = out / "grid.json"
    grid = load_grid(grid_path)
    if "teacher" in grid and not grid["teacher"].get("curve"):  # grids written before the curve was read right
        grid["teacher"]["curve"] = teacher_curve(out / "teacher")
    result_file = RESULTS / ("detect_distill_quick" if args.quick else args.name)
    if args.report:
        print(report(grid, result_file))
        return
    if args.rescore:
        data, ckpts = out / "data", {"teacher": out / "teacher" / "checkpoints" / "last.pt"}
        ckpts.update({key: out / "students" / key.replace("/", "-") / "checkpoints" / "last.pt"
                      for key in grid["rows"]})
        imgsz, batch = grid["args"]["imgsz"], grid["args"]["batch"]
        for key, ckpt in ckpts.items():
            entry = grid["teacher"] if key == "teacher" else grid["rows"][key]
            if "metrics_ml" not in entry:
                entry["metrics_ml"] = evaluate(ckpt, data, imgsz, batch, multi_label=True)
        save_grid(grid_path, grid)
        print(report(grid, result_file))
        return

    data = out / "data"
    if not (data / ".complete").exists():
        write_synthetic_mar20(data, train=args.train, val=args.val, imgsz=args.imgsz, seed=0)
        (data / ".complete").write_text("ok\n")
    common = [f"imgsz={args.imgsz}", f"batch_size={args.batch}", f"amp={args.amp}", "plots=false",
              f"aug.close_mosaic={args.close_mosaic}"]

    teacher = out / "teacher" / "checkpoints" / "last.pt"
    if "teacher" not in grid:
        _, cpu = train(out / "teacher", [*common, f"data={data}", "base_classes=[A1..A10]", "seed=0",
                                         f"epochs={args.teacher_epochs}", f"batch_size={args.teacher_batch}",
                                         f"eval_every={max(1, args.teacher_epochs // 10)}"])
        grid["teacher"] = {"metrics": evaluate(teacher, data, args.imgsz, args.batch), "cpu_s": cpu,
                           "curve": teacher_curve(out / "teacher"), "epochs": args.teacher_epochs}
        grid["args"] = vars(args)
        save_grid(grid_path, grid)
    print("teacher curve (epoch, mAP50):", grid["teacher"]["curve"], flush=True)
    if args.teacher_only:
        return

    for k in args.shots:
        for seed in args.seeds:
            splits = {}
            for kind, keep in (("fewshot", "false"), ("joint", "true")):
                splits[kind] = out / f"{kind}-k{k}-s{seed}"
                if not (splits[kind] / "split.json").exists():
                    split(load_config(SplitConfig, None, [f"data={data}", f"out={splits[kind]}", "base=A1..A10",
                                                          f"shots={k}", f"seed={seed}", f"keep_base={keep}"]))
            splits["full"] = data
            for method in args.methods:
                key = f"K{k}/seed{seed}/{method}" if method != "full-data" else f"all/seed{seed}/{method}"
                if key in grid["rows"]:
                    continue
                kind, extra = METHODS[method]
                t0 = time.time()
                ckpt, cpu = train(out / "students" / key.replace("/", "-"),
                                  [*common, f"data={splits[kind]}", f"max_steps={args.student_steps}",
                                   f"lr={args.student_lr}", "warmup_epochs=1", "eval_every=0", f"seed={seed}",
                                   *(e.format(teacher=teacher) for e in extra)])
                metrics = evaluate(ckpt, data, args.imgsz, args.batch)
                grid["rows"][key] = {"shots": k if method != "full-data" else 0, "seed": seed, "method": method,
                                     "metrics": metrics, "cpu_s": cpu, "wall_s": time.time() - t0}
                save_grid(grid_path, grid)
                print(f"  {key}: base mAP50 {metrics['mAP50/base']:.3f}, novel {metrics['mAP50/novel']:.3f}, "
                      f"all {metrics['mAP50/all']:.3f}", flush=True)
    print(report(grid, result_file))


if __name__ == "__main__":
    main()
