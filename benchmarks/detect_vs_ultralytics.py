"""End-to-end race: Ultralytics YOLOv8n and ours trained from scratch on the same synthetic MAR20 set,
same image size, epochs, batch and optimizer, both scored by our evaluator on the same validation images.

    python benchmarks/detect_vs_ultralytics.py --work /work/bench/race [--epochs 16] [--runs ours,u16,u64]
        [--ours KEY=VALUE ...]

* Data: ``visiontrain synth detect`` (the ``make demo`` set: 800 + 100 images, 256 px, seed 0), written
  once in the MAR20/VOC layout (ours) and mirrored in the YOLO layout (symlinked images, label files) for
  Ultralytics.
* ``ours``: ``visiontrain train detect`` (the task's defaults unless ``--ours`` overrides), evaluated after
  every epoch by the trainer; training time from its ``time/train_wall_s`` / ``time/train_cpu_s``.
* ``u16`` / ``u64``: Ultralytics 8.4.190 ``YOLO("yolov8n.yaml").train(...)`` with AdamW at the same lr,
  ``nbs`` 16 (one optimizer step per batch, as ours) or its default 64 (it accumulates 4 batches per step),
  ``val=False`` (no per-epoch validation time), images cached in RAM like ours, an epoch checkpoint each
  epoch scored afterwards by ``visiontrain eval detect``; training time per epoch from a callback (wall
  and this process's CPU time).

Prints one table (mAP50 / mAP50-95 after each epoch, training wall and CPU seconds), the race's two
goals, and writes ``race.png`` (mAP50-95 against training wall time) and ``race.json`` into ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ULTRA_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from ultralytics import YOLO
    data, project, name, epochs, imgsz, batch, lr, nbs = sys.argv[1:9]
    marks = []
    def start(trainer):
        if not marks:
            marks.append({"start": True, "wall": time.perf_counter(), "cpu": time.process_time()})
    def stamp(trainer):  # trainer.epoch is 0-based; its checkpoint is weights/epoch<trainer.epoch>.pt
        marks.append({"epoch": trainer.epoch, "wall": time.perf_counter(), "cpu": time.process_time()})
    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_epoch_start", start)
    model.add_callback("on_train_epoch_end", stamp)
    model.train(data=data, project=project, name=name, exist_ok=True, epochs=int(epochs), imgsz=int(imgsz),
                batch=int(batch), optimizer="AdamW", lr0=float(lr), nbs=int(nbs), device="cpu", workers=0,
                cache="ram", save_period=1, val=False, plots=False, seed=0, deterministic=True, amp=False,
                verbose=False)
    json.dump(marks, open(f"{project}/{name}/times.json", "w"))
""")


