"""The detect verbs' edges: one message for a wrong weights file, and --help listing only keys a verb reads."""

from __future__ import annotations

import pytest
import torch

from visiontrain.cli import main
from visiontrain.config import flat_keys, load_config
from visiontrain.detect.cli import VERBS
from visiontrain.detect.model import YOLOv8
from visiontrain.detect.synthetic import MAR20_NAMES, write_synthetic_mar20

NAMES = list(MAR20_NAMES)
QUIET = ["tensorboard=false", "plots=false", "progress=false", "imgsz=64", "batch_size=2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny MAR20 set, a (random) detector saved the way the engine saves best.pt, and a flow checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    data = write_synthetic_mar20(root / "data", train=4, val=2, imgsz=64, seed=0)
    torch.manual_seed(0)
    model = YOLOv8("n", nc=20, names=NAMES)
    best = root / "best.pt"
    torch.save({"format_version": 1, "task": "detect", "model_signature": "yolov8n-nc20", "config": {},
                "task_state": {"names": NAMES, "scale": "n", "imgsz": 64}, "model": model.state_dict(),
                "ema": None}, best)
    flow = root / "flow.pt"
    torch.save({"format_version": 1, "task": "flow", "model_signature": "raft_small", "model": {}}, flow)
    return {"root": root, "data": data, "best": best, "flow": flow, "image": data / "JPEGImages" / "5.jpg"}


# ---- a wrong weights file: one message, from every verb that takes weights ------------------------

@pytest.mark.parametrize("verb", ["eval", "predict", "export", "train weights=", "train distill.teacher="])
def test_a_flow_checkpoint_gets_one_message_from_every_verb(files, tmp_path, capsys, verb):
    flow, out = files["flow"], tmp_path / "out"
    argv = {
        "eval": ["eval", "detect", f"weights={flow}", f"data={files['data']}", f"out={out}"],
        "predict": ["predict", "detect", f"weights={flow}", f"source={files['image']}", f"out={out}"],
        "export": ["export", "detect", f"weights={flow}", f"out={out}"],
        "train weights=": ["train", "detect", f"weights={flow}", f"data={files['data']}", f"out={out}", *QUIET],
        "train distill.teacher=": ["train", "detect", f"distill.teacher={flow}", f"data={files['data']}",
                                   f"out={out}", *QUIET],
    }[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {flow} is a flow checkpoint (from `visiontrain train flow`); detect needs a detect checkpoint, " \
           "an Ultralytics .pt" in err, err
    assert not out.exists()  # found before any output (or run) folder is made


def test_an_onnx_file_is_refused_where_only_torch_weights_work(files, tmp_path, capsys):
    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"not read")
    assert main(["export", "detect", f"weights={fake}"]) == 2
    assert "is already an ONNX export" in capsys.readouterr().err
    assert main(["train", "detect", f"weights={fake}", f"data={files['data']}", f"out={tmp_path / 'r'}", *QUIET]) == 2
    assert "is an ONNX export (predict and eval run it); this needs a detect checkpoint" in capsys.readouterr().err


# ---- --help lists only keys the verb reads ----------------------------------------------------------

class ReadRecorder:
    """Wraps a config and records which keys are read."""

    def __init__(self, cfg):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "read", set())

    def __getattr__(self, key):
        self.read.add(key)
        return getattr(self._cfg, key)


def test_every_key_a_verb_lists_is_read_by_it(files, tmp_path):
    d, best = files["data"], files["best"]
    runs = {
        "eval": [f"weights={best}", f"data={d}", f"out={tmp_path / 'e'}", "classes=[A1]"],
        "predict": [f"weights={best}", f"source={files['image']}", f"out={tmp_path / 'p'}"],
        "export": [f"weights={best}", f"out={tmp_path / 'x.onnx'}"],
        "synth": [f"out={tmp_path / 's'}", "train=1", "val=1", "imgsz=64"],
        "split": [f"data={d}", f"out={tmp_path / 'k'}", "base=A1..A10", "shots=1"],
    }
    for verb, overrides in runs.items():
        schema, fn = VERBS[verb]
        rec = ReadRecorder(load_config(schema, None, overrides))
        assert fn(rec) == 0
        listed = {k for k, *_ in flat_keys(schema)}
        # ``format`` has one choice (onnx), checked when the config is built
        assert listed - rec.read - ({"format"} if verb == "export" else set()) == set(), verb
