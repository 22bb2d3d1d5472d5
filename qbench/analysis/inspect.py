"""`qbench inspect`: per-tensor activation statistics, per-layer quantization error, activation diagnostics.

Two streamed passes, both bounded in memory (nothing is kept per image):

1. statistics, over the calibration images, of every activation tensor the
   INT8 model quantizes plus the input of every LeakyReLU (`TensorStats`:
   range, moments, percentiles, negative fraction, clipping at the calibrated
   range, per-channel spread, histogram);
2. error, over a fixed set of held-out (val) images: per tensor, the SQNR and
   cosine similarity between the FP32 activation and
   - *isolated*: the same FP32 activation quantized alone with the INT8
     model's scale and zero point (that tensor's own rounding and clipping);
   - *cumulative*: the INT8 model's dequantized tensor, every earlier layer
     quantized too (the QDQ graph run as written, i.e. simulated int8);
   and per LeakyReLU layer the output SQNR as deployed and under each remedy
   (`LeakyError`), per SiLU layer as deployed (Conv output, Sigmoid and product
   each requantized, in ORT's layout) and fused (`SiluError`). Weights get their
   SQNR from the initializers.

Writes into `out`: `layers.csv` (one row per tensor, stable columns),
`leaky.csv` / `silu.csv` (one row per LeakyReLU / SiLU, ranked by harm; only
for the activations the model has), `weights.csv`,
`histograms.npz` (every tensor's histogram) and `inspect.json` (all of the
tables and a summary), the JSON last.

Each quantized tensor also says what sets its per-tensor range (`range_diagnosis`), because the fixes differ:
a few channels far wider than the rest (`channel_range_spread` >= 8) can be rescaled per channel (recipe key
`equalize`); rare large values spread over the channels (`tail_ratio`, max |value| over the 99.9th percentile
of |value|, >= 4, with the channels alike) cannot be moved by any per-channel rescaling, only clipped (which
trades their error for the bulk's: on the gtsdb4 reference model that costs accuracy) or kept at higher precision.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..calibration import CalibrationReader, load_manifest
from ..data.dataset import image_files, load_data_yaml
from ..errors import QbenchError
from ..files import write_json
from ..graph.detector import PREPARED_FP32, check_detector, load_onnx, preparation_of
from ..graph.qdq import (
    QParams,
    activation_census,
    activation_quantizers,
    fake_quant,
    leaky_relus,
    tensor_order,
    weight_quantizers,
)
from ..graph.tap import TensorTap
from ..progress import bar
from .leaky import LeakyError, code_budget
from .silu import SiluError, silus
from .stats import DEFAULT_BINS, PERCENTILES, ErrorStats, TensorStats

LAYER_COLUMNS = (
    ["depth", "tensor", "layer", "producer", "role", "dtype", "scale", "zero_point", "q_lo", "q_hi",
     "min", "max", "mean", "std"] + [f"p{p:g}" for p in PERCENTILES] +
    ["negative_fraction", "neg_to_pos_ratio", "clip_fraction", "channels", "channel_range_spread", "tail_ratio",
     "range_set_by", "sqnr_isolated_db", "cos_isolated", "sqnr_cumulative_db", "cos_cumulative", "hist_stride"])
LEAKY_COLUMNS = ("rank", "layer", "node", "alpha", "unfused", "out_min", "out_max", "neg_to_pos_ratio",
                 "scheme", "neg_codes", "pos_codes", "neg_codes_used", "pos_codes_used", "bits_lost_vs_relu",
                 "asym_neg_codes", "asym_pos_codes", "asym_bits_lost", "sym_neg_codes", "sym_pos_codes",
                 "sym_bits_lost", "sqnr_actual_db", "sqnr_ideal_db", "harm_db", "remedy", "remedy_gain_db")
CHANNEL_SPREAD_FLAG = 8.0  # largest / median channel range at which a few channels set a tensor's range
TAIL_FLAG = 4.0  # max |value| / 99.9th percentile of |value| at which rare values set it
SILU_COLUMNS = ("rank", "layer", "node", "unfused", "sigmoid_quantized", "out_min", "out_max", "neg_to_pos_ratio",
                "scheme", "neg_codes", "pos_codes", "neg_codes_used", "pos_codes_used", "sqnr_actual_db",
                "sqnr_fused_db", "sqnr_ideal_db", "harm_db", "fused_gain_db", "remedy")
WEIGHT_COLUMNS = ("depth", "node", "layer", "op_type", "channels", "per_channel", "sqnr_db", "cosine")


def layer_name(tensor: str) -> str:
    """'/model.2/cv1/conv/Conv_output_0' -> 'model.2.cv1.conv' (the ultralytics module path), else the name."""
    parts = [p for p in tensor.split("/") if p]
    if len(parts) >= 2 and re.search(r"_output_\d+$", parts[-1]):
        return ".".join(parts[:-1])
    return tensor


def is_attention(row: dict) -> bool:
    """A layers.csv row of an attention block's tensors (ultralytics' C2PSA/PSA `attn` modules, MatMul, Softmax)."""
    return row.get("producer") in ("MatMul", "Softmax") or ".attn" in f".{row.get('layer', '')}"


def range_diagnosis(row: dict) -> tuple[float, str]:
    """(tail_ratio, range_set_by) of a `layers.csv` row (see module doc): max |value| over the 99.9th percentile
    of |value| (the larger of |p0.1| and |p99.9|), and "channels", "rare values" or "" (neither flag)."""
    def num(k):
        try:
            return abs(float(row.get(k, "")))
        except (TypeError, ValueError):
            return math.nan

    bulk = max(num("p0.1"), num("p99.9"))
    tail = max(num("min"), num("max")) / bulk if bulk > 0 else math.nan
    spread = num("channel_range_spread")
    if spread >= CHANNEL_SPREAD_FLAG:
        return tail, "channels"
    return tail, "rare values" if tail >= TAIL_FLAG else ""


def _finite(v):
    """JSON/CSV-safe number: inf and nan become strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return v


