"""`qbench sensitivity`: which quantized layers cost accuracy, one layer at a time (AIMET QuantAnalyzer style).

For every quantized Conv of an INT8 QDQ model (see `qbench.quantization.fallback` for what a layer's quantizers
are), two edited models are run on a fixed set of proxy images (calibration images: never the scored split):

- *damage*: the FP32 model with only this layer quantized;
- *recovery*: the INT8 model with only this layer back in FP32.

The proxy is the error of the detector's raw output against FP32 on those images (`output_error`): class scores
over every anchor, and boxes weighted by the FP32 confidence of their anchor (boxes of background anchors barely
matter), each relative to its own power, averaged. It is shown in dB (-10 log10 error, like SQNR). A layer's
proxy damage is its damage model's error; its proxy recovery is the INT8 model's error minus the error left
with this layer in FP32.

The top-K layers by proxy recovery are then measured by mAP50-95 on the scoring split (val): recovery = mAP of
the INT8 model with the layer in FP32 minus the INT8 mAP, damage = FP32 mAP minus the mAP with only the layer
quantized. The Spearman rank correlation of proxy vs mAP over those K layers says how far the proxy can be trusted.

Cost: 2 x layers x images forward passes for the proxy (plus one FP32 and one INT8 pass), 2 x K + 2 mAP
evaluations over the scoring split; both are reported with their wall time.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.dataset import read_image
from ..data.preprocess import letterbox, to_input
from ..errors import QbenchError
from ..evaluation import EvalSettings, evaluate
from ..files import display_path, scratch, write_json
from ..graph.detector import load_onnx
from ..models.export import read_onnx_meta
from ..progress import bar
from ..quantization.fallback import Layer, conv_layers, keep_float, quantize_only
from ..runtime import ort_session

DEFAULT_IMAGES = 8
DEFAULT_TOP_K = 10
CSV_COLUMNS = ("rank", "layer", "module", "index", "macs", "proxy_recovery", "proxy_recovery_db", "proxy_damage_db",
               "map_recovery", "map_damage")


def output_error(y: np.ndarray, ref: np.ndarray) -> float:
    """Relative error of a raw YOLO output (N, 4 + nc, anchors) against the FP32 one (see the module doc)."""
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    s, sr = y[:, 4:], ref[:, 4:]
    e_cls = ((s - sr) ** 2).sum() / max((sr ** 2).sum(), 1e-12)
    w = sr.max(axis=1)[:, None]  # the FP32 confidence of each anchor
    b, br = y[:, :4], ref[:, :4]
    e_box = (w * (b - br) ** 2).sum() / max((w * br ** 2).sum(), 1e-12)
    return float(0.5 * (e_cls + e_box))


def to_db(err: float) -> float:
    return round(-10 * math.log10(max(err, 1e-30)), 3)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return None

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return round(float(np.corrcoef(ra, rb)[0, 1]), 3)


def _inputs(images: Sequence[str | os.PathLike], imgsz: int) -> np.ndarray:

    return to_input([letterbox(read_image(Path(p)), imgsz)[0] for p in images])


class _Runner:
    """Runs serialized models on the proxy images, one image at a time (bounded memory, static-batch models)."""

    def __init__(self, x: np.ndarray, threads: int | None):
        self.x, self.threads, self.passes = x, threads, 0

    def __call__(self, model) -> np.ndarray:

        sess = ort_session(model if isinstance(model, bytes) else model.SerializeToString(), self.threads)
        name = sess.get_inputs()[0].name
        out = [sess.run(None, {name: self.x[i:i + 1]})[0] for i in range(len(self.x))]
        self.passes += len(self.x)
        return np.concatenate(out)


def _map(model, path: Path, data, settings) -> float:
    """mAP50-95 of an (edited) model on the scoring split, through qbench's one evaluation path."""
    import onnx

    onnx.save(model, str(path))
    try:
        return float(evaluate(path, data, settings)["metrics"]["mAP50-95"])
    finally:
        path.unlink(missing_ok=True)


