"""`qbench run`: the main job as a chain of stages over one run folder.

    load      -> model.json        (architecture, classes, imgsz, activations)
    export    -> fp32.onnx         (no NMS, dynamic batch, class names in metadata)
    calibrate -> calibration.json  (seeded, class-stratified sample of the train split)
    quantize  -> int8.onnx, recipe.yaml, quantize.json
    evaluate  -> metrics.json      (FP32 and INT8 through ONNX Runtime, the one evaluation path)
    compare   -> compare.json      (accuracy deltas, latency, size)
    report    -> summary.md

The folder is built under a hidden staging name and renamed when every stage
has finished, so an interrupted or failed run never leaves a folder that looks
complete.
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from pathlib import Path

from . import __version__
from .data.dataset import load_data_yaml
from .data.default import DEFAULT_CALIB, default_data, default_weights
from .errors import QbenchError
from .evaluate import EvalSettings
from .files import display_path, write_json


def next_run_dir(root: Path = Path("runs") / "qbench", name: str = "run") -> Path:
    """runs/qbench/run, run2, run3, ... (the first that does not exist), as ultralytics numbers its runs."""
    k = 1
    while True:
        cand = root / (name if k == 1 else f"{name}{k}")
        if not cand.exists():
            return cand
        k += 1


def run(weights: Path | None = None, data: Path | None = None, out: Path | None = None, imgsz: int | None = None,
        batch: int = 16, threads: int | None = None, recipe: str | Path | None = None, calib: Path | None = None,
        baseline: bool = False, profile: str | Path | None = None, fusion: str | None = None,
        profiles: list[str] | None = None, fusions: list[str] | None = None, progress: bool = False) -> Path:
    """`qbench run`. `recipe` (+ `profile`, `fusion`) makes int8.onnx; each of `profiles` (x `fusions`) adds a
    variant under profiles/PROFILE-FUSION/, scored in the same table."""
    from .calibration import build_manifest, save_manifest
    from .compare import compare
    from .data.dataset import image_files
    from .models.export import export_onnx
    from .models.load import load_checkpoint, model_facts
    from .quantize import apply_profile, quantize_ort

    from .compare import profile_variants, quantize_variants

    rec = apply_profile(recipe, profile, fusion)  # the recipe itself without profile and fusion; checked first
    variants = profile_variants(recipe, profiles, fusions) if profiles else {}
    weights = Path(weights) if weights else default_weights()
    if data is None and calib is None:  # the embedded set calibrates on its committed manifest (hash-verified)
        calib = DEFAULT_CALIB
    data = Path(data) if data else default_data(progress=progress)
    spec = load_data_yaml(data, require=("val",) if calib else ("val", "train"))
    yolo = load_checkpoint(weights)
    facts = model_facts(yolo, imgsz)
    if facts["nc"] != spec.nc:
        raise QbenchError(f"Model '{weights}' predicts {facts['nc']} classes but '{spec.yaml_path}' has {spec.nc}; "
                          "pass the data.yaml the model was trained on.")
    out = Path(out) if out else next_run_dir()
    if out.exists():
        raise QbenchError(f"Run folder '{out}' already exists; choose another --out or delete it.")
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    timings = {}

    def timed(name, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t, 2)
        return result

    try:
        write_json(facts, stage / "model.json")
        onnx_path = timed("export_s", export_onnx, weights, stage / "fp32.onnx", imgsz=facts["imgsz"])
        calib_shown = display_path(calib) if calib else "calibration.json"
        if calib is None:  # calibrate on the train split, never on the split being scored
            n = min(rec.calib_size, len(image_files(spec, "train")))
            calib = save_manifest(timed("calibration_set_s", build_manifest, data, n, "train"),
                                  stage / "calibration.json")
        qreport = timed("quantize_s", quantize_ort, onnx_path, stage / "int8.onnx", rec, calib, progress=progress)
        write_json(qreport, stage / "quantize.json")
        extra, variant_info = {}, {}
        if variants:
            extra, variant_info = timed("profiles_quantize_s", quantize_variants, onnx_path, calib, variants,
                                        stage / "profiles", progress=progress)
        if baseline:  # ultralytics' own export(format="onnx", quantize=8), scored the same way
            from .quantize.baseline import ultralytics_int8

            extra["ultralytics-int8"] = timed("ultralytics_int8_export_s", ultralytics_int8, weights, data,
                                              stage / "ultralytics-int8.onnx", facts["imgsz"])
        cmp = timed("evaluate_and_compare_s", compare, onnx_path, stage / "int8.onnx", data,
                    EvalSettings(batch=batch, threads=threads), progress=progress, extra=extra)
        if variant_info:
            cmp["variants"] = variant_info
        evaluations = cmp.pop("evaluations")
        for k, r in evaluations.items():  # relative to the run folder, which gets renamed
            r["model"]["path"] = (f"profiles/{variants[k][0]}/int8.onnx" if k in variants else f"{k}.onnx")
        write_json(evaluations, stage / "metrics.json")
        write_json(cmp, stage / "compare.json")
        info = {"qbench_version": __version__, "command": " ".join(["qbench", *sys.argv[1:]]),
                "weights": display_path(weights), "data": display_path(spec.yaml_path),
                "recipe": display_path(rec.name) if Path(rec.name).exists() else rec.name,
                "calibration": calib_shown, "timings": timings, "python": platform.python_version()}
        write_json(info, stage / "run.json")
        (stage / "summary.md").write_text(summary_md(facts, evaluations["fp32"], cmp, qreport, info))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    stage.rename(out)
    return out


def summary_md(facts: dict, fp32: dict, cmp: dict, qreport: dict, info: dict) -> str:
    from .compare import compare_md

    d = fp32["data"]
    acts = ", ".join(f"{k} x{v}" for k, v in sorted(facts.get("activations", {}).items()) if isinstance(v, int))
    lines = [
        "# qbench run",
        "",
        f"Reproduce: `{info['command']}`",
        "",
        f"- model: `{info['weights']}` ({facts.get('params', 0) / 1e6:.2f} M params, {acts or 'activations n/a'}, "
        f"imgsz {facts['imgsz']}, {facts['nc']} classes)",
        f"- data: `{info['data']}`, split `{d['split']}`: {d['images']} images, {d['instances']} instances",
        f"- INT8: ONNX Runtime static QDQ, recipe `{info['recipe']}` (see recipe.yaml), calibrated on "
        f"{qreport.get('calibration', {}).get('images', '?')} train images (calibration.json)",
        "",
        compare_md(cmp),
    ]
    return "\n".join(lines)
