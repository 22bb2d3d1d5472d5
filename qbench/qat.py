"""Quantization-aware fine-tuning (QAT) that matches a PTQ recipe/profile, and its INT8 ONNX export.

`qat(weights, data, out, recipe, profile, ...)` runs these stages in one folder (each skipped when its output is
already there, so re-running the same command after an interruption resumes):

1. `fp32.onnx`: the FP32 export of `weights`; `ptq/`: ONNX Runtime static PTQ of it with the recipe + profile
   (`quantize_ort`), which also saves the calibrated activation ranges (`ptq/ranges.json`). With recipe key
   `equalize`, fp32.onnx is the equalized export and `equalize.json` holds the scales, which the PyTorch model
   gets too (`qbench.quantize.equalize.equalize_torch`) before the fake quantization goes in.
2. fake quantization read FROM THAT PTQ GRAPH (`prepare_qat`): the ultralytics model is fused (Conv+BN folded, so
   the fake-quantized weights are the deployed ones) and
   - every Conv the PTQ graph quantizes becomes a `QConv2d` (same class layout, same state_dict): its input is
     fake-quantized with the PTQ graph's scale/zero point, its weight per output channel, symmetric int8
     (scale = absmax / 127 as ORT computes it; rounded up to a power of two under pow2 profiles), its bias on the
     int32 grid input scale x weight scale, and its output when the PTQ graph requantizes the Conv output on its
     own (profiles that do not fuse Conv+activation; the detect-branch convs whose outputs the float decode reads);
   - every other quantized tensor that is the output of a module (a Conv block's activation, a Bottleneck's
     residual Add, a Concat layer) gets an `OutputFakeQuant` forward hook with its PTQ scale/zero point;
   - tensors that only pass through with their input's quantizer (Split, MaxPool, Resize) need nothing, and
     tensors read only by quantized Convs (C2f's inner Concat, the image) are fake-quantized at those Convs' inputs.
   Each activation tensor is fake-quantized once (a conv whose input another module already quantizes skips its
   own input quantizer). With `learn_ranges` each of those quantizers learns its scale, LSQ-style:
   a log2 scale parameter initialised at the PTQ value, its exponent rounded to an integer under pow2 profiles
   (zero point and int range stay the PTQ ones, so symmetric stays symmetric); otherwise they stay frozen at the
   PTQ values. The DFL conv and the decode stay float, as in the PTQ graph. Gradients pass straight through (STE).
3. `train/`: fine-tuning with ultralytics' DetectionTrainer (its loss, augmentation, LR schedule, EMA, validation),
   checkpointing `train/weights/last.pt` every epoch; an interrupted run resumes from it on the next call, which
   must ask for the same epochs (the checkpoint's) and settings (`train/qat_settings.json`: range mode, range_lr,
   distill weight), or is refused naming the options to pass.
4. `qat.pt` (the trained model with the fake quantizers stripped: a plain fused ultralytics checkpoint),
   `qat-fp32.onnx` (its FP32 export), `qat/int8.onnx` (quantize_ort with the PTQ ranges, or with
   `qat/ranges.json`, the ranges that give back the learned scales exactly: every activation scale equals the
   fake-quant model's, which is checked).
5. checks and scores: the QAT INT8 ONNX against the PyTorch fake-quant model on a few val images, the int8 kernels
   ORT fused, and FP32 / PTQ / QAT through `qbench.compare.compare` (one evaluation path, latency interleaved);
   `summary.md` and `report.html` (qbench.report: the FP32 / PTQ / QAT table, the training per epoch, the checks);
   `qat.json` is written last (atomically): a folder with qat.json is a finished run.

`u8_activations` (default on) writes int8 activation Q/DQ as uint8 with zero point + 128 in both INT8 models:
the same numbers, but ORT's fast x86 u8s8 kernels (see `constraints.activations_to_uint8`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.nn as nn  # QConv2d subclasses nn.Conv2d at import time: checkpoints pickle it as qbench.qat.QConv2d

from .errors import QbenchError

LOG = logging.getLogger("qbench")

QAT_JSON = "qat.json"
DONE = "done.json"  # written into train/ when fine-tuning finished (ultralytics strips last.pt's epoch at the end)
SESSIONS = "sessions.json"  # one entry per training call: epochs run, seconds, device
EQUALIZE_JSON = "equalize.json"  # the scales of recipe key `equalize`, applied to fp32.onnx and the PyTorch model
SETTINGS = "qat_settings.json"  # the fine-tuning settings ultralytics' train_args cannot hold, checked on resume
MATCH_IMAGES = 4
RANGE_LR = 1e-2  # AdamW step of a log2 activation scale: crossing to the next power of two takes ~50 steps
PASS_THROUGH = frozenset({"Split", "MaxPool", "Resize", "Reshape", "Transpose", "Slice", "Identity", "Flatten",
                          "Squeeze", "Unsqueeze", "Gather"})
HOOKED_OUTPUTS = {"Add": ("Bottleneck",), "Concat": ("Concat",)}  # op -> ultralytics module classes ending in it
ACT_OPS = frozenset({"LeakyRelu", "Relu", "Sigmoid", "Mul", "Clip", "HardSwish", "PRelu"})


# --------------------------------------------------------------------------- fake-quant modules (pickled in ckpts)
def _fq(x, q: tuple):
    """ORT QuantizeLinear -> DequantizeLinear of a per-tensor quantizer q = (scale, zero_point, qmin, qmax)."""
    import torch

    return torch.fake_quantize_per_tensor_affine(x, q[0], q[1], q[2], q[3])


def _pow2_ceil(s):
    import torch

    mant, exp = torch.frexp(s)
    return torch.ldexp(torch.ones_like(s), torch.where(mant == 0.5, exp - 1, exp))


def _ste_round_to(x, scale, lo=None, hi=None):
    """x on the grid `scale` (round half to even, optional clamp in grid units), gradient straight through."""
    import torch

    q = torch.round(x.detach() / scale)
    if lo is not None:
        q = q.clamp(lo, hi)
    return x + (q * scale - x).detach()


RANGE_PARAM = "qat_log2_scale"  # the learned log2 activation scale a module owns (registered: EMA, optimizer, ckpt)
IN_RANGE_PARAM = "qat_in_log2_scale"  # a QConv2d's input scale, when no other module quantizes that tensor


def learned_scale(log2_scale, pow2: bool):
    """2 ** log2_scale; under pow2 profiles the exponent is rounded to an integer (gradient straight through)."""
    import torch

    e = log2_scale + (torch.round(log2_scale) - log2_scale).detach() if pow2 else log2_scale
    return torch.exp2(e)


def _lfq(x, log2_scale, q: tuple, pow2: bool):
    """Fake quantization with a learned scale (LSQ gradient for the scale; zero point and int range fixed)."""
    import torch

    s = learned_scale(log2_scale, pow2).to(x.dtype)
    zp = torch.zeros_like(s) + float(q[1])
    return torch._fake_quantize_learnable_per_tensor_affine(x, s, zp, q[2], q[3], 1.0)


def _range_param_log2(e: float):
    import torch

    return nn.Parameter(torch.tensor([e], dtype=torch.float32))


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




class QConv2d(nn.Conv2d):
    """A Conv2d (class swapped in place, same parameters and state_dict) that computes what ORT's QDQ Conv does.

    Attributes (plain Python values, so half() and EMA leave them alone): in_q / out_q per-tensor quantizers
    (scale, zero_point, qmin, qmax) or None, per_channel, pow2, quant_bias, onnx_node (the Conv in the PTQ graph),
    in_fq (False when the module producing the input already fake-quantizes it).
    With learned ranges, parameters `qat_in_log2_scale` / `qat_log2_scale` replace the scales of in_q / out_q
    (their zero points and int ranges stay), and the bias is rounded to the grid learned input scale x weight
    scale: `in_scale_of` = (module, parameter name) holding the learned scale of this conv's input (a plain
    reference, not a submodule, so state_dict/EMA see the parameter once).
    """

    in_q: tuple | None = None
    out_q: tuple | None = None
    per_channel: bool = True
    pow2: bool = False
    quant_bias: bool = True
    onnx_node: str = ""
    in_fq: bool = True
    in_scale_of: tuple | None = None

    def weight_scale(self):
        import torch

        w = self.weight.detach().float()
        absmax = w.abs().amax(dim=(1, 2, 3)) if self.per_channel else w.abs().amax().reshape(1)
        s = (2 * absmax) / torch.tensor(254.0, dtype=torch.float32, device=w.device)  # ORT: (rmax - rmin) / (127 - -127)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return _pow2_ceil(s) if self.pow2 else s

    def forward(self, x):
        import torch.nn.functional as F

        ps = self._parameters
        if self.in_q is not None and self.in_fq:
            lp = ps.get(IN_RANGE_PARAM)
            x = _fq(x, self.in_q) if lp is None else _lfq(x, lp, self.in_q, self.pow2)
        s = self.weight_scale().to(self.weight.dtype)
        w = _ste_round_to(self.weight, s.reshape(-1, 1, 1, 1), -127, 127)
        b = self.bias
        if b is not None and self.quant_bias and self.in_q is not None:
            if self.in_scale_of is None:
                s_in = self.in_q[0]
            else:
                owner, name = self.in_scale_of
                s_in = learned_scale(owner._parameters[name].detach().float(), self.pow2)
            b = _ste_round_to(b, (s.float() * s_in).to(b.dtype))
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        if self.out_q is not None:
            lp = ps.get(RANGE_PARAM)
            y = _fq(y, self.out_q) if lp is None else _lfq(y, lp, self.out_q, self.pow2)
        return y


class OutputFakeQuant:
    """Forward hook: fake-quantize a module's output with its PTQ quantizer (picklable, no tensors), or, when the
    module owns a `qat_log2_scale` parameter, with that learned scale (PTQ zero point and int range)."""

    pow2: bool = False

    def __init__(self, q: tuple, tensor: str, pow2: bool = False):
        self.q, self.tensor, self.pow2 = tuple(q), tensor, pow2

    def __call__(self, module, inputs, output):
        lp = module._parameters.get(RANGE_PARAM)
        return _fq(output, self.q) if lp is None else _lfq(output, lp, self.q, self.pow2)

    def __repr__(self):
        return f"OutputFakeQuant({self.tensor}, scale={self.q[0]:.6g}, zp={self.q[1]}, [{self.q[2]}, {self.q[3]}])"


def is_prepared(model) -> bool:
    return any(isinstance(m, QConv2d) for m in model.modules())


def strip_qat(model):
    """Remove every fake quantizer in place (QConv2d -> nn.Conv2d, hooks dropped); returns the model."""
    for m in model.modules():
        if isinstance(m, QConv2d):
            for k in ("in_q", "out_q", "per_channel", "pow2", "quant_bias", "onnx_node", "in_fq", "in_scale_of"):
                m.__dict__.pop(k, None)
            m.__class__ = nn.Conv2d
        for k in (RANGE_PARAM, IN_RANGE_PARAM):
            m._parameters.pop(k, None)
        for k, h in list(m._forward_hooks.items()):
            if isinstance(h, OutputFakeQuant):
                del m._forward_hooks[k]
    return model


# --------------------------------------------------------------------------- PTQ graph -> torch placement
def module_for_node(model, node_name: str):
    """(module path, module) of the ultralytics module an exported ONNX node belongs to, or (None, None).

    The exporter names nodes by module scope: '/model.23/cv2.0/cv2.0.2/Conv' is model.23.cv2.0.2 (a nested
    container repeats its parent's name as a prefix); 'm_1' is the second call of module 'm'.
    """
    segs = node_name.strip("/").split("/")[:-1]
    if not segs:
        return None, None
    cur, prev, path = model, None, []
    for seg in segs:
        found = None
        cands = [seg]
        if prev is not None and seg.startswith(prev + "."):
            cands.insert(0, seg[len(prev) + 1:])
        head, _, tail = seg.rpartition("_")
        if head and tail.isdigit():
            cands.append(head)
        for c in cands:
            try:
                found = cur.get_submodule(c)
            except AttributeError:
                continue
            path.append(c)
            break
        if found is None:
            return None, None
        cur, prev = found, seg
    return ".".join(path), cur


def _qparams_of(init: dict, scale_name: str, zp_name: str | None) -> tuple:
    from .analysis.stats import INT_RANGES

    scale = float(np.asarray(init[scale_name], np.float32).reshape(-1)[0])
    zp = init.get(zp_name) if zp_name else None
    dtype = "int8" if zp is not None and zp.dtype == np.int8 else "uint8"
    lo, hi = INT_RANGES[dtype]
    return (scale, int(np.asarray(zp).reshape(-1)[0]) if zp is not None else 0, lo, hi)


def prepare_qat(model, qmodel, recipe, learn_ranges: bool = False, calibrated: dict | None = None) -> dict:
    """Insert fake quantization into a FUSED ultralytics DetectionModel, in place, from the PTQ QDQ graph `qmodel`.

    learn_ranges: every activation tensor quantized in exactly one place gets a learned log2 scale (a parameter
    `qat_log2_scale` / `qat_in_log2_scale` of the module that quantizes it, initialised at the PTQ scale; integer
    exponents under pow2 profiles); otherwise the PTQ quantizers stay frozen.
    calibrated: {tensor: (min, max)}, the PTQ calibration ranges (`read_ranges`). Under pow2 a learned exponent
    then starts where the calibrated scale lies inside the interval that rounds to its PTQ power of two
    (log2(calibrated scale) + 1/2, since PTQ rounds up), not at its centre: a scale that the rounding up
    nearly doubled is a small step from the power below.

    Returns the placement: quantized convs (with their scales), hooked tensors, tensors covered otherwise,
    `learned` (tensor -> module and parameter, with learn_ranges), `pass_through_of` (tensor -> the tensor whose
    quantizer it shares) and `unmapped` (quantized tensors the torch model does not reproduce; empty for YOLO
    C2f/SPPF/Detect models).
    """
    from onnx import numpy_helper

    from .analysis.graph import activation_quantizers

    if not recipe.weight_symmetric or recipe.weight_type != "int8" or recipe.reduce_range:
        raise QbenchError(f"recipe {recipe.name}: QAT reproduces symmetric int8 weights without reduce_range (every "
                          "shipped recipe and profile); set weight_symmetric: true, weight_type: int8, "
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
        return _range_param_log2(e)

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
        mod.__class__ = QConv2d
        mod.in_q = in_q
        mod.out_q = None if out_q is None else (out_q.scale, out_q.zero_point, out_q.qmin, out_q.qmax)
        mod.per_channel = bool(recipe.per_channel)
        mod.pow2 = bool(recipe.pow2_scales)
        mod.quant_bias = len(n.input) > 2 and dq_of(n.input[2]) is not None
        mod.onnx_node = n.name
        q = producer.get(x_dq.input[0])
        in_t = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else x_dq.input[0]
        covered_by_conv.add(in_t)
        conv_mods.append((path, mod, in_t, n.output[0]))
        convs.append({"node": n.name, "module": path, "input_scale": in_q[0], "input_zero_point": in_q[1],
                      "output_quantized": mod.out_q is not None, "bias_quantized": mod.quant_bias})
    hooked, passthrough, at_conv_input, unmapped, learned, pass_of = [], [], [], [], {}, {}
    conv_nodes = {c["node"] for c in convs}
    q_out = {n.input[0]: n.output[0] for n in g.node if n.op_type == "QuantizeLinear"}
    for t, a in aq.items():
        if a.producer == "Conv" and a.producer_node in conv_nodes:
            continue  # a QConv2d's out_q
        qp = (a.qparams.scale, a.qparams.zero_point, a.qparams.qmin, a.qparams.qmax)
        node = producer.get(t) if a.producer != "input" else None
        target = None
        if node is not None:
            path, mod = module_for_node(model, node.name)
            if node.op_type in ACT_OPS and path and path.endswith(".act"):
                parent_path = path.rsplit(".", 1)[0]
                parent = model.get_submodule(parent_path)
                if getattr(parent, "act", None) is not None and node.op_type != "Mul":
                    target = (parent_path, parent)
            elif node.op_type in HOOKED_OUTPUTS and type(mod).__name__ in HOOKED_OUTPUTS[node.op_type]:
                target = (path, mod)
        if target is not None:
            target[1].register_forward_hook(OutputFakeQuant(qp, t, bool(recipe.pow2_scales)))
            hooked.append({"tensor": t, "module": target[0], "scale": qp[0], "zero_point": qp[1]})
            if learn_ranges:
                target[1].register_parameter(RANGE_PARAM, log2_init(t, qp[0]))
                learned[t] = {"module": target[0], "param": RANGE_PARAM}
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
        unmapped.append({"tensor": t, "producer": a.producer_node, "consumers": a.consumers})
    if problems:
        raise RuntimeError(f"the PTQ graph's convs do not map onto the PyTorch model: {problems[:3]}")
    # a conv whose input another module already fake-quantizes (a hooked output, a quantized conv output, or a
    # tensor passing those through) skips its own input quantizer: the same numbers (frozen) or the same learned
    # scale (learned ranges), quantized once
    upstream = {h["tensor"] for h in hooked} | {o for _, m, _, o in conv_mods if m.out_q is not None}

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
    return {"quantized_convs": len(convs), "hooked_outputs": len(hooked), "pass_through": len(passthrough),
            "at_conv_inputs": len(at_conv_input), "unmapped": unmapped, "convs": convs, "hooks": hooked,
            "learned": learned, "pass_through_of": pass_of,
            "inputs_quantized_upstream": sum(not m.in_fq for _, m, _, _ in conv_mods),
            "activation_tensors": len(aq), "weights": {"per_channel": bool(recipe.per_channel),
                                                       "pow2": bool(recipe.pow2_scales)}}


# --------------------------------------------------------------------------- ultralytics trainer
class DistillLoss:
    """ultralytics' detection loss plus `weight` x a distillation term from the FP32 model on the same batch.

    The term pulls the fake-quant model's raw head outputs towards the FP32 model's: class scores by the binary KL
    divergence from the FP32 sigmoid scores (normalised by their sum, as ultralytics normalises its class loss),
    and each box side's DFL distribution by the KL divergence from the FP32 one, weighted per anchor by the FP32
    top class score. Both models see the same augmented images; the labels still drive the detection loss.
    A plain object (not an nn.Module), so the teacher is no parameter of the student, its EMA or the optimizer.
    """

    def __init__(self, base, teacher, weight: float):
        self.base, self.teacher, self.weight = base, teacher, float(weight)

    def __getattr__(self, name):  # the trainer calls criterion.update() etc. when the base loss has them
        if name in ("base", "teacher", "weight") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, preds, batch):
        import torch
        import torch.nn.functional as F

        loss, items = self.base(preds, batch)
        p = self.base.parse_output(preds)
        if not isinstance(p, dict) or "scores" not in p or "boxes" not in p:
            raise QbenchError("--distill supports detection heads whose training output has 'boxes' and 'scores' "
                              "(YOLOv8/11-style Detect); this model's has not.")
        with torch.no_grad():
            t = self.base.parse_output(self.teacher(batch["img"]))
        t_logit = t["scores"].float()
        t_cls = t_logit.sigmoid()
        bce = F.binary_cross_entropy_with_logits  # minus the FP32 scores' own entropy: a KL divergence, 0 at a match
        cls = (bce(p["scores"].float(), t_cls, reduction="sum") - bce(t_logit, t_cls, reduction="sum")) \
            / t_cls.sum().clamp(min=1)
        b, c, n = p["boxes"].shape
        s_log = p["boxes"].float().reshape(b, 4, c // 4, n).log_softmax(2)
        t_log = t["boxes"].float().reshape(b, 4, c // 4, n).log_softmax(2)
        kl = (t_log.exp() * (t_log - s_log)).sum(2).sum(1)  # (b, n): the four sides of each anchor
        w = t_cls.amax(1)
        dfl = (kl * w).sum() / w.sum().clamp(min=1e-6)
        extra = self.weight * (cls + dfl) * b  # ultralytics sums the loss vector (box, cls, dfl): add it once
        return loss + extra / loss.numel(), items


def _trainer_class(range_lr: float, teacher=None, distill: float = 0.0):
    from . import ultra  # noqa: F401
    from ultralytics.models.yolo.detect import DetectionTrainer

    class QATTrainer(DetectionTrainer):
        """DetectionTrainer that trains the fake-quant model it is given (or, on resume, the checkpoint's); learned
        activation ranges get their own parameter group (lr `range_lr`, no weight decay, same LR schedule)."""

        def get_model(self, cfg=None, weights=None, verbose=True):
            if weights is not None and is_prepared(weights):
                return weights  # resume: the checkpoint holds the fake-quant model itself
            raise RuntimeError("QATTrainer needs a prepared model (trainer.model) or a QAT checkpoint to resume")

        def _setup_train(self):
            super()._setup_train()
            if distill > 0:  # after the EMA copy: the EMA and the checkpoints never hold the teacher
                m = self.model.module if hasattr(self.model, "module") else self.model
                teacher.to(self.device).eval()
                for p in teacher.parameters():
                    p.requires_grad_(False)
                m.criterion = DistillLoss(m.init_criterion(), teacher, distill)

        def build_optimizer(self, model, *args, **kwargs):
            opt = super().build_optimizer(model, *args, **kwargs)
            ranges = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in (RANGE_PARAM, IN_RANGE_PARAM)]
            if ranges:
                ids = {id(p) for p in ranges}
                for group in opt.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in ids]
                opt.add_param_group({**{k: v for k, v in opt.param_groups[0].items() if k != "params"},
                                     "params": ranges, "lr": range_lr, "weight_decay": 0.0,
                                     "param_group": "qat_ranges"})
            return opt

    return QATTrainer


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(p: Path, default):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return default


def _check_args(weights, data, out, epochs, recipe, profile, fusion, batch, lr0, device):
    from .data.dataset import load_data_yaml
    from .quantize.profile import apply_profile

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise QbenchError(f"epochs {epochs!r} must be a whole number >= 1 (QAT fine-tuning typically needs 1-10).")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise QbenchError(f"batch {batch!r} must be a whole number >= 2, e.g. 16.")
    if not isinstance(lr0, (int, float)) or isinstance(lr0, bool) or not 0 < lr0 < 1:
        raise QbenchError(f"lr0 {lr0!r} must be a number between 0 and 1, e.g. 1e-4 for QAT fine-tuning.")
    w = Path(weights)
    if not w.is_file():
        raise QbenchError(f"Weights file '{w}' does not exist; pass the path of a trained best.pt.")
    rec = apply_profile(recipe, profile, fusion)  # QbenchError for unknown recipe/profile/fusion
    if rec.shift_negative:
        raise QbenchError(f"recipe {rec.name} sets 'shift_negative', which QAT does not support yet (the fake "
                          "quantization would need the same shifts in the PyTorch model); use a recipe without it.")
    load_data_yaml(data, require=("train", "val"))
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise QbenchError(f"output '{o}' is a file; pass a folder for the QAT run.")
    if str(device).lower() not in ("cpu",) and not str(device).replace(",", "").isdigit() and device != "":
        raise QbenchError(f"device {device!r} is not 'cpu' or a CUDA index like '0'.")
    return rec


def _ptq_stage(weights: Path, data, out: Path, rec, calib, imgsz: int, u8: bool, progress: bool) -> dict:
    from .calibration import build_manifest, save_manifest
    from .models.export import export_onnx
    from .quantize.ort_engine import quantize_ort

    fp32 = out / "fp32.onnx"
    ptq = out / "ptq" / "int8.onnx"
    ranges = out / "ptq" / "ranges.json"
    rep_path = out / "ptq" / "quantize.json"
    if fp32.exists() and ptq.exists() and ranges.exists() and rep_path.exists() \
            and (rec.equalize == 0 or (out / EQUALIZE_JSON).exists()):
        return _read_json(rep_path, {})
    if calib is None:
        from .data.dataset import image_files, load_data_yaml

        n = min(rec.calib_size, len(image_files(load_data_yaml(data, require=("train",)), "train")))
        calib = save_manifest(build_manifest(data, n, seed=0), out / "calibration.json")
    if rec.equalize > 0:  # quantize_ort equalizes; fp32.onnx is its equalized model, whose scales the PyTorch
        plain = out / "fp32-unequalized.onnx"  # model takes too (equalize.json)
        export_onnx(weights, plain, imgsz=imgsz)
        rep = quantize_ort(plain, ptq, rec, calib, imgsz=imgsz, progress=progress, save_ranges=ranges,
                           u8_activations=u8, save_prepared=fp32)
        plain.unlink()
        _atomic_write_text(out / EQUALIZE_JSON, json.dumps(rep["equalize"], indent=2) + "\n")
    else:
        if not fp32.exists():
            export_onnx(weights, fp32, imgsz=imgsz)
        rep = quantize_ort(fp32, ptq, rec, calib, imgsz=imgsz, progress=progress, save_ranges=ranges,
                           u8_activations=u8)
    _atomic_write_text(rep_path, json.dumps(rep, indent=2, default=str) + "\n")
    return rep


def _train_stage(model, weights: Path, data, out: Path, epochs: int, imgsz: int, batch: int, lr0: float,
                 range_lr: float, teacher, distill: float, device: str, workers: int, callbacks: dict | None,
                 overrides: dict) -> dict:
    """Fine-tune (or resume); returns {"resumed_from_epoch", "sessions", "done"}."""
    import torch

    tdir = out / "train"
    last = tdir / "weights" / "last.pt"
    done = tdir / DONE
    sessions = _read_json(tdir / SESSIONS, [])
    if done.exists():
        return {"resumed_from_epoch": None, "sessions": sessions, "skipped": True}
    Trainer = _trainer_class(range_lr, teacher, distill)
    learned = bool(_learned_params(model))
    settings = {"learn_ranges": learned, "distill": distill, **({"range_lr": range_lr} if learned else {})}
    resume_from = None
    if last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        ck_epochs = int((ck.get("train_args") or {}).get("epochs", -1))
        resume_from = int(ck.get("epoch", -1)) + 1
        del ck
        if ck_epochs != epochs:
            raise QbenchError(f"'{out}' holds an interrupted QAT run of {ck_epochs} epochs; re-run with --epochs "
                              f"{ck_epochs} to resume it, or choose another --out.")
        before = _read_json(tdir / SETTINGS, None)
        if before is not None and before != settings:
            flags = " ".join(_settings_flag(k, before.get(k)) for k in sorted({*before, *settings})
                             if before.get(k) != settings.get(k) and k in before)
            raise QbenchError(f"'{out}' holds an interrupted QAT run with other settings; re-run with {flags} to "
                              f"resume it, or choose another --out.")
    args = dict(model=str(weights), data=str(Path(data).resolve()), epochs=epochs, imgsz=imgsz, batch=batch,
                device=device, workers=workers, seed=0, deterministic=True, amp=False, plots=False,
                project=str(out.resolve()), name="train", exist_ok=True, verbose=False,
                optimizer="AdamW", lr0=lr0, lrf=0.1, warmup_epochs=0, cos_lr=False, save_period=-1, val=True,
                # no mosaic: QAT fine-tunes in the regime the original training ended in (its close_mosaic
                # epochs); ultralytics closes mosaic at epoch `epochs - close_mosaic`, here the first
                close_mosaic=epochs)
    args.update(overrides)
    t0 = time.time()
    tdir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(tdir / SETTINGS, json.dumps(settings) + "\n")
    if resume_from is not None and resume_from >= epochs:  # finished, but interrupted before the done marker
        trainer = None
    elif resume_from is not None and resume_from > 0:
        trainer = Trainer(overrides={**args, "resume": str(last), "save_dir": str(tdir.resolve())})
    else:
        trainer = Trainer(overrides=args)
        trainer.model = model
        resume_from = 0
    if trainer is not None:
        for event, fn in (callbacks or {}).items():
            trainer.add_callback(event, fn)
        try:
            with _fp32_checkpoints():
                trainer.train()
        finally:
            end = _last_epoch(tdir)
            sessions.append({"start_epoch": resume_from + 1, "end_epoch": end, "seconds": round(time.time() - t0, 1),
                             "device": str(trainer.device)})
            _atomic_write_text(tdir / SESSIONS, json.dumps(sessions, indent=2) + "\n")
    _atomic_write_text(done, json.dumps({"epochs": epochs}) + "\n")
    return {"resumed_from_epoch": resume_from + 1 if resume_from else None, "sessions": sessions, "skipped": False}


def _settings_flag(key: str, value) -> str:
    """The `qbench qat` option that gives setting `key` (train/qat_settings.json) the value `value`."""
    if key == "learn_ranges":
        return "--learn-ranges" if value else "--freeze-ranges"
    return f"--{key.replace('_', '-')} {value}"


@contextlib.contextmanager
def _fp32_checkpoints():
    """ultralytics saves the EMA with `.half()` (save_model, strip_optimizer): a QAT model's weights then land on
    different int8 codes than the ones it was validated with. While training, `Module.half` is a no-op, so
    last.pt/best.pt hold the fp32 EMA that ultralytics' per-epoch validation scored."""
    import torch.nn as nn

    half = nn.Module.half
    nn.Module.half = lambda self: self
    try:
        yield
    finally:
        nn.Module.half = half


def _learned_params(model) -> dict:
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


def write_learned_ranges(src: Path, dst: Path, scales: dict, placement: dict, qparams: dict, recipe) -> dict:
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
            hi = np.float64(s) * (sym_hi - sym_lo) / 2
            lo = -hi
        else:  # ORT: scale = (rmax - rmin) / (qmax - qmin), zero point qmin - rmin / scale
            _, zp, qmin, qmax = qparams[t]
            lo, hi = (qmin - zp) * np.float64(s), (qmax - zp) * np.float64(s)
        td = TensorData(lowest=np.array([lo], np.float32), highest=np.array([hi], np.float32))
        data[t] = td
        expected[t] = s
    for t, src_t in placement["pass_through_of"].items():
        r = src_t
        while r in placement["pass_through_of"]:
            r = placement["pass_through_of"][r]
        if r in expected:
            data[t] = data[r]
            expected[t] = expected[r]
    save_tensors_data(TensorsData(ranges.calibration_method, data), dst)
    return expected


def _last_epoch(tdir: Path) -> int:
    csv = tdir / "results.csv"
    if not csv.exists():
        return 0
    rows = [r for r in csv.read_text().strip().splitlines()[1:] if r.strip()]
    return int(float(rows[-1].split(",")[0])) if rows else 0


def _results(tdir: Path) -> list[dict]:
    csv = tdir / "results.csv"
    if not csv.exists():
        return []
    lines = csv.read_text().strip().splitlines()
    head = [h.strip() for h in lines[0].split(",")]
    return [{h: float(v) for h, v in zip(head, r.split(","))} for r in lines[1:] if r.strip()]


def load_qat_model(path: str | os.PathLike):
    """The fake-quant model of a QAT checkpoint (train/weights/best.pt or last.pt), float32, eval, CPU."""
    from . import ultra  # noqa: F401
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(path), device="cpu")
    if not is_prepared(model):
        raise QbenchError(f"'{path}' holds no fake-quant model; pass a checkpoint written by `qbench qat`.")
    return model.float().eval()


def _save_plain(model, src_ckpt: Path, dst: Path, imgsz: int) -> Path:
    """A plain ultralytics checkpoint (fake quantizers stripped) that `export_onnx` and `YOLO()` load."""
    import torch

    plain = strip_qat(copy.deepcopy(model))  # fp32: exactly the weights the fake-quant model was scored with
    for p in plain.parameters():
        p.requires_grad = False
    ck = torch.load(src_ckpt, map_location="cpu", weights_only=False)
    train_args = dict(ck.get("train_args") or {})
    train_args["imgsz"] = imgsz
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"model": plain, "ema": None, "epoch": -1, "train_args": train_args,
                    "date": ck.get("date"), "version": ck.get("version"), "qbench": "qat, fake quantizers stripped"},
                   tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def match_onnx(model, onnx_path: str | os.PathLike, data, imgsz: int, n: int = MATCH_IMAGES,
               threads: int | None = None) -> dict:
    """The fake-quant PyTorch model vs the INT8 ONNX on n val images: ORT with every optimisation (fused int8
    kernels) and without (the QDQ graph simulated in float). Errors on box rows (pixels) and class scores."""
    import torch

    from .data.dataset import image_files, load_data_yaml, read_image
    from .data.preprocess import letterbox, to_input
    from .runtime import ort_session

    spec = load_data_yaml(data, require=("val",))
    files = image_files(spec, "val")[:n]
    x = to_input([letterbox(read_image(f), imgsz)[0] for f in files])
    with torch.inference_mode():
        y = model(torch.from_numpy(x))
    ref = (y[0] if isinstance(y, (list, tuple)) else y).float().numpy()
    with torch.inference_mode():
        yf = strip_qat(copy.deepcopy(model))(torch.from_numpy(x))
    flt = (yf[0] if isinstance(yf, (list, tuple)) else yf).float().numpy()
    out = {"images": len(files)}
    sess = ort_session(onnx_path, threads, optimize=True)
    opt_out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    for label, opt in (("ort_optimized", True), ("ort_qdq_simulated", False), ("baseline_float_torch", None)):
        if opt is None:  # for scale: the same weights WITHOUT fake quantization against the int8 kernels
            got, ref = opt_out, flt
        elif opt:
            got = opt_out
        else:
            sess = ort_session(onnx_path, threads, optimize=False)
            got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        d = np.abs(got - ref)
        noise = float(np.mean((got - ref).astype(np.float64) ** 2))
        sig = float(np.mean(ref.astype(np.float64) ** 2))
        out[label] = {"box_max_abs_px": float(d[:, :4].max()), "box_mean_abs_px": float(d[:, :4].mean()),
                      "score_max_abs": float(d[:, 4:].max()), "score_mean_abs": float(d[:, 4:].mean()),
                      "sqnr_db": float(10 * np.log10(sig / noise)) if noise > 0 else float("inf")}
    return out


