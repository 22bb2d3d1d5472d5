"""Fake quantization placed FROM the PTQ QDQ graph onto the fused ultralytics model, and the learned ranges.

`prepare_qat` reads every quantized tensor of the PTQ graph and gives it exactly one quantizer in the PyTorch
model (see qbench.qatrain.fakequant for the modules), or reports it `unmapped`: a tensor the PyTorch model cannot
reproduce makes QAT train something other than what is deployed, and `qat()` refuses it.
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from ..errors import QbenchError
from ..graph.qdq import INT_RANGES, activation_quantizers
from ..models.modules import module_for_node
from .fakequant import (
    IN_RANGE_PARAM,
    RANGE_PARAM,
    TAPPED,
    Attention,
    OutputFakeQuant,
    PSABlock,
    QAttention,
    QConv2d,
    QSiLU,
    learned_scale,
    range_param_log2,
)

PASS_THROUGH = frozenset({"Split", "MaxPool", "Resize", "Reshape", "Transpose", "Slice", "Identity", "Flatten",
                          "Squeeze", "Unsqueeze", "Gather"})
HOOKED_OUTPUTS = {"Add": ("Bottleneck",), "Concat": ("Concat",)}  # op -> ultralytics module classes ending in it
ACT_OPS = frozenset({"LeakyRelu", "Relu", "Sigmoid", "Mul", "Clip", "HardSwish", "PRelu"})


def _sym_qrange(recipe) -> tuple[float, float]:
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qt = TensorProto.INT8 if recipe.activation_type == "int8" else TensorProto.UINT8
    return tuple(float(v) for v in get_qmin_qmax_for_qType(qt, symmetric=True))


def _ort_scale(lo: float, hi: float, recipe, q) -> float:
    """The scale ORT's quantizer computes from a calibrated range (before any pow2 rounding)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if recipe.activation_symmetric:
        qmin, qmax = _sym_qrange(recipe)
        return 2 * max(-lo, hi) / (qmax - qmin)
    return (hi - lo) / (q.qmax - q.qmin)


def read_ranges(path) -> dict:
    """{tensor: (min, max)} of a ranges file written by quantize_ort(save_ranges=...)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    return {t: (float(np.asarray(d.range_value[0]).reshape(-1)[0]), float(np.asarray(d.range_value[1]).reshape(-1)[0]))
            for t, d in load_tensors_data(path).data.items()}


def ort_range_for(scale: float, zero_point: int, qmin: int, qmax: int, symmetric: bool) -> tuple:
    """A float32 (min, max) from which ONNX Runtime's quantizer (quant_utils.compute_scale_zp) computes exactly
    `scale` (float32) and `zero_point`: the analytic range, nudged by ulps where float rounding misses."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    s = np.float32(scale)
    half = (qmax - qmin) / 2
    hi = np.float32(np.float64(s) * half) if symmetric else np.float32((qmax - zero_point) * np.float64(s))
    lo = -hi if symmetric else np.float32((qmin - zero_point) * np.float64(s))
    best = (lo, hi)
    for _ in range(16):
        z, got = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), np.array(qmin, np.int32),
                                  np.array(qmax, np.int32), symmetric)
        if np.float32(got) == s and int(z) == int(zero_point):
            return float(lo), float(hi)
        direction = np.float32(np.inf) if np.float32(got) < s else np.float32(-np.inf)
        hi = np.nextafter(hi, direction)
        lo = -hi if symmetric else lo
    return float(best[0]), float(best[1])


def _qparams_of(init: dict, scale_name: str, zp_name: str | None) -> tuple:

    scale = float(np.asarray(init[scale_name], np.float32).reshape(-1)[0])
    zp = init.get(zp_name) if zp_name else None
    dtype = "int8" if zp is not None and zp.dtype == np.int8 else "uint8"
    lo, hi = INT_RANGES[dtype]
    return (scale, int(np.asarray(zp).reshape(-1)[0]) if zp is not None else 0, lo, hi)