def _write_csv(rows: list[dict], columns: Sequence[str], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else _finite(v))
                    for k, v in r.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    tmp.replace(path)


def _ahead(forward, images, imgsz: int, input_name: str):
    """Yield forward(x) image by image, computing the next image's while the caller works on the current one
    (ONNX Runtime and NumPy both release the GIL): at most two images' tensors are alive at once."""
    from concurrent.futures import ThreadPoolExecutor

    reader = CalibrationReader(images, imgsz, input_name, batch=1)

    def step():
        feed = reader.get_next()
        return None if feed is None else forward(feed[input_name])

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(step)
        while (values := pending.result()) is not None:
            pending = pool.submit(step)
            yield values


def inspect_models(fp32: str | os.PathLike, int8: str | os.PathLike | dict, calib_images: Sequence[str | os.PathLike],
                   error_images: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                   bins: int = DEFAULT_BINS, threads: int | None = None, progress: bool = False,
                   source: dict | None = None) -> dict:
    """Run both passes and write the files (see the module doc); returns the first INT8 model's inspect.json, plus
    'other_variants' ({name: {out, summary}}) for the others.

    `int8` is one INT8 QDQ model (files into `out`), or several as {name: (int8 path, out folder)}, e.g. a recipe
    and its NPU-profile variants: they share the FP32 statistics pass and each gets its own files.
    """

    fp32 = Path(fp32)
    models = ({str(k): (Path(v[0]), Path(v[1])) for k, v in int8.items()} if isinstance(int8, dict)
              else {"int8": (Path(int8), Path(out if out is not None else "."))})
    fmodel = load_onnx(fp32, "FP32 model")
    info = check_detector(fmodel, fp32)
    imgsz = info["imgsz"]
    if imgsz is None:
        raise QbenchError(f"'{fp32}' has a dynamic input size; export it at a fixed size with `qbench export`.")
    ftensors = {o for n in fmodel.graph.node for o in n.output} | {i.name for i in fmodel.graph.input}
    f_eq = preparation_of(fmodel)
    variants = {}
    for name, (path, folder) in models.items():
        qmodel = load_onnx(path, "INT8 model")
        q_eq = preparation_of(qmodel)
        if q_eq != f_eq:  # recipe keys equalize and shift_negative rescale and shift tensors
            raise QbenchError(
                f"'{path}' and '{fp32}' were not prepared alike (recipe keys 'equalize' and 'shift_negative' "
                f"rescale and shift the float model's tensors), so their tensors cannot be compared one by one; "
                + (f"pass the prepared FP32 model written next to it ({Path(path).with_name(PREPARED_FP32)}) "
                   f"as the FP32 model." if q_eq else "pass the FP32 model it was quantized from."))
        acts = activation_quantizers(qmodel)
        if not acts:
            raise QbenchError(f"'{path}' has no quantized activations (no QuantizeLinear nodes); pass the INT8 QDQ "
                              "model that `qbench quantize` wrote.")
        missing = [t for t in acts if t not in ftensors]
        if missing:
            raise QbenchError(f"'{path}' was not quantized from '{fp32}': it quantizes tensors the FP32 model does "
                              f"not have (e.g. {missing[0]}); pass the FP32 model it was made from.")
        variants[name] = {"path": path, "out": folder, "qmodel": qmodel, "acts": acts,
                          "leaks": leaky_relus(fmodel, acts), "silus": silus(fmodel, acts)}
    if not calib_images:
        raise QbenchError("no calibration images to collect statistics on; pass a manifest from `qbench calib`.")
    order = tensor_order(fmodel)
    watched = set()
    for v in variants.values():
        watched |= set(v["acts"]) | {lk.pre for lk in v["leaks"]} | {lk.post for lk in v["leaks"]} \
            | {sl.pre for sl in v["silus"]} | {sl.post for sl in v["silus"]}
    watched = sorted(watched, key=lambda t: (order[t], t))  # ties (a Split's outputs): by name, so runs diff cleanly
    t_start = time.perf_counter()

    # ---- pass 1: statistics over the calibration images (FP32 activations: shared by every variant)
    stats = {t: TensorStats(bins, ranges={k: v["acts"][t].qparams for k, v in variants.items() if t in v["acts"]})
             for t in watched}
    tap = TensorTap(fmodel, watched, threads)
    with bar(len(calib_images), "Activation statistics", progress) as advance:
        for values in _ahead(lambda x: tap.run(x), calib_images, imgsz, info["input_name"]):
            for t, val in values.items():
                stats[t].update(val)
            advance(1)
    t_stats = time.perf_counter() - t_start

    # ---- pass 2: errors on held-out images, every variant against the same FP32 activations
    out_name = fmodel.graph.output[0].name
    for v in variants.values():
        acts = v["acts"]
        v["isolated"] = {t: ErrorStats() for t in acts}
        own = {t for lk in v["leaks"] for t in (lk.pre, lk.post)} | {t for sl in v["silus"] for t in (sl.pre, sl.post)}
        v["watched"] = [t for t in watched if t in acts or t in own]
        v["cumulative"] = {t: ErrorStats() for t in v["watched"]}
        v["output"] = ErrorStats()
        v["leaky_err"] = {}
        for lk in v["leaks"]:
            if lk.post not in acts:
                continue  # an unquantized LeakyReLU (kept float by the recipe)
            s_post, s_pre = stats[lk.post], stats[lk.pre]
            v["leaky_err"][lk.node] = lk.pre, LeakyError(
                lk.alpha, acts[lk.post].qparams, acts[lk.pre].qparams if lk.unfused else None, s_post.min,
                s_post.max, s_pre.min, s_pre.max, s_post.percentile(0.01), s_post.percentile(99.99))
        v["silu_err"] = {sl.node: (sl.pre, SiluError(acts[sl.post].qparams,
                                                     acts[sl.pre].qparams if sl.pre_quantized else None,
                                                     acts[sl.sig].qparams if sl.sig_quantized else None,
                                                     stats[sl.post].min, stats[sl.post].max))
                         for sl in v["silus"] if sl.post in acts}
        v["qnames"] = {t: (acts[t].dequantized if t in acts else t) for t in v["watched"]}
        v["qtap"] = TensorTap(v["qmodel"], [*v["qnames"].values(), out_name], threads, optimize=False)
    ftap = TensorTap(fmodel, watched + [out_name], threads)

    def forward(x):
        return ftap.run(x), {k: v["qtap"].run(x) for k, v in variants.items()}

    t1 = time.perf_counter()
    with bar(len(error_images), "Quantization error", progress) as advance:
        for fv, qvs in _ahead(forward, error_images, imgsz, info["input_name"]):
            for k, v in variants.items():
                qv, acts = qvs[k], v["acts"]
                for t in v["watched"]:
                    ref = fv[t]
                    if t in acts:
                        v["isolated"][t].update(ref, fake_quant(ref, acts[t].qparams))
                    v["cumulative"][t].update(ref, qv[v["qnames"][t]])
                v["output"].update(fv[out_name], qv[out_name])
                for pre, err in (*v["leaky_err"].values(), *v["silu_err"].values()):
                    err.update(fv[pre])
            advance(1)
    t_err = time.perf_counter() - t1
    seconds = {"statistics": round(t_stats, 2), "error": round(t_err, 2),
               "total": round(time.perf_counter() - t_start, 2)}
    results = {k: _write_variant(k, v, fmodel, fp32, stats, order, imgsz, calib_images, error_images, bins, seconds,
                                 source) for k, v in variants.items()}
    first, *others = results
    # in memory only (each variant's inspect.json is already written): the other variants' summaries
    return {**results[first], "other_variants": {k: {"out": str(variants[k]["out"]), "summary": results[k]["summary"]}
                                                 for k in others}}


