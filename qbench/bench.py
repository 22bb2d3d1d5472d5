"""Side-by-side benchmarks whose outputs are committed under results/.

`bench_eval`: qbench's evaluator against ultralytics' own `YOLO(onnx).val()` on
the same ONNX file and data, interleaved in one process so both see the same
machine state; reports the median wall time of each, their ratio, and both
sets of metrics (which must agree: same preprocessing, NMS and matching).
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

from . import __version__
from .evaluate import EvalSettings, evaluate
from .files import write_json
from .runtime import default_threads


def _ultralytics_val(model: Path, data: Path, imgsz: int, batch: int, conf: float, iou: float) -> dict:
    from .ultra import YOLO

    with tempfile.TemporaryDirectory() as tmp:
        m = YOLO(str(model), task="detect")
        r = m.val(data=str(data), imgsz=imgsz, batch=batch, conf=conf, iou=iou, rect=False, plots=False,
                  device="cpu", verbose=False, project=tmp, name="val", save_json=False)
    p, rc, m50, m5095 = (float(x) for x in r.mean_results())
    return {"precision": p, "recall": rc, "mAP50": m50, "mAP50-95": m5095}


def bench_eval(model: str | Path, data: str | Path, out: str | Path, repeats: int = 2, batch: int = 16,
               imgsz: int | None = None, argv: list[str] | None = None) -> str:
    """Time both evaluators on `model` (.onnx, or a .pt exported to a temporary FP32 ONNX at `imgsz`)."""
    from .data.dataset import load_data_yaml

    data, out = Path(data), Path(out)
    load_data_yaml(data)
    with tempfile.TemporaryDirectory() as tmp:
        if Path(model).suffix.lower() == ".pt":
            from .models.export import export_onnx

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
    command = " ".join(["qbench", *(argv or [])[1:]]) if argv else f"qbench bench eval {model} --data {data} --out {out}"
    result = {
        "command": command,
        "model": str(source), "data": str(data), "images": ours["data"]["images"], "imgsz": imgsz, "batch": batch,
        "threads": default_threads(), "repeats": repeats,
        "qbench_eval_s": [round(x, 2) for x in times_q], "ultralytics_val_s": [round(x, 2) for x in times_u],
        "median_qbench_s": round(q, 2), "median_ultralytics_s": round(u, 2), "speedup": round(u / q, 3),
        "metrics_qbench": ours["metrics"], "metrics_ultralytics": theirs,
        "abs_diff_mAP50-95": abs(ours["metrics"]["mAP50-95"] - theirs["mAP50-95"]),
        "qbench_version": __version__, "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "bench.json")
    mq, mu = ours["metrics"], theirs
    summary = "\n".join([
        f"# Evaluation speed: qbench eval vs ultralytics YOLO(onnx).val",
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
