"""Unsupervised flow (UFlow objective, PWC network; SMURF-style RAFT) on synthetic FlyingChairs-layout pairs.

    python benchmarks/flow_unsupervised.py [--cpu-minutes 30] [--train 400] [--val 40] [--size 192x256]
    python benchmarks/flow_unsupervised.py --seeds 0-4 --models pwc,raft_small_convex --cpu-minutes 3 ...

``--seeds A-B`` (robustness): one run per seed and model (``--cpu-minutes`` each), a table of final EPE
per seed and ``mask_kept.png`` in ``--out``: the share of pixels the occlusion mask keeps
(``stat/mask_kept``) over the steps of every run. ``--models``: ``pwc`` and/or a RAFT
(``raft_small``, ``raft_small_convex``; optionally fine-tuned from ``--raft-weights``), RAFT with every
iteration in the loss (``--raft-iters``) and full-image warping of its training crop (``--crop`` inside the
``--size`` image).

Trains :class:`PWCFlow` from scratch with :class:`UnsupervisedFlowObjective` for ``--cpu-minutes`` of
*process CPU time* (all threads; a busy shared machine stretches the wall time, not the training),
then reports validation EPE side by side with zero flow and OpenCV DIS (fast and medium presets) on
the same validation pairs. Ground truth is never read for training: the training loop only opens the
image files (``FlowItem.image1/image2``); the ``.flo`` files are read for validation alone.

Schedule, as UFlow's code in proportion except for the learning rate: Adam lr 5e-4 (UFlow: 1e-4, which
in a 4-CPU-minute run had not started to lower the census loss after 160 steps, while 5e-4 reached EPE
1.75), plus a 50-step linear warmup, occlusion ``wang`` from the start. Self-supervision is off by
default (``--selfsup-at 1``); ``--selfsup-at 0.5`` switches it on at half of the budget, as UFlow does,
ramped up over the next 10 %. Until issue 18 it diverged here (the student learned the teacher's flow
enlarged by the crop zoom everywhere, and the flow grew until it pointed out of the image, where the
masked losses were empty: EPE 550 px in a 2-CPU-minute run); self-supervision now uses SMURF's mask
(see ``visiontrain.flow.selfsup``) and the objective has a floor under its mask
(``visiontrain.flow.losses.mask_floor``). Every step's ``stat/mask_kept`` is recorded. Training
samples are random crops (``--crop``) with a random horizontal flip of both images; validation runs
on full images (sizes must be multiples of 32). The data set is written with
``visiontrain.flow.synthetic.write_synthetic_chairs`` (same defaults as ``flow_supervised.py``, so
the two tables share their validation pairs when run with the same ``--size``, ``--val``, ``--seed``
and ``--train``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from visiontrain.config import load_config
from visiontrain.flow.data import list_flow_items, open_flow_dataset
from visiontrain.flow.inference import load_flow_weights, predict_flow
from visiontrain.flow.io import read_image
from visiontrain.flow.losses.full_frame import FullFrame
from visiontrain.flow.metrics import FlowMetrics, format_comparison
from visiontrain.flow.models.pwc import PWCFlow
from visiontrain.flow.models.raft import build_raft
from visiontrain.flow.models.raft_pair import RaftPair
from visiontrain.flow.synth.config import FlowGenConfig
from visiontrain.flow.synthetic import write_synthetic_chairs
from visiontrain.flow.unsupervised import UnsupervisedFlowObjective, save_mask_png


def parse_hw(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


class UnlabeledPairs:
    """Image pairs of a chairs-layout folder's train split, without their flow files."""

    def __init__(self, data: Path, crop: tuple[int, int], seed: int, full_frame: bool = False):
        self.pairs = [(item.image1, item.image2) for item in list_flow_items(f"chairs:{data}", "train")]
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        self.full_frame = full_frame

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, FullFrame | None]:
        """Crops ``[B, 3, h, w]`` of random pairs (random flip); with ``full_frame`` also the whole images
        and the crop's offset (one offset for the batch) for full-image warping."""
        images1, images2 = [], []
        height, width = self.crop
        top = left = None
        for index in self.rng.integers(0, len(self.pairs), size):
            a, b = (read_image(p) for p in self.pairs[index])  # [H, W, 3] float32 in [0, 1]
            if top is None or not self.full_frame:
                top = int(self.rng.integers(0, a.shape[0] - height + 1))
                left = int(self.rng.integers(0, a.shape[1] - width + 1))
            if not self.full_frame:
                a, b = a[top : top + height, left : left + width], b[top : top + height, left : left + width]
            if self.rng.random() < 0.5:
                a, b = a[:, ::-1], b[:, ::-1]
            images1.append(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))))
            images2.append(torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1))))
        image1, image2 = torch.stack(images1), torch.stack(images2)
        if not self.full_frame:
            return image1, image2, None
        full = FullFrame(image1, image2, top, left)
        return (*full.crop(height, width), full)


