"""Quantization engines behind one protocol, chosen by the type of the configuration they are given.

A `Recipe` (configs/recipes/, optionally with an NPU profile applied) goes to ONNX Runtime's static QDQ engine
(`ort_engine.quantize_ort`); an `IncConfig` to Intel Neural Compressor's mAP-driven tuning of the PyTorch model
(`inc_engine.quantize_inc`). Adding an engine is one file with a config type and an `Engine`, listed in ENGINES.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from ..errors import QbenchError
from .inc_engine import quantize_inc
from .ort_engine import quantize_ort
from .recipe import Recipe


@dataclass(frozen=True)
class IncConfig:
    """Intel Neural Compressor: tuning stops at the first trial within `tolerable_loss` (relative mAP50-95)."""

    tolerable_loss: float = 0.01
    max_trials: int = 3
    calib_images: int = 128
    eval_images: int | None = None

    @property
    def name(self) -> str:
        return f"inc(tolerable_loss={self.tolerable_loss:g})"

    def to_dict(self) -> dict:
        return asdict(self)


class Engine(Protocol):
    """quantize(weights, fp32, out, config, calib, data) -> the engine's JSON-able report; `out` is written only
    when it succeeds."""

    name: str
    config_type: type
    needs_weights: bool  # quantizes the PyTorch model (the .pt), not only the FP32 ONNX
    needs_data: bool  # scores trials on data's val split

    def quantize(self, weights: Path | None, fp32: Path, out: Path, config, calib, data, *, threads: int | None,
                 progress: bool) -> dict: ...


class OrtEngine:
    name, config_type, needs_weights, needs_data = "ort", Recipe, False, False

    def quantize(self, weights, fp32, out, config, calib, data, *, threads=None, progress=False) -> dict:
        return quantize_ort(fp32, out, config, calib, progress=progress, threads=threads)


class IncEngine:
    name, config_type, needs_weights, needs_data = "inc", IncConfig, True, True

    def quantize(self, weights, fp32, out, config, calib, data, *, threads=None, progress=False) -> dict:
        return quantize_inc(weights, fp32, out, data, calib, tolerable_loss=config.tolerable_loss,
                            max_trials=config.max_trials, eval_images=config.eval_images,
                            calib_images=config.calib_images, threads=threads, progress=progress)


ENGINES: tuple[Engine, ...] = (OrtEngine(), IncEngine())


def engine_for(config) -> Engine:
    """The engine a configuration belongs to (a Recipe -> ort, an IncConfig -> inc)."""
    for e in ENGINES:
        if isinstance(config, e.config_type):
            return e
    raise QbenchError(f"{config!r} is not a quantization configuration; pass a recipe (name, YAML path or Recipe) "
                      f"or one of {', '.join(e.config_type.__name__ for e in ENGINES)}.")


def engine_named(name: str) -> Engine:
    for e in ENGINES:
        if e.name == name:
            return e
    raise QbenchError(f"--engine {name!r} is not an engine; use {' or '.join(e.name for e in ENGINES)}.")


def is_weights(model: str | os.PathLike) -> bool:
    return Path(model).suffix.lower() == ".pt"