def _write_variant(name, v, fmodel, fp32, stats, order, imgsz, calib_images, error_images, bins, seconds,
                   source) -> dict:
    """The tables and files of one INT8 variant."""
    acts, out = v["acts"], v["out"]
    rows = []
    for t in v["watched"]:
        a = acts.get(t)
        s = stats[t].summary(name if a else None)
        q = a.qparams if a else None
        rows.append({
            "depth": order[t], "tensor": t, "layer": layer_name(t),
            "producer": a.producer if a else next((n.op_type for n in fmodel.graph.node if t in n.output), "?"),
            "role": "quantized" if a else "pre-activation (not quantized)", "dtype": q.dtype if q else "",
            "scale": q.scale if q else "", "zero_point": q.zero_point if q else "", "q_lo": q.lo if q else "",
            "q_hi": q.hi if q else "",
            **{k: s.get(k, "") for k in ("min", "max", "mean", "std", *[f"p{p:g}" for p in PERCENTILES],
                                         "negative_fraction", "neg_to_pos_ratio", "channels",
                                         "channel_range_spread", "hist_stride")},
            "clip_fraction": s.get("clip_fraction", "") if a else "",
            "sqnr_isolated_db": v["isolated"][t].sqnr_db if a else "",
            "cos_isolated": v["isolated"][t].cosine if a else "",
            "sqnr_cumulative_db": v["cumulative"][t].sqnr_db, "cos_cumulative": v["cumulative"][t].cosine,
        })
        if a:
            rows[-1]["tail_ratio"], rows[-1]["range_set_by"] = range_diagnosis(rows[-1])
    leaky_rows = []
    for lk in v["leaks"]:
        if lk.node not in v["leaky_err"]:
            continue
        s = stats[lk.post]
        res = v["leaky_err"][lk.node][1].result()
        asym = code_budget(s.min, s.max, QParams.from_range(s.min, s.max, "uint8"))
        sym = code_budget(s.min, s.max, QParams.from_range(s.min, s.max, "int8", symmetric=True))
        actual = code_budget(s.min, s.max, acts[lk.post].qparams)
        leaky_rows.append({
            "layer": layer_name(lk.post), "node": lk.node, "alpha": lk.alpha, "unfused": lk.unfused,
            "out_min": s.min, "out_max": s.max, "neg_to_pos_ratio": s.summary()["neg_to_pos_ratio"],
            **{k: actual[k] for k in ("scheme", "neg_codes", "pos_codes", "neg_codes_used", "pos_codes_used",
                                      "bits_lost_vs_relu")},
            "asym_neg_codes": asym["neg_codes_used"], "asym_pos_codes": asym["pos_codes_used"],
            "asym_bits_lost": asym["bits_lost_vs_relu"], "sym_neg_codes": sym["neg_codes"],
            "sym_pos_codes": sym["pos_codes"], "sym_bits_lost": sym["bits_lost_vs_relu"],
            "sqnr_actual_db": res["sqnr_db"]["actual"], "sqnr_ideal_db": res["sqnr_db"]["ideal"],
            "harm_db": res["harm_db"], "remedy": res["remedy"] or "none",
            "remedy_gain_db": res["remedy_gain_db"].get(res["remedy"], 0.0) if res["remedy"] else 0.0,
            "sqnr_db": res["sqnr_db"], "remedy_gains_db": res["remedy_gain_db"], "remedy_text": res["remedy_text"],
        })
    leaky_rows.sort(key=lambda r: (-r["harm_db"], r["sqnr_actual_db"]))
    for k, r in enumerate(leaky_rows, 1):
        r["rank"] = k
    silu_rows = []
    for sl in v["silus"]:
        if sl.node not in v["silu_err"]:
            continue
        s = stats[sl.post]
        res = v["silu_err"][sl.node][1].result()
        actual = code_budget(s.min, s.max, acts[sl.post].qparams)
        silu_rows.append({
            "layer": layer_name(sl.post), "node": sl.node, "unfused": sl.pre_quantized,
            "sigmoid_quantized": sl.sig_quantized, "out_min": s.min, "out_max": s.max,
            "neg_to_pos_ratio": s.summary()["neg_to_pos_ratio"],
            **{k: actual[k] for k in ("scheme", "neg_codes", "pos_codes", "neg_codes_used", "pos_codes_used")},
            "sqnr_actual_db": res["sqnr_db"]["actual"], "sqnr_fused_db": res["sqnr_db"]["fused"],
            "sqnr_ideal_db": res["sqnr_db"]["ideal"], "harm_db": res["harm_db"], "fused_gain_db": res["fused_gain_db"],
            "remedy": res["remedy"] or "none", "remedy_text": res["remedy_text"],
        })
    silu_rows.sort(key=lambda r: (-r["harm_db"], r["sqnr_actual_db"]))
    for k, r in enumerate(silu_rows, 1):
        r["rank"] = k

    from onnx import numpy_helper

    finit = {t.name: t for t in fmodel.graph.initializer}
    producers = {n.name: n.output[0] for n in v["qmodel"].graph.node if n.output}
    weight_rows = []
    for node, wq in weight_quantizers(v["qmodel"]).items():
        if wq.name not in finit:
            continue
        w = numpy_helper.to_array(finit[wq.name]).astype(np.float32)
        e = ErrorStats()
        e.update(w, wq.dequantized())
        out_t = producers.get(node, node)
        weight_rows.append({"depth": order.get(out_t, -1), "node": node, "layer": layer_name(out_t),
                            "op_type": wq.op_type, "channels": int(w.shape[0]), "per_channel": wq.scale.size > 1,
                            "sqnr_db": e.sqnr_db, "cosine": e.cosine})
    weight_rows.sort(key=lambda r: r["depth"])

    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, LAYER_COLUMNS, out / "layers.csv")
    for table, columns, fname in ((leaky_rows, LEAKY_COLUMNS, "leaky.csv"), (silu_rows, SILU_COLUMNS, "silu.csv")):
        if table:  # only the activations the model has (a stale file of an earlier inspection goes)
            _write_csv(table, columns, out / fname)
        else:
            (out / fname).unlink(missing_ok=True)
    _write_csv(weight_rows, WEIGHT_COLUMNS, out / "weights.csv")
    quantized_rows = [r for r in rows if r["role"] == "quantized"]
    worst = sorted(quantized_rows, key=lambda r: r["sqnr_isolated_db"])[:10]
    result = {
        "qbench_version": __version__, "fp32": str(fp32), "int8": str(v["path"]), "variant": name, "imgsz": imgsz,
        "source": source or {},
        "images": {"statistics": len(calib_images), "error": len(error_images)},
        "bins": bins,
        "seconds": seconds,
        "summary": {
            "tensors": len(rows), "quantized_tensors": len(quantized_rows), "activations": activation_census(fmodel),
            "leaky_relus": len(leaky_rows), "unfused_leaky_relus": sum(r["unfused"] for r in leaky_rows),
            "silus": len(silu_rows), "unfused_silus": sum(r["unfused"] or r["sigmoid_quantized"] for r in silu_rows),
            "attention_tensors": sum(is_attention(r) for r in quantized_rows),
            "output_sqnr_db": v["output"].sqnr_db, "output_cosine": v["output"].cosine,
            "median_isolated_sqnr_db": float(np.median([r["sqnr_isolated_db"] for r in quantized_rows])),
            "min_cumulative_sqnr_db": min(r["sqnr_cumulative_db"] for r in quantized_rows),
            "range_set_by": {k: sum(r.get("range_set_by") == k for r in quantized_rows)
                             for k in ("channels", "rare values")},
            "worst_isolated": [{"tensor": r["tensor"], "sqnr_isolated_db": r["sqnr_isolated_db"]} for r in worst],
        },
        "layers": rows,
        "leaky": leaky_rows,
        "silu": silu_rows,
        "weights": weight_rows,
        "histograms": "histograms.npz",
    }
    _write_histograms({t: stats[t] for t in v["watched"]}, out / "histograms.npz")
    write_json(_jsonable(result), out / "inspect.json")
    return result


