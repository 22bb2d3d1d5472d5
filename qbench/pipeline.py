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

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import onnx
from onnx import shape_inference

from . import __version__
from .analysis.ops import analyse, targets_with_ops
from .calibration import build_manifest, save_manifest, scored_overlap
from .comparison import compare, compare_md, profile_variants, quantize_variants
from .data.dataset import image_files, load_data_yaml, scored_labels
from .data.default import DEFAULT_CALIB, default_data, default_weights
from .errors import QbenchError
from .evaluation import EvalSettings
from .files import check_writable, command_line, display_path, write_json
from .models.export import export_onnx
from .models.load import load_checkpoint, model_facts
from .quantization import apply_profile, load_profile, quantize_ort
from .quantization.baseline import ultralytics_int8
from .quantization.recipe import recipe_label


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
        profiles: list[str] | None = None, fusions: list[str] | None = None, progress: bool = False,
        allow_scored_calib: bool = False, runtime: str = "ort", targets: list[str] | None = None) -> Path:
    """`qbench run`. `recipe` (+ `profile`, `fusion`) makes int8.onnx; each of `profiles` (x `fusions`) adds a
    variant under profiles/PROFILE-FUSION/, scored in the same table. A `calib` manifest that holds images of the
    scored (val) split is refused unless `allow_scored_calib`. `runtime` runs every .onnx (ONNX Runtime or OpenVINO);
    without a profile or fusion, the INT8 model gets the most accurate layout that runtime runs in int8 (see
    `default_layout`). Each of `targets` (NPU targets that list operators) adds its op-support analysis of the FP32
    graph (ops.json) and, when the target also sets the integer arithmetic, a variant quantized under it."""

    settings = EvalSettings(batch=batch, threads=threads, runtime=runtime)  # bad values: refused before any work
    layout = default_layout(runtime) if profile is None and fusion is None else None
    base = recipe or "default"  # what --profiles variants start from
    if layout:
        rec = apply_profile(recipe or layout["recipe"], layout["profile"], layout["fusion"])
    else:
        rec = apply_profile(base, profile, fusion)
    loaded_targets = [load_profile(t) for t in targets or []]
    for t in loaded_targets:
        if t.ops is None:
            raise QbenchError(f"--target {t.name} lists no operators (it is an arithmetic profile); pass it to "
                              f"--profiles, and to --target one of: {', '.join(targets_with_ops())}.")
    names = list(profiles or [])
    names += [t.name for t in loaded_targets if t.settings and t.name not in {load_profile(p).name for p in names}]
    variants = profile_variants(base, names, fusions) if names else {}
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
    scored_labels(spec, "val", image_files(spec, "val"))  # labels checked before any work: bad data fails fast
    used = max([rec.calib_size, *(r.calib_size for _, r in variants.values())])
    overlap = scored_overlap(calib, data, "val", allow_scored_calib, used) if calib is not None else None
    auto = out is None
    out = Path(out) if out else next_run_dir()
    if out.exists():
        raise QbenchError(f"Run folder '{out}' already exists; choose another --out or delete it.")
    check_writable(out.parent, "the run folder")
    # this run's own staging folder: two runs with the same --out never share (or delete) each other's files
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
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
        u8 = runtime == "openvino"  # OpenVINO runs int8 activations inaccurately, uint8 ones right (openvino_caveat)
        qreport = timed("quantize_s", quantize_ort, onnx_path, stage / "int8.onnx", rec, calib, progress=progress,
                        u8_activations=u8)
        write_json(qreport, stage / "quantize.json")
        extra, variant_info = {}, {}
        if variants:
            extra, variant_info = timed("profiles_quantize_s", quantize_variants, onnx_path, calib, variants,
                                        stage / "profiles", progress=progress, u8_activations=u8)
        if baseline:  # ultralytics' own export(format="onnx", quantize=8), scored the same way

            extra["ultralytics-int8"] = timed("ultralytics_int8_export_s", ultralytics_int8, weights, data,
                                              stage / "ultralytics-int8.onnx", facts["imgsz"])
        cmp = timed("evaluate_and_compare_s", compare, onnx_path, stage / "int8.onnx", data,
                    settings, progress=progress, extra=extra)
        if variant_info:
            cmp["variants"] = variant_info
        if loaded_targets:
            graph = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
            write_json({"command": command_line(),
                        "targets": [analyse(graph, t, display_path(weights)) for t in loaded_targets]},
                       stage / "ops.json")
        cmp["sanity"] = qreport.get("sanity")
        evaluations = cmp.pop("evaluations")
        for k, r in evaluations.items():  # relative to the run folder, which gets renamed
            r["model"]["path"] = (f"profiles/{variants[k][0]}/int8.onnx" if k in variants else f"{k}.onnx")
        write_json(evaluations, stage / "metrics.json")
        write_json(cmp, stage / "compare.json")
        info = {"qbench_version": __version__, "command": command_line(),
                "weights": display_path(weights), "data": display_path(spec.yaml_path),
                "recipe": recipe_label(rec),
                "calibration": calib_shown, "calibration_check": overlap or {"split": "train", "in_scored_split": 0},
                "runtime": runtime, "layout": layout["why"] if layout else None,
                "timings": timings, "python": platform.python_version()}
        write_json(info, stage / "run.json")
        (stage / "summary.md").write_text(summary_md(facts, evaluations["fp32"], cmp, qreport, info))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _publish(stage, out, auto)


