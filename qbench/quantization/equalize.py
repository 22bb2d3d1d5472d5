"""Activation-range equalization of Conv -> LeakyRelu/Relu -> Conv chains (recipe key `equalize`).

A per-tensor activation grid is set by the tensor's largest channel. In the LeakyReLU YOLO head a few channels
reach +-100 while most stay within +-2, so with the pow2 grid of a shift-only NPU (step 1.0 there) those channels
are quantized to three levels (`qbench inspect` shows it). LeakyReLU and ReLU are positively homogeneous,
f(x / s) = f(x) / s for s > 0, so dividing output channel c of the first Conv (weights and bias) by s_c and
multiplying input channel c of the second Conv's weights by s_c computes the same function in float, with the
channel c activations (before and after the activation) divided by s_c.

With r_c the channel's largest |value| on the calibration images (the Conv output) and R = max_c r_c,
s_c = (r_c / R) ** alpha (SmoothQuant's migration exponent): alpha 0 changes nothing, alpha 1 gives every channel
the range R; the largest channel keeps its range, so the per-tensor range stays R and the quantization step of
the small channels shrinks relative to their values by (R / r_c) ** alpha. The cost moves to the second Conv's
weights, whose column c shrinks by s_c <= 1 inside a per-output-channel grid that its largest column still sets.
Only chains where the first Conv's output feeds only the activation and the activation feeds only the second
Conv (both group 1, initializer weights) are touched: residual Adds, Concats and Splits would need one scale for
every branch.

QAT (qbench.qatrain) applies the same scales to the PyTorch model (`equalize_torch`), so the fake-quant model and the
equalized ONNX its PTQ graph came from compute the same function.
"""

from __future__ import annotations

import numpy as np

from ..models.modules import module_for_node

ACTIVATIONS = ("LeakyRelu", "Relu")
MAX_IMAGES = 32  # channel ranges for the scales: the first images of the calibration set
MIN_RATIO = 1e-3  # channels that never fire are treated as 1e-3 of the largest (no division by ~0)


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def find_chains(model) -> list[tuple]:
    """(first Conv, activation, second Conv) node triples that can be equalized (see module doc)."""
    g = model.graph
    init = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def own(name):  # an initializer only this node reads
        return name in init and len(consumers.get(name, [])) == 1

    chains = []
    for a in g.node:
        if a.op_type != "Conv" or len(a.input) < 3 or _group(a) != 1 or not own(a.input[1]) \
                or not own(a.input[2]) or a.output[0] in outputs:
            continue
        after = consumers.get(a.output[0], [])
        if len(after) != 1 or after[0].op_type not in ACTIVATIONS or after[0].output[0] in outputs:
            continue
        act = after[0]
        nxt = consumers.get(act.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Conv" or _group(nxt[0]) != 1 or nxt[0].input[0] != act.output[0] \
                or not own(nxt[0].input[1]):
            continue
        chains.append((a, act, nxt[0]))
    return chains


def probe_session(model, tensors: list[str]):
    """An unoptimized ONNX Runtime session of `model` (float) that also outputs `tensors`."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=t))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])


def channel_ranges(model, tensors: list[str], reader, images: int) -> dict:
    """{tensor: per-channel max |value|} of `model` (float, unoptimized) over `images` batches of `reader`."""
    sess = probe_session(model, tensors)
    r: dict[str, np.ndarray] = {}
    for _ in range(images):
        feed = reader.get_next()
        if feed is None:
            break
        for t, v in zip(tensors, sess.run(tensors, feed)):
            m = np.abs(v).max(axis=(0, *range(2, v.ndim)))
            r[t] = m if t not in r else np.maximum(r[t], m)
    return r


def equalize(model, reader, alpha: float, images: int = MAX_IMAGES) -> dict:
    """Equalize `model` (an FP32 ModelProto) in place from the calibration images `reader` yields; a report."""
    from onnx import numpy_helper

    chains = find_chains(model)
    report = {"alpha": alpha, "chains": len(chains), "images": 0, "layers": []}
    if not chains or alpha <= 0:
        return report
    ranges = channel_ranges(model, [a.output[0] for a, _, _ in chains], reader, images)
    report["images"] = reader.images_read if hasattr(reader, "images_read") else images
    init = {t.name: t for t in model.graph.initializer}
    for a, _, b in chains:
        r = ranges[a.output[0]].astype(np.float64)
        if r.max() <= 0:
            continue
        s = np.clip(r / r.max(), MIN_RATIO, 1.0) ** alpha
        wa = numpy_helper.to_array(init[a.input[1]]).astype(np.float64) / s.reshape(-1, 1, 1, 1)
        ba = numpy_helper.to_array(init[a.input[2]]).astype(np.float64) / s
        wb = numpy_helper.to_array(init[b.input[1]]).astype(np.float64) * s.reshape(1, -1, 1, 1)
        for name, arr in ((a.input[1], wa), (a.input[2], ba), (b.input[1], wb)):
            init[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
        report["layers"].append({"conv": a.name, "next": b.name, "median_channel_range_before": float(np.median(r)),
                                 "median_channel_range_after": float(np.median(r / s)), "range": float(r.max()),
                                 "scales": [float(v) for v in s]})
    return report


def equalization_tag(report: dict) -> str:
    """The exponent and a digest of the scales (part of ort_engine.prepared_tag), so models equalized differently
    (other images, another exponent) never pass for each other."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps([[x["conv"], x["next"], x["scales"]] for x in report.get("layers", [])])
                          .encode()).hexdigest()[:12]
    return f"{report.get('alpha', 0):g} {digest}"


def equalize_torch(model, report: dict) -> int:
    """Apply the scales of an `equalize` report to the matching convs of a FUSED ultralytics model in place (the
    model the ONNX was exported from; node names map to modules as in qbench.models.modules.module_for_node). Returns the
    number of chains applied."""
    import torch

    done = 0
    with torch.no_grad():
        for layer in report.get("layers", []):
            (pa, a), (pb, b) = module_for_node(model, layer["conv"]), module_for_node(model, layer["next"])
            if not isinstance(a, torch.nn.Conv2d) or not isinstance(b, torch.nn.Conv2d) or a.bias is None:
                raise RuntimeError(f"equalized chain {layer['conv']} -> {layer['next']} has no matching convs "
                                   f"in the PyTorch model ({pa}, {pb})")
            s = torch.tensor(layer["scales"], dtype=torch.float64)
            a.weight.copy_((a.weight.double() / s.reshape(-1, 1, 1, 1)).to(a.weight.dtype))
            a.bias.copy_((a.bias.double() / s).to(a.bias.dtype))
            b.weight.copy_((b.weight.double() * s.reshape(1, -1, 1, 1)).to(b.weight.dtype))
            done += 1
    return done
