"""Intel Neural Compressor (INC 3.x) static INT8 of a YOLO detector, accuracy-tuned on mAP, deployed as ONNX.

INC 3.x has no ONNX backend any more (TOOLCHAIN.md), so INC quantizes the PyTorch
model and qbench turns the result into an ONNX model that ONNX Runtime runs with
real int8 kernels:

1. load the checkpoint (`load_checkpoint`), fuse Conv+BN, put the Detect head in
   export mode, run it once at (1, 3, imgsz, imgsz) (the head caches its anchor
   grid, so the trace holds no shape arithmetic) and export it with INC's
   `neural_compressor.torch.export.export` (torch.export, static batch 1: with a
   dynamic batch the trace keeps shape ops on conv outputs and torchao's
   X86InductorQuantizer refuses those convs);
2. `autotune` over a short list of INT8StaticQuantConfig variants (TRIAL_CONFIGS)
   with a mAP eval function: the candidate model runs in PyTorch behind a
   `qbench.runtime.Detector` through `qbench.evaluation.evaluate` (FP32 baseline
   first, then one evaluation per trial); run_fn feeds the letterboxed
   calibration images. INC stops at the first trial whose mAP50-95 is within
   `tolerable_loss` (RELATIVE: trial >= baseline * (1 - tolerable_loss)) or after
   `max_trials`, and returns the best. Every trial keeps the detect decode
   float: the DFL conv is excluded by name (set_local ... fp32), and the
   quantizer places no observer on the box arithmetic, sigmoid or final concat.
   INC's PT2E path (X86InductorQuantizer) quantizes only op INPUTS, so a Conv's
   output reaches its LeakyReLU in float and ONNX Runtime could fuse nothing:
   `_conv_output_observers` patches INC's quantizer factory for the duration of
   the call so that every Conv followed by an activation also gets its output
   observed (Conv -> Q/DQ -> LeakyRelu -> Q/DQ, ORT's own QDQ layout);
3. export the chosen model with the TorchScript ONNX exporter (opset 17; the
   dynamo exporter needs onnxscript, which is not a qbench dependency): the
   quantized_decomposed quantize/dequantize pairs are first rewritten to
   torch.fake_quantize_per_{tensor,channel}_affine, which export to
   QuantizeLinear/DequantizeLinear;
4. make the weights real int8 (`fold_weight_quantizers`): every QuantizeLinear
   (optionally followed by a Clip) applied to a constant float weight is
   replaced by the int8 initializer it computes, feeding DequantizeLinear
   directly; the values come from ONNX Runtime running those very nodes and are
   checked equal to numpy's round-half-even, so the model computes exactly
   what it did before the rewrite;
5. copy the FP32 ONNX's metadata (names, imgsz, stride, ...), load the model in
   ONNX Runtime with every optimisation (saving the optimised graph) and count
   QLinearConv, run it once, and write it atomically (temporary name, rename).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .. import __version__
from ..calibration import calibration_paths
from ..data.dataset import load_data_yaml, read_image
from ..data.preprocess import letterbox, to_input
from ..errors import QbenchError
from ..evaluation import EvalSettings, evaluate
from ..files import display_path, scratch, stage_onnx
from ..graph.qdq import sqnr_db
from ..models.export import read_onnx_meta
from ..models.load import load_checkpoint
from ..progress import bar
from ..runtime import Detector, default_threads, ort_session

LOG = logging.getLogger("qbench")

OPSET = 17
# Tried in this order (INC's own tuning set is act_sym x act_algo); weights int8 per-channel symmetric, activations
# uint8 (x86 int8 kernels want unsigned activations).
TRIAL_CONFIGS = (
    {"act_sym": False, "act_algo": "minmax"},
    {"act_sym": False, "act_algo": "kl"},
    {"act_sym": True, "act_algo": "minmax"},
    {"act_sym": True, "act_algo": "kl"},
    {"act_sym": False, "act_algo": "minmax", "w_granularity": "per_tensor"},
)
ACTIVATIONS = ("leaky_relu", "relu", "hardtanh", "silu", "hardswish", "gelu")  # aten op names a Conv may feed
INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


class IncError(QbenchError):
    """Intel Neural Compressor could not quantize or deploy the model (one-line reason)."""


# --------------------------------------------------------------------------- PyTorch side
def _load_model(weights: Path):
    """Fused FP32 eval model with the Detect head in export mode (raw (N, 4+nc, anchors) output)."""
    import torch

    yolo = load_checkpoint(weights)  # QbenchError for anything that is not a YOLO detection checkpoint
    model = yolo.model.float().eval()
    model = model.fuse(verbose=False) if hasattr(model, "fuse") else model
    head = model.model[-1]
    head.export, head.format = True, "onnx"
    for p in model.parameters():
        p.requires_grad_(False)
    names = [model.names[i] for i in range(len(model.names))]
    has_dfl = isinstance(getattr(head, "dfl", None), torch.nn.Module) and any(True for _ in head.dfl.parameters())
    dfl = f"model.{len(model.model) - 1}.dfl" if has_dfl else None  # module name as torch.export records it
    return model, names, dfl


def _calib_paths(calib, n: int) -> list[Path]:

    try:
        paths = calibration_paths(calib)
    except QbenchError as e:  # the INC engine reports every failure as its own (bench engines keeps ORT's row)
        raise IncError(str(e)) from e
    if not paths:
        raise IncError("the calibration set is empty; pass a manifest or at least one image.")
    return paths[:n]


def _image_batches(paths, imgsz: int):
    """(1, 3, imgsz, imgsz) float32 tensors, letterboxed exactly like evaluation."""
    import torch

    for p in paths:
        yield torch.from_numpy(to_input([letterbox(read_image(p), imgsz)[0]]))


@contextlib.contextmanager
def _conv_output_observers():
    """Make INC's PT2E quantizer also observe the output of every quantized Conv that feeds an activation.

    X86InductorQuantizer annotates op inputs only (Inductor fuses Conv+activation+requant itself); ONNX Runtime
    needs a QuantizeLinear right after a Conv to turn it into QLinearConv. The patch wraps INC's quantizer factory
    (`create_xiq_quantizer_from_pt2e_config`, looked up by W8A8PT2EQuantizer.prepare) and is undone on exit.
    """
    from neural_compressor.torch.algorithms.pt2e_quant import core

    original = core.create_xiq_quantizer_from_pt2e_config

    def factory(config, is_dynamic=False):
        quantizer = original(config, is_dynamic=is_dynamic)
        glob = quantizer.get_global_quantization_config()
        if glob is None:
            return quantizer
        spec, annotate = glob.output_activation, quantizer.annotate

        def annotate_with_conv_outputs(model):
            model = annotate(model)
            for node in model.graph.nodes:
                ann = node.meta.get("quantization_annotation")
                if (node.op != "call_function" or "conv" not in str(node.target) or ann is None
                        or not ann.input_qspec_map or ann.output_qspec is not None or not node.users):
                    continue
                if all(_is_activation(u) for u in node.users):
                    ann.output_qspec = spec
            return model

        quantizer.annotate = annotate_with_conv_outputs
        return quantizer

    core.create_xiq_quantizer_from_pt2e_config = factory
    try:
        yield
    finally:
        core.create_xiq_quantizer_from_pt2e_config = original


def _is_activation(node) -> bool:
    """An aten activation call (e.g. aten.leaky_relu_.default)."""
    parts = str(node.target).split(".")
    return node.op == "call_function" and len(parts) > 1 and parts[0] == "aten" and parts[1].rstrip("_") in ACTIVATIONS


def _trial_configs(dfl: str | None):
    from neural_compressor.torch.quantization import StaticQuantConfig

    out = []
    for kw in TRIAL_CONFIGS:
        cfg = StaticQuantConfig(**kw)
        if dfl:  # the DFL's fixed arange conv reads a softmax: keep it (and so the whole decode) float
            cfg.set_local(dfl, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
        out.append(cfg)
    return out


def _config_dict(model) -> dict:
    """The global settings of the INC config a quantized model was made with."""
    mapping = getattr(model, "qconfig", None) or {}
    cfg = next(iter(mapping.values()), None)
    keys = ("w_dtype", "w_sym", "w_granularity", "w_algo", "act_dtype", "act_sym", "act_granularity", "act_algo")
    return {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}


def _to_fake_quant(gm):
    """Rewrite quantized_decomposed quantize->dequantize pairs into fake_quantize ops the ONNX exporter knows."""
    import torch

    qd = torch.ops.quantized_decomposed
    graph = gm.graph
    pairs = {qd.dequantize_per_tensor.default: qd.quantize_per_tensor.default,
             qd.dequantize_per_channel.default: qd.quantize_per_channel.default}
    n_rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in pairs:
            continue
        src = node.args[0]
        if getattr(src, "target", None) is not pairs[node.target]:
            raise IncError(f"INC's quantized graph has a dequantize ({node.name}) without its quantize; "
                           "qbench cannot export this graph to ONNX.")
        with graph.inserting_before(node):
            if node.target is qd.dequantize_per_tensor.default:
                x, scale, zp, lo, hi, _ = src.args
                new = graph.call_function(torch.fake_quantize_per_tensor_affine, (x, scale, zp, lo, hi))
            else:
                x, scale, zp, axis, lo, hi, _ = src.args
                setattr(gm, zp.target, getattr(gm, zp.target).to(torch.int32))  # what fake_quantize wants
                new = graph.call_function(torch.fake_quantize_per_channel_affine, (x, scale, zp, axis, lo, hi))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n_rewritten += 1
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in pairs.values() and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return n_rewritten


def _export_onnx(gm, imgsz: int, path: Path) -> None:
    import torch
    from torch.onnx import TrainingMode

    x = torch.zeros(1, 3, imgsz, imgsz)
    with warnings_off():
        torch.onnx.export(gm, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["output0"], training=TrainingMode.PRESERVE)  # exported GraphModules
        # refuse .train()/.eval(), which the exporter would otherwise call


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- ONNX side
def _const_values(graph) -> dict:
    """name -> numpy array for initializers and Constant nodes."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _numpy_quantize(w, scale, zp, axis: int, clip: tuple | None):
    shape = [1] * w.ndim
    if np.ndim(scale):
        shape[axis] = -1
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    lo, hi = INT_RANGES[np.dtype(dtype)]
    zp32 = np.zeros(1, np.int32) if zp is None else zp.astype(np.int32)
    per = shape if np.ndim(scale) else []
    q = np.rint(w / np.reshape(scale, per)) + np.reshape(zp32, shape if np.ndim(zp32) else [])
    if clip is not None:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return np.clip(q, lo, hi).astype(dtype)


