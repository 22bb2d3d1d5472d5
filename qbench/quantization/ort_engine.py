"""ONNX Runtime static INT8 (QDQ) quantization of a YOLO detector, driven by a recipe.

Steps (all intermediate files live in a private temporary folder, never next to
the user's files):

1. check that the FP32 ONNX is a YOLO detector: one 4-D image input and an
   output shaped (N, 4 + nc, anchors);
2. `quant_pre_process` (shape inference + basic graph optimisation). Symbolic
   shape inference stops on qbench's batch-dynamic exports ("floor(1.0*batch)"
   from the upsampling Resize cannot be merged with "batch"), so it is retried
   with auto_merge, and as a last resort with ONNX shape inference only. It runs
   with the temporary folder as working directory, because ORT's symbolic shape
   inference drops sym_shape_infer_temp.onnx and a <uuid>.data copy of all
   weights into the current folder whenever it gives up;
3. find the detect head FROM THE GRAPH (`find_head`): walk back from the graph
   output through every non-Conv op until a Conv is reached. Those Convs are the
   last conv of each detect branch (box and class, per scale); everything the
   walk passed (reshapes and concats of the scales, the DFL softmax and its
   fixed arange(16) 1x1 Conv, the anchor/stride box arithmetic, the class
   sigmoid, the final concat) is the decode and stays float. The DFL Conv is
   recognised by its weight (1, c, 1, 1) = arange(c) fed by a Softmax, so the
   walk passes through it. Shape/Size ops end the walk (they read shapes only).
   The branch convs stay int8 (QLinearConv); ORT puts a Q/DQ pair on their
   outputs, and the decode reads those through one DequantizeLinear each;
4. calibrate with ONNX Runtime's calibrators on a streaming `CalibrationReader`,
   fed CHUNK_IMAGES images per `collect_data` call, so memory stays bounded for
   every method (ORT's calibrators keep every activation of every image one call
   reads). Histogram methods first take a min/max pass and pre-size every
   histogram to its final range (`_seed_histograms`): entropy and distribution
   then give exactly ORT's all-at-once result, instead of histograms that grow
   chunk by chunk (different thresholds, and a quadratic entropy search);
5. `quantize_static(QDQ)` with those ranges (passed as ORT's calibration cache,
   so num_bins, which quantize_static does not forward, is honoured), the
   exclusions and the recipe's types and options (activation_fusion 'unfused'
   sets ORT's QDQKeepRemovableActivations, so Relu/Clip keep their own Q/DQ);
6. apply the recipe's hardware constraints to the QDQ graph (`constraints.py`):
   activation_fusion 'fused' removes the Q/DQ between a Conv and its
   activation, pow2_scales makes every scale a power of two (weights and
   biases requantized from the pre-processed FP32 model's float values);
7. copy the FP32 model's metadata (class names, imgsz, ...) into the INT8 model,
   load it in ONNX Runtime with every optimisation (which fuses QDQ groups into
   QLinearConv & co.) and run it once; write recipe.yaml (the recipe actually
   used + the excluded node names) next to the output, then rename the model into
   place last.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__
from ..calibration import CalibrationReader, calibration_paths
from ..data.preprocess import load_batch
from ..errors import QbenchError
from ..files import check_writable, scratch, stage_onnx
from ..graph.detector import (  # noqa: F401
    PREPARED_FP32,
    PREPARED_META,
    HeadInfo,
    _opset,
    check_detector,
    find_head,
    head_qdq_violations,
    node_summary,
)
from ..graph.qdq import activation_census, census_text
from ..progress import bar
from ..runtime import ort_session
from .constraints import activations_to_uint8, apply_constraints
from .equalize import MAX_IMAGES, equalization_tag, equalize
from .recipe import MAX_OPSET, MIN_CALIB, Recipe, load_recipe, write_recipe
from .ranges import consumer_functions, mse_ranges
from .shift import ABSORBED, shift_negative, snap_shifts
from .shift import MAX_IMAGES as SHIFT_IMAGES
from .shift import SOURCES as SHIFT_SOURCES

LOG = logging.getLogger("qbench")

CHUNK_IMAGES = 4  # images per calibrator.collect_data call: bounds the activations held at once
# mse collects ORT's signed "distribution" histograms and picks each range itself (ranges.py)
# mean_minmax is ORT's min/max calibrator in its moving-average mode, fed one image per inference, with the
# averaging constant set per chunk so that the result is the exact mean over the images (see `_collect`)
METHOD_NAMES = {"minmax": "MinMax", "mean_minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile",
                "distribution": "Distribution", "mse": "Distribution"}
RECIPE_FILE = "recipe.yaml"


def recipe_file(model: str | os.PathLike) -> Path:
    """Where the recipe a model was made with is written: recipe.yaml beside int8.onnx, NAME.recipe.yaml beside
    any other NAME.onnx (so two models in one folder keep their own)."""
    model = Path(model)
    return model.with_name(RECIPE_FILE if model.name == "int8.onnx" else f"{model.stem}.{RECIPE_FILE}")

# --------------------------------------------------------------------------- graph helpers


def _name_nodes(model) -> bool:
    """Give unnamed nodes unique names (ORT's exclusion lists work by name); True if any was renamed."""
    seen, changed = set(), False
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_qb{i}"
            changed = True
        seen.add(n.name)
    return changed


def prepared_tag(equalized: dict | None, shifted: dict | None) -> str:
    """The PREPARED_META value of a model whose float graph was transformed: which transforms, with a digest of
    their parameters, so models prepared differently (other images, another exponent) never pass for each other."""
    import hashlib
    import json

    parts = []
    if equalized is not None:
        parts.append(f"equalize {equalization_tag(equalized)}")
    if shifted is not None:
        digest = hashlib.sha1(json.dumps([[x["tensor"], x["shift"]] for x in shifted.get("shifted", [])])
                              .encode()).hexdigest()[:12]
        parts.append(f"shift_negative {digest}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- steps
@contextlib.contextmanager
def _cwd(path: Path):
    """Run in `path` (ORT's symbolic shape inference writes sym_shape_infer_temp.onnx + a <uuid>.data copy of the
    weights into the current folder when it gives up)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _preprocess(src: Path, dst: Path) -> str:
    """quant_pre_process with fallbacks, run inside dst's (temporary) folder; returns how shapes were inferred."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    attempts = (("symbolic", {}), ("symbolic+auto_merge", {"auto_merge": True}),
                ("onnx-only", {"skip_symbolic_shape": True}))
    errors = []
    with _cwd(dst.parent):
        for label, kw in attempts:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    quant_pre_process(str(src), str(dst), **kw)
                return label
            except Exception as e:  # symbolic shape inference raises a bare Exception
                errors.append(f"{label}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")
    raise QbenchError(f"ONNX Runtime cannot prepare '{src.name}' for quantization ({'; '.join(errors)}); "
                      "re-export it with `qbench export`.")


def _op_types_to_quantize() -> list[str]:
    """What quantize_static quantizes by default (QOperator + QDQ registries); calibration covers the same."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def _collect(calibrator, reader: CalibrationReader) -> None:
    """Feed a calibrator CHUNK_IMAGES images per collect_data call (ORT holds what one call reads).

    A min/max calibrator in moving-average mode averages the per-inference minima and maxima of one call, then
    merges calls as old + c * (new - old); c = (inferences in this call) / (inferences so far) makes that the
    exact mean over every inference (ORT's fixed default, 0.01, weighs the first chunk most)."""
    n, k = len(reader), max(1, CHUNK_IMAGES // reader.batch)
    averaging = getattr(calibrator, "moving_average", False)
    for start in range(0, n, k):
        reader.set_range(start, start + k)
        if averaging:
            calibrator.averaging_constant = (min(n, start + k) - start) / min(n, start + k)
        calibrator.collect_data(reader)
    reader.set_range(0, n)


def _seed_histograms(calibrator, minmax) -> int:
    """Give ORT's histogram collector each tensor's final range before any data arrives; returns tensors seeded.

    ORT sizes a histogram from the first data it sees and, when later data exceeds that range, appends bins of the
    same width. Fed in chunks, a histogram then grows from num_bins to several times that, which changes entropy's
    result and makes its O(bins^2) threshold search minutes long. With the range of every tensor known from a min/max
    pass, each chunk falls into the same fixed bins: entropy and distribution get exactly the histograms ORT builds
    from all images at once, and percentile (|x| histogram) fixed bins over [0, max|x|].
    Relies on ORT's HistogramCollector layout (onnxruntime 1.20-1.32); on any mismatch it seeds nothing.
    """
    try:
        from onnxruntime.quantization.calibrate import HistogramCollector

        collector = HistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                       num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                       percentile=calibrator.percentile, scenario=calibrator.scenario)
        absolute = calibrator.method == "percentile" and calibrator.symmetric  # collect_absolute_value's layout
        wanted = calibrator.tensors_to_calibrate
        seeded = {}
        for name in wanted:
            if name not in minmax:
                continue
            lo, hi = (np.asarray(v, np.float32).reshape(-1) for v in minmax[name].range_value)
            if lo.size != 1 or hi.size != 1 or not (np.isfinite(lo[0]) and np.isfinite(hi[0])):
                continue
            mn, mx = lo[0], hi[0]
            t = np.array(max(abs(mn), abs(mx)), dtype=np.float32)
            if t == 0:
                continue
            nb = calibrator.num_bins
            if absolute:
                edges = np.linspace(0, t, nb + 1, dtype=np.float32)
                seeded[name] = (np.zeros(nb, np.int64), edges, mn, mx)
            else:  # the same call collect_value makes, so the bins are identical to ORT's one-shot histogram
                hist, edges = np.histogram(np.zeros(0, np.float32), nb, range=(-t, t))
                seeded[name] = (hist, edges, mn, mx, t)
        collector.histogram_dict.update(seeded)
        calibrator.collector = collector
        return len(seeded)
    except (AttributeError, TypeError) as e:  # another ORT layout: fall back to ORT's growing histograms
        LOG.debug(f"cannot pre-size ORT's histograms ({e}); they grow chunk by chunk")
        return 0


def _calibrate(model_path: Path, workdir: Path, recipe: Recipe, reader: CalibrationReader, op_types: list[str],
               source: Path):
    """Ranges for every tensor ORT may quantize, streamed chunk by chunk; histogram methods take a min/max pass
    first (see `_seed_histograms`). Returns (TensorsData, CalibrationMethod, tensors seeded, the `mse` search's summary
    or None)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    method = getattr(CalibrationMethod, METHOD_NAMES[recipe.method])
    opts = {"moving_average": recipe.method == "mean_minmax"}
    if recipe.method in ("minmax", "mean_minmax", "entropy"):
        opts["symmetric"] = recipe.activation_symmetric
    if recipe.effective_num_bins is not None:
        opts["num_bins"] = recipe.effective_num_bins
    if recipe.method == "percentile":
        opts["percentile"] = recipe.effective_percentile
    seeded, searched = 0, None
    # ORT prints progress lines; its distribution method can take the sqrt of a tiny negative variance (a nan std
    # that int8 does not use)
    with contextlib.redirect_stdout(io.StringIO()), np.errstate(invalid="ignore"):
        try:
            minmax = None
            if recipe.method not in ("minmax", "mean_minmax"):
                pre = create_calibrator(model_path, op_types,
                                        augmented_model_path=str(workdir / "augmented_minmax.onnx"),
                                        calibrate_method=CalibrationMethod.MinMax,
                                        extra_options={"moving_average": False})
                _collect(pre, reader)
                minmax = pre.compute_data()
                del pre
            calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(workdir / "augmented.onnx"),
                                           calibrate_method=method, extra_options=opts)
            if minmax is not None:
                seeded = _seed_histograms(calibrator, minmax)
            _collect(calibrator, reader)
            if recipe.method == "mse":
                ranges, searched = _mse_ranges(calibrator, model_path, recipe)
                method = CalibrationMethod.MinMax  # the ranges are plain (lowest, highest) pairs now
            else:
                ranges = calibrator.compute_data()
            del calibrator
        except ValueError as e:
            if "bins" not in str(e):
                raise
            raise QbenchError(f"{recipe.method} calibration of '{source}' failed: an activation barely varies over "
                              f"the calibration images, so ONNX Runtime cannot build its histogram ({e}; typical of "
                              f"an untrained model); use 'method: minmax' in recipe {recipe.name} or a trained "
                              "model.") from e
    return ranges, method, seeded, searched


def _mse_ranges(calibrator, model_path: Path, recipe: Recipe):
    """Recipe `method: mse`: each tensor's consumer-aware error-minimising range from the calibrator's signed
    histograms (ranges.py), as the (lowest, highest) TensorsData ORT's min/max calibrator would have returned."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    kinds = consumer_functions(onnx.load(str(model_path), load_external_data=False))
    levels = 254 if recipe.activation_symmetric else 255  # a symmetric int8 grid has 2 * 127 steps
    found, summary = mse_ranges(calibrator.collector.histogram_dict, kinds, recipe.activation_symmetric, levels)
    return TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
        for name, (lo, hi) in found.items()}), summary


