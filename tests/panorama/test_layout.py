"""The package keeps the agreed shape: short files, one home per concern, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import visiontrain.panorama

PACKAGE = Path(visiontrain.panorama.__file__).parent


def panorama_imports(path: Path) -> set[str]:
    """The sibling modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visiontrain.panorama."):
            found.add(node.module.split(".")[2])
    return found


def test_files_are_short_and_concerns_have_one_home() -> None:
    lengths = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(lengths.values()) <= 450, lengths
    graph = {p.stem: panorama_imports(p) for p in PACKAGE.glob("*.py")}
    # configs in config.py, the Task alone in task.py, verbs in cli.py, model loading in inference.py
    task_source = (PACKAGE / "task.py").read_text()
    assert "dataclass" not in task_source and "load_checkpoint" not in task_source and "VERBS" not in task_source
    assert [p.stem for p in PACKAGE.glob("*.py") if "load_checkpoint(" in p.read_text()] == ["inference"]
    assert "task" not in graph["inference"] and "cli" not in set().union(*(graph[m] for m in graph if m != "cli"))


def test_no_import_cycles() -> None:
    graph = {p.stem: panorama_imports(p) for p in PACKAGE.glob("*.py")}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert [m for m in graph if m in reachable(m)] == []
