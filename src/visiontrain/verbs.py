"""``<verb> <task> [--config F.yaml] [key=value ...]``: find the task's verb, build its config, run it.

Each task package has a ``cli`` module with a ``VERBS`` table ``{verb: (config schema, function)}``; this
module loads the one asked for (lazily: a task's dependencies are imported only when it is used). A train
config with ``resume=`` starts from the checkpoint's saved config, so a resumed run keeps its settings;
command-line overrides (e.g. ``epochs=``) still win.
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Any

from visiontrain.config import ConfigError, config_help, load_config

TASKS = {
    "detect": "visiontrain.detect.cli",
    "flow": "visiontrain.flow.cli",
    "panorama": "visiontrain.panorama.cli",
}
ALL_VERBS = ("train", "eval", "predict", "synth", "export", "split")


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'.{did_you_mean(name, list(TASKS))} Tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def build_train_config(schema: type, yaml_path: str | None, overrides: list[str]) -> Any:
    """:func:`load_config`, on top of the saved config of the checkpoint ``resume=`` names (if any)."""
    cfg = load_config(schema, yaml_path, overrides)
    from visiontrain.engine.checkpoint import load_checkpoint, resume_path

    path = resume_path(getattr(cfg, "resume", ""), getattr(cfg, "out", ""))
    if path is None:
        return cfg  # a fresh run (resume=auto with nothing to resume starts one in out=)
    saved = load_checkpoint(path).get("config") or {}
    saved = {k: v for k, v in saved.items() if k not in ("resume",)}
    return load_config(schema, yaml_path, overrides, base=saved)


def parse_args(rest: list[str]) -> tuple[str | None, list[str], bool]:
    """``(yaml path, key=value overrides, help asked)`` from the words after ``<verb> <task>``."""
    yaml_path, overrides, i = None, [], 0
    while i < len(rest):
        a = rest[i]
        if a in ("-h", "--help"):
            return yaml_path, overrides, True
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
    return yaml_path, overrides, False


def run_verb(verb: str, task: str, rest: list[str]) -> int:
    """Run ``visiontrain <verb> <task> REST``; returns the exit status."""
    if verb in TASKS and task in ALL_VERBS:
        raise ConfigError(f"'{verb} {task}': the verb comes first: visiontrain {task} {verb} ...")
    module = task_module(task)
    if verb not in module.VERBS:
        raise ConfigError(f"task '{task}' has no verb '{verb}'.{did_you_mean(verb, list(module.VERBS))} "
                          f"It offers {', '.join(module.VERBS)}")
    schema, fn = module.VERBS[verb]
    yaml_path, overrides, want_help = parse_args(rest)
    if want_help:
        print(config_help(schema, f"visiontrain {verb} {task} [--config F.yaml] [key=value ...]\nkeys:"))
        return 0
    cfg = (build_train_config if verb == "train" else load_config)(schema, yaml_path, overrides)
    result = fn(cfg)
    return result if isinstance(result, int) else 0
