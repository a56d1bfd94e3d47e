"""How many RAFT refinement steps (and which input scale) to use at evaluation, chosen on built-in data.

    python benchmarks/flow_eval_iters.py --weights run/checkpoints/last.pt [--iters 2 4 6 8 12 24]
        [--scales 1 1.5 2] [--val 60] [--out DIR] [--check]

RAFT is trained with a fixed number of updates (``num_flow_updates_train``); whether more updates at test
time help depends on the model. This scores ``--weights`` on a built-in validation set written by the
layered generator with another seed (``--val`` pairs, ``--size``) for every (scale, updates) setting, picks
the best EPE there, and with ``--check`` only then scores the picked setting (and the 12-update default,
for reference) on the real-texture check, which is never used to choose. A scale ``s`` resizes both
frames by ``s`` (to multiples of 8) and the predicted flow back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from flow_supervised import model_metrics, realcheck_dir

from visiontrain.flow.inference import load_flow_model
from visiontrain.flow.sizes import parse_size
from visiontrain.flow.synthetic import write_synthetic_chairs

VAL_SEED = 2  # flow_ablation.py's built-in validation set uses seed 1, training data seed 0


class Resized(torch.nn.Module):
    """A RAFT that sees its (already normalised and padded) frames resized by ``scale`` to multiples of 8;
    its predictions are resized back and their vectors rescaled. Called by ``raft_forward`` like the model."""

    def __init__(self, model: torch.nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, first: torch.Tensor, second: torch.Tensor, num_flow_updates: int) -> list[torch.Tensor]:
        h, w = first.shape[-2:]
        size = (max(8, round(h * self.scale / 8) * 8), max(8, round(w * self.scale / 8) * 8))
        first, second = (F.interpolate(i, size, mode="bilinear", align_corners=False) for i in (first, second))
        gain = torch.tensor([w / size[1], h / size[0]]).view(1, 2, 1, 1)
        return [F.interpolate(p, (h, w), mode="bilinear", align_corners=False) * gain
                for p in self.model(first, second, num_flow_updates=num_flow_updates)]


def score(model: torch.nn.Module, data: Path, scale: float, iters: int) -> dict[str, float]:
    """EPE etc. on the val split of ``data`` with frames resized by ``scale`` and ``iters`` updates."""
    return model_metrics(Resized(model, scale) if scale != 1 else model, data, iters)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="a RAFT checkpoint (ours or a torchvision state dict)")
    ap.add_argument("--model", default="", help="model name when the file does not say (raft_small_convex, ...)")
    ap.add_argument("--iters", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12, 24, 32])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0])
    ap.add_argument("--val", type=int, default=60, help="built-in validation pairs")
    ap.add_argument("--size", default="192x256")
    ap.add_argument("--out", default="runs/bench_flow_eval_iters", help="where the data sets are written")
    ap.add_argument("--check", action="store_true", help="then score the picked setting on the real-texture check")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    val = out / f"val_layered_s{VAL_SEED}"
    if len(list((val / "data").glob("*_flow.flo"))) != a.val:
        write_synthetic_chairs(val, 0, a.val, parse_size(a.size, "size"), seed=VAL_SEED)
    model = load_flow_model(a.weights, a.model).model
    results = {}
    for scale in a.scales:
        for iters in a.iters:
            t0 = time.process_time()
            r = results[(scale, iters)] = score(model, val, scale, iters)
            print(f"built-in val ({a.val} pairs), scale {scale:g}, {iters} updates: EPE {r['epe']:.3f}, "
                  f"1px {100 * r['1px']:.1f} %, 3px {100 * r['3px']:.1f} % ({time.process_time() - t0:.0f} CPU-s)",
                  flush=True)
    best = min(results, key=lambda k: results[k]["epe"])
    print(f"picked on built-in val: scale {best[0]:g}, {best[1]} updates")
    if a.check:
        check = realcheck_dir(out / "realcheck")
        for scale, iters in dict.fromkeys([best, (1.0, 12)]):
            r = score(model, check, scale, iters)
            print(f"real-texture check, scale {scale:g}, {iters} updates: EPE {r['epe']:.3f}, "
                  f"1px {100 * r['1px']:.1f} %, 3px {100 * r['3px']:.1f} %", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
