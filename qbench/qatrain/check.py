"""Self-checks of QAT: does the PyTorch fake-quant model compute what the INT8 ONNX computes?

`fake_quant_match` runs both on the same images, ONNX Runtime with graph optimisations off (the QDQ graph as
written: float math on quantized values, the same on every CPU), and compares the detector output and every
quantized tensor the PyTorch model reproduces, in graph order. A placement that is wrong (a quantizer on the wrong
tensor, a missing one) shows as a low SQNR from that tensor on; `first_divergent` names it.
`match_onnx` is the report's check of the exported QAT model on val images, with ORT's fused int8 kernels too.
"""

from __future__ import annotations

import copy
import os

import numpy as np

from ..data.dataset import image_files, load_data_yaml
from ..data.preprocess import load_batch
from ..graph.qdq import activation_quantizers
from ..graph.tap import TensorTap
from ..runtime import ort_session

MATCH_IMAGES = 4
MIN_MATCH_DB = 30.0  # below this a tensor (or the output) of the fake-quant model and of the ONNX differ in kind


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    noise = float(np.sum((got - ref) ** 2))
    sig = float(np.sum(ref ** 2))
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(sig / noise)) if sig > 0 else float("-inf")


def _torch_out(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        y = model(torch.from_numpy(x))
    return (y[0] if isinstance(y, (list, tuple)) else y).float().numpy()


def output_sqnr(ref: np.ndarray, got: np.ndarray) -> dict:
    """SQNR of a detector output (N, 4 + nc, anchors): all of it, the box rows (pixels) and the class scores."""
    return {"all": sqnr_db(ref, got), "boxes": sqnr_db(ref[:, :4], got[:, :4]),
            "scores": sqnr_db(ref[:, 4:], got[:, 4:])}


def fake_quant_match(model, qdq_onnx: str | os.PathLike, x: np.ndarray, min_db: float = MIN_MATCH_DB,
                     threads: int | None = None) -> dict:
    """The fake-quant `model` against the QDQ ONNX on images `x` (N, 3, H, W float32 in [0, 1]), two ways.

    free-running: both run on their own; the detector outputs are compared ("output" SQNR: all, boxes, scores).
    Even two correct int8 implementations drift apart there: float sums in another order move a value across a
    rounding boundary now and then, that one-code step spreads to the layers after it, and a deep model with
    requantized activations everywhere ends ~30 dB apart.
    per tensor: the PyTorch forward continues from ONNX Runtime's value of every quantized tensor it reproduces
    (`capture(inject=...)`), so each tensor's SQNR measures only its own computation: ~50 dB and more when it is
    placed right (a rare one-code step), far less where a quantizer sits on the wrong tensor, is missing, or the
    float math around it differs. "first_divergent" is the first tensor (graph order) below `min_db`, "worst"
    the lowest; "min_tensor_db" the lowest SQNR, which qat() requires to be at least `min_db`.
    """
    import onnx
    import torch

    from .fakequant import capture

    qmodel = onnx.load(str(qdq_onnx))
    aq = activation_quantizers(qmodel)
    out_name = qmodel.graph.output[0].name
    tap = TensorTap(qmodel, [a.dequantized for a in aq.values()] + [out_name], threads, optimize=False)
    ort = tap.run(x)
    model.eval()
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        free = _torch_out(model, x)
        with capture(inject={t: ort[a.dequantized] for t, a in aq.items()}) as cap:
            forced = model(xt)
    forced = (forced[0] if isinstance(forced, (list, tuple)) else forced).float().numpy()
    rows = []
    for t, a in aq.items():
        if t in cap:
            ref = ort[a.dequantized]
            db = sqnr_db(ref, cap[t].numpy()) if tuple(ref.shape) == tuple(cap[t].shape) else float("-inf")
            rows.append({"tensor": t, "producer": a.producer_node, "sqnr_db": db})
    first = next((r for r in rows if r["sqnr_db"] < min_db), None)
    worst = min(rows, key=lambda r: r["sqnr_db"]) if rows else None
    return {"images": int(x.shape[0]), "output": output_sqnr(ort[out_name], free),
            "output_per_tensor": output_sqnr(ort[out_name], forced), "threshold_db": min_db,
            "min_tensor_db": worst["sqnr_db"] if worst else float("inf"), "compared": len(rows),
            "of_quantized": len(aq), "first_divergent": first, "worst": worst, "tensors": rows}


def matches(m: dict) -> bool:
    """Whether a fake_quant_match result says the two models compute the same function."""
    return m["min_tensor_db"] >= m["threshold_db"] and min(m["output_per_tensor"].values()) >= m["threshold_db"]


def divergence_message(m: dict, what: str) -> str:
    """One sentence for a failed fake_quant_match: where the two models first compute different things."""
    first = m.get("first_divergent") or m.get("worst")
    where = (f"'{first['tensor']}' (made by {first['producer']}) is {first['sqnr_db']:.1f} dB from ONNX Runtime's "
             f"given the same inputs" if first and first["sqnr_db"] < m["threshold_db"] else
             f"the detector output is {min(m['output_per_tensor'].values()):.1f} dB from ONNX Runtime's")
    return (f"{what}: the PyTorch fake-quant model and the INT8 ONNX compute different functions: {where} (below "
            f"{m['threshold_db']:.0f} dB). QAT would train a model that is not the one deployed, so no result is "
            "written; please report this model's architecture.")


def match_onnx(model, onnx_path: str | os.PathLike, data, imgsz: int, n: int = MATCH_IMAGES,
               threads: int | None = None) -> dict:
    """The fake-quant PyTorch model vs the INT8 ONNX on n val images: ORT with every optimisation (fused int8
    kernels) and without (the QDQ graph simulated in float). Errors on box rows (pixels) and class scores.

    "ort_self" is the scale to read them on: ORT's two executions of the same INT8 ONNX against each other. Float
    sums in another order move a value across a rounding boundary now and then and that one-code step spreads
    (see fake_quant_match): with free scales ORT's two executions end ~35-50 dB apart (level-3 LeakyReLU and stock
    SiLU models alike); with power-of-two scales requantization is exact in float and they agree to ~140 dB. PyTorch
    can match ORT no better than ORT matches itself."""
    from .fakequant import strip_qat

    files = image_files(load_data_yaml(data, require=("val",)), "val")[:n]
    x = load_batch(files, imgsz)
    ref = _torch_out(model, x)
    flt = _torch_out(strip_qat(copy.deepcopy(model)), x)
    out = {"images": len(files)}
    outs = {}
    for opt in (True, False):
        sess = ort_session(onnx_path, threads, optimize=opt)
        outs[opt] = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    pairs = {"ort_optimized": (outs[True], ref), "ort_qdq_simulated": (outs[False], ref),
             "ort_self": (outs[True], outs[False]),  # ORT's fused int8 kernels vs its own QDQ simulation
             "baseline_float_torch": (outs[True], flt)}  # for scale: the same weights WITHOUT fake quantization
    for label, (got, want) in pairs.items():
        d = np.abs(got - want)
        s = output_sqnr(want, got)
        out[label] = {"box_max_abs_px": float(d[:, :4].max()), "box_mean_abs_px": float(d[:, :4].mean()),
                      "score_max_abs": float(d[:, 4:].max()), "score_mean_abs": float(d[:, 4:].mean()),
                      "sqnr_db": s["all"], "score_sqnr_db": s["scores"]}
    return out