def _swap(parent, attr: str, mod, qcls):
    """`mod` (parent.attr) as its quantized class: a fresh copy where the float module may be shared between blocks
    (ultralytics' Conv.default_act is one SiLU for every block), the module itself otherwise."""
    if isinstance(mod, qcls):
        return mod
    if qcls is QSiLU:
        mod = nn.SiLU()
        setattr(parent, attr, mod)
    mod.__class__ = qcls
    mod.qat_taps, mod.qat_tensors = {}, {}
    return mod


def _tap_role(mod, node, producer: dict, consumers: dict) -> str | None:
    """The role (fakequant ROLES) of a quantized tensor made by `node` inside `mod`, read from the graph's shape."""
    op = node.op_type

    def readers(t):  # through Q/DQ and pass-through ops
        out, todo, seen = [], [t], set()
        while todo:
            for c in consumers.get(todo.pop(), []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op_type in ("QuantizeLinear", "DequantizeLinear") or c.op_type in PASS_THROUGH:
                    todo.append(c.output[0])
                else:
                    out.append(c)
        return out

    if isinstance(mod, nn.SiLU):
        return "sigmoid" if op == "Sigmoid" else None
    if isinstance(mod, Attention):
        if op == "MatMul":
            return "scores" if any(r.op_type == "Softmax" for r in readers(node.output[0])) else "av"
        return {"Mul": "q_scaled", "Softmax": "softmax", "Add": "sum"}.get(op)
    if isinstance(mod, PSABlock) and op == "Add":
        srcs = [producer.get(i) for i in node.input]
        names = " ".join(s.name for s in srcs if s is not None) + " " + " ".join(node.input)
        return "attn_add" if "/attn/" in names else "ffn_add" if "/ffn/" in names else None
    return None


def _constant_value(init: dict, producer: dict, t: str) -> float | None:
    """The value of a scalar constant input as ORT reads it (a dequantized initializer: (q - zp) * scale)."""
    p = producer.get(t)
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in init:
        q = np.asarray(init[p.input[0]]).astype(np.float32)
        s = np.asarray(init[p.input[1]], np.float32)
        zp = np.asarray(init[p.input[2]]).astype(np.float32) if len(p.input) > 2 and p.input[2] in init else 0
        v = (q - zp) * s
        return float(v.reshape(-1)[0]) if v.size == 1 else None
    if t in init and np.asarray(init[t]).size == 1:
        return float(np.asarray(init[t], np.float32).reshape(-1)[0])
    return None


def prepare_qat(model, qmodel, recipe, learn_ranges: bool = False, calibrated: dict | None = None) -> dict:
    """Insert fake quantization into a FUSED ultralytics DetectionModel, in place, from the PTQ QDQ graph `qmodel`.

    - every Conv the PTQ graph quantizes becomes a `QConv2d`: its input is fake-quantized with the PTQ graph's scale/
      zero point, its weight per output channel, symmetric int8 (scale = absmax / 127 as ORT computes it; rounded up
      to a power of two under pow2 profiles), its bias on the int32 grid input scale x weight scale, and its output
      when the PTQ graph requantizes the Conv output on its own (profiles that do not fuse Conv+activation; the
      detect-branch convs whose outputs the float decode reads);
    - every quantized tensor that is a module's output (a Conv block's activation, LeakyReLU or SiLU's product, a
      Bottleneck's residual Add, a Concat layer) gets an `OutputFakeQuant` forward hook;
    - tensors inside a module's forward get a tap of its quantized class: SiLU's Sigmoid (`QSiLU`, one per block),
      the C2PSA attention's tensors (`QAttention`, `QPSABlock`);
    - tensors that only pass through with their input's quantizer (Split, MaxPool, Resize, Reshape, Transpose) need
      nothing, and tensors read only by quantized Convs (C2f's inner Concat, the image) are fake-quantized at those
      Convs' inputs.
    Each activation tensor is fake-quantized once (a conv whose input another module already quantizes skips its
    own input quantizer). The DFL conv and the decode stay float, as in the PTQ graph.

    learn_ranges: every conv and hooked tensor quantized in exactly one place gets a learned log2 scale (a parameter
    `qat_log2_scale` / `qat_in_log2_scale` of the module that quantizes it, initialised at the PTQ scale; integer
    exponents under pow2 profiles); taps stay frozen at their PTQ scales. Otherwise every quantizer is frozen.
    calibrated: {tensor: (min, max)}, the PTQ calibration ranges (`read_ranges`). Under pow2 a learned exponent
    then starts where the calibrated scale lies inside the interval that rounds to its PTQ power of two
    (log2(calibrated scale) + 1/2, since PTQ rounds up), not at its centre.

    Returns the placement: quantized convs (with their scales), hooked tensors, tapped tensors, tensors covered
    otherwise, `learned` (tensor -> module and parameter, with learn_ranges), `pass_through_of` (tensor -> the
    tensor whose quantizer it shares) and `unmapped` (quantized tensors the PyTorch model does not reproduce).
    """
    from onnx import numpy_helper

    if not recipe.weight_symmetric or recipe.weight_type != "int8" or recipe.reduce_range:
        raise QbenchError(f"recipe {recipe.name}: QAT reproduces symmetric int8 weights without reduce_range (every "
                          "shipped recipe but reduce-range); set weight_symmetric: true, weight_type: int8, "
                          "reduce_range: false.")
    g = qmodel.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    aq = activation_quantizers(qmodel)
    pow2 = bool(recipe.pow2_scales)

    def log2_init(t: str, scale: float):
        e = float(np.log2(scale))
        if pow2 and calibrated and t in calibrated:
            raw = _ort_scale(*calibrated[t], recipe, aq[t].qparams)
            if raw > 0:
                e = float(np.clip(np.log2(raw) + 0.5, e - 0.49, e + 0.49))
        return range_param_log2(e)

    def dq_of(t):
        p = producer.get(t)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    convs, covered_by_conv, problems, conv_mods = [], set(), [], []
    for n in g.node:
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        x_dq, w_dq = dq_of(n.input[0]), dq_of(n.input[1])
        if x_dq is None or w_dq is None:
            continue  # float conv (DFL, excluded layers)
        path, mod = module_for_node(model, n.name)
        if not isinstance(mod, nn.Conv2d):
            problems.append(f"{n.name}: no nn.Conv2d at {path}")
            continue
        in_q = _qparams_of(init, x_dq.input[1], x_dq.input[2] if len(x_dq.input) > 2 else None)
        out_q = aq[n.output[0]].qparams if n.output[0] in aq else None
        q = producer.get(x_dq.input[0])
        in_t = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else x_dq.input[0]
        mod.__class__ = QConv2d
        mod.in_q = in_q
        mod.out_q = None if out_q is None else (out_q.scale, out_q.zero_point, out_q.qmin, out_q.qmax)
        mod.per_channel = bool(recipe.per_channel)
        mod.pow2 = pow2
        mod.quant_bias = len(n.input) > 2 and dq_of(n.input[2]) is not None
        mod.onnx_node, mod.in_tensor, mod.out_tensor = n.name, in_t, n.output[0]
        covered_by_conv.add(in_t)
        conv_mods.append((path, mod, in_t, n.output[0]))
        convs.append({"node": n.name, "module": path, "input_scale": in_q[0], "input_zero_point": in_q[1],
                      "output_quantized": mod.out_q is not None, "bias_quantized": mod.quant_bias})
    if problems:
        raise QbenchError(f"the PTQ graph's convs do not map onto the PyTorch model ({'; '.join(problems[:3])}); "
                          "QAT needs the FP32 ONNX exported from these same weights by qbench.")
    hooked, tapped, passthrough, at_conv_input, unmapped, learned, pass_of = [], [], [], [], [], {}, {}
    conv_nodes = {c["node"] for c in convs}
    q_out = {n.input[0]: n.output[0] for n in g.node if n.op_type == "QuantizeLinear"}
    for t, a in aq.items():
        if a.producer == "Conv" and a.producer_node in conv_nodes:
            continue  # a QConv2d's out_q
        qp = (a.qparams.scale, a.qparams.zero_point, a.qparams.qmin, a.qparams.qmax)
        node = producer.get(t) if a.producer != "input" else None
        target = tap = None
        if node is not None:
            path, mod = module_for_node(model, node.name)
            if node.op_type in ACT_OPS and path and path.endswith(".act") and not (
                    isinstance(mod, nn.SiLU) and node.op_type == "Sigmoid"):
                parent_path = path.rsplit(".", 1)[0]
                parent = model.get_submodule(parent_path)
                if getattr(parent, "act", None) is mod:  # the activation's output is the block's output
                    target = (parent_path, parent)
            elif node.op_type in HOOKED_OUTPUTS and type(mod).__name__ in HOOKED_OUTPUTS[node.op_type]:
                target = (path, mod)
            elif mod is not None and any(isinstance(mod, base) for base in TAPPED):
                role = _tap_role(mod, node, producer, consumers)
                if role is not None:
                    tap = (path, mod, role)
        if target is not None:
            target[1].register_forward_hook(OutputFakeQuant(qp, t, pow2))
            hooked.append({"tensor": t, "module": target[0], "scale": qp[0], "zero_point": qp[1]})
            if learn_ranges:
                target[1].register_parameter(RANGE_PARAM, log2_init(t, qp[0]))
                learned[t] = {"module": target[0], "param": RANGE_PARAM}
            continue
        if tap is not None:
            path, mod, role = tap
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            qmod = _swap(parent, attr, mod, TAPPED[next(b for b in TAPPED if isinstance(mod, b))])
            if role in qmod.qat_taps:
                unmapped.append({"tensor": t, "producer": a.producer_node, "consumers": a.consumers,
                                 "why": f"a second '{role}' tensor in {path}"})
                continue
            qmod.qat_taps[role], qmod.qat_tensors[role] = qp, t
            if isinstance(qmod, QAttention) and role == "q_scaled":
                qmod.qat_scale = _constant_value(init, producer, node.input[1])
            tapped.append({"tensor": t, "module": path, "role": role, "scale": qp[0], "zero_point": qp[1]})
            continue
        if node is not None and node.op_type in PASS_THROUGH:
            src = node.input[0]
            src_dq = dq_of(src)
            src_q = producer.get(src_dq.input[0]) if src_dq is not None else None
            src_t = src_q.input[0] if src_q is not None and src_q.op_type == "QuantizeLinear" else None
            if src_t in aq and aq[src_t].qparams == a.qparams:
                passthrough.append(t)
                pass_of[t] = src_t
                continue
        readers = [c for dq in consumers.get(q_out.get(t, ""), []) if dq.op_type == "DequantizeLinear"
                   for c in consumers.get(dq.output[0], [])]
        if t in covered_by_conv and readers and all(c.name in conv_nodes for c in readers):
            at_conv_input.append(t)
            continue
        _, mod = module_for_node(model, node.name) if node is not None else (None, None)
        unmapped.append({"tensor": t, "producer": a.producer_node, "consumers": a.consumers,
                         "module_class": type(mod).__name__ if mod is not None else None})
    # a conv whose input another module already fake-quantizes (a hooked output, a tap, a quantized conv output, or
    # a tensor passing those through) skips its own input quantizer: the same numbers (frozen) or the same learned
    # scale (learned ranges), quantized once
    upstream = {h["tensor"] for h in hooked} | {x["tensor"] for x in tapped} \
        | {o for _, m, _, o in conv_mods if m.out_q is not None}

    def root(t):
        while t in pass_of:
            t = pass_of[t]
        return t

    readers_of: dict[str, int] = {}
    for _, _, t, _ in conv_mods:
        readers_of[t] = readers_of.get(t, 0) + 1
    for path, mod, t, o in conv_mods:
        if root(t) in upstream:
            mod.in_fq = False
        elif learn_ranges and t in at_conv_input and readers_of[t] == 1:
            mod.register_parameter(IN_RANGE_PARAM, log2_init(t, mod.in_q[0]))
            learned[t] = {"module": path, "param": IN_RANGE_PARAM}
        if learn_ranges and mod.out_q is not None:
            mod.register_parameter(RANGE_PARAM, log2_init(o, mod.out_q[0]))
            learned[o] = {"module": path, "param": RANGE_PARAM}
    for _, mod, t, _ in conv_mods:  # the bias grid follows the learned scale of the conv's input
        where = learned.get(root(t))
        if where is not None:
            mod.in_scale_of = (model.get_submodule(where["module"]), where["param"])
    return {"quantized_convs": len(convs), "hooked_outputs": len(hooked), "tapped": len(tapped),
            "pass_through": len(passthrough), "at_conv_inputs": len(at_conv_input), "unmapped": unmapped,
            "convs": convs, "hooks": hooked, "taps": tapped, "learned": learned, "pass_through_of": pass_of,
            "inputs_quantized_upstream": sum(not m.in_fq for _, m, _, _ in conv_mods),
            "activation_tensors": len(aq), "weights": {"per_channel": bool(recipe.per_channel), "pow2": pow2}}


def learned_params(model) -> dict:
    """{parameter name: parameter} of the learned activation ranges in a (fake-quant) model."""
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in (RANGE_PARAM, IN_RANGE_PARAM)}