def fold_weight_quantizers(proto) -> dict:
    """Replace every constant float weight -> QuantizeLinear [-> Clip] feeding DequantizeLinear by the int8
    initializer it computes (in place). Values are computed by ONNX Runtime running those nodes and must equal
    numpy's; returns {"weights": n, "clips": n, "max_abs_diff": 0}."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    g = proto.graph
    consts = _const_values(g)
    producer = {o: n for n in g.node for o in n.output}
    consumers = Counter(i for n in g.node for i in n.input)
    chains = []  # (Q node, Clip node or None, name of the tensor DQ reads)
    for dq in g.node:
        if dq.op_type != "DequantizeLinear":
            continue
        src = producer.get(dq.input[0])
        clip = None
        if src is not None and src.op_type == "Clip" and consumers[src.output[0]] == 1:
            clip, src = src, producer.get(src.input[0])
        if src is None or src.op_type != "QuantizeLinear" or src.input[0] not in consts:
            continue
        w = consts[src.input[0]]
        if w.dtype != np.float32 or w.ndim < 2 or consumers[src.output[0]] != 1:
            continue
        if any(i and i not in consts for i in list(src.input[1:]) + (list(clip.input[1:]) if clip else [])):
            continue
        chains.append((src, clip, dq.input[0]))
    if not chains:
        return {"weights": 0, "clips": 0}

    # ORT computes the int8 values with the very nodes being removed: the model stays bit-identical.
    nodes = [n for q, c, _ in chains for n in ([q, c] if c else [q])]
    needed = {i for n in nodes for i in n.input if i}
    inits = [numpy_helper.from_array(consts[i], i) for i in sorted(needed)]

    def elem(q):
        zp = consts[q.input[2]] if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        return helper.np_dtype_to_tensor_dtype(zp.dtype)

    outs = [helper.make_tensor_value_info(t, elem(q), None) for q, _, t in chains]
    mini = helper.make_model(helper.make_graph(nodes, "fold", [], outs, inits), opset_imports=proto.opset_import,
                             ir_version=proto.ir_version)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    values = ort.InferenceSession(mini.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {})

    drop, new_inits, n_clips = set(), [], 0
    for (q, clip, name), v in zip(chains, values):
        scale = consts[q.input[1]]
        zp = consts[q.input[2]] if len(q.input) > 2 and q.input[2] else None
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        bounds = None
        if clip is not None:
            lo = consts[clip.input[1]] if len(clip.input) > 1 and clip.input[1] else -np.inf
            hi = consts[clip.input[2]] if len(clip.input) > 2 and clip.input[2] else np.inf
            bounds = (float(lo), float(hi))
            n_clips += 1
        ref = _numpy_quantize(consts[q.input[0]], scale, zp, axis, bounds)
        if v.dtype != ref.dtype or not np.array_equal(v, ref):
            raise IncError(f"folding the weight quantizer {q.name} gave values that differ from ONNX Runtime's; "
                           "the exported INC model cannot be made int8 safely.")
        new_inits.append(numpy_helper.from_array(v, name))
        drop.update({q.output[0], *((clip.output[0],) if clip else ())})
    keep = [n for n in g.node if n.output[0] not in drop]
    used = {i for n in keep for i in n.input}
    del g.node[:]
    g.node.extend(keep)
    kept_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    return {"weights": len(chains), "clips": n_clips}


def float_weight_quantizers(proto) -> int:
    """How many QuantizeLinear still quantize a constant float tensor at run time (0 after folding)."""
    consts = _const_values(proto.graph)
    return sum(1 for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in consts)


def optimized_op_counts(path: Path, threads: int | None = None) -> Counter:
    """Op types of the graph ONNX Runtime actually runs (ORT_ENABLE_ALL, CPU), from its saved optimized model."""
    import onnx
    import onnxruntime as ort

    with scratch("incopt") as td:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(td) / "optimized.onnx")
        so.intra_op_num_threads = threads or 1
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _copy_metadata(src, dst, extra: dict) -> None:
    keep = {p.key: p.value for p in src.metadata_props}
    keep.update({k: str(v) for k, v in extra.items()})
    del dst.metadata_props[:]
    for k, v in keep.items():
        e = dst.metadata_props.add()
        e.key, e.value = k, v


# --------------------------------------------------------------------------- entry point
def _check_args(out: Path, tolerable_loss, max_trials, eval_images, calib_images) -> None:
    if out.suffix.lower() != ".onnx":
        raise IncError(f"output '{out}' does not end in .onnx; pass a path like int8-inc.onnx.")
    if out.is_dir():
        raise IncError(f"output '{out}' is a directory; pass a file path like {out / 'int8-inc.onnx'}.")
    if isinstance(tolerable_loss, bool) or not isinstance(tolerable_loss, (int, float)) or \
            not 0 <= tolerable_loss < 1 or not math.isfinite(tolerable_loss):
        raise IncError(f"tolerable_loss {tolerable_loss!r} must be a relative mAP loss in [0, 1), e.g. 0.01.")
    for name, v, allow_none in (("max_trials", max_trials, False), ("eval_images", eval_images, True),
                                ("calib_images", calib_images, False)):
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise IncError(f"{name} {v!r} must be a whole number of at least 1.")


def quantize_inc(weights: str | Path, fp32_onnx: str | Path, out_onnx: str | Path, data: str | Path,
                 calib: str | Path | list, tolerable_loss: float = 0.01, max_trials: int = 5,
                 eval_images: int | None = None, calib_images: int = 128, threads: int | None = None,
                 progress: bool = False) -> dict:
    """Quantize `weights` with INC's mAP-driven autotune and write a fused-int8 ONNX to `out_onnx`.

    fp32_onnx: the FP32 export of the same weights (its metadata is copied, its imgsz used).
    data: data.yaml whose val split scores each trial (the first `eval_images` images; None = all).
    calib: calibration manifest .json or image paths (the first `calib_images` are used).
    tolerable_loss: INC's relative loss, tuning stops at the first trial with mAP50-95 >= baseline*(1-loss).
    Returns a JSON-able report. Raises IncError (a QbenchError) with a one-line reason on any failure;
    `out_onnx` is written only when everything succeeded.
    """
    import torch

    t_start = time.perf_counter()
    weights, fp32_onnx, out = Path(weights), Path(fp32_onnx), Path(out_onnx)
    _check_args(out, tolerable_loss, max_trials, eval_images, calib_images)
    model, names, dfl = _load_model(weights)  # QbenchError for a missing or unusable checkpoint
    meta = read_onnx_meta(fp32_onnx)
    load_data_yaml(data, require=("val",))
    paths = _calib_paths(calib, calib_images)
    imgsz = meta["imgsz"]
    n_threads = threads or default_threads()
    torch.set_num_threads(n_threads)

    import neural_compressor
    from neural_compressor.torch.export import export as inc_export
    from neural_compressor.torch.quantization import TuningConfig, autotune

    if names != meta["names"]:
        raise IncError(f"'{weights}' predicts {names} but '{fp32_onnx}' was exported for {meta['names']}; "
                       "pass the FP32 ONNX exported from these weights.")
    example = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():
        model(example)  # the head caches anchors/strides for this shape, so the trace holds no shape arithmetic
    inc_logger = logging.getLogger("neural_compressor")
    level = inc_logger.level
    inc_logger.setLevel(logging.WARNING)
    try:
        with warnings_off():
            exported = inc_export(model, (example,))
    except Exception as e:
        raise IncError(f"INC could not export '{weights}' with torch.export ({str(e).splitlines()[0][:160]}).") from e
    finally:
        inc_logger.setLevel(level)

    trials: list[dict] = []
    settings = EvalSettings(limit=eval_images, threads=n_threads, batch=1)

    def eval_fn(candidate) -> float:
        def forward(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                y = candidate(torch.from_numpy(batch))
            return (y[0] if isinstance(y, (list, tuple)) else y).numpy()

        det = Detector(weights, "pt", names, imgsz, False, forward, n_threads)
        score = float(evaluate(det, data, settings)["metrics"]["mAP50-95"])
        if not trials and score <= 0:  # INC divides by the baseline
            raise IncError(f"the FP32 model scores mAP50-95 0 on the first {eval_images or 'all'} val images of "
                           f"'{data}', so INC has no baseline to tune against; raise eval_images or check the data.")
        trials.append({"config": _config_dict(candidate) or "fp32 baseline", "mAP50-95": round(score, 5)})
        LOG.info(f"INC trial {len(trials) - 1}: {trials[-1]}")
        return score

    def run_fn(prepared) -> None:
        with torch.no_grad(), bar(len(paths), "INC calibration", progress) as adv:
            for x in _image_batches(paths, imgsz):
                prepared(x)
                adv(1)

    tune = TuningConfig(config_set=_trial_configs(dfl), tolerable_loss=float(tolerable_loss), max_trials=max_trials)
    t_tune = time.perf_counter()
    inc_logger.setLevel(logging.WARNING)
    try:
        with _conv_output_observers(), warnings_off():
            best = autotune(exported, tune, eval_fn=eval_fn, run_fn=run_fn, example_inputs=(example,))
    except QbenchError:
        raise
    except Exception as e:
        raise IncError(f"INC autotune failed on '{weights}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}).") \
            from e
    finally:
        inc_logger.setLevel(level)
    tune_s = time.perf_counter() - t_tune
    if best is None:
        raise IncError(f"INC autotune returned no model for '{weights}'; raise max_trials or tolerable_loss.")
    chosen = _config_dict(best)
    probe = next(_image_batches(paths[:1], imgsz))  # a real image: an all-zero one says little about agreement
    with torch.no_grad():
        y_torch = best(probe)
    y_torch = (y_torch[0] if isinstance(y_torch, (list, tuple)) else y_torch).numpy()

    import onnx

    t_export = time.perf_counter()
    with scratch("inc") as td:
        raw = Path(td) / "inc.onnx"
        n_qdq = _to_fake_quant(best)
        try:
            _export_onnx(best, imgsz, raw)
        except Exception as e:
            raise IncError(f"exporting INC's quantized model to ONNX failed ({str(e).splitlines()[0][:160]}).") from e
        proto = onnx.load(str(raw))
        folded = fold_weight_quantizers(proto)
        left = float_weight_quantizers(proto)
        if not folded["weights"] or left:
            raise IncError(f"{folded['weights']} weight quantizers were folded and {left} are left in the exported "
                           "INC model; its convs would not run as int8 in ONNX Runtime.")
        _copy_metadata(onnx.load(str(fp32_onnx), load_external_data=False), proto, {
            "qbench_version": __version__, "qbench_engine": f"inc {neural_compressor.__version__}",
            "qbench_imgsz": imgsz, "qbench_batch_dynamic": False})
        onnx.checker.check_model(proto)
        staged = Path(td) / "int8.onnx"
        onnx.save(proto, str(staged))
        ops = optimized_op_counts(staged, n_threads)
        sess = ort_session(staged, n_threads)  # exact int8 on every CPU, as the evaluation runs it
        y_onnx = sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})[0]
        if y_onnx.shape != y_torch.shape or not np.isfinite(y_onnx).all():
            raise IncError(f"the INC ONNX model gives output {y_onnx.shape}, expected {y_torch.shape}.")
        agreement_db = sqnr_db(float(np.mean(np.square(y_torch, dtype=np.float64))),
                               float(np.mean(np.square(y_torch - y_onnx, dtype=np.float64))))
        del sess
        export_s = time.perf_counter() - t_export
        os.replace(stage_onnx(proto, out), out)

    convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    baseline = trials[0]["mAP50-95"] if trials else None
    return {
        "engine": "inc",
        "inc_version": neural_compressor.__version__,
        "torch_version": torch.__version__,
        "qbench_version": __version__,
        "weights": str(weights), "fp32_onnx": str(fp32_onnx), "out_onnx": str(out),
        "imgsz": imgsz, "batch": 1, "opset": OPSET,
        "tuning": {"tolerable_loss": tolerable_loss, "tolerable_loss_semantics":
                   "relative: stop at the first trial with mAP50-95 >= baseline * (1 - tolerable_loss)",
                   "max_trials": max_trials, "eval_images": eval_images, "calib_images": len(paths),
                   "baseline_mAP50-95": baseline, "trials": trials[1:], "chosen": chosen,
                   "decode_float": {"dfl_excluded": dfl}},
        "seconds": {"tuning": round(tune_s, 1), "export_fold_check": round(export_s, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "graph": {"convs": convs, "qdq_pairs_exported": n_qdq, "weights_folded_to_int8": folded["weights"],
                  "clips_folded": folded["clips"], "float_weight_quantizers_left": left,
                  "qlinearconv": ops.get("QLinearConv", 0),
                  "optimized_op_counts": dict(sorted(ops.items()))},
        # ONNX (ORT int8 kernels) vs INC's PyTorch model on the first calibration image: boxes (pixels) and
        # class scores, as SQNR over the whole output and the largest differences
        "check": {"image": display_path(paths[0]),
                  "sqnr_db_onnx_vs_torch": round(agreement_db, 2),
                  "max_abs_box_px": float(np.abs(y_onnx[:, :4] - y_torch[:, :4]).max()),
                  "max_abs_score": float(np.abs(y_onnx[:, 4:] - y_torch[:, 4:]).max())},
    }