def qat_command(weights, data, out, recipe, profile, fusion, calib, epochs, imgsz, batch, lr0, device, workers,
                u8_activations, learn_ranges, range_lr, distill, train_overrides: dict) -> str:
    """The `qbench qat` command line that repeats a `qat()` call (options at their CLI defaults left out); calls
    with ultralytics overrides the CLI has no option for say so instead."""
    import shlex

    def q(v) -> str:
        return shlex.quote(str(v))

    parts = ["qbench qat", f"--weights {q(weights)}", f"--data {q(data)}"]
    parts += [f"--{k} {q(v)}" for k, v in (("recipe", None if recipe == "default" else recipe), ("profile", profile),
                                            ("fusion", fusion), ("calib", calib)) if v is not None]
    parts.append(f"--epochs {epochs}")
    parts += [f"--{k} {v}" for k, v, default in (("imgsz", imgsz, None), ("batch", batch, 16), ("lr0", lr0, 1e-4),
                                                 ("device", device, "cpu"), ("workers", workers, 2))
              if v != default]
    parts += ["--no-u8"] if not u8_activations else []
    parts += [f"--learn-ranges --range-lr {range_lr:g}"] if learn_ranges else []
    parts += [f"--distill {distill:g}"] if distill else []
    rest = dict(train_overrides)
    seed = rest.pop("seed", 0)
    parts += [f"--seed {seed}"] if seed else []
    parts.append(f"--out {q(out)}")
    cmd = " ".join(parts)
    return cmd if not rest else f"qbench.qat.qat(...) with ultralytics overrides {rest} (no CLI option); nearest: {cmd}"


