"""Class-incremental detection on synthetic MAR20: does distillation keep the old classes?

1. synthetic MAR20 (20 aircraft classes, VOC layout);
2. teacher: yolov8n trained on the base classes A1..A10 only (``base_classes``);
3. few-shot split: K images per novel class A11..A20, **no base images and no base labels**
   (``visiontrain split detect ... keep_base=false``);
4. students, both starting from the teacher with the class branch grown to 20 classes, same schedule:
   (a) plain fine-tuning (``weights=teacher.pt``), (b) distillation (``distill.teacher=teacher.pt``);
5. every model (final EMA weights) on the full validation split: mAP50-95 / mAP50 on base, novel, all.

Goal: (b) keeps >= 90 % of the teacher's base mAP50, (a) drops below 70 %, and (b)'s novel mAP50 is
within 10 % of (a)'s. Prints a table and writes ``<out>/results.json``::

    python benchmarks/detect_distill.py --out runs/bench-distill --student-epochs 50   # recorded run, ~25 min
    python benchmarks/detect_distill.py --quick                             # a smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import json
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


def evaluate(ckpt: Path, data: Path, imgsz: int, batch: int) -> dict[str, float]:
    """Final (EMA) weights of ``ckpt`` on the whole val split: base / novel / all mAP."""
    model = build_detector(ckpt)
    net = ClassesAs(model, list(model.names), ALL).eval()
    val = DetectionDataset(load_labels(data, "test", class_names=ALL), "test", imgsz, augment=False)
    loader = torch.utils.data.DataLoader(val, batch_size=batch, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        evaluator = run_evaluation(net, loader, ALL, conf=0.001, iou=0.7, max_det=300)
    return base_novel_metrics(evaluator, BASE)


def train(out: Path, overrides: list[str]) -> Path:
    t0 = time.time()
    cfg = load_config(DetectTrainConfig, None, [f"out={out}", "tensorboard=false", "progress=false", *overrides])
    result = fit(DetectTask(cfg))
    print(f"  trained {out.name} in {time.time() - t0:.0f}s ({result['step']} steps)", flush=True)
    return Path(result["out"]) / "checkpoints" / "last.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-distill")
    ap.add_argument("--train", type=int, default=800, help="synthetic training images")
    ap.add_argument("--val", type=int, default=100, help="synthetic validation images")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--teacher-epochs", type=int, default=24)
    ap.add_argument("--student-epochs", type=int, default=40)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--student-lr", type=float, default=0.002)
    ap.add_argument("--amp", default="bf16")
    ap.add_argument("--distill", nargs="+", default=["cwd=1,kl=1", "cwd=1,kl=10", "cwd=5,kl=20"],
                    help="one (b) student per item: distill.* settings, e.g. 'cwd=1,kl=10' 'cwd=5,kl=20,dfl=1'")
    ap.add_argument("--close-mosaic", type=int, default=4, help="epochs without mosaic at the end")
    ap.add_argument("--teacher", default="", help="reuse this teacher checkpoint instead of training one")
    ap.add_argument("--only", default="ab", help="which students to train: a, b or ab")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args()
    if args.quick:
        args.train, args.val, args.imgsz, args.teacher_epochs, args.student_epochs, args.shots = 48, 16, 128, 2, 2, 3
        args.batch = 8
    torch.manual_seed(0)
    out = Path(args.out)
    t_start = time.time()

    data = out / "data"
    if not (data / ".complete").exists():
        write_synthetic_mar20(data, train=args.train, val=args.val, imgsz=args.imgsz, seed=0)
        (data / ".complete").write_text("ok\n")
    common = [f"imgsz={args.imgsz}", f"batch_size={args.batch}", f"amp={args.amp}", "eval_every=0",
              "plots=false", "seed=0", f"aug.close_mosaic={args.close_mosaic}"]

    teacher = Path(args.teacher) if args.teacher else train(
        out / "teacher", [*common, f"data={data}", "base_classes=[A1..A10]", f"epochs={args.teacher_epochs}"])

    fewshot = out / f"fewshot-k{args.shots}"
    if not (fewshot / "split.json").exists():
        split(load_config(SplitConfig, None, [f"data={data}", f"out={fewshot}", "base=A1..A10",
                                              f"shots={args.shots}", "seed=0", "keep_base=false"]))
    student = [*common, f"data={fewshot}", f"epochs={args.student_epochs}", f"lr={args.student_lr}",
               "warmup_epochs=1"]
    rows = {"teacher (A1-A10)": teacher}
    if "a" in args.only:
        rows["(a) fine-tune"] = train(out / "student-finetune", [*student, f"weights={teacher}"])
    if "b" in args.only:
        for spec in args.distill:
            keys = [kv.strip() for kv in spec.split(",") if kv.strip()]
            tag = "-".join(k.replace("=", "") for k in keys)
            rows[f"(b) {spec}"] = train(out / f"student-distill-{tag}",
                                        [*student, f"distill.teacher={teacher}", *(f"distill.{k}" for k in keys)])

    results = {name: evaluate(ckpt, data, args.imgsz, args.batch) for name, ckpt in rows.items()}
    base_ref = results["teacher (A1-A10)"]["mAP50/base"]
    print(f"\nsynthetic MAR20 {args.train}/{args.val} images at {args.imgsz}px, K={args.shots} novel shots, "
          f"no base data; teacher {args.teacher_epochs} ep, students {args.student_epochs} ep; "
          f"student lr {args.student_lr}; total {time.time() - t_start:.0f}s")
    head = f"{'model':<26}" + "".join(f"{k:>12}" for k in ("base 50-95", "base 50", "novel 50-95", "novel 50",
                                                          "all 50-95", "all 50", "base kept"))
    print(head)
    for name, m in results.items():
        kept = m["mAP50/base"] / base_ref if base_ref > 0 else float("nan")
        print(f"{name:<26}" + "".join(f"{m.get(k, 0.0):>12.3f}" for k in (
            "mAP50-95/base", "mAP50/base", "mAP50-95/novel", "mAP50/novel", "mAP50-95/all", "mAP50/all"))
              + f"{kept:>11.0%}")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
