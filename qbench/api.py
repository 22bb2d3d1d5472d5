"""qbench's Python API: the CLI's verbs as functions returning typed results (each `.to_json()` is the JSON the
CLI writes). `import qbench` exposes these names.

    import qbench
    calib = qbench.CalibrationSet.sample("data.yaml", n=128)            # train split, class-stratified, seeded
    q = qbench.quantize("best.pt", "out/int8.onnx", "default", calib=calib, profile="npu-symmetric")
    c = qbench.compare(q.fp32, q.model, "data.yaml")
    print(c.delta("int8"), c.interval("int8"))                            # mAP50-95 change and its 95% CI

The configuration picks the engine (qbench.quantization.engines): a recipe (name, YAML path or Recipe) quantizes
the FP32 ONNX with ONNX Runtime; an `IncConfig` tunes the PyTorch model with Intel Neural Compressor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .analysis import inspect_run
from .calibration import build_manifest, calibration_paths, load_manifest, save_manifest
from .comparison import compare as _compare
from .data.dataset import image_files, load_data_yaml
from .errors import QbenchError
from .evaluation import EvalSettings
from .evaluation import evaluate as _evaluate
from .files import write_json
from .mixed import quantize_max_drop
from .models.export import export_onnx
from .pipeline import run as _run
from .quantization.engines import IncConfig, engine_for, is_weights
from .quantization.profile import apply_profile, load_profile
from .quantization.recipe import Recipe, recipe_label

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- calibration sets
@dataclass
class CalibrationSet:
    """The images quantization calibrates on, with the manifest that records them (paths + sha256, seed)."""

    paths: list[Path]
    manifest: dict | None = None
    source: Path | None = None  # the manifest file it was loaded from or saved to

    @classmethod
    def sample(cls, data: PathLike, n: int = 128, split: str = "train", seed: int = 0) -> CalibrationSet:
        """A seeded, class-stratified sample of `split` (never the split you score)."""
        m = build_manifest(data, n, split=split, seed=seed)
        root = Path(m["root"])
        return cls([p if p.is_absolute() else root / p for p in (Path(e["path"]) for e in m["images"])], m)

    @classmethod
    def load(cls, path: PathLike, verify: bool = True) -> CalibrationSet:
        m, paths = load_manifest(path, verify=verify)
        return cls(paths, m, Path(path))

    @classmethod
    def of(cls, images) -> CalibrationSet:
        """A set given as image paths (no manifest: nothing to verify them against later)."""
        return cls(calibration_paths(list(images)))

    def save(self, path: PathLike) -> Path:
        if self.manifest is None:
            raise QbenchError("this calibration set has no manifest (it was given as image paths); build one with "
                              "CalibrationSet.sample to save it.")
        self.source = save_manifest(self.manifest, path)
        return self.source

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)


def _calib_arg(calib):
    """What the engines take: a manifest path (verified) or image paths."""
    if isinstance(calib, CalibrationSet):
        return calib.source if calib.source is not None else calib.paths
    return calib


# --------------------------------------------------------------------------- results
@dataclass
class QuantResult:
    """An INT8 model and how it was made (`report`: what quantize.json holds)."""

    model: Path
    fp32: Path
    engine: str
    config: str
    report: dict = field(repr=False)

    @property
    def qlinear_convs(self) -> int:
        return (self.report.get("qlinear_ops") or self.report.get("graph") or {}).get("QLinearConv", 0)

    def to_json(self) -> dict:
        return self.report


@dataclass
class MixedResult:
    """A mixed-precision INT8 model (`quantize_with_accuracy_control`): which layers stayed in FP32 and why."""

    model: Path | None
    met: bool
    float_layers: list[dict]
    report: dict = field(repr=False)

    def to_json(self) -> dict:
        return self.report


@dataclass
class EvalResult:
    """One model scored on one split (what metrics.json holds per model)."""

    map50: float
    map50_95: float
    precision: float
    recall: float
    per_class: list[dict]
    report: dict = field(repr=False)

    def to_json(self) -> dict:
        return self.report


@dataclass
class CompareResult:
    """FP32 and INT8 models through one evaluation path (what compare.json holds)."""

    report: dict = field(repr=False)

    @property
    def models(self) -> list[str]:
        return list(self.report["models"])

    def map50_95(self, name: str = "fp32") -> float:
        return self.report["models"][name]["metrics"]["mAP50-95"]

    def delta(self, name: str = "int8") -> float:
        """mAP50-95 of `name` minus FP32's."""
        return self.report["models"][name]["delta"]["mAP50-95"]

    def interval(self, name: str = "int8") -> list[float] | None:
        """95% interval of `delta(name)` (paired bootstrap over the images)."""
        return (self.report["models"][name].get("delta_ci95") or {}).get("mAP50-95")

    def speedup(self, name: str = "int8") -> float:
        return self.report["models"][name]["speedup_batch1"]

    def to_json(self) -> dict:
        return self.report