def _relocate(out: Path, stage: Path) -> None:
    """The reports a run wrote name files in its staging folder (quantize.json's model and recipe paths, recipe.yaml's
    source model): point them at the published folder instead of one that no longer exists."""
    names = {str(stage): str(out), str(stage.resolve()): str(out.resolve())}
    rel = os.path.relpath(stage)
    if not rel.startswith(".."):
        names[rel] = os.path.relpath(out)
    for f in [*out.rglob("*.json"), *out.rglob("*.yaml"), *out.rglob("*.md")]:
        text = f.read_text(encoding="utf-8")
        new = text
        for a, b in names.items():
            new = new.replace(a, b)
        if new != text:
            f.write_text(new, encoding="utf-8")


def _publish(stage: Path, out: Path, auto: bool) -> Path:
    """Rename the finished staging folder to `out`. If another run took `out` meanwhile: an automatic name moves
    on to the next free one; an explicit --out is refused and this run's files removed (never mixed)."""
    for _ in range(100):
        try:
            os.rename(stage, out)  # atomic; fails when `out` exists and is not empty
            _relocate(out, stage)
            return out
        except OSError:
            if not auto:
                shutil.rmtree(stage, ignore_errors=True)
                raise QbenchError(f"Run folder '{out}' was written by another run while this one ran; this run's "
                                  "results were discarded. Use a separate --out for each run.") from None
            out = next_run_dir(out.parent, "run")
    raise QbenchError(f"could not find a free run folder name in '{out.parent}'; pass --out.")


def default_layout(runtime: str) -> dict | None:
    """The INT8 layout `qbench run` picks when none is asked for: the most accurate one the runtime runs at int8
    speed, and the recipe it goes with when none is given. ONNX Runtime's CPU EP has int8 kernels for Conv then
    LeakyReLU/SiLU each requantized (its own QDQ layout) and none for a fused Conv+activation, which it runs in
    float; OpenVINO fuses Conv+activation in int8 (keeping the Conv output unrequantized is where the accuracy comes
    from) and concatenates int8 only with shared scales: the `openvino` profile, with the `mean-minmax` ranges
    (docs/runtimes.md has the measurements)."""
    if runtime == "openvino":
        return {"profile": "openvino", "fusion": None, "recipe": "mean-minmax",
                "why": "OpenVINO: profile openvino (Conv+activation fused, Concat on shared scales, float head "
                       "outputs, the Conv that reads the image float: the most accurate layout it runs in int8, "
                       "also on CPUs without VNNI), recipe mean-minmax unless --recipe"}
    return None  # ORT: the recipe as given (its layout: Conv output requantized before the activation)


def summary_md(facts: dict, fp32: dict, cmp: dict, qreport: dict, info: dict) -> str:

    d = fp32["data"]
    check = info.get("calibration_check") or {}
    calib_split = check.get("split") or "train"
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
        f"{qreport.get('calibration', {}).get('images', '?')} {calib_split} images (`{info['calibration']}`)"
        + (f"; **{check['in_scored_split']} of the calibration images are in the scored split** "
           "(--allow-scored-calib): INT8 accuracy here is flattered" if check.get("in_scored_split") else "")
        + (f"; layout picked for the runtime: {info['layout']}" if info.get("layout") else ""),
        "",
        compare_md(cmp),
    ]
    return "\n".join(lines)
