"""``visiontrain <verb> <task> [--config F.yaml] [key=value ...]``.

Verbs come from each task module's ``VERBS`` table (``train``, ``eval``, ``predict``, ``synth``,
``export``, ``split``); ``visiontrain demo`` runs the main demo end to end.
"""

from __future__ import annotations

import os
import sys

from visiontrain import __version__
from visiontrain.config import ConfigError
from visiontrain.verbs import ALL_VERBS, TASKS, did_you_mean, run_verb, task_module

USAGE = """usage: visiontrain <verb> <task> [--config FILE.yaml] [key=value ...] [--help]
       visiontrain demo [key=value ...]

tasks: {tasks}
verbs: train, eval, predict, synth, export, split (which a task offers: visiontrain <task> --help)
examples:
  visiontrain train detect epochs=5 batch_size=16 amp=bf16
  visiontrain train detect resume=auto out=runs/detect
  torchrun --nproc_per_node 2 -m visiontrain train flow data=chairs:/data/FlyingChairs
"""


def run(argv: list[str]) -> int:
    tasks = ", ".join(TASKS)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(tasks=tasks))
        return 0
    if argv[0] == "--version":
        print(f"visiontrain {__version__}")
        return 0
    if argv[0] == "demo":
        from visiontrain.demo import main as demo

        return demo(argv[1:]) or 0
    if argv[0] in TASKS and (len(argv) == 1 or argv[1] in ("-h", "--help")):  # `visiontrain detect --help`
        print(f"task {argv[0]}: verbs {', '.join(task_module(argv[0]).VERBS)}")
        return 0
    if len(argv) < 2:
        verb = argv[0]
        hint = did_you_mean(verb, [*ALL_VERBS, "demo"]) if verb not in ALL_VERBS else ""
        raise ConfigError(f"'{verb}' needs a task after it.{hint}\n" + USAGE.format(tasks=tasks))
    if argv[0] not in ALL_VERBS and argv[0] not in TASKS:
        raise ConfigError(f"unknown verb '{argv[0]}'.{did_you_mean(argv[0], [*ALL_VERBS, 'demo'])} "
                          f"Verbs: {', '.join(ALL_VERBS)}, demo")
    return run_verb(argv[0], argv[1], argv[2:])


def setup_logging() -> None:
    """Library messages (dataset summaries, weight loading) to stderr: rank 0 says everything, other
    ranks of a torchrun job only errors, so each line appears once."""
    import logging

    quiet = os.environ.get("RANK", "0") != "0"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("visiontrain")  # propagates: no duplicate unless the root logger has handlers
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from visiontrain.engine.guard import NonFiniteLossError
    from visiontrain.engine.interrupt import TrainingInterrupted
    from visiontrain.engine.runtime import tune_allocator

    tune_allocator()
    setup_logging()
    try:
        return run(argv)
    except TrainingInterrupted as e:  # the trainer has said what it saved and how to resume
        return e.exit_code
    except NonFiniteLossError as e:
        print(f"error: non-finite loss: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        if os.environ.get("VISIONTRAIN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `visiontrain ... --help | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