@dataclass
class InspectResult:
    """Per-tensor statistics and error of an INT8 model (what inspect.json holds)."""

    summary: dict
    report: dict = field(repr=False)

    @property
    def layers(self) -> list[dict]:
        return self.report["layers"]

    @property
    def leaky(self) -> list[dict]:
        return self.report["leaky"]

    @property
    def silu(self) -> list[dict]:
        return self.report.get("silu", [])

    def to_json(self) -> dict:
        return {k: v for k, v in self.report.items() if k != "other_variants"}


@dataclass
class RunResult:
    """A `qbench run` folder and its comparison."""

    folder: Path
    compare: CompareResult


@dataclass
class QatResult:
    """A QAT run (what qat.json holds): FP32 / PTQ / QAT scores and the self-checks."""

    folder: Path
    report: dict = field(repr=False)

    @property
    def qat_minus_ptq(self) -> float | None:
        return (self.report.get("compare") or {}).get("qat_minus_ptq")

    def to_json(self) -> dict:
        return self.report


# --------------------------------------------------------------------------- verbs
def _config(config, profile, fusion):
    if isinstance(config, IncConfig):
        if profile or fusion:
            raise QbenchError("an IncConfig tunes on its own; profiles and fusion are ONNX Runtime recipe options.")
        return config
    return apply_profile(config, profile, fusion)


def _beside(out: Path, name: str) -> Path:
    """fp32.onnx / calibration.json beside int8.onnx; NAME.fp32.onnx / NAME.calibration.json beside NAME.onnx."""
    return out.with_name(name if out.name == "int8.onnx" else f"{out.stem}.{name}")


def _prepare(model: PathLike, out: Path, cfg, calib, data) -> tuple[Path | None, Path, object]:
    """(weights or None, FP32 ONNX, calibration set) for a quantization: a .pt is exported beside `out` (the INT8
    model's float reference, kept), a missing calibration set sampled from data's train split (saved beside it)."""
    model = Path(model)
    engine = engine_for(cfg)
    if engine.needs_weights and not is_weights(model):
        raise QbenchError(f"the {engine.name} engine quantizes the PyTorch model: pass the trained .pt, not '{model}'.")
    if engine.needs_data and data is None:
        raise QbenchError(f"the {engine.name} engine scores its trials on data's val split; pass data (data.yaml).")
    if calib is None:
        if data is None:
            raise QbenchError("pass a calibration set (calib=CalibrationSet or a manifest) or data to sample one "
                              "from its train split.")
        n = min(getattr(cfg, "calib_size", None) or getattr(cfg, "calib_images", 128),
                len(image_files(load_data_yaml(data, require=("train",)), "train")))
        calib = CalibrationSet.sample(data, n)
        calib.save(_beside(out, "calibration.json"))
    fp32 = export_onnx(model, _beside(out, "fp32.onnx")) if is_weights(model) else model
    return (model if is_weights(model) else None), fp32, _calib_arg(calib)


def quantize(model: PathLike, out: PathLike, config: str | PathLike | Recipe | IncConfig = "default", *,
             calib: CalibrationSet | PathLike | list | None = None, data: PathLike | None = None,
             profile: str | None = None, fusion: str | None = None, threads: int | None = None,
             progress: bool = False) -> QuantResult:
    """Quantize `model` (.pt, exported first, or FP32 .onnx) to an INT8 ONNX at `out`; writes the recipe used
    beside it and returns what the engine reports (also written as quantize.json / NAME.quantize.json)."""
    out = Path(out)
    cfg = _config(config, profile, fusion)
    weights, fp32, cal = _prepare(model, out, cfg, calib, data)
    engine = engine_for(cfg)
    report = engine.quantize(weights, fp32, out, cfg, cal, data, threads=threads, progress=progress)
    write_json(report, _beside(out, "quantize.json"))
    return QuantResult(out, Path(fp32), engine.name, recipe_label(cfg) if isinstance(cfg, Recipe) else cfg.name,
                       report)


