"""Loss and metric curves as PNG, redrawn from ``metrics.csv`` at each evaluation."""

from __future__ import annotations

import math
from pathlib import Path

from visiontrain.engine.logging import read_metrics


def _grid(keys: list[str], series: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``plots/train.png`` (losses, lr) and ``plots/val.png`` (metrics); returns the paths."""
    run_dir = Path(run_dir)
    csv_path = run_dir / "metrics.csv"
    if not csv_path.exists():
        return []
    series = read_metrics(csv_path)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    groups = {
        "train.png": [k for k in series if k.startswith("train/") or k == "lr"],
        "val.png": [k for k in series if k.startswith("val/") and "per_class" not in k],
    }
    for name, keys in groups.items():
        if keys:
            _grid(sorted(keys), series, out / name, f"{run_dir.name}: {name[:-4]}")
            written.append(out / name)
    return written