def learned_scales(model, placement: dict, pow2: bool) -> dict:
    """{activation tensor: learned scale} of a fake-quant model prepared with learn_ranges (see prepare_qat)."""
    import torch

    out = {}
    with torch.no_grad():
        for t, where in placement["learned"].items():
            p = model.get_submodule(where["module"])._parameters[where["param"]]
            out[t] = float(learned_scale(p.detach().float(), pow2).item())
    return out


def write_learned_ranges(src, dst, scales: dict, placement: dict, qparams: dict, recipe) -> dict:
    """The PTQ ranges file `src` with each learned tensor's range set so that ORT's quantizer gives back exactly
    its learned scale (and its PTQ zero point); tensors that share a learned tensor's quantizer (pass-through ops)
    get the same range. Returns {tensor: expected scale} for every tensor changed."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, load_tensors_data, save_tensors_data

    ranges = load_tensors_data(src)
    data = dict(ranges.data)
    sym_lo, sym_hi = _sym_qrange(recipe)
    expected = {}
    for t, s in scales.items():
        if recipe.activation_symmetric:  # ORT: scale = 2 absmax / (qmax - qmin) of the symmetric int range
            lo, hi = ort_range_for(s, 0, int(sym_lo), int(sym_hi), True)
        else:  # ORT: scale = (rmax - rmin) / (qmax - qmin), zero point qmin - rmin / scale
            _, zp, qmin, qmax = qparams[t]
            lo, hi = ort_range_for(s, zp, qmin, qmax, False)
        data[t] = TensorData(lowest=np.array([lo], np.float32), highest=np.array([hi], np.float32))
        expected[t] = s
    for t in placement["pass_through_of"]:
        r = t
        while r in placement["pass_through_of"]:
            r = placement["pass_through_of"][r]
        if r in expected:
            data[t] = data[r]
            expected[t] = expected[r]
    save_tensors_data(TensorsData(ranges.calibration_method, data), dst)
    return expected