def _write_histograms(stats: dict[str, TensorStats], path: Path) -> None:
    """One compressed file: per tensor `<i>/counts`, and `names`, `lo`, `width`, `min`, `max` arrays."""
    names = list(stats)
    arrays = {"names": np.array(names), "lo": np.array([stats[t].lo for t in names]),
              "width": np.array([stats[t].width for t in names]), "min": np.array([stats[t].min for t in names]),
              "max": np.array([stats[t].max for t in names]),
              "counts": np.stack([stats[t].hist for t in names]).astype(np.int64)}
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def read_histograms(path: str | os.PathLike) -> dict[str, dict]:
    """{tensor: {lo, width, min, max, counts}} from a histograms.npz written by `inspect_models`."""
    with np.load(path) as z:
        return {str(t): {"lo": float(z["lo"][i]), "width": float(z["width"][i]), "min": float(z["min"][i]),
                         "max": float(z["max"][i]), "counts": z["counts"][i]} for i, t in enumerate(z["names"])}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    return _finite(obj)


def _resolve(run_dir: Path, recorded: str | None) -> Path | None:
    """A path recorded in run.json: relative to the run folder, else as a person typed it (cwd, ~)."""
    if not recorded:
        return None
    for cand in (run_dir / recorded, Path(recorded).expanduser()):
        if cand.exists():
            return cand
    return None


