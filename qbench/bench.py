"""Side-by-side benchmarks whose outputs are committed under results/.

`bench_eval`: qbench's evaluator against ultralytics' own `YOLO(onnx).val()` on
the same ONNX file and data, interleaved in one process so both see the same
machine state; reports the median wall time of each, their ratio, and both
sets of metrics (which must agree: same preprocessing, NMS and matching).
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

from . import __version__
from .analysis import inspect_run
from .calibration import load_manifest
from .comparison import ci_text, compare
from .data.dataset import load_data_yaml
from .errors import QbenchError
from .evaluation import EvalSettings, delta_interval, evaluate
from .files import command_line, scratch, write_json
from .models.export import export_onnx
from .quantization import load_recipe, quantize_ort
from .quantization.inc_engine import quantize_inc
from .quantization.recipe import short_name
from .runtime import default_threads, int8_host


def _ultralytics_val(model: Path, data: Path, imgsz: int, batch: int, conf: float, iou: float) -> dict:
    from .ultra import YOLO

    with scratch("bench") as tmp:
        m = YOLO(str(model), task="detect")
        r = m.val(data=str(data), imgsz=imgsz, batch=batch, conf=conf, iou=iou, rect=False, plots=False,
                  device="cpu", verbose=False, project=tmp, name="val", save_json=False)
    p, rc, m50, m5095 = (float(x) for x in r.mean_results())
    return {"precision": p, "recall": rc, "mAP50": m50, "mAP50-95": m5095}


def bench_eval(model: str | Path, data: str | Path, out: str | Path, repeats: int = 2, batch: int = 16,
               imgsz: int | None = None, argv: list[str] | None = None) -> str:
    """Time both evaluators on `model` (.onnx, or a .pt exported to a temporary FP32 ONNX at `imgsz`)."""

    data, out = Path(data), Path(out)
    load_data_yaml(data)
    with scratch("bench") as tmp:
        if Path(model).suffix.lower() == ".pt":

            onnx_path = export_onnx(model, Path(tmp) / "fp32.onnx", imgsz=imgsz)
        else:
            onnx_path = Path(model)
        return _bench_eval(onnx_path, Path(model), data, out, repeats, batch, argv)


def _bench_eval(model: Path, source: Path, data: Path, out: Path, repeats: int, batch: int, argv) -> str:
    settings = EvalSettings(batch=batch)
    # a warm-up of each, untimed, so neither pays for first-touch file caching or imports
    first = evaluate(model, data, settings)
    imgsz = first["settings"]["imgsz"]
    _ultralytics_val(model, data, imgsz, batch, settings.conf, settings.iou)
    times_q, times_u = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ours = evaluate(model, data, settings)
        times_q.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs = _ultralytics_val(model, data, imgsz, batch, settings.conf, settings.iou)
        times_u.append(time.perf_counter() - t)
    q, u = statistics.median(times_q), statistics.median(times_u)
    command = command_line(argv) if argv else f"qbench bench eval {model} --data {data} --out {out}"
    result = {
        "command": command,
        "model": str(source), "data": str(data), "images": ours["data"]["images"], "imgsz": imgsz, "batch": batch,
        "threads": default_threads(), "repeats": repeats,
        "qbench_eval_s": [round(x, 2) for x in times_q], "ultralytics_val_s": [round(x, 2) for x in times_u],
        "median_qbench_s": round(q, 2), "median_ultralytics_s": round(u, 2), "speedup": round(u / q, 3),
        "metrics_qbench": ours["metrics"], "metrics_ultralytics": theirs,
        "abs_diff_mAP50-95": abs(ours["metrics"]["mAP50-95"] - theirs["mAP50-95"]),
        "qbench_version": __version__, "python": platform.python_version(), "host": int8_host(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "bench.json")
    mq, mu = ours["metrics"], theirs
    summary = "\n".join([
        "# Evaluation speed: qbench eval vs ultralytics YOLO(onnx).val",
        "",
        f"Reproduce: `{command}`",
        "",
        f"{result['images']} images of `{data}`, imgsz {imgsz}, batch {batch}, {result['threads']} threads, "
        f"median of {repeats} interleaved runs after one warm-up each.",
        "",
        "| evaluator | wall s (median) | P | R | mAP50 | mAP50-95 |",
        "|---|---|---|---|---|---|",
        f"| qbench eval | {q:.2f} | {mq['precision']:.4f} | {mq['recall']:.4f} | {mq['mAP50']:.4f} | {mq['mAP50-95']:.4f} |",
        f"| ultralytics val | {u:.2f} | {mu['precision']:.4f} | {mu['recall']:.4f} | {mu['mAP50']:.4f} | {mu['mAP50-95']:.4f} |",
        "",
        f"qbench is **{u / q:.2f}x** the speed of ultralytics' evaluator on this run "
        f"(|Δ mAP50-95| = {result['abs_diff_mAP50-95']:.4f}).",
        "",
    ])
    (out / "summary.md").write_text(summary)
    return summary


def _fp32_onnx(model: Path, tmp: Path, imgsz: int | None) -> Path:
    """`model` itself if it is an .onnx, else its FP32 export (at `imgsz`) in `tmp`."""
    if model.suffix.lower() == ".pt":

        return export_onnx(model, tmp / "fp32.onnx", imgsz=imgsz)
    return model


def bench_sweep(model: str | Path, data: str | Path, calib: str | Path, out: str | Path,
                methods: list[str], sizes: list[int], recipe: str = "default", imgsz: int | None = None,
                batch: int = 16, argv: list[str] | None = None, progress: bool = False) -> str:
    """INT8 accuracy over calibration method x calibration size, one table (FP32 scored once as the reference).

    Each row's Δ mAP50-95 against FP32 and, for every method after the first, its difference from the first method
    at the same size, each with its 95% interval (paired bootstrap over the scored images, `delta_interval`)."""

    model, data, out = Path(model), Path(data), Path(out)
    base = load_recipe(recipe)
    recipes = [(m, n, base.replace(method=m, calib_size=n)) for m in methods for n in sizes]  # validate all first
    manifest, paths = load_manifest(calib)
    if max(sizes) > len(paths):

        raise QbenchError(f"calibration manifest '{calib}' has {len(paths)} images, fewer than the largest size "
                          f"{max(sizes)}; build a larger one with `qbench calib --n {max(sizes)}`.")
    settings = EvalSettings(batch=batch)
    rows = []
    with scratch("bench") as tmp:
        tmp = Path(tmp)
        fp32_path = _fp32_onnx(model, tmp, imgsz)
        fp32 = evaluate(fp32_path, data, settings, progress=progress, keep_stats=True)
        base_stats, first = fp32.pop("image_stats"), {}
        for m, n, rec in recipes:
            q = quantize_ort(fp32_path, tmp / f"{m}-{n}" / "int8.onnx", rec, paths, progress=progress)
            r = evaluate(tmp / f"{m}-{n}" / "int8.onnx", data, settings, progress=progress, keep_stats=True)
            stats = r.pop("image_stats")
            row = {"method": m, "calib_size": n, **r["metrics"],
                   "delta_mAP50-95": r["metrics"]["mAP50-95"] - fp32["metrics"]["mAP50-95"],
                   "delta_ci95_mAP50-95": delta_interval(base_stats, stats),
                   "delta_mAP50": r["metrics"]["mAP50"] - fp32["metrics"]["mAP50"],
                   "calibration_s": q["calibration"]["seconds"]}
            if n in first:  # against the first method at this size, on the same images
                ref_method, ref_stats, ref_map = first[n]
                row["vs_first"] = {"method": ref_method, "delta_mAP50-95": r["metrics"]["mAP50-95"] - ref_map,
                                   "ci95": delta_interval(ref_stats, stats)}
            else:
                first[n] = (m, stats, r["metrics"]["mAP50-95"])
            rows.append(row)
    command = command_line(argv) if argv else None
    result = {"command": command, "model": str(model), "data": str(data), "calibration": str(calib),
              "recipe": base.to_dict(), "fp32": fp32["metrics"], "imgsz": fp32["settings"]["imgsz"], "rows": rows,
              "qbench_version": __version__}
    write_json(result, out / "sweep.json")
    f = fp32["metrics"]
    lines = ["# INT8 accuracy: calibration method x calibration size", "",
             f"Reproduce: `{command}`" if command else "", "",
             f"FP32: mAP50 {f['mAP50']:.4f}, mAP50-95 {f['mAP50-95']:.4f} on {fp32['data']['images']} images of "
             f"`{data}` (imgsz {fp32['settings']['imgsz']}); calibration images from `{calib}` (first N, stratified).",
             "", f"Δ against FP32, and against {methods[0]} at the same N, with the 95% interval (paired bootstrap "
             f"over the {fp32['data']['images']} images).", "",
             f"| method | N | mAP50 | mAP50-95 | Δ mAP50-95 [95% CI] | vs {methods[0]} [95% CI] | calibration s |",
             "|---|---|---|---|---|---|---|"]

    def ci(lo_hi):
        return f"[{lo_hi[0]:+.4f}, {lo_hi[1]:+.4f}]"

    for r in rows:
        v = r.get("vs_first")
        vs = f"{v['delta_mAP50-95']:+.4f} {ci(v['ci95'])}" if v else "—"
        lines.append(f"| {r['method']} | {r['calib_size']} | {r['mAP50']:.4f} | {r['mAP50-95']:.4f} | "
                     f"{r['delta_mAP50-95']:+.4f} {ci(r['delta_ci95_mAP50-95'])} | {vs} | {r['calibration_s']:.1f} |")
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    return summary


_MEMORY_CHILD = """
import json, resource, sys
from qbench.calibration import load_manifest
from qbench.quantization import load_recipe, quantize_ort
fp32, manifest, n, recipe, out = sys.argv[1:6]
_, paths = load_manifest(manifest)
rec = load_recipe(recipe).replace(calib_size=int(n))
r = quantize_ort(fp32, out, rec, paths[:int(n)])
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "calibration_s": r["calibration"]["seconds"], "images": r["calibration"]["images"]}))
"""


def bench_calib_memory(model: str | Path, calib: str | Path, out: str | Path, sizes: list[int],
                       recipe: str = "default", imgsz: int | None = None, argv: list[str] | None = None) -> str:
    """Peak resident memory of a whole quantization (calibration included) per calibration size, each in a fresh
    process; bounded-memory calibration means the largest stays close to the smallest."""
    import json
    import subprocess
    import sys

    model, out = Path(model), Path(out)
    rows = []
    with scratch("bench") as tmp:
        tmp = Path(tmp)
        fp32 = _fp32_onnx(model, tmp, imgsz)
        for n in sizes:
            r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(fp32), str(calib), str(n), recipe,
                                str(tmp / f"int8-{n}.onnx")], capture_output=True, text=True, check=False)
            if r.returncode != 0:

                raise QbenchError(f"quantizing with {n} calibration images failed: {r.stderr.strip().splitlines()[-1]}")
            rows.append({"calib_size": n, **json.loads(r.stdout.strip().splitlines()[-1])})
    base = rows[0]["peak_rss_mb"]
    for r in rows:
        r["ratio_to_smallest"] = round(r["peak_rss_mb"] / base, 3)
    command = command_line(argv) if argv else None
    write_json({"command": command, "model": str(model), "calibration": str(calib), "recipe": recipe,
                "rows": rows, "qbench_version": __version__}, out / "memory.json")
    lines = ["# Peak memory of calibration + quantization vs calibration size", "",
             f"Reproduce: `{command}`" if command else "", "",
             "Each size runs in a fresh process; peak RSS of the whole process (model, ONNX Runtime, calibration).", "",
             "| calibration images | peak RSS MB | ratio to smallest | calibration s |", "|---|---|---|---|"]
    lines += [f"| {r['calib_size']} | {r['peak_rss_mb']:.0f} | {r['ratio_to_smallest']:.2f}x | {r['calibration_s']:.1f} |"
              for r in rows]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    return summary


_INSPECT_CHILD = """
import json, resource, sys
from qbench.calibration import load_manifest
from qbench.analysis import inspect_models
fp32, int8, manifest, n, errors, out = sys.argv[1:7]
_, paths = load_manifest(manifest)
r = inspect_models(fp32, int8, paths[:int(n)], paths[:int(errors)], out)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": r["seconds"], "images": r["images"]}))
"""


def bench_inspect(fp32: str | Path, int8: str | Path, calib: str | Path, data: str | Path, out: str | Path,
                  images: int = 128, error_images: int = 16, memory_sizes: list[int] | None = None,
                  argv: list[str] | None = None, progress: bool = False) -> str:
    """Time of `qbench inspect` (statistics over `images` calibration images + error over `error_images` val
    images) against one FP32 evaluation pass over as many images of the same data, in one process; and, per
    `memory_sizes`, the peak RSS of inspect in a fresh process (bounded memory: the largest near the smallest)."""
    import json
    import subprocess
    import sys

    fp32, int8, out = Path(fp32), Path(int8), Path(out)
    _, paths = load_manifest(calib)
    if images > len(paths) or max(memory_sizes or [0]) > len(paths):
        raise QbenchError(f"calibration manifest '{calib}' has {len(paths)} images, fewer than asked for; "
                          "build a larger one with `qbench calib`.")
    settings = EvalSettings(split="train", limit=images)
    evaluate(fp32, data, EvalSettings(split="train", limit=2))  # warm-up: imports, first-touch caches
    t = time.perf_counter()
    ev = evaluate(fp32, data, settings, progress=progress)
    eval_s = time.perf_counter() - t
    with scratch("bench") as tmp:
        t = time.perf_counter()
        ins = inspect_run(fp32=fp32, int8=int8, calib=calib, data=data, out=Path(tmp) / "inspect", images=images,
                          error_images=error_images, progress=progress)
        inspect_s = time.perf_counter() - t
        mem = []
        for n in memory_sizes or []:
            r = subprocess.run([sys.executable, "-c", _INSPECT_CHILD, str(fp32), str(int8), str(calib), str(n), "1",
                                str(Path(tmp) / f"mem-{n}")], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise QbenchError(f"inspect with {n} images failed: {r.stderr.strip().splitlines()[-1]}")
            mem.append({**json.loads(r.stdout.strip().splitlines()[-1]), "images": n})
    for m in mem:
        m["ratio_to_smallest"] = round(m["peak_rss_mb"] / mem[0]["peak_rss_mb"], 3)
    command = command_line(argv) if argv else None
    result = {"command": command, "fp32": str(fp32), "int8": str(int8), "calibration": str(calib), "data": str(data),
              "imgsz": ins["imgsz"], "images": images, "error_images": error_images,
              "fp32_eval_s": round(eval_s, 2), "fp32_eval_images": ev["data"]["images"],
              "inspect_s": round(inspect_s, 2), "inspect_seconds": ins["seconds"],
              "ratio_inspect_to_eval": round(inspect_s / eval_s, 3),
              "ratio_statistics_to_eval": round(ins["seconds"]["statistics"] / eval_s, 3),
              "memory": mem, "threads": default_threads(), "qbench_version": __version__,
              "host": int8_host()}
    write_json(result, out / "bench.json")
    lines = ["# Inspect cost: time against one FP32 evaluation pass, and memory", "",
             f"Reproduce: `{command}`" if command else "", "",
             f"imgsz {ins['imgsz']}, {default_threads()} threads. FP32 evaluation: {ev['data']['images']} train images "
             f"of `{data}` (letterbox, batched ONNX Runtime, NMS, matching). Inspect: statistics of "
             f"{ins['summary']['tensors']} tensors over {images} calibration images (`{calib}`) + error (FP32 and "
             f"simulated INT8) over {error_images} val images.", "",
             "| step | seconds | ratio to FP32 evaluation |", "|---|---|---|",
             f"| FP32 evaluation, {ev['data']['images']} images | {eval_s:.1f} | 1.00x |",
             f"| inspect: statistics, {images} images | {ins['seconds']['statistics']:.1f} | "
             f"{ins['seconds']['statistics'] / eval_s:.2f}x |",
             f"| inspect: error, {error_images} images | {ins['seconds']['error']:.1f} | "
             f"{ins['seconds']['error'] / eval_s:.2f}x |",
             f"| inspect, whole command | {inspect_s:.1f} | **{inspect_s / eval_s:.2f}x** |", ""]
    if mem:
        lines += ["Peak memory of inspect (statistics over N images, fresh process each):", "",
                  "| images | peak RSS MB | ratio to smallest | statistics s |", "|---|---|---|---|"]
        lines += [f"| {m['images']} | {m['peak_rss_mb']:.0f} | {m['ratio_to_smallest']:.2f}x | "
                  f"{m['seconds']['statistics']:.1f} |" for m in mem]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    return summary


def bench_engines(weights: str | Path, data: str | Path, calib: str | Path, out: str | Path,
                  recipe: str = "default", tolerable_loss: float = 0.01, max_trials: int = 3,
                  eval_images: int | None = None, argv: list[str] | None = None, progress: bool = False) -> str:
    """The two quantization engines side by side on one model: ONNX Runtime static QDQ (`recipe`) and Intel Neural
    Compressor's accuracy-aware tuning (`quantize_inc`), both scored and timed by `compare` against FP32 in one
    table, with the int8 convolutions of each optimized graph counted. An INC failure is reported in the table and
    the benchmark goes on with the ORT engine."""

    weights, data, out = Path(weights), Path(data), Path(out)
    if weights.suffix.lower() != ".pt":
        raise QbenchError(f"'{weights}' is not a .pt checkpoint; the INC engine quantizes the PyTorch model, so pass "
                          "the trained best.pt.")
    engines: dict[str, dict] = {}
    with scratch("engines") as tmp:
        tmp = Path(tmp)
        fp32 = export_onnx(weights, tmp / "fp32.onnx")
        t = time.perf_counter()
        q = quantize_ort(fp32, tmp / "ort" / "int8.onnx", recipe, calib, progress=progress)
        engines["int8_ort"] = {"engine": f"onnxruntime {q['onnxruntime']} static QDQ, recipe "
                                         f"{short_name(load_recipe(recipe))}",
                               "seconds": round(time.perf_counter() - t, 1),
                               "int8_convs": q["qlinear_ops"].get("QLinearConv", 0), "status": "ok"}
        models = {"int8_ort": tmp / "ort" / "int8.onnx"}
        t = time.perf_counter()
        try:
            r = quantize_inc(weights, fp32, tmp / "inc" / "int8.onnx", data, calib, tolerable_loss=tolerable_loss,
                             max_trials=max_trials, eval_images=eval_images, progress=progress)
            engines["int8_inc"] = {"engine": f"neural-compressor {r['inc_version']} autotune "
                                             f"(chosen {r['tuning']['chosen']})",
                                   "seconds": round(time.perf_counter() - t, 1),
                                   "int8_convs": r["graph"]["qlinearconv"], "status": "ok", "report": r}
            models["int8_inc"] = tmp / "inc" / "int8.onnx"
        except Exception as e:  # noqa: BLE001 - reported; the other engine's numbers still stand
            engines["int8_inc"] = {"engine": "neural-compressor", "seconds": round(time.perf_counter() - t, 1),
                                   "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        c = compare(fp32, None, data, EvalSettings(), progress=progress, extra=models)
    command = command_line(argv) if argv else None
    result = {"command": command, "weights": str(weights), "data": str(data), "calibration": str(calib),
              "engines": engines, "compare": {k: v for k, v in c.items() if k != "evaluations"},
              "qbench_version": __version__, "threads": c["threads"], "host": c["host"]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "engines.json")
    rows = c["models"]
    f = rows["fp32"]
    lines = ["# Quantization engines: ONNX Runtime vs Intel Neural Compressor", "",
             f"Reproduce: `{command}`" if command else "", "",
             f"`{weights}` on `{data}` ({c['evaluations']['fp32']['data']['images']} {c['settings']['split']} images, "
             f"imgsz {c['settings']['imgsz']}, {c['threads']} threads); calibration `{calib}`.", "",
             "| model | engine | mAP50-95 | Δ mAP50-95 | Δ 95% CI | int8 convs (ORT-optimized graph) | batch-1 ms | "
             "vs FP32 | quantize s |", "|---|---|---|---|---|---|---|---|---|",
             f"| fp32 | — | {f['metrics']['mAP50-95']:.4f} | — | — | 0 | {f['latency']['batch1_median_ms']:.1f} | "
             "1.00x | — |"]
    for k, e in engines.items():
        if k in rows:
            r = rows[k]
            lines.append(f"| {k} | {e['engine']} | {r['metrics']['mAP50-95']:.4f} | {r['delta']['mAP50-95']:+.4f} | "
                         f"{ci_text(r)} | {e['int8_convs']} | {r['latency']['batch1_median_ms']:.1f} | "
                         f"{r['speedup_batch1']:.2f}x | "
                         f"{e['seconds']:.0f} |")
        else:
            lines.append(f"| {k} | {e['engine']} | — | — | — | — | — | — | {e['seconds']:.0f} ({e['status']}) |")
    failed = [k for k, e in engines.items() if e["status"] != "ok"]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{k}: {engines[k]['status']}" for k in failed)
                  + ". The table still holds the engines that ran."]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    return summary