def _load_ranges(path: Path, model_path: Path, op_types: list[str]):
    """Ranges saved by `save_ranges`, checked against the tensors ORT will quantize in `model_path`."""
    import onnx
    from onnxruntime.quantization.calibrate import load_tensors_data

    try:
        tensors = load_tensors_data(path)
        data = dict(tensors.data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise QbenchError(f"ranges file '{path}' is not a ranges JSON written by save_ranges ({e}).") from e
    if not data:
        raise QbenchError(f"ranges file '{path}' holds no ranges; write one with save_ranges.")
    model = onnx.load(str(model_path), load_external_data=False)
    wanted = set()
    init = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in op_types:
            wanted.update(t for t in (*n.input, *n.output) if t and t not in init)
    missing = sorted(wanted - set(data) - {i.name for i in model.graph.input if i.name in init})
    # ORT calibrates every input/output of the ops it quantizes; a model with the same graph has the same names
    if len(missing) > 0.5 * len(wanted) or not set(data) & wanted:
        raise QbenchError(f"ranges file '{path}' does not fit this model ({len(missing)} of {len(wanted)} tensors "
                          f"have no range, e.g. {missing[:3]}); use ranges from a model with the same graph.")
    return tensors, tensors.calibration_method, 0, None


def _ort_has_calibration_cache() -> bool:
    """quantize_static(calibration_cache_path=...) exists (ORT 1.32 has it); without it ORT recalibrates."""
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def input_convs(model) -> list:
    """The Conv nodes that read the model's input (the image) directly."""
    inputs = {i.name for i in model.graph.input}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[0] in inputs]


