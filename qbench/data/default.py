"""The embedded defaults: the committed default model and the synthetic data it was trained on.

The default data is generated on first use into qbench's cache folder
(`$QBENCH_CACHE`, default ~/.cache/qbench) and reused afterwards. Generation is
deterministic and the same on every CPU (see synth.py), so the sha256 of
calibration/synth-train-512.json hold wherever it is regenerated.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import QbenchError
from ..progress import bar
from ..resources import shipped
from . import synth

DEFAULT_WEIGHTS = shipped("default_model") / "best.pt"
DEFAULT_SEED = 0
DEFAULT_TRAIN, DEFAULT_VAL = 1200, 200
# 512 stratified train images of the default set (`qbench calib --n 512 --out ...`); `qbench run` calibrates on it
DEFAULT_CALIB = shipped("calibration") / "synth-train-512.json"


def cache_dir() -> Path:
    return Path(os.environ.get("QBENCH_CACHE") or Path.home() / ".cache" / "qbench")


def synth_dataset(out: str | Path, n_train: int = DEFAULT_TRAIN, n_val: int = DEFAULT_VAL, seed: int = DEFAULT_SEED,
                  progress: bool = False) -> Path:
    """Generate a synthetic set into `out` (staged, then renamed: never half-written); returns its data.yaml."""
    out = Path(out)
    if (out / "data.yaml").exists():
        raise QbenchError(f"'{out}' already holds a dataset; choose another --out or delete it.")
    if out.exists() and any(out.iterdir()):
        raise QbenchError(f"'{out}' exists and is not empty; choose another --out or delete it.")
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    with bar(n_train + n_val, "Drawing synthetic images", progress) as adv:
        synth.generate(stage, n_train, n_val, synth.SynthConfig(seed=seed), progress=adv)
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage.rename(out)
    return out / "data.yaml"


def default_data_dir() -> Path:
    """Where the default synthetic set lives (or will, once generated)."""
    return cache_dir() / f"synth-v{synth.GENERATOR_VERSION}-seed{DEFAULT_SEED}-{DEFAULT_TRAIN}-{DEFAULT_VAL}"


def default_data(progress: bool = False) -> Path:
    """data.yaml of the default synthetic set, generated on first use."""
    d = default_data_dir()
    if not (d / "data.yaml").exists():
        synth_dataset(d, progress=progress)
    return d / "data.yaml"


def default_weights() -> Path:
    if not DEFAULT_WEIGHTS.exists():
        raise QbenchError(f"The default model '{DEFAULT_WEIGHTS}' is missing from this checkout; "
                          "pass --weights or restore it with git.")
    return DEFAULT_WEIGHTS
