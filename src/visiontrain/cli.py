"""``visiontrain <verb> <task> [--config F.yaml] [key=value ...]``.

Verbs come from each task module's ``VERBS`` table (``train``, ``eval``, ``predict``, ``synth``,
``export``, ``split``); ``visiontrain demo`` runs the main demo end to end.
"""

from __future__ import annotations

import importlib
import os
import sys

from visiontrain import __version__
from visiontrain.config import ConfigError, config_help, load_config

TASKS = {
    "detect": "visiontrain.detect.commands",
    "flow": "visiontrain.flow.task",
    "panorama": "visiontrain.panorama.task",
}

USAGE = """usage: visiontrain <verb> <task> [--config FILE.yaml] [key=value ...] [--help]
       visiontrain demo [key=value ...]

tasks: {tasks}
verbs: train, eval, predict, synth, export, split (which a task offers: visiontrain <task> --help)
examples:
  visiontrain train detect epochs=5 batch_size=16 amp=bf16
  visiontrain train detect resume=auto out=runs/detect
  torchrun --nproc_per_node 2 -m visiontrain train flow data=chairs:/data/FlyingChairs
"""


def _task_module(name: str):
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown task '{name}'.{hint} Tasks: {', '.join(TASKS)}")
    try:
        return importlib.import_module(TASKS[name])
    except ModuleNotFoundError as e:
        if e.name == TASKS[name]:
            raise ConfigError(f"task '{name}' is not available in this version of visiontrain") from None
        raise


def build_train_config(schema: type, yaml_path: str | None, overrides: list[str]):
    """Like :func:`load_config`, but ``resume=`` starts from the checkpoint's saved config so a
    resumed run keeps its settings; overrides on the command line (e.g. ``epochs=``) still win."""
    cfg = load_config(schema, yaml_path, overrides)
    from visiontrain.engine.checkpoint import load_checkpoint, resume_path

    path = resume_path(getattr(cfg, "resume", ""), getattr(cfg, "out", ""))
    if path is None:
        return cfg  # a fresh run (resume=auto with nothing to resume starts one in out=)
    saved = load_checkpoint(path).get("config") or {}
    saved = {k: v for k, v in saved.items() if k not in ("resume",)}
    return load_config(schema, yaml_path, overrides, base=saved)


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(tasks=", ".join(TASKS)))
        return 0
    if argv[0] == "--version":
        print(f"visiontrain {__version__}")
        return 0
    if argv[0] == "demo":
        from visiontrain.demo import main as demo

        return demo(argv[1:]) or 0
    if argv[0] in TASKS:  # `visiontrain detect --help`
        module = _task_module(argv[0])
        print(f"task {argv[0]}: verbs {', '.join(module.VERBS)}")
        return 0
    if len(argv) < 2:
        raise ConfigError(f"missing task after '{argv[0]}'.\n" + USAGE.format(tasks=", ".join(TASKS)))
    verb, task_name, rest = argv[0], argv[1], argv[2:]
    module = _task_module(task_name)
    if verb not in module.VERBS:
        raise ConfigError(f"task '{task_name}' has no verb '{verb}'; it offers {', '.join(module.VERBS)}")
    schema, fn = module.VERBS[verb]
    yaml_path = None
    overrides = []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("-h", "--help"):
            print(config_help(schema, f"visiontrain {verb} {task_name} [--config F.yaml] [key=value ...]\nkeys:"))
            return 0
        if a == "--config":
            if i + 1 >= len(rest):
                raise ConfigError("--config needs a file name")
            yaml_path = rest[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            yaml_path = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise ConfigError(f"unknown option '{a}'; settings are given as key=value (see --help)")
        else:
            overrides.append(a)
        i += 1
    cfg = build_train_config(schema, yaml_path, overrides) if verb == "train" else load_config(
        schema, yaml_path, overrides)
    result = fn(cfg)
    return result if isinstance(result, int) else 0


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