def _inspect_qat_run(run: Path, fp32, int8, calib, data, out, **kw) -> dict:
    """A `qbench qat` folder: its PTQ model against fp32.onnx (into ptq/) and its QAT model against its own FP32
    weights, qat-fp32.onnx (into qat/); the QAT model's inspect.json, with the PTQ one's summary as a variant."""
    import json

    if fp32 or int8:
        raise QbenchError(f"'{run}' is a QAT folder, whose models are fixed (fp32.onnx + ptq/int8.onnx, "
                          "qat-fp32.onnx + qat/int8.onnx); to inspect other models pass --fp32/--int8 without it.")
    q = json.loads((run / "qat.json").read_text(encoding="utf-8"))
    calib = Path(calib) if calib else (_resolve(run, q.get("calibration")) or _resolve(run, "calibration.json"))
    data = Path(data) if data else _resolve(run, q.get("data"))
    out = Path(out) if out else run
    pairs = {"ptq": (run / "fp32.onnx", run / "ptq" / "int8.onnx"), "qat": (run / "qat-fp32.onnx",
                                                                            run / "qat" / "int8.onnx")}
    missing = [str(m) for pair in pairs.values() for m in pair if not m.is_file()]
    if missing:
        raise QbenchError(f"'{run}' lacks {', '.join(missing)}; re-run its `qbench qat` command to finish it "
                          f"(ONNX files are not committed with results).")
    done = {k: inspect_run(None, fp32=f, int8=i, calib=calib, data=data, out=out / k, variants=False, **kw)
            for k, (f, i) in pairs.items()}
    return {**done["qat"], "out": str(out / "qat"),
            "other_variants": {"ptq": {"out": str(out / "ptq"), "summary": done["ptq"]["summary"]}}}


