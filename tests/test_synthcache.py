"""Built-in synthetic data is written once, whoever asks for it at the same time (the ranks of a torchrun
job, runs started side by side), and a half-written set is never used."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from visiontrain.synthcache import MARKER, synthesize_once


def _slow_writer(tmp: Path) -> None:
    with open(tmp.parent / "writes.log", "a") as f:
        f.write("write\n")
    time.sleep(0.5)
    (tmp / "data.txt").write_text("ok")


def _ask(folder: str, queue) -> None:
    out = synthesize_once(folder, {"n": 1}, _slow_writer)
    queue.put((out / "data.txt").read_text())


def test_concurrent_callers_write_once_and_all_see_the_whole_set(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ask, args=(str(tmp_path / "set"), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [queue.get(timeout=5) for _ in procs] == ["ok"] * 3
    assert (tmp_path / "writes.log").read_text().count("write") == 1
    assert json.loads((tmp_path / "set" / MARKER).read_text()) == {"n": 1}


def test_an_interrupted_write_leaves_nothing_and_other_params_rewrite(tmp_path):
    def broken(tmp: Path) -> None:
        (tmp / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize_once(tmp_path / "set", {"n": 1}, broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []  # no partial set
    synthesize_once(tmp_path / "set", {"n": 1}, lambda tmp: (tmp / "v").write_text("1"))
    synthesize_once(tmp_path / "set", {"n": 2}, lambda tmp: (tmp / "v").write_text("2"))
    assert (tmp_path / "set" / "v").read_text() == "2"


def test_a_folder_that_is_not_ours_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTRAIN_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "my_dataset"
    mine.mkdir()
    (mine / "precious.jpg").write_text("x")
    with pytest.raises(FileExistsError, match="not a synthetic set written by visiontrain"):
        synthesize_once(mine, {"n": 1}, lambda tmp: None)
    assert (mine / "precious.jpg").is_file()