def quantize_with_accuracy_control(model: PathLike, out: PathLike, config: str | PathLike | Recipe = "default", *,
                                   data: PathLike, max_drop: float = 0.3,
                                   calib: CalibrationSet | PathLike | list | None = None,
                                   profile: str | None = None, fusion: str | None = None,
                                   max_float: int | None = None, threads: int | None = None,
                                   allow_scored_calib: bool = False, progress: bool = False,
                                   fallback: str = "float", runtime: str = "ort") -> MixedResult:
    """Quantize, then move the fewest convs (sensitivity-ranked) from INT8 to `fallback` precision ("float", or
    "int16" where the profile's target lists it) until mAP50-95 on data's val split drops by at most `max_drop`
    points (0.3 = 0.003); writes mixed.json and sensitivity.csv/json beside `out`, and the model only when the
    budget is met. (The metric is qbench's own mAP50-95 on `data`, every model run by `runtime`: "ort" or
    "openvino", the runtime that deploys it.)"""
    out = Path(out)
    settings = EvalSettings(threads=threads, runtime=runtime)  # a bad runtime: refused before any work
    cfg = _config(config, profile, fusion)
    if isinstance(cfg, IncConfig):
        raise QbenchError("accuracy control keeps ONNX Runtime layers in FP32; pass a recipe, not an IncConfig.")
    target = load_profile(profile) if profile is not None else None
    if fallback == "int16" and target is not None and "int16" not in target.int_types:
        p = target
        raise QbenchError(f"--fallback int16: target {p.name} runs only {', '.join(p.int_types)} (its int_types); "
                          "use --fallback float, or a profile whose target lists int16.")
    _, fp32, cal = _prepare(model, out, cfg, calib, data)
    m = quantize_max_drop(fp32, out, cfg, cal, data, max_drop, max_float=max_float,
                          settings=settings, progress=progress, threads=threads,
                          allow_scored_calib=allow_scored_calib, fallback=fallback)
    return MixedResult(out if m.get("met") else None, bool(m.get("met")), m.get("float_layers", []), m)


def evaluate(model: PathLike, data: PathLike, *, split: str = "val", imgsz: int | None = None, batch: int = 16,
             conf: float = 0.001, iou: float = 0.7, threads: int | None = None, limit: int | None = None,
             runtime: str = "ort", progress: bool = False) -> EvalResult:
    """mAP50, mAP50-95, precision, recall and per-class AP of a .onnx (run by `runtime`: "ort" or "openvino") or a
    .pt, as `yolo val`. `report["model"]` names the runtime, and carries `runtime_caveat` when the runtime's numbers
    are not the model's (runtime.openvino_caveat)."""
    r = _evaluate(model, data, EvalSettings(split=split, imgsz=imgsz, batch=batch, conf=conf, iou=iou,
                                            threads=threads, limit=limit, runtime=runtime), progress=progress)
    m = r["metrics"]
    return EvalResult(m["mAP50"], m["mAP50-95"], m["precision"], m["recall"], r["per_class"], r)


def compare(fp32: PathLike, int8: PathLike | None, data: PathLike, *, extra: dict | None = None, batch: int = 16,
            threads: int | None = None, runtime: str = "ort", progress: bool = False) -> CompareResult:
    """FP32 vs INT8 (and any `extra` {name: model}) through the same evaluation path, every .onnx run by `runtime`
    ("ort" or "openvino"): deltas with 95% intervals, latency, size."""
    return CompareResult(_compare(fp32, int8, data, EvalSettings(batch=batch, threads=threads, runtime=runtime),
                                  progress=progress, extra={k: Path(v) for k, v in (extra or {}).items()} or None))


def inspect(fp32: PathLike, int8: PathLike, calib: CalibrationSet | PathLike, data: PathLike, *,
            out: PathLike | None = None, images: int = 128, error_images: int = 16,
            progress: bool = False) -> InspectResult:
    """Per-tensor activation statistics (on the first `images` calibration images) and quantization error (on the
    first `error_images` val images), activation diagnostics; writes layers.csv & co. into `out`."""
    if isinstance(calib, CalibrationSet):
        if calib.source is None:
            raise QbenchError("inspect reads the calibration manifest: save the set first (CalibrationSet.save).")
        calib = calib.source
    r = inspect_run(None, fp32=fp32, int8=int8, calib=calib, data=data, out=out, images=images,
                    error_images=error_images, progress=progress)
    return InspectResult(r["summary"], r)


def run(weights: PathLike | None = None, data: PathLike | None = None, out: PathLike | None = None, *,
        recipe: str | PathLike | None = None, calib: CalibrationSet | PathLike | None = None,
        profile: str | None = None, fusion: str | None = None, profiles: list[str] | None = None,
        both_fusions: bool = False, baseline: bool = False, progress: bool = False, **kw) -> RunResult:
    """The main job (`qbench run`): export, calibrate, quantize, evaluate both, compare, into a run folder.
    recipe None: `default`, or `mean-minmax` with runtime="openvino" and no profile/fusion (pipeline.default_layout)."""
    if isinstance(calib, CalibrationSet):
        calib = calib.source
    folder = _run(weights=weights, data=data, out=out, recipe=recipe, calib=calib, profile=profile, fusion=fusion,
                  profiles=profiles or [], fusions=["fused", "unfused"] if both_fusions else None, baseline=baseline,
                  progress=progress, **kw)
    return RunResult(folder, CompareResult(json.loads((folder / "compare.json").read_text())))


def qat(weights: PathLike, data: PathLike, out: PathLike, **kw) -> QatResult:
    """Quantization-aware fine-tuning matching a recipe/profile (qbench.qatrain.qat: its keyword arguments)."""
    from .qatrain import qat as _qat

    return QatResult(Path(out), _qat(weights, data, out, **kw))