def input_conv_weights(model) -> list[str]:
    """The weight initializers of the Convs that read the model's input (the image) directly."""
    init = {i.name for i in model.graph.initializer}
    return [n.input[1] for n in input_convs(model) if len(n.input) > 1 and n.input[1] in init]


def _quantize_kwargs(recipe: Recipe, excluded: list[str], op_types: list[str], narrow: list[str] = ()) -> dict:
    """quantize_static's arguments for `recipe`; `narrow`: weights quantized to 7 bits (reduce_range: input)."""
    from onnxruntime.quantization import QuantFormat, QuantType

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    extra = {"ActivationSymmetric": recipe.activation_symmetric, "WeightSymmetric": recipe.weight_symmetric,
             "CalibMovingAverage": False}
    if narrow:  # ORT's per-tensor reduce_range; with per-channel weights the override names the channel axis
        extra["TensorQuantOverrides"] = {w: [{"reduce_range": True, **({"axis": 0} if recipe.per_channel else {})}]
                                         for w in narrow}
    if recipe.method == "percentile":
        extra["CalibPercentile"] = recipe.effective_percentile
    if recipe.activation_fusion == "unfused":  # ORT folds Relu/Clip into the Conv's range unless told not to
        extra["QDQKeepRemovableActivations"] = True
    return dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types, per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range is True, activation_type=qtype[recipe.activation_type],
                weight_type=qtype[recipe.weight_type], nodes_to_exclude=list(excluded), extra_options=extra)