# --------------------------------------------------------------------------- entry point
def qat(weights: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, recipe: str | None = "default",
        profile: str | None = None, fusion: str | None = None, calib: str | os.PathLike | None = None,
        epochs: int = 3, imgsz: int | None = None, batch: int = 16, lr0: float = 1e-4, device: str = "cpu",
        workers: int = 2, u8_activations: bool = True, learn_ranges: bool = False, range_lr: float = RANGE_LR,
        distill: float = 0.0,
        evaluate: bool = True, eval_limit: int | None = None, progress: bool = False, callbacks: dict | None = None,
        **train_overrides) -> dict:
    """Quantization-aware fine-tuning matching a PTQ recipe/profile, exported to an INT8 QDQ ONNX (see module doc).

    Re-running the same call after an interruption resumes (PTQ and export stages are skipped when their files
    exist; training resumes from train/weights/last.pt). `train_overrides` go to ultralytics (e.g. optimizer='SGD',
    close_mosaic=0, fraction=0.5). Returns the qat.json report.
    """
    import torch

    from .models.load import checkpoint_imgsz, load_checkpoint

    t_all = time.time()
    imgsz_arg = imgsz
    rec = _check_args(weights, data, out, epochs, recipe, profile, fusion, batch, lr0, device)
    if not isinstance(range_lr, (int, float)) or isinstance(range_lr, bool) or not 0 < range_lr < 1:
        raise QbenchError(f"range_lr {range_lr!r} must be a number between 0 and 1, e.g. {RANGE_LR}.")
    if not isinstance(distill, (int, float)) or isinstance(distill, bool) or not 0 <= distill <= 100:
        raise QbenchError(f"distill {distill!r} must be a weight between 0 (off) and 100, e.g. 1.")
    weights, out = Path(weights), Path(out)
    if (out / QAT_JSON).exists():
        raise QbenchError(f"'{out}' already holds a finished QAT run ({QAT_JSON}); choose another --out or delete it.")
    yolo = load_checkpoint(weights)  # QbenchError for anything that is not a YOLO detection checkpoint
    if imgsz is None:
        imgsz = checkpoint_imgsz(yolo) or 640
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % 32:
        raise QbenchError(f"imgsz {imgsz!r} must be a positive multiple of 32, e.g. 640.")
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    t = time.time()
    ptq_rep = _ptq_stage(weights, data, out, rec, calib, imgsz, u8_activations, progress)
    seconds["ptq"] = round(time.time() - t, 1)

    import onnx

    qmodel = onnx.load(str(out / "ptq" / "int8.onnx"))
    model = copy.deepcopy(yolo.model).float()
    model.fuse(verbose=False)
    if rec.equalize > 0:  # the same rescaling as fp32.onnx, the model the PTQ graph was quantized from
        from .quantize.equalize import equalize_torch

        equalize_torch(model, _read_json(out / EQUALIZE_JSON, {}))
        rec = rec.replace(equalize=0.0)  # the QAT export quantizes qat-fp32.onnx, which is equalized already
    teacher = copy.deepcopy(model) if distill > 0 else None  # the FP32 model the fake-quant one is distilled from
    placement = prepare_qat(model, qmodel, rec, learn_ranges=learn_ranges,
                            calibrated=read_ranges(out / "ptq" / "ranges.json"))
    if placement["unmapped"]:
        LOG.warning(f"{len(placement['unmapped'])} quantized tensors of the PTQ graph have no fake quantizer in the "
                    f"PyTorch model: {[u['tensor'] for u in placement['unmapped'][:5]]}")
    del yolo

    t = time.time()
    train_info = _train_stage(model, weights, data, out, epochs, imgsz, batch, lr0, range_lr, teacher, distill,
                              str(device), workers, callbacks, train_overrides)
    seconds["train_this_call"] = round(time.time() - t, 1)

    tdir = out / "train"
    best = tdir / "weights" / ("best.pt" if (tdir / "weights" / "best.pt").exists() else "last.pt")
    trained = load_qat_model(best)
    plain_pt = _save_plain(trained, best, out / "qat.pt", imgsz)

    t = time.time()
    from .analysis.graph import activation_quantizers
    from .models.export import export_onnx
    from .quantize.ort_engine import quantize_ort

    qat_fp32 = out / "qat-fp32.onnx"
    if not qat_fp32.exists():
        export_onnx(plain_pt, qat_fp32, imgsz=imgsz)
    qat_int8 = out / "qat" / "int8.onnx"
    qat_rep_path = out / "qat" / "quantize.json"
    a_ptq = activation_quantizers(qmodel)
    ranges = out / "ptq" / "ranges.json"
    expected = {}
    if learn_ranges:  # the learned scales, written as the ranges ORT quantizes the QAT model with
        (out / "qat").mkdir(exist_ok=True)
        scales = learned_scales(trained, placement, bool(rec.pow2_scales))
        expected = write_learned_ranges(ranges, out / "qat" / "ranges.json", scales, placement,
                                        {t: (a.qparams.scale, a.qparams.zero_point, a.qparams.qmin, a.qparams.qmax)
                                         for t, a in a_ptq.items()}, rec)
        ranges = out / "qat" / "ranges.json"
    if not (qat_int8.exists() and qat_rep_path.exists()):
        qrep = quantize_ort(qat_fp32, qat_int8, rec, None, imgsz=imgsz, ranges=ranges, u8_activations=u8_activations)
        _atomic_write_text(qat_rep_path, json.dumps(qrep, indent=2, default=str) + "\n")
    qrep = _read_json(qat_rep_path, {})
    seconds["export"] = round(time.time() - t, 1)
    a_qat = activation_quantizers(onnx.load(str(qat_int8)))
    differ = []
    for k, a in a_ptq.items():
        b, q = a_qat.get(k), a.qparams
        if b is None or (b.qparams.zero_point, b.qparams.qmin, b.qparams.qmax) != (q.zero_point, q.qmin, q.qmax) \
                or not np.isclose(b.qparams.scale, expected.get(k, q.scale), rtol=1e-6, atol=0):
            differ.append(k)
    if differ:
        raise RuntimeError(f"the QAT INT8 model's activation quantizers differ from the fake-quant model's: "
                           f"{differ[:5]}")
    range_changes = [{"tensor": k, "ptq_scale": a_ptq[k].qparams.scale, "qat_scale": v} for k, v in expected.items()
                     if k in placement["learned"] and not np.isclose(v, a_ptq[k].qparams.scale, rtol=1e-6, atol=0)]

    t = time.time()
    match = match_onnx(trained, qat_int8, data, imgsz)
    seconds["match"] = round(time.time() - t, 1)
    ops = qrep.get("ort_optimized_ops", {})
    kernels = {"QLinearConv": ops.get("QLinearConv", 0), "float_Conv": ops.get("Conv", 0),
               "quantized_convs": placement["quantized_convs"], "qlinear_ops": qrep.get("qlinear_ops", {}),
               "ptq_qlinear_ops": ptq_rep.get("qlinear_ops", {})}

    cmp = None
    if evaluate:
        from .compare import compare
        from .evaluate import EvalSettings, delta_interval

        t = time.time()
        c = compare(out / "fp32.onnx", out / "ptq" / "int8.onnx", data, EvalSettings(limit=eval_limit),
                    progress=progress, extra={"qat": qat_int8}, keep_stats=True)
        stats = c.pop("image_stats")
        seconds["compare"] = round(time.time() - t, 1)
        rows = c["models"]
        f, p, q = (rows[k]["metrics"]["mAP50-95"] for k in ("fp32", "int8", "qat"))
        cmp = {"table": {k: {"mAP50": r["metrics"]["mAP50"], "mAP50-95": r["metrics"]["mAP50-95"],
                             "delta_mAP50-95": r["delta"]["mAP50-95"], "batch1_median_ms": r["latency"]
                             ["batch1_median_ms"], "speedup_batch1": r["speedup_batch1"], "size_mb": r["size_mb"],
                             "delta_ci95_mAP50-95": r["delta_ci95"]["mAP50-95"]}
                         for k, r in rows.items()},
               # paired bootstrap over the val images of QAT - PTQ: whether the gain is resolved at all
               "qat_minus_ptq": q - p, "qat_minus_ptq_ci95": delta_interval(stats["int8"], stats["qat"]),
               "ptq_drop": f - p, "qat_drop": f - q,
               "recovered_fraction": (q - p) / (f - p) if f - p > 0 else None,
               "threads": c["threads"], "settings": c["settings"]}
        _atomic_write_text(out / "compare.json", json.dumps(c, indent=2, default=str) + "\n")

    import ultralytics

    sessions = train_info["sessions"]
    report = {
        "command": qat_command(weights, data, out, recipe, profile, fusion, calib, epochs, imgsz_arg, batch, lr0,
                               device, workers, u8_activations, learn_ranges, range_lr, distill, train_overrides),
        "weights": str(weights), "data": str(data), "out": str(out), "recipe": rec.name, "profile": profile,
        "calibration": str(calib if calib is not None else out / "calibration.json"),
        "fusion": rec.activation_fusion, "u8_activations": u8_activations, "imgsz": imgsz,
        "activation_ranges": {"mode": "learned" if learn_ranges else "frozen at PTQ", "range_lr": range_lr,
                              "learned_tensors": len(placement["learned"]),
                              "changed_from_ptq": len(range_changes), "changes": range_changes},
        "epochs": epochs, "epochs_run": _last_epoch(tdir), "device": str(device), "batch": batch, "lr0": lr0,
        "distill": distill,
        "equalize": {k: v for k, v in _read_json(out / EQUALIZE_JSON, {}).items() if k != "layers"} or None,
        "train_overrides": train_overrides, "resumed_from_epoch": train_info["resumed_from_epoch"],
        "train_sessions": sessions, "train_seconds": round(sum(s["seconds"] for s in sessions), 1),
        "train_results": _results(tdir), "checkpoint": str(best),
        "models": {"fp32": str(out / "fp32.onnx"), "ptq": str(out / "ptq" / "int8.onnx"), "qat_pt": str(plain_pt),
                   "qat_fp32": str(qat_fp32), "qat": str(qat_int8)},
        "placement": {k: v for k, v in placement.items() if k not in ("convs", "hooks", "learned", "pass_through_of")},
        "onnx_vs_torch": match, "kernels": kernels, "compare": cmp,
        "seconds": {**seconds, "total_this_call": round(time.time() - t_all, 1)},
        "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__,
                     "python": platform.python_version()},
    }
    (out / "placement.json").write_text(json.dumps(placement, indent=2, default=str) + "\n")
    if cmp is not None:  # summary.md + report.html (qbench.report): the table, the training, the checks
        from .report.render import load_run, write_report

        write_report([load_run(out, qat=report)], out)  # qat.json is not written yet: the report comes from memory
    _atomic_write_text(out / QAT_JSON, json.dumps(report, indent=2, default=str) + "\n")
    return report
