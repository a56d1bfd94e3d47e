"""Per-epoch progress: a tqdm bar on a terminal (losses, lr, it/s, ETA); silent otherwise, where the
trainer prints plain periodic lines instead."""

from __future__ import annotations

import sys

import tqdm

from visiontrain.engine.logging import RunLogger


class EpochProgress:
    def __init__(self, log: RunLogger, enabled: bool, epoch: int, epochs: int, total: int, start: int = 0):
        self.log = log
        self.live = bool(enabled and sys.stderr.isatty())
        self.bar = None
        if self.live:
            self.bar = tqdm.tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}",
                                 unit="batch", dynamic_ncols=True, leave=True, file=sys.stderr)
            log.bar_active = True

    def update(self, n: int, values: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
            self.bar.update(n)

    def pause(self) -> None:
        if self.bar is not None:
            self.bar.clear()

    def resume(self) -> None:
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.log.bar_active = False