def _resolve_exclusions(model, head: HeadInfo | None, recipe: Recipe) -> tuple[list[dict], list[str], dict]:
    """[(node, op_type, reason)], forced-in names, and patterns that matched nothing."""
    names = [n.name for n in model.graph.node]
    ops = {n.name: n.op_type for n in model.graph.node}
    reasons: dict[str, str] = {}
    if head is not None:
        dfl = set(head.dfl_convs)
        for n in head.decode:
            reasons[n] = "DFL conv (fixed arange weights after the softmax)" if n in dfl else "detect-head decode"
    if recipe.keep_input_float:
        for n in input_convs(model):
            reasons[n.name] = "reads the image (recipe keep_input_float)"
    unmatched = {"exclude": [], "include": []}
    for pat in recipe.exclude:
        hits = fnmatch.filter(names, pat)
        if not hits:
            unmatched["exclude"].append(pat)
        for n in hits:
            reasons.setdefault(n, f"recipe exclude '{pat}'")
    forced = []
    for pat in recipe.include:
        hits = fnmatch.filter(names, pat)
        if not hits:
            unmatched["include"].append(pat)
        for n in hits:
            if reasons.pop(n, None) is not None:
                forced.append(n)
    order = {n: i for i, n in enumerate(names)}
    excluded = [{"node": n, "op_type": ops[n], "reason": r}
                for n, r in sorted(reasons.items(), key=lambda x: order[x[0]])]
    return excluded, sorted(forced, key=order.__getitem__), unmatched


SANITY_IMAGES = 2  # calibration images the INT8 model's output is compared with the FP32 model's on
# Outputs this far from FP32 are broken, not merely imprecise: box rows below 10 dB SQNR, or class scores below
# 3 dB (error energy half the scores' own: scores rounded to 0 give 0 dB; the default model's power-of-two
# unfused profile, a poor but working model, gives 9 dB, its default recipe 21 dB).
SANITY_MIN_DB = {"box": 10.0, "score": 3.0}


def _sanity(fp32: Path, int8: Path, images: list[Path], imgsz: int, threads: int | None) -> dict:
    """The INT8 model's output against the FP32 model's on a few calibration images (SQNR of the box rows and of
    the class scores); `flagged` when either is below SANITY_MIN_DB (e.g. scores rounded to 0 by a shared scale)."""

    x = load_batch(images[:SANITY_IMAGES], imgsz)
    outs = []
    for m in (fp32, int8):
        sess = ort_session(m, threads)
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    ref, got = outs

    def db(a, b):
        noise = float(np.sum((a.astype(np.float64) - b) ** 2))
        return float("inf") if noise == 0 else float(10 * np.log10(max(float(np.sum(a.astype(np.float64) ** 2)),
                                                                        1e-30) / noise))

    res = {"images": int(x.shape[0]), "box_sqnr_db": round(db(ref[:, :4], got[:, :4]), 2),
           "score_sqnr_db": round(db(ref[:, 4:], got[:, 4:]), 2), "threshold_db": SANITY_MIN_DB}
    res["flagged"] = res["box_sqnr_db"] < SANITY_MIN_DB["box"] or res["score_sqnr_db"] < SANITY_MIN_DB["score"]
    return res