def inspect_run(run_dir: str | os.PathLike | None = None, *, fp32: str | os.PathLike | None = None,
                int8: str | os.PathLike | None = None, calib: str | os.PathLike | None = None,
                data: str | os.PathLike | None = None, out: str | os.PathLike | None = None, images: int = 128,
                error_images: int = 16, bins: int = DEFAULT_BINS, threads: int | None = None,
                variants: bool = True, progress: bool = False) -> dict:
    """`qbench inspect`: the models, calibration manifest and data of a `qbench run` folder (each overridable),
    statistics on the first `images` calibration images, error on the first `error_images` val images. With
    `variants`, the run's NPU-profile variants (profiles/*/int8.onnx) too, each into its own folder. A `qbench qat`
    folder: its PTQ and its QAT model, each against its own FP32 model (see _inspect_qat_run)."""
    import json

    run = Path(run_dir) if run_dir else None
    info = {}
    if run is not None and not (run / "run.json").is_file() and (run / "qat.json").is_file():
        return _inspect_qat_run(run, fp32, int8, calib, data, out, images=images, error_images=error_images,
                                bins=bins, threads=threads, progress=progress)
    if run is not None:
        if not (run / "run.json").is_file():
            raise QbenchError(f"'{run}' is not a qbench run folder (no run.json or qat.json); pass a folder "
                              "`qbench run` or `qbench qat` wrote, or --fp32/--int8/--calib/--data.")
        info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    int8 = Path(int8) if int8 else (run / "int8.onnx" if run else None)
    if not fp32 and run is not None and int8 is not None and int8.with_name(PREPARED_FP32).is_file():
        fp32 = int8.with_name(PREPARED_FP32)  # a prepared INT8 model: its own float reference
    fp32 = Path(fp32) if fp32 else (run / "fp32.onnx" if run else None)
    calib = Path(calib) if calib else (_resolve(run, info.get("calibration")) if run else None)
    data = Path(data) if data else (_resolve(run, info.get("data")) if run else None)
    for value, flag in ((fp32, "--fp32"), (int8, "--int8"), (calib, "--calib"), (data, "--data")):
        if value is None:
            raise QbenchError(f"inspect needs {flag}" + (f" (not found from '{run}/run.json')" if run else "")
                              + "; pass it, or a run folder from `qbench run`.")
    for n, flag in ((images, "--images"), (error_images, "--error-images")):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise QbenchError(f"{flag} {n!r} must be a whole number of at least 1.")
    _, calib_paths = load_manifest(calib)
    spec = load_data_yaml(data, require=("val",))
    val = image_files(spec, "val")[:error_images]
    out = Path(out) if out else (run if run else Path("."))
    source = {"run": str(run) if run else None, "calibration": str(calib), "data": str(data),
              "statistics_images": f"first {min(images, len(calib_paths))} of the calibration manifest",
              "error_images": f"first {len(val)} images of the val split"}
    models = {"int8": (int8, out)}
    if run is not None and variants:  # NPU-profile variants `qbench run --profiles` wrote
        for q in sorted(run.glob("profiles/*/int8.onnx")):
            models[q.parent.name] = (q, out / "profiles" / q.parent.name)
    return inspect_models(fp32, models, calib_paths[:images], val, bins=bins, threads=threads, progress=progress,
                          source=source)
