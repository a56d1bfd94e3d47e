"""Stop requests: SIGINT (Ctrl-C) and SIGTERM (cluster schedulers) end a run cleanly, keeping its work.

While a :class:`StopSignals` block is active, the first SIGINT or SIGTERM only records a request; the
trainer finishes the optimizer step it is in, all ranks agree on that step, ``last.pt`` is written and
:class:`TrainingInterrupted` ends the run (exit status 130 for SIGINT, 143 for SIGTERM). A second signal
stops at once, without writing. Under a torchrun agent a Ctrl-C reaches each worker twice — from the
terminal and forwarded by the agent a few milliseconds later — so there a repeat within
:data:`LAUNCHER_REPEAT_S` seconds is taken as the same request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LAUNCHER_REPEAT_S = 1.0


class TrainingInterrupted(KeyboardInterrupt):
    """A run ended by a signal. ``saved``: ``last.pt`` holds the step it stopped at. A subclass of
    ``KeyboardInterrupt`` so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, step: int, saved: bool, message: str = ""):
        super().__init__(message or f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.saved = int(signum), int(step), saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "stop request"


def resume_command(task: str, out: str | os.PathLike, world: int = 1) -> str:
    """The command line that continues a run (with the torchrun launcher it was started with)."""
    launcher = "visiontrain"
    if world > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = world // max(1, per_node)
        launcher = (f"torchrun {'--nnodes ' + str(nodes) + ' ' if nodes > 1 else ''}"
                    f"--nproc_per_node {per_node} -m visiontrain")
    return f"{launcher} train {task} resume=auto out={out}"


def saved_state(last: Path, command: str) -> str:
    """What a stop that did not save leaves: the step ``last`` holds and how to go on."""
    if not last.is_file():
        return f"no checkpoint was written yet ({command} starts the run over)"
    from visiontrain.engine.checkpoint import load_checkpoint

    return f"{last} holds step {load_checkpoint(last)['step']}; resume with: {command}"


def stop_message(e: KeyboardInterrupt, step: int, last: Path, command: str) -> str:
    """What the log says when a run stops on a signal: what was saved and how to go on."""
    if isinstance(e, TrainingInterrupted) and e.saved:
        return f"{e}: wrote {last} at step {step}; resume with: {command}"
    return f"{e or 'interrupted'} at step {step}: {saved_state(last, command)}"


def under_launcher() -> bool:
    """True when an elastic agent (torchrun) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


class StopSignals:
    """Context manager: SIGINT/SIGTERM set :attr:`signum` instead of ending the process; a second one
    raises :class:`TrainingInterrupted` (``saved=False``) at once. Handlers are installed only in the
    main thread (Python allows no other) and restored on exit."""

    def __init__(self, announce: bool = True, repeat_window: float | None = None):
        self.announce = announce
        self.signum: int | None = None
        self._first = 0.0
        self._window = (LAUNCHER_REPEAT_S if under_launcher() else 0.0) if repeat_window is None else repeat_window
        self._previous: dict[int, object] = {}
        self.step = 0  # kept current by the trainer, for the message of an immediate stop

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            if self.announce:
                name = signal.Signals(signum).name
                print(f"\n{name} received: finishing step {self.step + 1}, then writing last.pt "
                      f"(send it again to stop at once, without saving)", file=sys.stderr, flush=True)
            return
        if now - self._first < self._window:
            return  # the launcher forwarding the same interrupt
        self.restore()
        raise TrainingInterrupted(signum, self.step, saved=False,
                                  message=f"second {signal.Signals(signum).name}: stopped at once")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGINT/SIGTERM to the main process, which stops
    them after saving (a Ctrl-C reaches the whole process group; a dead worker would end the run)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