def build(a: argparse.Namespace, model_name: str) -> tuple[torch.nn.Module, object]:
    """The network and what the objective calls: PWC itself, or RAFT wrapped to give both directions."""
    if model_name == "pwc":
        model = PWCFlow(channel_multiplier=a.channel_multiplier).train()
        return model, model
    model = build_raft(model_name).train()
    if a.raft_weights:
        load_flow_weights(model, model_name, a.raft_weights)
    return model, RaftPair(model, a.raft_iters)


def train(a: argparse.Namespace, data: Path, model_name: str = "pwc", seed: int | None = None) -> tuple[torch.nn.Module, dict]:
    seed = a.seed if seed is None else seed
    torch.manual_seed(seed)
    model, net = build(a, model_name)
    objective = UnsupervisedFlowObjective(selfsup_start_step=10**12, selfsup_ramp_steps=1)  # switched on below
    optimizer = torch.optim.Adam(model.parameters(), lr=a.lr if model_name == "pwc" else a.raft_lr)
    # Linear warmup: Adam's first steps move every weight by ~lr, which at the coarsest level (flow x32
    # at full resolution) can throw the flow out of the image before the census loss has a say.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(1, a.warmup)))
    pairs = UnlabeledPairs(data, parse_hw(a.crop), seed, full_frame=model_name != "pwc")
    budget = 60.0 * a.cpu_minutes
    cpu0, wall0 = time.process_time(), time.perf_counter()
    step, running, kept = 0, {}, []
    while time.process_time() - cpu0 < budget:
        if objective.selfsup_start_step > step and time.process_time() - cpu0 >= a.selfsup_at * budget:
            objective.selfsup_start_step = step
            objective.selfsup_ramp_steps = max(1, step // 5)  # 10 % of the (estimated) total
            print(f"step {step}: self-supervision on (ramp {objective.selfsup_ramp_steps} steps)", flush=True)
        image1, image2, full = pairs.batch(a.batch)
        terms = objective(net, image1, image2, step, full)
        loss = sum(v for k, v in terms.items() if not k.startswith("stat/"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if model_name != "pwc":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the flow task does for RAFT
        optimizer.step()
        schedule.step()
        step += 1
        kept.append(float(terms["stat/mask_kept"]))
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if step % a.log_every == 0:
            means = " ".join(f"{k} {v / a.log_every:.4f}" for k, v in running.items())
            print(f"step {step}  {means}  ({(time.process_time() - cpu0) / 60:.1f} CPU-min)", flush=True)
            running = {}
    info = {"steps": step, "cpu_min": (time.process_time() - cpu0) / 60, "wall_min": (time.perf_counter() - wall0) / 60,
            "mask_kept": kept}
    return model.eval(), info


def dis_flow(image1: np.ndarray, image2: np.ndarray, preset: int) -> np.ndarray:
    def grey(x: np.ndarray) -> np.ndarray:
        return cv2.cvtColor((x * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY)

    return cv2.DISOpticalFlow_create(preset).calc(grey(image1), grey(image2), None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Path, out: Path | None, iters: int = 12) -> dict[str, dict[str, float]]:
    val = open_flow_dataset(f"chairs:{data}", "val")
    rows = {"zero flow": FlowMetrics(), "OpenCV DIS (fast)": FlowMetrics(), "OpenCV DIS (medium)": FlowMetrics(),
            "UFlow PWC (unsupervised)": FlowMetrics()}
    presets = {"OpenCV DIS (fast)": cv2.DISOPTICAL_FLOW_PRESET_FAST, "OpenCV DIS (medium)": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
    objective = UnsupervisedFlowObjective()
    for i in range(len(val)):
        s = val.load(i)
        gt = torch.from_numpy(s["flow"]).permute(2, 0, 1)[None]
        valid = torch.from_numpy(s["valid"])[None]
        rows["zero flow"].update(torch.zeros_like(gt), gt, valid)
        for name, preset in presets.items():
            rows[name].update(torch.from_numpy(dis_flow(s["image1"], s["image2"], preset)).permute(2, 0, 1)[None], gt, valid)
        image1 = torch.from_numpy(s["image1"]).permute(2, 0, 1)[None]
        image2 = torch.from_numpy(s["image2"]).permute(2, 0, 1)[None]
        if not isinstance(model, PWCFlow):
            rows["UFlow PWC (unsupervised)"].update(predict_flow(model, image1, image2, iters), gt, valid)
            continue
        pred = model(image1, image2)
        rows["UFlow PWC (unsupervised)"].update(pred["flow_fw"], gt, valid)
        if out is not None and i < 4:
            masks = objective.occlusion_masks(pred["flow_fw"], pred["flow_bw"])
            save_mask_png(masks["occlusion_fw"][0], out / f"val{i:02d}_occlusion_fw.png")
    return {name: m.compute() for name, m in rows.items()}


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> ``[0, 1, 2, 3, 4]``; ``"1,3"`` -> ``[1, 3]``."""
    if "-" in text:
        first, _, last = text.partition("-")
        return list(range(int(first), int(last) + 1))
    return [int(t) for t in text.split(",")]


def plot_mask_kept(runs: dict[str, list[float]], path: Path, steps: dict[str, list[int]] | None = None) -> None:
    """One line per run: the share of pixels the mask kept at every training step (at ``steps[run]`` when
    given: the steps a run logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1, figsize=(8, 4))
    for label, kept in runs.items():
        x = steps[label] if steps else np.arange(1, len(kept) + 1)
        axes.plot(x, kept, label=label, linewidth=0.8, marker="." if steps else None)
    axes.set(xlabel="optimizer step", ylabel="stat/mask_kept", ylim=(0, 1.02),
             title="share of pixels the occlusion mask keeps (0 = the all-occluded collapse)")
    axes.axhline(0.05, color="red", linestyle=":", linewidth=0.8, label="guard (5 %)")
    axes.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def robustness(a: argparse.Namespace, data: Path, out: Path | None) -> None:
    """``--seeds``: every seed x model for ``--cpu-minutes``; after each run, the table of final EPE so far and
    (with ``--out``) the mask plot, so an interrupted run still leaves its figures."""
    table, curves = [], {}
    for seed in parse_seeds(a.seeds):
        for model_name in a.models.split(","):
            print(f"=== {model_name} seed {seed} ===", flush=True)
            model, info = train(a, data, model_name, seed)
            rows = evaluate(model, data, None, a.raft_iters)
            epe = rows["UFlow PWC (unsupervised)"]["epe"]
            kept = info["mask_kept"]
            table.append((model_name, seed, info["steps"], info["cpu_min"], epe, min(kept), kept[-1]))
            curves[f"{model_name} s{seed}"] = kept
            print(f"\nzero flow {rows['zero flow']['epe']:.3f}, DIS fast {rows['OpenCV DIS (fast)']['epe']:.3f}, "
                  f"DIS medium {rows['OpenCV DIS (medium)']['epe']:.3f} (same {int(rows['zero flow']['images'])} pairs)")
            print("| model | seed | steps | CPU-min | EPE | mask kept (min) | mask kept (last) |")
            print("|---|---|---|---|---|---|---|")
            for name, s, steps, cpu, e, low, last in table:
                print(f"| {name} | {s} | {steps} | {cpu:.1f} | {e:.3f} | {low:.3f} | {last:.3f} |", flush=True)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                plot_mask_kept(curves, out / "mask_kept.png")
                np.savez(out / "mask_kept.npz", **{k.replace(" ", "_"): np.asarray(v) for k, v in curves.items()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-minutes", type=float, default=30.0, help="training budget in process CPU minutes")
    ap.add_argument("--data", default="", help="existing chairs-layout folder (default: synthesise into a temp dir)")
    ap.add_argument("--train", type=int, default=1000,
                    help="synthetic training pairs (1000 = flow_supervised.py's default: the same validation pairs)")
    ap.add_argument("--val", type=int, default=40, help="synthetic validation pairs")
    ap.add_argument("--size", default="192x256", help="synthetic image size HxW (multiples of 32)")
    ap.add_argument("--crop", default="128x192", help="training crop HxW (multiples of 32)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=50, help="linear lr warmup steps")
    ap.add_argument("--selfsup-at", type=float, default=1.0,
                    help="fraction of the budget after which self-supervision starts (UFlow: 0.5; >= 1: never)")
    ap.add_argument("--channel-multiplier", type=float, default=0.5, help="PWC width (UFlow: 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; on a loaded machine extra threads spin-wait and burn CPU time for nothing")
    ap.add_argument("--out", default="", help="write weights and occlusion-mask PNGs here")
    ap.add_argument("--seeds", default="", help="robustness: seeds A-B (or A,B,...), one run per seed and model")
    ap.add_argument("--models", default="pwc", help="with --seeds: pwc and/or raft_small, raft_small_convex")
    ap.add_argument("--raft-weights", default="", help="RAFT: start from these weights (else from scratch)")
    ap.add_argument("--raft-iters", type=int, default=6, help="RAFT refinement steps (training and validation)")
    ap.add_argument("--raft-lr", type=float, default=2e-4, help="RAFT: Adam learning rate (SMURF: 2e-4)")
    ap.add_argument("--gen", nargs="*", default=["style=legacy"],
                    help="synthetic data generator keys (gen.*); default style=legacy, the generator every "
                         "recorded figure of this script was made with; --gen (empty) for the layered one")
    a = ap.parse_args()
    for text in (a.size, a.crop):
        if any(v % 32 for v in parse_hw(text)):
            ap.error(f"{text}: sizes must be multiples of 32 (PWC has 5 stride-2 levels)")
    if a.selfsup_at < 1 and "raft" in a.models and parse_hw(a.crop) == parse_hw(a.size):
        print("note: RAFT trains on --crop inside --size with full-image warping; equal sizes use whole images")
    torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else Path(tmp) / "chairs"
        if not a.data:
            t0 = time.perf_counter()
            gen = load_config(FlowGenConfig, None, [x.removeprefix("gen.") for x in a.gen])
            write_synthetic_chairs(data, a.train, a.val, parse_hw(a.size), seed=a.seed, gen=gen)
            print(f"synthesised {a.train} + {a.val} pairs ({a.size}) in {time.perf_counter() - t0:.0f} s", flush=True)
        if a.seeds:
            robustness(a, data, out)
            return 0
        model, info = train(a, data)
        print(f"trained {info['steps']} steps (batch {a.batch}, crop {a.crop}): {info['cpu_min']:.1f} CPU-min, "
              f"{info['wall_min']:.1f} wall-min, {torch.get_num_threads()} threads", flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / "pwc_unsupervised.pt")
        rows = evaluate(model, data, out)
    n = int(rows["zero flow"]["images"])
    label = f"UFlow PWC x{a.channel_multiplier:g}, {a.cpu_minutes:g} CPU-min ({info['steps']} steps)"
    rows[label] = rows.pop("UFlow PWC (unsupervised)")
    print(f"\nvalidation: {n} synthetic chairs-layout pairs {a.size}; ground truth never used in training")
    print(format_comparison(rows, width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
