"""Synthetic optical-flow pairs with exact ground truth, written in the FlyingChairs layout.

:func:`write_synthetic_chairs` writes pairs of the layered generator of :mod:`visiontrain.flow.synth` (the
default) or of the legacy one (:mod:`visiontrain.flow.synth.legacy`, ``gen.style=legacy``), whose names are
re-exported here; :func:`synthetic_chairs_spec` is the built-in set, written once into a cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from visiontrain.flow.io import write_flo, write_image
from visiontrain.flow.sizes import format_size
from visiontrain.flow.synth.legacy import (  # noqa: F401  (re-exported: the legacy generator's public names)
    SyntheticPair,
    SyntheticScene,
    bilinear_sample,
    make_texture,
    pair_rng,
    random_scene,
    render_pair,
)

if TYPE_CHECKING:
    from visiontrain.flow.synth.config import FlowGenConfig


def write_synthetic_chairs(out: str | Path, train: int, val: int, size: tuple[int, int] = (256, 320),
                           seed: int = 0, max_translation: float = 14.0, gen: FlowGenConfig | None = None) -> Path:
    """Write ``train + val`` pairs in the FlyingChairs layout and return ``out``::

        out/data/00001_img1.ppm  00001_img2.ppm  00001_flow.flo  ...
        out/FlyingChairs_train_val.txt    one line per pair: 1 = train, 2 = val

    Pairs ``1..train`` are training pairs, the next ``val`` validation pairs. Deterministic by seed
    (pair ``i`` depends only on ``(seed, i)``). Images are 8-bit, flow is exact float32. ``gen`` chooses
    the generator (default: the layered one of :mod:`visiontrain.flow.synth`; ``style=legacy``: this
    module's, with ``max_translation``).
    """
    from visiontrain.flow.synth.pairs import flow_pair

    if train < 0 or val < 0 or train + val == 0:
        raise ValueError(f"write_synthetic_chairs: need train + val > 0 pairs, got train={train} val={val}")
    height, width = size
    if height < 32 or width < 32:
        raise ValueError(f"write_synthetic_chairs: size {format_size(height, width)} is too small (min 32×32)")
    out = Path(out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(1, train + val + 1):
        pair = flow_pair(pair_rng(seed, i), size, gen, max_translation)
        write_image(data / f"{i:05d}_img1.ppm", pair.image1)
        write_image(data / f"{i:05d}_img2.ppm", pair.image2)
        write_flo(data / f"{i:05d}_flow.flo", pair.flow)
    (out / "FlyingChairs_train_val.txt").write_text("1\n" * train + "2\n" * val)
    return out


def synthetic_chairs_spec(folder: str | Path, train: int, val: int, size: tuple[int, int], seed: int,
                          gen: FlowGenConfig | None = None) -> str:
    """The ``chairs:DIR`` spec of the built-in synthetic set, written once (see :mod:`visiontrain.synthcache`)
    into ``folder``, or, when it is empty, into ``<cache>/flow_synth/chairs_t<train>_v<val>_<H>x<W>_s<seed>``
    (legacy generator) or ``..._s<seed>_<style>-<hash of the gen settings>``."""
    import hashlib
    import json

    from visiontrain.flow.synth.config import FlowGenConfig
    from visiontrain.synthcache import cache_root, synthesize_once

    gen = gen or FlowGenConfig()
    name = f"chairs_t{train}_v{val}_{size[0]}x{size[1]}_s{seed}"
    if gen.style != "legacy":
        name += f"_{gen.style}-{hashlib.sha1(json.dumps(gen.params(), sort_keys=True).encode()).hexdigest()[:8]}"
    folder = Path(folder) if str(folder) else cache_root() / "flow_synth" / name
    params = {"kind": "chairs", "train": train, "val": val, "size": list(size), "seed": seed}
    if gen.style != "legacy":
        params["gen"] = gen.params()
    written = synthesize_once(folder, params, lambda tmp: write_synthetic_chairs(tmp, train, val, size, seed, gen=gen),
                              what=f"synthetic FlyingChairs-layout data ({train} train, {val} val pairs)")
    return f"chairs:{written}"
