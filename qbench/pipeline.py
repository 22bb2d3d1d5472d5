"""`qbench run`: the main job as a chain of stages over one run folder.

    load     -> model.json    (architecture, classes, imgsz, activations)
    export   -> fp32.onnx     (no NMS, dynamic batch, class names in metadata)
    evaluate -> metrics.json  (FP32 through ONNX Runtime, the one evaluation path)
    report   -> summary.md

The folder is built under a hidden staging name and renamed when every stage
has finished, so an interrupted or failed run never leaves a folder that looks
complete.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

from . import __version__
from .data.dataset import load_data_yaml
from .data.default import default_data, default_weights
from .errors import QbenchError
from .evaluate import EvalSettings, evaluate, write_json


def next_run_dir(root: Path = Path("runs") / "qbench", name: str = "run") -> Path:
    """runs/qbench/run, run2, run3, ... (the first that does not exist), as ultralytics numbers its runs."""
    k = 1
    while True:
        cand = root / (name if k == 1 else f"{name}{k}")
        if not cand.exists():
            return cand
        k += 1


def run(weights: Path | None = None, data: Path | None = None, out: Path | None = None, imgsz: int | None = None,
        batch: int = 16, threads: int | None = None, progress: bool = False) -> Path:
    from .models.export import export_onnx
    from .models.load import load_checkpoint, model_facts

    weights = Path(weights) if weights else default_weights()
    data = Path(data) if data else default_data(progress=progress)
    spec = load_data_yaml(data, require=("val",))
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
    try:
        write_json(facts, stage / "model.json")
        t = time.perf_counter()
        onnx_path = export_onnx(weights, stage / "fp32.onnx", imgsz=facts["imgsz"])
        timings["export_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        fp32 = evaluate(onnx_path, data, EvalSettings(batch=batch, threads=threads), progress=progress)
        timings["evaluate_fp32_s"] = round(time.perf_counter() - t, 2)
        fp32["model"]["path"] = "fp32.onnx"  # relative to the run folder, which gets renamed
        write_json({"fp32": fp32}, stage / "metrics.json")
        info = {"qbench_version": __version__, "command": " ".join(["qbench", *sys.argv[1:]]),
                "weights": str(weights), "data": str(spec.yaml_path), "timings": timings,
                "python": platform.python_version()}
        write_json(info, stage / "run.json")
        (stage / "summary.md").write_text(summary_md(facts, fp32, info))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    stage.rename(out)
    return out


def summary_md(facts: dict, fp32: dict, info: dict) -> str:
    m, d, t = fp32["metrics"], fp32["data"], fp32["timing"]
    acts = ", ".join(f"{k} x{v}" for k, v in sorted(facts.get("activations", {}).items()) if isinstance(v, int))
    lines = [
        "# qbench run",
        "",
        f"Reproduce: `{info['command']}`",
        "",
        f"- model: `{info['weights']}` ({facts.get('params', 0) / 1e6:.2f} M params, {acts or 'activations n/a'}, "
        f"imgsz {facts['imgsz']}, {facts['nc']} classes)",
        f"- data: `{info['data']}`, split `{d['split']}`: {d['images']} images, {d['instances']} instances",
        "",
        "| model | P | R | mAP50 | mAP50-95 | ms/image (inference) |",
        "|---|---|---|---|---|---|",
        f"| FP32 ONNX | {m['precision']:.3f} | {m['recall']:.3f} | {m['mAP50']:.3f} | {m['mAP50-95']:.3f} "
        f"| {t['inference_ms_per_image']:.1f} |",
        "",
        "| class | images | instances | P | R | mAP50 | mAP50-95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in fp32["per_class"]:
        cells = [("-" if r[k] is None else f"{r[k]:.3f}") for k in ("precision", "recall", "mAP50", "mAP50-95")]
        lines.append(f"| {r['class']} | {r['images']} | {r['instances']} | " + " | ".join(cells) + " |")
    lines += ["", f"Settings: {json.dumps(fp32['settings'])}", ""]
    return "\n".join(lines)