def _verify(tmp: Path, optimized: Path, input_name: str, imgsz: int, threads: int | None) -> dict:
    """Load the INT8 model with every ORT optimisation, save the optimised graph, run once; op-type counts."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(optimized)
    so.intra_op_num_threads = threads or 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {input_name: np.zeros((1, 3, imgsz, imgsz), np.float32)})[0]
    if not np.isfinite(y).all():
        raise RuntimeError(f"the quantized model {tmp} gives non-finite outputs on a zero image")
    opt = onnx.load(str(optimized), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in opt.graph.node).items()))


# --------------------------------------------------------------------------- entry point
def quantize_ort(fp32_onnx: str | os.PathLike, out_onnx: str | os.PathLike, recipe: Recipe | str | os.PathLike | None,
                 calib_paths: Sequence[str | os.PathLike] | str | os.PathLike | None, imgsz: int | None = None,
                 progress: bool = False, threads: int | None = None, *, ranges: str | os.PathLike | None = None,
                 save_ranges: str | os.PathLike | None = None, u8_activations: bool = False,
                 save_prepared: str | os.PathLike | None = None) -> dict:
    """Quantize `fp32_onnx` to a QDQ INT8 `out_onnx` with ONNX Runtime; returns a JSON-able report.

    calib_paths: image paths (the first `recipe.calib_size` are used; a manifest's order is stratified), or the
    path of a calibration manifest .json (verified). imgsz defaults to the model's input size.
    Also writes `recipe.yaml` (the recipe used, plus the excluded nodes) next to `out_onnx`.

    ranges: a ranges file written by `save_ranges` of an earlier call (ORT's calibration-cache JSON): calibration is
    skipped and these ranges are used (calib_paths may then be None), so a model with the same graph but other
    weights (e.g. after QAT) gets exactly the earlier activation scales. Every tensor to quantize must have a range.
    save_ranges: also write the calibrated ranges there (JSON).
    save_prepared: with recipe keys equalize or shift_negative (which transform the float graph: rescaled channels,
    shifted tensors), where to write the transformed FP32 model [PREPARED_FP32 next to `out_onnx`]: the float
    weights the INT8 model's layers fall back to (`fallback.keep_float`) and the reference `qbench inspect`
    compares it with; metadata marks both with the same `prepared_tag`.
    u8_activations: rewrite int8 activation Q/DQ as uint8 with zero point + 128 (`activations_to_uint8`): the same
    numbers, but ONNX Runtime's fast x86 u8s8 kernels for symmetric profiles.
    """
    import onnx
    import onnxruntime as ort
    from google.protobuf.message import DecodeError
    from onnxruntime.quantization import quantize_static

    t_all = time.perf_counter()
    recipe = load_recipe(recipe)
    src, out = Path(fp32_onnx), Path(out_onnx)
    if not src.is_file():
        raise QbenchError(f"FP32 model '{src}' does not exist; export one with `qbench export`.")
    if out.suffix.lower() != ".onnx":
        raise QbenchError(f"output '{out}' does not end in .onnx; pass an output path like int8.onnx.")
    if out.is_dir():
        raise QbenchError(f"output '{out}' is a directory; pass a file path like {out / 'int8.onnx'}.")
    if out.exists() and out.resolve() == src.resolve():
        raise QbenchError(f"output '{out}' is the FP32 input itself; pass another output path like int8.onnx.")

    check_writable(out.parent, "the INT8 model")
    paths = calibration_paths(calib_paths) if ranges is None or calib_paths is not None else []
    if ranges is not None:
        ranges = Path(ranges)
        if recipe.equalize > 0:
            raise QbenchError(f"recipe {recipe.name}: 'equalize' rescales the float weights from calibration images, "
                              f"so it cannot reuse precomputed ranges; set 'equalize: 0' or drop the ranges.")
        if recipe.shift_negative:
            raise QbenchError(f"recipe {recipe.name}: 'shift_negative' shifts tensors by offsets measured on "
                              f"calibration images, so it cannot reuse precomputed ranges; set "
                              f"'shift_negative: false' or drop the ranges.")
        if not ranges.is_file():
            raise QbenchError(f"ranges file '{ranges}' does not exist; write one with save_ranges (or drop ranges and "
                              "pass a calibration set).")
        if not _ort_has_calibration_cache():
            raise QbenchError(f"this ONNX Runtime ({ort.__version__}) cannot take precomputed ranges "
                              "(quantize_static has no calibration_cache_path); install onnxruntime >= 1.22.")
    elif recipe.method in ("mse", "mean_minmax") and not _ort_has_calibration_cache():
        raise QbenchError(f"recipe {recipe.name}: 'method: {recipe.method}' hands its ranges to quantize_static as a calibration "
                          f"cache, which this ONNX Runtime ({ort.__version__}) lacks; install onnxruntime >= 1.22.")
    elif not paths:
        raise QbenchError("the calibration set is empty; pass at least 8 training images (default 128), "
                          "e.g. a manifest from `qbench calib`.")
    if ranges is None and len(paths) < MIN_CALIB:
        raise QbenchError(f"the calibration set of {len(paths)} images is too small for stable ranges; use at least "
                          f"{MIN_CALIB} (default 128).")
    used = paths[:recipe.calib_size]

    try:
        model = onnx.load(str(src))
    except DecodeError as e:
        raise QbenchError(f"'{src}' is not an ONNX model ({type(e).__name__}); export one with `qbench export`.") from e
    if not model.graph.node:
        raise QbenchError(f"'{src}' is not an ONNX model (no graph in it); export one with `qbench export`.")
    n_q = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear")
              for n in model.graph.node)
    if n_q:
        raise QbenchError(f"'{src}' is already quantized ({n_q} quantization nodes); pass the FP32 model it was "
                          "made from (`qbench export best.pt`).")
    info = check_detector(model, src)
    if info["imgsz"] is None and imgsz is None:
        raise QbenchError(f"'{src}' has a dynamic input size; pass imgsz (the size it was trained at, e.g. 640).")
    if imgsz is None:
        imgsz = info["imgsz"]
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0:
        raise QbenchError(f"image size {imgsz!r} must be a positive whole number, e.g. 640.")
    if info["imgsz"] is not None and imgsz != info["imgsz"]:
        raise QbenchError(f"'{src}' takes {info['imgsz']}x{info['imgsz']} images, not {imgsz}; pass imgsz "
                          f"{info['imgsz']} or re-export the model at {imgsz}.")
    opset = _opset(model)
    if opset is not None and opset > MAX_OPSET:
        raise QbenchError(f"'{src}' uses opset {opset}, but ONNX Runtime's static INT8 quantization needs opset "
                          f"{MAX_OPSET} or lower; re-export it with `qbench export` at opset 17.")
    batch = 1  # calibration batch: ranges do not depend on it, and batch 1 works for static exports too
    meta = {p.key: p.value for p in model.metadata_props}
    seconds = {}

    with scratch("quant") as td:
        work = Path(td)
        pre_in = src
        if recipe.opset is not None and recipe.opset != opset:
            from onnx import version_converter

            try:
                converted = version_converter.convert_version(model, recipe.opset)
            except Exception as e:
                raise QbenchError(f"cannot convert '{src}' from opset {opset} to the recipe's opset {recipe.opset} "
                                  f"({str(e).splitlines()[0][:120]}); re-export it at opset {recipe.opset} or "
                                  f"set 'opset: null' in recipe {recipe.name}.") from e
            pre_in = work / "converted.onnx"
            onnx.save(converted, str(pre_in))
            opset = recipe.opset
        del model

        t = time.perf_counter()
        pre = work / "pre.onnx"
        shape_mode = _preprocess(pre_in, pre)
        pmodel = onnx.load(str(pre))
        if _name_nodes(pmodel):
            onnx.save(pmodel, str(pre))
        seconds["preprocess"] = time.perf_counter() - t
        head = find_head(pmodel, src)  # checked even when keep_head_float is off: it proves this is a detector
        equalized = shifted = prepared = None
        if recipe.equalize > 0:

            t = time.perf_counter()
            eq_reader = CalibrationReader(used[:MAX_IMAGES], imgsz, info["input_name"], batch=1)
            equalized = equalize(pmodel, eq_reader, recipe.equalize)
            seconds["equalize"] = time.perf_counter() - t
            if not equalized["chains"]:
                acts = census_text(activation_census(pmodel))
                raise QbenchError(f"recipe {recipe.name}: 'equalize' rescales Conv -> ReLU/LeakyReLU -> Conv chains "
                                  f"(activations with f(s x) = s f(x)), and '{src.name}' has none ({acts}), so it "
                                  "would change nothing; use a recipe without it (e.g. default).")
        unshifted = None
        if recipe.shift_negative:

            if not any(n.op_type in SHIFT_SOURCES for n in pmodel.graph.node):
                acts = census_text(activation_census(pmodel))
                raise QbenchError(f"recipe {recipe.name}: 'shift_negative' shifts LeakyReLU outputs, and "
                                  f"'{src.name}' has none ({acts}), so it would only shift the image input; use a "
                                  "recipe without it (e.g. default), or --max-drop for layers that lose too much.")
            t = time.perf_counter()
            unshifted = onnx.ModelProto()
            unshifted.CopyFrom(pmodel)  # shifted again with the shifts on their INT8 grids after quantizing
            sh_reader = CalibrationReader(used[:SHIFT_IMAGES], imgsz, info["input_name"], batch=1)
            shifted = shift_negative(pmodel, sh_reader)
            seconds["shift_negative"] = time.perf_counter() - t
        if equalized is not None or shifted is not None:
            onnx.save(pmodel, str(pre))
        excluded, forced, unmatched = _resolve_exclusions(pmodel, head if recipe.keep_head_float else None, recipe)
        if shifted is not None:  # float Adds, fused with the op before them (constraints.fuse_shifts)
            excluded += [{"node": n, "op_type": "Add", "reason": "shift-negative correction (part of the activation)"}
                         for n in shifted["shift_nodes"]]
        for kind, pats in unmatched.items():
            for pat in pats:
                LOG.warning(f"recipe {recipe.name}: {kind} pattern '{pat}' matches no node of '{src}'.")
        excluded_names = [e["node"] for e in excluded]
        narrow = input_conv_weights(pmodel) if recipe.reduce_range == "input" else []
        float_inputs = [n.name for n in input_convs(pmodel) if n.name in excluded_names] \
            if recipe.keep_input_float else []
        op_types = _op_types_to_quantize()
        n_pre_nodes = len(pmodel.graph.node)
        del pmodel

        t = time.perf_counter()
        passes = 1 if recipe.method in ("minmax", "mean_minmax") else 2  # histogram methods: min/max, histograms
        ranges_file = ranges
        if ranges_file is not None:
            ranges, method, seeded, searched = _load_ranges(ranges_file, pre, op_types)
            passes, reader = 0, None
        else:
            with bar(len(used) * passes, "Calibrating", progress) as advance:
                reader = CalibrationReader(used, imgsz, info["input_name"], batch=batch, on_batch=advance)
                ranges, method, seeded, searched = _calibrate(pre, work, recipe, reader, op_types, src)
            if reader.images_read != len(used) * passes:
                raise RuntimeError(f"calibration read {reader.images_read} images, expected {len(used) * passes}")
        seconds["calibration"] = time.perf_counter() - t

        t = time.perf_counter()
        from onnxruntime.quantization.calibrate import save_tensors_data

        qpath = work / "int8.onnx"
        kwargs = _quantize_kwargs(recipe, excluded_names, op_types, narrow)
        if _ort_has_calibration_cache():
            cache = work / "ranges.json"
            save_tensors_data(ranges, cache)
            if save_ranges is not None:
                Path(save_ranges).parent.mkdir(parents=True, exist_ok=True)
                save_tensors_data(ranges, Path(save_ranges))
            cache_mode = ("qbench calibration, passed as ORT's calibration cache" if ranges_file is None else
                          f"precomputed ranges from {ranges_file}")

            def quantize_pre() -> None:  # the model at `pre` with the saved ranges
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(str(pre), str(qpath), None, calibrate_method=method,
                                    calibration_cache_path=str(cache), **kwargs)

            quantize_pre()
        else:  # older ORT: quantize_static calibrates again itself (ranges= was refused above), one batch per collect_data call (bounded memory)
            reader.rewind()
            reader.on_batch = None  # the progress bar is closed
            cache_mode = "recalibrated by quantize_static (ORT without calibration_cache_path; num_bins not applied)"
            kwargs["extra_options"]["CalibStridedMinMax"] = 1
            if recipe.method in ("minmax", "entropy"):
                kwargs["extra_options"]["CalibTensorRangeSymmetric"] = recipe.activation_symmetric
            with contextlib.redirect_stdout(io.StringIO()), np.errstate(invalid="ignore"):
                quantize_static(str(pre), str(qpath), reader, calibrate_method=method, **kwargs)
        seconds["quantize"] = time.perf_counter() - t

        def constrained():
            qm = onnx.load(str(qpath))
            return qm, apply_constraints(qm, recipe, pre, shift_nodes=shifted["shift_nodes"] if shifted else (),
                                         head_convs=head.branch_convs,
                                         shift_absorbed=shifted.pop(ABSORBED) if shifted else None)

        qmodel, constraints = constrained()
        if shifted is not None and _ort_has_calibration_cache():
            # again, each shift snapped to its tensor's grid (same tensors and ranges, so the same grids)

            t = time.perf_counter()
            snapped = snap_shifts(qmodel, shifted)
            images = shifted["images"]
            shifted = shift_negative(unshifted, ranges=shifted["ranges"], snapped=snapped)
            shifted["images"], shifted["snapped_to_grid"] = images, len(snapped)
            onnx.save(unshifted, str(pre))
            quantize_pre()
            qmodel, constraints = constrained()
            seconds["shift_negative"] += time.perf_counter() - t
        del unshifted
        if shifted is not None:
            shifted.pop("ranges", None)
        if equalized is not None or shifted is not None:
            prepared = prepared_tag(equalized, shifted)
            fprep = onnx.load(str(pre))
            del fprep.metadata_props[:]
            for k, v in [*meta.items(), (PREPARED_META, prepared)]:
                e = fprep.metadata_props.add()
                e.key, e.value = k, str(v)
            save_prepared = Path(save_prepared) if save_prepared is not None else out.with_name(PREPARED_FP32)
            save_prepared.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(fprep, str(save_prepared))
            del fprep
        if u8_activations:
            constraints["u8_activations"] = activations_to_uint8(qmodel)
        keep = [(p.key, p.value) for p in qmodel.metadata_props if p.key not in meta]
        del qmodel.metadata_props[:]
        extra_meta = {"qbench_quant_engine": f"onnxruntime {ort.__version__} static QDQ",
                      "qbench_quant_method": recipe.method, "qbench_quant_version": __version__}
        if prepared is not None:
            extra_meta[PREPARED_META] = prepared
        for k, v in [*meta.items(), *keep, *extra_meta.items()]:
            e = qmodel.metadata_props.add()
            e.key, e.value = k, str(v)
        violations = head_qdq_violations(qmodel, head) if recipe.keep_head_float else []
        if violations and not forced:  # forcing decode nodes in (recipe include) quantizes their neighbours' edges
            raise RuntimeError(f"the float head of {src} got Q/DQ nodes: {violations[:5]}")
        summary = node_summary(qmodel, set(excluded_names))
        tmp = stage_onnx(qmodel, out)
        del qmodel
        resolved = {
            "model": str(src),
            "excluded_nodes": excluded_names,
            "forced_in_nodes": forced,
            "head_branch_convs": head.branch_convs,
        }
        if recipe.reduce_range == "input":
            resolved["seven_bit_weights"] = narrow
        if recipe.keep_input_float:
            resolved["float_input_convs"] = float_inputs
        if u8_activations:
            resolved["u8_activations"] = "int8 activation Q/DQ written as uint8, zero point + 128 (same values)"
        if ranges_file is not None:
            resolved["ranges_from"] = str(ranges_file)
        try:
            t = time.perf_counter()
            fused = _verify(tmp, work / "optimized.onnx", info["input_name"], imgsz, threads)
            seconds["verify"] = time.perf_counter() - t
            sanity = _sanity(src if prepared is None else save_prepared, tmp, used, imgsz, threads) if used else None
            if sanity and sanity["flagged"]:
                LOG.warning(f"the INT8 model's output is far from the FP32 model's on {sanity['images']} calibration "
                            f"images (boxes {sanity['box_sqnr_db']:.1f} dB, class scores {sanity['score_sqnr_db']:.1f}"
                            f" dB SQNR; broken below {SANITY_MIN_DB['box']:g} / {SANITY_MIN_DB['score']:g} dB): this "
                            "recipe/profile breaks the model; its scores are a failure, not a precision loss (see "
                            "quantize.json 'sanity').")
            # recipe.yaml first, the model last: a model file at `out` means the whole step finished
            recipe_path = write_recipe(recipe, recipe_file(out), resolved)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    seconds["total"] = time.perf_counter() - t_all
    return {
        "engine": "ort",
        "onnxruntime": ort.__version__,
        "fp32": str(src),
        "out": str(out),
        "recipe_file": str(recipe_path),
        "recipe_source": recipe.name,
        "recipe": recipe.to_dict(),
        "imgsz": imgsz,
        "opset": opset,
        "calibration": {"images": len(used) if ranges_file is None else 0, "available": len(paths), "requested": recipe.calib_size,
                        "batch": batch, "method": recipe.method, "num_bins": recipe.effective_num_bins,
                        "percentile": recipe.effective_percentile, "ranges": cache_mode, "passes": passes,
                        "histograms_presized": seeded,
                        **({"consumer_aware_ranges": searched} if searched is not None else {}),
                        "seconds": round(seconds["calibration"], 3)},
        "preprocess": {"shape_inference": shape_mode},
        "head": {**asdict(head), "decode_nodes": len(head.decode), "qdq_in_decode": violations}
                if recipe.keep_head_float else
                {"kept_float": False, "branch_convs": head.branch_convs},
        "constraints": constraints,
        "equalize": equalized,
        "shift_negative": shifted,
        "excluded": excluded,
        "forced_in": forced,
        "unmatched_patterns": unmatched,
        "nodes": {"fp32_after_preprocess": n_pre_nodes, **summary},
        "sanity": sanity,
        "ort_optimized_ops": fused,
        "qlinear_ops": {k: v for k, v in fused.items() if k.startswith("QLinear")},
        "size_bytes": {"fp32": src.stat().st_size, "int8": out.stat().st_size},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