def layer_sensitivity(fp32: str | os.PathLike, int8: str | os.PathLike, images: Sequence[str | os.PathLike],
                      data: str | os.PathLike | None = None, top_k: int = DEFAULT_TOP_K, settings=None,
                      out: str | os.PathLike | None = None, progress: bool = False,
                      threads: int | None = None) -> dict:
    """Rank the quantized Convs of `int8` by the proxy, measure the top-K by mAP on `data` (None: proxy only).

    images: the proxy images (calibration images, e.g. the first 8 of a manifest). Writes sensitivity.json and
    sensitivity.csv into `out` when given. Returns the JSON-able result (layers ranked by proxy recovery).
    """

    settings = settings or EvalSettings()
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise QbenchError(f"top-K {top_k!r} must be a whole number >= 0 (0: proxy only).")
    if not images:
        raise QbenchError("no proxy images; pass calibration images (e.g. a manifest from `qbench calib`).")
    t0 = time.perf_counter()
    fmodel, qmodel = load_onnx(Path(fp32), "FP32 model"), load_onnx(Path(int8), "INT8 model")
    layers = conv_layers(qmodel)
    if not layers:
        raise QbenchError(f"'{int8}' has no quantized convolution; pass the INT8 QDQ model `qbench quantize` wrote.")
    imgsz = read_onnx_meta(fp32)["imgsz"]
    x = _inputs(images, imgsz)
    run = _Runner(x, threads)
    ref = run(fmodel)
    err_int8 = output_error(run(qmodel), ref)
    rows = []
    with bar(len(layers), "Sensitivity (proxy)", progress) as advance:
        for layer in layers:
            dmg = output_error(run(quantize_only(qmodel, fmodel, layer)), ref)
            left = output_error(run(keep_float(qmodel, fmodel, [layer])), ref)
            rows.append({"layer": layer.name, "module": layer.module, "index": layer.index, "macs": layer.macs,
                         "proxy_damage": dmg, "proxy_damage_db": to_db(dmg),
                         "proxy_recovery": err_int8 - left, "proxy_recovery_db": round(to_db(left) - to_db(err_int8), 3),
                         "map_recovery": None, "map_damage": None})
            advance(1)
    rows.sort(key=lambda r: -r["proxy_recovery"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    t_proxy = time.perf_counter() - t0

    measured = {}
    if data is not None and top_k:
        t1 = time.perf_counter()
        top = rows[:top_k]
        by_name = {layer.name: layer for layer in layers}
        with scratch("sens") as td, \
                bar(2 * len(top) + 2, "Sensitivity (mAP)", progress) as advance:
            tmp = Path(td) / "model.onnx"
            fp32_map = _map(fmodel, tmp, data, settings)
            advance(1)
            int8_map = _map(qmodel, tmp, data, settings)
            advance(1)
            for r in top:
                layer: Layer = by_name[r["layer"]]
                r["map_recovery"] = round(_map(keep_float(qmodel, fmodel, [layer]), tmp, data, settings) - int8_map, 5)
                advance(1)
                r["map_damage"] = round(fp32_map - _map(quantize_only(qmodel, fmodel, layer), tmp, data, settings), 5)
                advance(1)
        measured = {
            "split": settings.split, "fp32_mAP50-95": round(fp32_map, 5), "int8_mAP50-95": round(int8_map, 5),
            "top_k": len(top), "evaluations": 2 * len(top) + 2, "seconds": round(time.perf_counter() - t1, 1),
            "rank_correlation": {
                "recovery": spearman([r["proxy_recovery"] for r in top], [r["map_recovery"] for r in top]),
                "damage": spearman([-r["proxy_damage"] for r in top], [r["map_damage"] for r in top]),
            },
        }
    result = {
        "qbench_version": __version__,
        "fp32": display_path(fp32), "int8": display_path(int8),
        "proxy": {"images": [display_path(p) for p in images], "imgsz": imgsz,
                  "metric": "detection-output error vs FP32: class scores (all anchors) and boxes weighted by FP32 "
                            "confidence, each relative to its power, averaged; dB = -10 log10(error)",
                  "int8_error": err_int8, "int8_db": to_db(err_int8), "layers": len(layers),
                  "forward_passes": run.passes, "seconds": round(t_proxy, 1)},
        "map": measured or None,
        "layers": rows,
    }
    if out is not None:
        write_sensitivity(result, out)
    return result


def write_sensitivity(result: dict, out: str | os.PathLike) -> Path:
    """sensitivity.csv, then sensitivity.json (last: its presence means the folder is complete)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".sensitivity.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in result["layers"]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    os.replace(tmp, out / "sensitivity.csv")
    return write_json(result, out / "sensitivity.json")


def ranking(result: dict) -> list[str]:
    """Layers in the order mixed precision should try them: measured ones with a positive mAP recovery first
    (largest first), then the rest by proxy recovery; measured layers that did not help come last."""
    rows = result["layers"]
    helped = sorted((r for r in rows if r["map_recovery"] is not None and r["map_recovery"] > 0),
                    key=lambda r: -r["map_recovery"])
    unmeasured = [r for r in rows if r["map_recovery"] is None]
    useless = [r for r in rows if r["map_recovery"] is not None and r["map_recovery"] <= 0]
    return [r["layer"] for r in [*helped, *unmeasured, *useless]]