def write_data(work: Path, train: int, val: int, imgsz: int) -> tuple[Path, Path]:
    """The VOC set (ours) and its YOLO mirror (Ultralytics): ``(voc_root, yolo data.yaml)``."""
    from visiontrain.detect.data import load_labels
    from visiontrain.detect.synthetic import write_synthetic_mar20

    voc = work / "data"
    if not (voc / "ImageSets").is_dir():
        write_synthetic_mar20(voc, train=train, val=val, imgsz=imgsz, seed=0)
    yolo = work / "yolo"
    names = None
    for split, ours in (("train", "train"), ("val", "test")):
        labels = load_labels(voc, ours)
        names = labels.class_names
        (yolo / "images" / split).mkdir(parents=True, exist_ok=True)
        (yolo / "labels" / split).mkdir(parents=True, exist_ok=True)
        for r in labels.records:
            link = yolo / "images" / split / Path(r.path).name
            if not link.exists():
                link.symlink_to(Path(r.path).resolve())
            rows = [f"{c} {(b[0] + b[2]) / 2 / r.width:.6f} {(b[1] + b[3]) / 2 / r.height:.6f} "
                    f"{(b[2] - b[0]) / r.width:.6f} {(b[3] - b[1]) / r.height:.6f}" for b, c in zip(r.boxes, r.classes)]
            (yolo / "labels" / split / f"{r.image_id}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    yaml = yolo / "data.yaml"
    yaml.write_text(f"path: {yolo}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    return voc, yaml


def evaluate(weights: Path, voc: Path, imgsz: int, out: Path) -> dict:
    from visiontrain.verbs import run_verb

    shutil.rmtree(out, ignore_errors=True)
    run_verb("eval", "detect", [f"weights={weights}", f"data={voc}", f"imgsz={imgsz}", f"out={out}"])
    return json.loads((out / "metrics.json").read_text())


def run_ours(work: Path, voc: Path, a, extra: list[str]) -> list[dict]:
    from visiontrain.engine.logging import read_metrics

    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "visiontrain", "train", "detect", f"data={voc}", f"out={out}", f"imgsz={a.imgsz}",
           f"epochs={a.epochs}", f"batch_size={a.batch}", f"lr={a.lr}", "optimizer=adamw", "eval_every=1",
           "seed=0", "progress=false", "tensorboard=false", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    m = read_metrics(out / "metrics.csv")
    rows = []
    for i, (step, v50) in enumerate(m["val/mAP50"]):
        rows.append({"epoch": i + 1, "step": step, "mAP50": v50, "mAP50-95": m["val/mAP50-95"][i][1],
                     "wall": m["time/train_wall_s"][i][1], "cpu": m["time/train_cpu_s"][i][1]})
    return rows


def run_ultra(work: Path, voc: Path, yaml: Path, a, nbs: int) -> list[dict]:
    name = f"ultra_nbs{nbs}"
    shutil.rmtree(work / name, ignore_errors=True)
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", ULTRA_SCRIPT, str(yaml), str(work), name, str(a.epochs), str(a.imgsz),
                    str(a.batch), str(a.lr), str(nbs)], check=True, env=env, stdout=subprocess.DEVNULL)
    marks = json.loads((work / name / "times.json").read_text())
    start = next(m for m in marks if m.get("start"))
    ends = [m for m in marks if not m.get("start")]
    rows = []
    for m in ends:
        ckpt = work / name / "weights" / f"epoch{m['epoch']}.pt"
        if not ckpt.exists():  # the last epoch's weights are last.pt only
            ckpt = work / name / "weights" / "last.pt"
        metrics = evaluate(ckpt, voc, a.imgsz, work / f"{name}_eval")
        rows.append({"epoch": m["epoch"] + 1, "mAP50": metrics["mAP50"], "mAP50-95": metrics["mAP50-95"],
                     "wall": m["wall"] - start["wall"], "cpu": m["cpu"] - start["cpu"]})
    return rows


def time_to_reach(rows: list[dict], target: float) -> float | None:
    return next((r["wall"] for r in rows if r["mAP50-95"] >= target), None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--runs", default="ours,u16,u64")
    ap.add_argument("--ours", nargs="*", default=[], help="extra key=value settings for our run")
    a = ap.parse_args()
    from visiontrain.engine.runtime import cpu_description

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    voc, yaml = write_data(work, a.train, a.val, a.imgsz)
    results_path = work / "race.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for run in a.runs.split(","):
        if run == "ours":
            results["ours " + " ".join(a.ours)] = run_ours(work, voc, a, a.ours)
        else:
            results[f"ultralytics nbs={run[1:]}"] = run_ultra(work, voc, yaml, a, int(run[1:]))
        results_path.write_text(json.dumps(results, indent=1))
    print(cpu_description())
    print(f"{a.train} + {a.val} images, {a.imgsz} px, {a.epochs} epochs, batch {a.batch}, AdamW lr {a.lr}")
    print(f"{'run':<44}{'epoch':>6}{'mAP50':>8}{'mAP50-95':>10}{'train wall s':>14}{'train CPU s':>13}")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:<44}{r['epoch']:>6}{r['mAP50']:>8.3f}{r['mAP50-95']:>10.3f}{r['wall']:>14.0f}{r['cpu']:>13.0f}")
    ours = [k for k in results if k.startswith("ours")]
    if ours and "ultralytics nbs=16" in results:
        u = results["ultralytics nbs=16"]
        for k in ours:
            o = results[k]
            reach = time_to_reach(o, u[-1]["mAP50-95"])
            print(f"{k}: final mAP50-95 {o[-1]['mAP50-95']:.3f} vs Ultralytics (nbs=16) {u[-1]['mAP50-95']:.3f}; "
                  f"reaches it after {reach if reach is None else round(reach)} s of training vs its "
                  f"{u[-1]['wall']:.0f} s (goal: at most a third)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in results.items():
        ax.plot([r["wall"] / 60 for r in rows], [r["mAP50-95"] for r in rows], marker="o", ms=3, label=name)
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel("mAP50-95 (our evaluator)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "race.png", dpi=120)
    print(f"wrote {work / 'race.png'} and {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
