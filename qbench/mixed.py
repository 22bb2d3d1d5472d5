"""Accuracy-aware mixed precision (`qbench quantize --max-drop X`): the fewest Convs out of INT8 to stay in budget.

1. quantize the whole model with the recipe (an NPU profile applied) — `quantize_ort`;
2. score FP32 and INT8 on the scoring split; if the mAP50-95 drop is already within the budget, done;
3. rank the layers with `qbench.analysis.sensitivity` (proxy for all, mAP for the top-K): measured layers that
   recovered mAP first, then the rest by proxy;
4. greedy: put the next layer of the ranking in FP32 (`fallback.keep_float`) or, with `fallback="int16"`, in INT16
   (`fallback.keep_int16`: what an NPU with 16-bit layers can run; ONNX Runtime simulates it with 16-bit Q/DQ), on
   the same calibrated graph (no re-calibration); re-score; keep it only if the mAP went up, stop as soon as the drop
   is within the budget or `max_float` layers left INT8 or `max_trials` candidates were tried.

mixed.json gives each layer's precision and a cost model (COST_MODEL): weight bytes and int8-equivalent MACs.

The result is written only when the budget is met: out_onnx (the mixed model), `recipe.yaml`, and
`mixed.json` (every trial, the layers that fell back with their proxy and mAP recovery, the scores). When it
cannot be met, `mixed.json` says so (met: false, the best found) and a `QbenchError` explains; no model is left
looking like a result.

The drop is measured and selected on the same split, so it is an optimistic estimate for unseen images.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .analysis.sensitivity import layer_sensitivity, ranking, write_sensitivity
from .calibration import calibration_paths, scored_overlap
from .comparison import measure_latency
from .data.dataset import image_files, load_data_yaml, read_image
from .data.preprocess import letterbox, load_batch, to_input
from .errors import QbenchError
from .evaluation import EvalSettings, delta_interval, evaluate
from .files import display_path, scratch, write_json
from .graph.detector import PREPARED_FP32
from .graph.tap import TensorTap
from .progress import bar
from .quantization.fallback import conv_layers, int16_activation_tensors, keep_float, keep_int16
from .quantization.ort_engine import quantize_ort, recipe_file
from .quantization.recipe import load_recipe
from .runtime import open_model, runtime_versions

DEFAULT_MAX_FLOAT_FRACTION = 0.10  # at most this share of the quantized convs leave INT8 by default
FALLBACKS = {"float": keep_float, "int16": keep_int16}
PRECISION = {"float": "FP32", "int16": "INT16"}
COST_MODEL = ("a model, not a measurement: weights take 1 byte (int8), 2 (int16) or 4 (float32) per parameter; an "
              "int16 multiply-accumulate costs 4 int8 ones (a 16x16-bit product from four 8x8 partial products on an "
              "int8 MAC array); a float layer cannot run on an int8 NPU and goes to the host CPU (its MACs are "
              "counted apart)")


def _score(model_path: Path, data, settings) -> tuple[float, list]:
    """mAP50-95 on the scoring split, and the per-image matches for `delta_interval`."""

    r = evaluate(model_path, data, settings, keep_stats=True)
    return float(r["metrics"]["mAP50-95"]), r["image_stats"]


def _points(interval: list) -> list:
    return [round(100 * v, 3) for v in interval]


def quantize_max_drop(fp32_onnx: str | os.PathLike, out_onnx: str | os.PathLike, recipe, calib,
                      data: str | os.PathLike, max_drop: float, max_float: int | None = None,
                      max_trials: int | None = None, proxy_images: int = 8, top_k: int = 10, settings=None,
                      progress: bool = False, threads: int | None = None, allow_scored_calib: bool = False,
                      fallback: str = "float") -> dict:
    """Quantize with `recipe`, then move the fewest Convs from INT8 to `fallback` ("float" or "int16") so that
    mAP50-95 drops by at most `max_drop` points (0.3 = 0.003) on `data`'s scoring split. Every model is scored and
    timed by `settings.runtime` (ONNX Runtime or OpenVINO: the runtime that deploys it; for OpenVINO the activations
    are stored as uint8, as it needs). Returns the JSON-able report (also written as mixed.json)."""
    import onnx

    settings = settings or EvalSettings()
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) \
            or max_drop < 0:
        raise QbenchError(f"--max-drop {max_drop!r} must be a number of mAP50-95 points >= 0, e.g. 0.3 "
                          "(0.3 points = 0.003).")
    if max_drop > 100:
        raise QbenchError(f"--max-drop {max_drop} is more than 100 points of mAP50-95; pass points, e.g. 0.3.")
    if data is None:
        raise QbenchError("--max-drop needs --data: the budget is measured on its scoring split.")
    if fallback not in FALLBACKS:
        raise QbenchError(f"--fallback {fallback!r} is not a precision qbench falls back to; pick one of "
                          f"{', '.join(FALLBACKS)}.")
    keep = FALLBACKS[fallback]

    rec = load_recipe(recipe)
    scored_overlap(calib, data, settings.split, allow_scored_calib, rec.calib_size)
    out = Path(out_onnx)
    if out.suffix.lower() != ".onnx" or out.is_dir():  # checked before minutes of quantizing and scoring
        raise QbenchError(f"output '{out}' is not an .onnx file path; pass one like {out.parent / 'int8.onnx'}.")
    budget = max_drop / 100.0
    t0 = time.perf_counter()
    with scratch("mixed") as td:
        work = Path(td)
        q_all = work / "int8.onnx"
        qrep = quantize_ort(fp32_onnx, q_all, rec, calib, progress=progress, threads=threads,
                            u8_activations=settings.runtime == "openvino")
        # with equalize or shift_negative, layers fall back to the transformed FP32 weights quantize_ort wrote next
        # to q_all (the same function as fp32_onnx)
        fref = q_all.with_name(PREPARED_FP32) if rec.equalize > 0 or rec.shift_negative else Path(fp32_onnx)
        fmodel, qmodel = onnx.load(str(fref)), onnx.load(str(q_all))
        layers = conv_layers(qmodel)
        if fallback == "int16":  # 16-bit layers take their tensors' full calibrated range (no clipping needed)
            ranges = _ranges(fmodel, int16_activation_tensors(qmodel, layers), calibration_paths(calib),
                             qrep["imgsz"], threads)
            keep = functools.partial(keep_int16, ranges=ranges)
        n_layers = len(layers)
        limit = max_float if max_float is not None else max(1, int(DEFAULT_MAX_FLOAT_FRACTION * n_layers))
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise QbenchError(f"--max-float {limit!r} must be a whole number of layers >= 0.")
        trials_cap = max_trials if max_trials is not None else 2 * limit + top_k

        fp32_map, fp32_stats = _score(Path(fp32_onnx), data, settings)
        int8_map, int8_stats = _score(q_all, data, settings)
        best_stats = int8_stats
        trials = [{"float_layers": [], "mAP50-95": round(int8_map, 5), "drop_points": round(100 * (fp32_map - int8_map), 3),
                   "kept": True}]
        chosen: list[str] = []
        best_map = int8_map
        sens = None
        if fp32_map - int8_map > budget and limit > 0:
            paths = calibration_paths(calib)
            sens = layer_sensitivity(fref, q_all, paths[:proxy_images], data, top_k=top_k, settings=settings,
                                     progress=progress, threads=threads)
            order = ranking(sens)[:trials_cap]
            cand = work / "candidate.onnx"
            with bar(len(order), f"Mixed precision (budget {max_drop} points)", progress) as advance:
                for name in order:
                    if fp32_map - best_map <= budget or len(chosen) >= limit:
                        break
                    onnx.save(keep(qmodel, fmodel, [*chosen, name]), str(cand))
                    m, m_stats = _score(cand, data, settings)
                    kept = m > best_map
                    trials.append({"float_layers": [*chosen, name], "mAP50-95": round(m, 5),
                                   "drop_points": round(100 * (fp32_map - m), 3), "kept": kept})
                    if kept:
                        chosen.append(name)
                        best_map, best_stats = m, m_stats
                    advance(1)
        met = fp32_map - best_map <= budget
        rows = {r["layer"]: r for r in sens["layers"]} if sens else {}
        report = {
            "met": met,
            "max_drop_points": max_drop,
            "split": settings.split,
            "runtime": settings.runtime,  # what scored and timed every model, as in compare.json
            "runtimes": runtime_versions([settings.runtime]),
            "fp32_mAP50-95": round(fp32_map, 5),
            "int8_mAP50-95": round(int8_map, 5),
            "mixed_mAP50-95": round(best_map, 5),
            "drop_points": {"int8": round(100 * (fp32_map - int8_map), 3), "mixed": round(100 * (fp32_map - best_map), 3)},
            # 95% intervals (points, paired bootstrap over the images; evaluate.delta_interval): how much of the
            # mixed model's gain over all-INT8 these images resolve
            "drop_points_ci95": {"int8": _points(delta_interval(int8_stats, fp32_stats)),
                                 "mixed": _points(delta_interval(best_stats, fp32_stats))},
            "mixed_minus_int8_points_ci95": _points(delta_interval(int8_stats, best_stats)),
            "quantized_convs": n_layers,
            "max_float_layers": limit,
            "fallback": fallback,
            "float_layers": [{"layer": n, "precision": fallback, "why": _why(rows.get(n), trials, n)} for n in chosen],
            "float_fraction": round(len(chosen) / n_layers, 4) if n_layers else 0.0,
            "cost": _cost(layers, fmodel, chosen, fallback),
            "trials": trials,
            "recipe": qrep["recipe_source"],
            "quantize": {k: qrep[k] for k in ("calibration", "constraints", "qlinear_ops", "imgsz")},
            "seconds": round(time.perf_counter() - t0, 1),
            "note": "the drop is measured on the split the layers were chosen on: optimistic for unseen images",
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        if sens is not None:
            write_sensitivity(sens, out.parent)
        if not met:
            write_json(report, out.parent / "mixed.json")
            raise QbenchError(
                f"the budget of {max_drop} mAP50-95 points cannot be met within {limit} {PRECISION[fallback]} layers: "
                f"INT8 loses {report['drop_points']['int8']} points, the best mixed model "
                f"{report['drop_points']['mixed']} with {len(chosen)} layers in {PRECISION[fallback]} "
                f"({len(trials) - 1} tried); raise --max-float or --max-drop, or try another recipe/profile"
                + (" or --fallback float" if fallback == "int16" else "")
                + f". Details: {display_path(out.parent / 'mixed.json')}; no model was written.")
        final = keep(qmodel, fmodel, chosen) if chosen else qmodel
        tmp = out.with_name(f".{out.stem}.partial.onnx")  # .onnx: open_model reads it for the latency
        onnx.save(final, str(tmp))
        report["latency"] = _latency({"fp32": Path(fp32_onnx), "int8": q_all, "mixed": tmp}, data, settings, threads)
        shutil.copyfile(recipe_file(q_all), recipe_file(out))
        if fref != Path(fp32_onnx):  # the transformed float model: what `qbench inspect` compares the result with
            shutil.copyfile(fref, out.with_name(PREPARED_FP32))
        report["out"] = display_path(out)
        write_json(report, out.parent / "mixed.json")
        os.replace(tmp, out)
    return report


def _latency(models: dict, data, settings, threads) -> dict:
    """Batch-1 latency of FP32, all-INT8 and the mixed model, in turns (`comparison.measure_latency`)."""

    dets = {k: open_model(p, threads, settings.runtime) for k, p in models.items()}
    first = image_files(load_data_yaml(data, require=(settings.split,)), settings.split)[0]
    x = to_input([letterbox(read_image(first), dets["fp32"].imgsz)[0]])
    lat = measure_latency(dets, x, batch=settings.batch)
    base = lat["fp32"]["batch1_median_ms"]
    return {k: {**v, "speedup_batch1": round(base / v["batch1_median_ms"], 3)} for k, v in lat.items()}


def _why(row: dict | None, trials: list[dict], name: str) -> str:
    gain = next((t for t in trials if t["float_layers"] and t["float_layers"][-1] == name and t["kept"]), None)
    parts = []
    if row:
        parts.append(f"sensitivity rank {row['rank']} (proxy +{row['proxy_recovery_db']} dB"
                     + (f", alone +{100 * row['map_recovery']:.2f} mAP points" if row["map_recovery"] is not None
                        else "") + ")")
    if gain:
        parts.append(f"drop {gain['drop_points']} points after it")
    return "; ".join(parts)


def _cost(layers, fmodel, chosen: list[str], fallback: str) -> dict:
    """Weight bytes and int8-equivalent MACs of all-INT8 and of the mixed model, by COST_MODEL."""
    params = {t.name: int(np.prod(t.dims)) for t in fmodel.graph.initializer}
    moved = set(chosen)
    w_int8 = sum(params.get(x.weight, 0) for x in layers)
    w_moved = sum(params.get(x.weight, 0) for x in layers if x.name in moved)
    macs = sum(x.macs for x in layers)
    macs_moved = sum(x.macs for x in layers if x.name in moved)
    per_param = {"float": 4, "int16": 2}[fallback]
    out = {"model": COST_MODEL,
           "weight_bytes": {"all_int8": w_int8, "mixed": w_int8 - w_moved + per_param * w_moved},
           "macs": {"all": macs, "moved": macs_moved}}
    if fallback == "int16":
        out["int8_equivalent_macs"] = {"all_int8": macs, "mixed": macs - macs_moved + 4 * macs_moved}
    else:
        out["host_cpu_macs"] = macs_moved
    return out


def _ranges(fmodel, tensors: list[str], paths: list, imgsz: int, threads) -> dict:
    """{tensor: (min, max)} of the FP32 model's `tensors` over the calibration images."""
    tap = TensorTap(fmodel, tensors, threads)
    lo, hi = {}, {}
    for p in paths:
        for name, v in tap.run(load_batch([p], imgsz)).items():
            lo[name] = min(lo.get(name, np.inf), float(v.min()))
            hi[name] = max(hi.get(name, -np.inf), float(v.max()))
    return {t: (lo[t], hi[t]) for t in lo}
