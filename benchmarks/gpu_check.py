"""The GPU check: everything CI cannot run, in one script, under 5 minutes on one GPU.

    python benchmarks/gpu_check.py [--out DIR] [--device cuda] [--quick]

1. Every task (detect, flow supervised + unsupervised, panorama) trains a few steps in fp32, bf16 and fp16
   (GradScaler) on built-in synthetic data through the real CLI verb; peak ``torch.cuda.max_memory_allocated``
   and the step rate from the run's own ``metrics.csv``.
2. Resume: 6 steps straight vs the same run resumed from its own step-3 checkpoint (``deterministic=true``):
   the two final training states must be bit-identical.
3. The yolov8n training step (forward, loss, backward, SGD) at 640 px, batch 16 and 64, ours (fp32 and bf16
   autocast, channels-last) side by side with Ultralytics (fp32 and its fp16 AMP) on the same GPU.
4. With two or more GPUs: a 2-process NCCL detection run under torchrun.

Prints one table and writes it (``gpu_check.txt``, ``gpu_check.json``) to ``--out`` (default ``$OUT`` or
``runs/gpu_check``). ``--device cpu --quick`` runs parts 1 and 2 on a CPU (bf16 only) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TASK_ARGS = {
    "detect": ["imgsz=256", "batch_size=16", "synth.train=64", "synth.val=16", "synth.imgsz=256"],
    "flow (RAFT)": ["crop=256x320", "batch_size=8", "synth_train=64", "synth_val=8", "synth_size=288x352",
                    "num_flow_updates_train=12", "num_flow_updates_eval=4"],
    "flow (PWC, unsupervised)": ["method=unsupervised", "model=pwc", "batch_size=8", "synth_train=64",
                                 "synth_val=8", "synth_size=288x352"],
    "panorama": ["batch_size=16", "synth_train=64", "synth_val=8", "synth_size=128", "sample_steps=4"],
}
COMMON = ["tensorboard=false", "plots=false", "progress=false", "log_every=1", "eval_every=0"]


def task_of(name: str) -> str:
    return name.split()[0]


def train(task: str, args: list[str], out: Path, device: str) -> dict:
    """One training run in this process through the CLI's own verb; its peak memory and step rate."""
    from visiontrain.config import load_config
    from visiontrain.engine.logging import read_metrics
    from visiontrain.verbs import build_train_config, task_module

    schema, fn = task_module(task).VERBS["train"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cfg = (build_train_config if any(a.startswith("resume=") for a in args) else
           lambda s, y, o: load_config(s, y, o))(schema, None, [*args, *COMMON, f"device={device}", f"out={out}"])
    fn(cfg)
    rates = [v for _, v in read_metrics(out / "metrics.csv").get("train/steps_per_s", [])][1:]
    return {"seconds": time.perf_counter() - t0,
            "steps_per_s": sum(rates) / len(rates) if rates else float("nan"),
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")}


def state_pairs(a: Path, b: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matching tensors of two checkpoints: weights, EMA weights, optimizer state."""
    from visiontrain.engine.checkpoint import load_checkpoint

    ca, cb = load_checkpoint(a), load_checkpoint(b)
    tensors = [(ca["model"][k], cb["model"][k]) for k in ca["model"]]
    if ca.get("ema"):
        tensors += [(ca["ema"]["module"][k], cb["ema"]["module"][k]) for k in ca["ema"]["module"]]
    for pid, st in ca["optimizer"]["state"].items():
        tensors += [(v, cb["optimizer"]["state"][pid][k]) for k, v in st.items() if isinstance(v, torch.Tensor)]
    return tensors


def same_state(a: Path, b: Path) -> bool:
    return all(torch.equal(x, y) for x, y in state_pairs(a, b))


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest |difference| over the floating-point weights, relative to the largest |weight|."""
    from visiontrain.engine.checkpoint import load_checkpoint

    ma, mb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    pairs = [(ma[k].double(), mb[k].double()) for k in ma if ma[k].is_floating_point()]
    return max((x - y).abs().max().item() for x, y in pairs) / max(x.abs().max().item() for x, _ in pairs)


class NondeterministicOps(TorchDispatchMode):
    """A dispatch mode that runs every op with deterministic algorithms strictly on and records those torch
    refuses to run deterministically; each refused op is then run once without the setting so that the step
    goes on to the next one. Warnings cannot do this: torch warns about such an op once per process, so a
    check that already trained in the process would hear nothing. Backward ops are seen on the CPU (tested:
    there backward runs on the calling thread); that the mode also reaches autograd's CUDA worker thread is
    torch's documented behaviour but was not observed here, since on the H200 (torch 2.11) no op of a flow
    step was refused at all. A non-reproducible op torch does not flag (``grid_sample`` and bilinear
    ``interpolate`` backward there) is found only by comparing two runs: the resume row does that."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            torch.use_deterministic_algorithms(True, warn_only=False)
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "does not have a deterministic implementation" not in str(e):
                raise
            self.ops.add(str(e).split(" does not have a deterministic")[0])
            torch.use_deterministic_algorithms(False)
            return func(*args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def nondeterministic_ops(task: str, args: list[str], out: Path, device: str) -> list[str]:
    """The ops of one training step that torch has no deterministic implementation of on ``device``."""
    with NondeterministicOps() as mode:
        train(task, [*args, "max_steps=1", "save_every_steps=0"], out, device)
    return sorted(mode.ops)


def explain_difference(task: str, base: list[str], work: Path, straight: Path, split: Path, device: str,
                       k: int) -> str:
    """A resumed run that differs from the straight one: does a second straight run differ as much (kernels
    without a deterministic implementation), and which ops are they?"""
    again = work / f"{task}-again-{k}"
    train(task, base, again, device)
    resumed = max_weight_diff(straight / "checkpoints/last.pt", split / "checkpoints/last.pt")
    rerun = max_weight_diff(straight / "checkpoints/last.pt", again / "checkpoints/last.pt")
    ops = nondeterministic_ops(task, [a for a in base if not a.startswith("max_steps=")], work / f"{task}-ops-{k}",
                               device)
    return (f"DIFFERENT: resumed vs straight {resumed:.1e}, straight vs straight {rerun:.1e} (max |diff| / max |w|); "
            f"no deterministic kernel: {', '.join(ops) or 'none reported'}")


def part_tasks(work: Path, device: str, quick: bool, rows: list[dict], tasks: set[str]) -> None:
    precisions = ["off", "bf16"] if device == "cpu" else ["off", "bf16", "fp16"]
    for name, args in TASK_ARGS.items():
        task = task_of(name)
        if tasks and task not in tasks:
            continue
        for amp in precisions:
            row = {"part": "steps", "task": name, "amp": amp}
            try:
                row.update(train(task, [*args, f"amp={amp}", "max_steps=" + ("3" if quick else "8")],
                                 work / f"{task}-{amp}-{len(rows)}", device))
                row["ok"] = True
            except Exception as e:  # noqa: BLE001 - the table reports every failure
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            rows.append(row)
            print(row, flush=True)
        row = {"part": "resume", "task": name, "amp": "off"}
        try:  # 6 steps straight vs the same run resumed from its own step-3 checkpoint
            straight, split = work / f"{task}-straight-{len(rows)}", work / f"{task}-split-{len(rows)}"
            base = [*args, "amp=off", "deterministic=true", "save_every_steps=3", "keep_last=5", "max_steps=6"]
            train(task, base, straight, device)
            (split / "checkpoints").mkdir(parents=True)
            shutil.copy(straight / "checkpoints" / "step_0000003.pt", split / "checkpoints" / "last.pt")
            train(task, [*base, "resume=auto"], split, device)
            row["ok"] = same_state(straight / "checkpoints/last.pt", split / "checkpoints/last.pt")
            row["note"] = "bit-identical" if row["ok"] else explain_difference(task, base, work, straight, split,
                                                                              device, len(rows))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        rows.append(row)
        print(row, flush=True)


def part_race(device: str, rows: list[dict], batches=(16, 64), imgsz: int = 640, steps: int = 10) -> None:
    """yolov8n training step, ours vs Ultralytics, same GPU, same random batch. Both under deterministic
    kernels and no cuDNN autotuning, the training default of both (``deterministic=true`` here,
    ``deterministic: True`` in Ultralytics' default.yaml), set explicitly so that the race does not
    depend on whether part 1 ran before it."""
    from visiontrain.engine.runtime import set_deterministic

    set_deterministic()
    for b in batches:
        rows += race_one(device, b, imgsz, steps)
        for r in rows[-4:]:
            print(r, flush=True)


def race_one(device: str, b: int, imgsz: int, steps: int) -> list[dict]:
    from types import SimpleNamespace

    from ultralytics.nn.tasks import DetectionModel

    from visiontrain.detect.loss import DetectionLoss
    from visiontrain.detect.model import YOLOv8

    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, imgsz, imgsz, generator=g).to(device)
    n = 6 * b
    idx = torch.arange(n) // 6
    cls = torch.randint(0, 20, (n,), generator=g).float()
    cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
    ours_t = torch.cat([idx[:, None].float(), cls[:, None], torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1) * imgsz],
                       1).to(device)
    ubatch = {"img": images, "batch_idx": idx.float().to(device), "cls": cls[:, None].to(device),
              "bboxes": torch.cat([cxcy, wh], 1).to(device)}
    torch.manual_seed(0)
    um = DetectionModel("yolov8n.yaml", nc=20, verbose=False).to(device).train()
    um.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    u_opt = torch.optim.SGD(um.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")

    def ultra(amp: bool):
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss, _ = um.loss(ubatch)
        scaler.scale(loss.sum()).backward() if amp else loss.sum().backward()
        if amp:
            scaler.step(u_opt)
            scaler.update()
        else:
            u_opt.step()
        u_opt.zero_grad(set_to_none=True)

    m = YOLOv8("n", nc=20).to(device).train().to(memory_format=torch.channels_last)
    x = images.contiguous(memory_format=torch.channels_last)
    crit = DetectionLoss(20)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def ours(bf16: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            preds = m(x)
        sum(crit(preds, ours_t, (imgsz, imgsz)).values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {"ultralytics fp32": lambda: ultra(False), "ultralytics fp16 AMP": lambda: ultra(True),
                "ours fp32": lambda: ours(False), "ours bf16": lambda: ours(True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()
        f()
    for _ in range(steps):
        for k, f in variants.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    base = sorted(times["ultralytics fp32"])[steps // 2]
    return [{"part": "race", "task": f"yolov8n b{b} {imgsz}px", "amp": k, "ok": True,
             "ms_per_step": 1000 * sorted(ts)[steps // 2], "vs_ultralytics_fp32": sorted(ts)[steps // 2] / base}
            for k, ts in times.items()]


def part_nccl(work: Path, rows: list[dict]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "visiontrain", "train",
           "detect", *TASK_ARGS["detect"], *COMMON, "device=cuda", "max_steps=4", f"out={work / 'nccl'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    rows.append({"part": "nccl", "task": "detect, 2 processes", "amp": "off", "ok": p.returncode == 0,
                 "error": "" if p.returncode == 0 else p.stderr[-500:]})


def _num(r: dict, key: str, fmt: str) -> str:
    return f"{r[key]:{fmt}}" if isinstance(r.get(key), float) else ""


def table(rows: list[dict]) -> str:
    lines = [f"{'part':<7}{'task':<27}{'amp / variant':<22}{'ok':<5}{'steps/s':>9}{'peak MiB':>10}"
             f"{'ms/step':>9}{'vs U fp32':>10}  note"]
    for r in rows:
        lines.append(f"{r['part']:<7}{r['task']:<27}{r['amp']:<22}{'yes' if r.get('ok') else 'NO':<5}"
                     f"{_num(r, 'steps_per_s', '9.2f'):>9}{_num(r, 'peak_mib', '10.0f'):>10}"
                     f"{_num(r, 'ms_per_step', '9.1f'):>9}{_num(r, 'vs_ultralytics_fp32', '10.2f'):>10}  "
                     f"{r.get('note', '')}{r.get('error', '')[:80]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer steps (a script check)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: tasks,race,nccl")
    ap.add_argument("--tasks", default="", help="comma-separated tasks for part 1 (detect,flow,panorama; default all)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VISIONTRAIN_CACHE", str(out / "cache"))
    skip = set(filter(None, a.skip.split(",")))
    rows: list[dict] = []
    t0 = time.time()
    header = f"torch {torch.__version__}, device {a.device}"
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("no CUDA device here; run with --device cpu --quick to check the script")
            return 1
        header += f": {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    print(header, flush=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        if "tasks" not in skip:
            part_tasks(work, a.device, a.quick, rows, set(filter(None, a.tasks.split(","))))
        if "race" not in skip and a.device.startswith("cuda"):
            part_race(a.device, rows)
        if "nccl" not in skip and a.device.startswith("cuda") and torch.cuda.device_count() > 1:
            part_nccl(work, rows)
    text = f"{header}\n{table(rows)}\ntotal {time.time() - t0:.0f} s"
    print(text)
    (out / "gpu_check.txt").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1, default=str))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
