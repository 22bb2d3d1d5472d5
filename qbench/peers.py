"""`qbench bench peers`: qbench's INT8 models next to what other tools make of the same FP32 model, each scored
through the runtime that deploys it, in one table.

From one FP32 export and one calibration set (the first 128 images of the manifest, for every tool that takes a
calibration set):

- qbench default: ONNX Runtime's layout (Conv output requantized before its activation), run by ONNX Runtime;
- qbench fused: the `cpu` profile with Conv+activation fused, run by OpenVINO (which runs that layout in int8;
  ONNX Runtime's CPU EP runs it in float);
- qbench openvino: what `qbench run --runtime openvino` makes: the `openvino` profile (Conv+activation fused,
  Concat inputs sharing the output's grid, the head's last convs writing float) with the `mean-minmax` recipe,
  run by OpenVINO;
- NNCF (ONNX backend, MIXED preset, the YOLO decode in its ignored scope, fast bias correction): run by OpenVINO
  and, separately, by ONNX Runtime; and its model with the int8 activation Q/DQ rewritten as uint8 (zero point
  + 128: the same values), run by OpenVINO, which mis-runs signed int8 activations with a non-zero zero point;
- ONNX Runtime's `quantize_static` called as a plain user would (its defaults: QDQ, per-tensor weights, MinMax);
- ultralytics' `export(format="onnx", quantize=8)` (which calibrates on the val split: flattered);
- the FP32 model on OpenVINO (what the runtime alone gives).

Accuracy: mAP50-95 against the FP32 model on ONNX Runtime, with the paired-bootstrap 95% interval, on the val
split and, when given, a held-out set (`qbench data heldout`). Speed: batch-1 median latency against the FP32
model on ONNX Runtime, measured in the same command (`comparison.measure_latency`: steady state, the models'
blocks in turn). peers.json holds a row per model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnx

from . import __version__
from .calibration import CalibrationReader, calibration_paths
from .comparison import caveat_lines, compare, cpu_text
from .data.preprocess import load_batch
from .errors import QbenchError
from .evaluation import EvalSettings
from .files import check_writable, command_line, scratch, write_json
from .graph.detector import check_detector, find_head
from .models.export import export_onnx
from .quantization.baseline import ultralytics_int8
from .quantization.constraints import activations_to_uint8
from .quantization.ort_engine import quantize_ort
from .quantization.profile import apply_profile
from .runtime import default_threads

CALIB_IMAGES = 128


def _nncf(fp32: Path, out: Path, paths: list[Path], imgsz: int) -> dict:
    """NNCF's post-training quantization of the ONNX model (MIXED preset: symmetric weights, asymmetric activations),
    the YOLO decode (found from the graph, as qbench keeps it float) in its ignored scope."""
    try:
        import nncf
    except ImportError as e:
        raise QbenchError("the peers benchmark needs nncf (pip install nncf) for NNCF's row.") from e

    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    head = find_head(model, fp32)
    t = time.perf_counter()
    q = nncf.quantize(model, nncf.Dataset(paths, lambda p: {name: load_batch([p], imgsz)}),
                      preset=nncf.QuantizationPreset.MIXED, subset_size=len(paths),
                      ignored_scope=nncf.IgnoredScope(names=list(head.decode), validate=False))
    seconds = time.perf_counter() - t
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(q, str(out))
    return {"tool": f"nncf {nncf.__version__}", "settings": "ONNX backend, preset MIXED, fast bias correction, "
            f"{len(paths)} images, ignored scope: the {len(head.decode)} decode nodes", "seconds": round(seconds, 1)}


def _ort_plain(fp32: Path, out: Path, paths: list[Path], imgsz: int) -> dict:
    """onnxruntime.quantization.quantize_static with its defaults, as a plain user calls it."""
    import onnxruntime
    from onnxruntime.quantization import quantize_static

    info = check_detector(onnx.load(str(fp32)), fp32)
    reader = CalibrationReader(paths, imgsz, info["input_name"], batch=1)
    t = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(fp32), str(out), reader)
    return {"tool": f"onnxruntime {onnxruntime.__version__} quantize_static", "settings": "defaults (QDQ, "
            f"per-tensor weights, MinMax, int8 activations), {len(paths)} images",
            "seconds": round(time.perf_counter() - t, 1)}


def bench_peers(weights: str | os.PathLike, data: str | os.PathLike, calib, out: str | os.PathLike,
                heldout: str | os.PathLike | None = None, imgsz: int | None = None, threads: int | None = None,
                argv: list[str] | None = None, progress: bool = False) -> str:
    """Run the peers benchmark (see the module doc) into `out` (peers.json, peers.md); returns the Markdown."""
    weights, out = Path(weights), Path(out)
    check_writable(out, "the peers benchmark")
    paths = calibration_paths(calib)[:CALIB_IMAGES]
    if len(paths) < 8:
        raise QbenchError(f"the calibration set has {len(paths)} images; pass a manifest with at least 8.")
    threads = threads or default_threads()
    with scratch("peers") as td:
        td = Path(td)
        fp32 = export_onnx(weights, td / "fp32.onnx", imgsz=imgsz)
        size = check_detector(onnx.load(str(fp32)), fp32)["imgsz"]
        tools = {}
        quantize_ort(fp32, td / "default" / "int8.onnx", "default", paths, progress=progress, threads=threads)
        tools["qbench default"] = {"tool": f"qbench {__version__}", "settings": "recipe default (ONNX Runtime's "
                                   "layout)"}
        quantize_ort(fp32, td / "fused" / "int8.onnx", apply_profile("default", "cpu", "fused"), paths,
                     progress=progress, threads=threads)
        tools["qbench fused"] = {"tool": f"qbench {__version__}", "settings": "recipe default, profile cpu, "
                                 "Conv+activation fused"}
        quantize_ort(fp32, td / "openvino" / "int8.onnx", apply_profile("mean-minmax", "openvino"), paths,
                     progress=progress, threads=threads)
        tools["qbench openvino"] = {"tool": f"qbench {__version__}", "settings": "recipe mean-minmax, profile "
                                    "openvino (what `qbench run --runtime openvino` makes)"}
        tools["nncf"] = _nncf(fp32, td / "nncf.onnx", paths, size)
        nncf_u8 = onnx.load(str(td / "nncf.onnx"))
        rewritten = activations_to_uint8(nncf_u8)
        onnx.save(nncf_u8, str(td / "nncf-u8.onnx"))
        del nncf_u8
        tools["nncf u8"] = {**tools["nncf"], "settings": tools["nncf"]["settings"] + "; then its "
                            f"{rewritten['quantize_nodes']} int8 activation quantizers rewritten as uint8 (zero point "
                            "+ 128, the same values) by qbench"}
        tools["ort quantize_static"] = _ort_plain(fp32, td / "ort-plain.onnx", paths, size)
        ultralytics_int8(weights, data, td / "ultralytics.onnx", size)
        tools["ultralytics"] = {"tool": "ultralytics export(format='onnx', quantize=8)",
                                "settings": "its defaults (calibrates on the val split: flattered)"}
        models = {  # row: (model, runtime, tool)
            "fp32 @openvino": (fp32, "openvino", None),
            "qbench default @ort": (td / "default" / "int8.onnx", "ort", "qbench default"),
            "qbench fused @openvino": (td / "fused" / "int8.onnx", "openvino", "qbench fused"),
            "qbench openvino @openvino": (td / "openvino" / "int8.onnx", "openvino", "qbench openvino"),
            "nncf @openvino": (td / "nncf.onnx", "openvino", "nncf"),
            "nncf u8 @openvino": (td / "nncf-u8.onnx", "openvino", "nncf u8"),
            "nncf @ort": (td / "nncf.onnx", "ort", "nncf"),
            "ort quantize_static @ort": (td / "ort-plain.onnx", "ort", "ort quantize_static"),
            "ultralytics @ort": (td / "ultralytics.onnx", "ort", "ultralytics"),
        }
        settings = EvalSettings(threads=threads)
        extra = {k: v[0] for k, v in models.items()}
        runtimes = {k: v[1] for k, v in models.items()}
        scored = {"val": compare(fp32, None, data, settings, progress=progress, extra=extra, runtimes=runtimes)}
        if heldout is not None:
            scored["heldout"] = compare(fp32, None, heldout, settings, progress=progress, extra=extra,
                                        runtimes=runtimes, rounds=3)
    rows = []
    val = scored["val"]["models"]
    for name in ["fp32", *models]:
        r = val[name]
        row = {"name": "fp32 @ort" if name == "fp32" else name, "runtime": r["runtime"],
               "tool": tools.get(models[name][2], {}) if name in models and models[name][2] else {},
               "mAP50": r["metrics"]["mAP50"], "mAP50-95": r["metrics"]["mAP50-95"],
               "delta_mAP50-95": r["delta"]["mAP50-95"], "delta_ci95": r["delta_ci95"]["mAP50-95"],
               "batch1_median_ms": r["latency"]["batch1_median_ms"], "speedup_batch1": r["speedup_batch1"],
               **({"runtime_caveat": r["runtime_caveat"]} if r.get("runtime_caveat") else {})}
        if "heldout" in scored:
            h = scored["heldout"]["models"][name]
            row["heldout"] = {"mAP50-95": h["metrics"]["mAP50-95"], "delta_mAP50-95": h["delta"]["mAP50-95"],
                              "delta_ci95": h["delta_ci95"]["mAP50-95"]}
        rows.append(row)
    result = {"command": command_line(argv) if argv else None, "weights": str(weights), "data": str(data),
              "heldout": str(heldout) if heldout else None, "calibration": str(calib),
              "calibration_images": len(paths), "imgsz": size, "threads": threads,
              "host": scored["val"]["host"], "runtimes": scored["val"]["runtimes"],
              "images": {k: v["data"]["images"] for k, v in scored.items()}, "rows": rows,
              "baseline": "fp32 @ort: every delta and speedup is against the FP32 model on ONNX Runtime"}
    md = peers_md(result)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "peers.json")
    (out / "peers.md").write_text(md)
    return md


def peers_md(r: dict) -> str:
    def ci(v):
        return "—" if not v else f"[{v[0]:+.4f}, {v[1]:+.4f}]"

    held = any("heldout" in row for row in r["rows"])
    head = ["model", "runtime", "mAP50-95", "Δ (val)", "95% CI"] + (["Δ (held-out)", "95% CI"] if held else []) \
        + ["batch-1 ms", "vs ORT FP32"]
    lines = [f"# Peers on `{r['data']}`", "", f"Reproduce: `{r['command']}`" if r.get("command") else "", "",
             f"{r['images']['val']} val images" + (f", {r['images']['heldout']} held-out images" if held else "")
             + f", imgsz {r['imgsz']}, {r['threads']} threads, calibration: the first {r['calibration_images']} "
             f"images of `{r['calibration']}`. CPU: {cpu_text(r['host'])}. Runtimes: "
             f"{', '.join(r['runtimes'].values())}. {r['baseline']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in r["rows"]:
        cells = [row["name"], row["runtime"], f"{row['mAP50-95']:.4f}",
                 "—" if row["name"] == "fp32 @ort" else f"{row['delta_mAP50-95']:+.4f}", ci(row["delta_ci95"])]
        if held:
            h = row.get("heldout", {})
            cells += ["—" if row["name"] == "fp32 @ort" else f"{h.get('delta_mAP50-95', 0):+.4f}",
                      ci(h.get("delta_ci95"))]
        cells += [f"{row['batch1_median_ms']:.1f}", f"{row['speedup_batch1']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += caveat_lines({row["name"]: row.get("runtime_caveat") for row in r["rows"]})
    lines += ["", "How each model was made:", ""]
    lines += [f"- {row['name']}: {row['tool'].get('tool', '')} — {row['tool'].get('settings', '')}"
              for row in r["rows"] if row.get("tool")]
    return "\n".join(lines) + "\n"
