"""Fake-quantization modules that compute what ONNX Runtime's QDQ graph computes (pickled in QAT checkpoints).

Every module here is an in-place class swap of the ultralytics module it replaces (same parameters, same
state_dict), carrying its quantizers as plain Python tuples (scale, zero_point, qmin, qmax) so that half(), EMA
and deepcopy leave them alone; `strip_qat` swaps them back:

- `QConv2d` (nn.Conv2d): input, per-channel weight, int32 bias and (when the graph requantizes it) output;
- `OutputFakeQuant`: a forward hook that quantizes a module's output (a Conv block's activation, a Bottleneck's
  residual Add, a Concat layer);
- `QSiLU` (nn.SiLU): SiLU exported as x * Sigmoid(x), with the Sigmoid's own output quantizer (ORT's
  QLinearSigmoid); one instance per Conv block (ultralytics shares one SiLU across blocks);
- `QAttention`, `QPSABlock` (ultralytics' C2PSA attention): the tensors inside their forward that the graph
  quantizes (scaled queries, attention scores, softmax, attention x values, the positional-encoding sum, the two
  residual Adds).

`capture()` records every fake-quantized tensor by its ONNX name, which the self-check compares with ONNX
Runtime's tensor by tensor (`qbench.qatrain.check`), optionally continuing each forward from ONNX Runtime's values.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from ultralytics.nn.modules.block import Attention, PSABlock  # noqa: E402

from .. import ultra  # noqa: F401  (ultralytics offline, before its first import)

RANGE_PARAM = "qat_log2_scale"  # the learned log2 activation scale a module owns (registered: EMA, optimizer, ckpt)
IN_RANGE_PARAM = "qat_in_log2_scale"  # a QConv2d's input scale, when no other module quantizes that tensor
TAP_ATTRS = ("qat_taps", "qat_tensors")

_CAPTURE: dict | None = None
_INJECT: dict | None = None


@contextlib.contextmanager
def capture(inject: dict | None = None):
    """Inside the block, every fake-quantized tensor that has an ONNX name is recorded: {name: tensor}. With
    `inject` ({name: array}), the forward then continues from the injected value instead of its own (same shape
    required), so each recorded tensor differs from the injected one only by its own computation."""
    global _CAPTURE, _INJECT
    before = _CAPTURE, _INJECT
    _CAPTURE, _INJECT = {}, inject
    try:
        yield _CAPTURE
    finally:
        _CAPTURE, _INJECT = before


def _record(name: str | None, y):
    if _CAPTURE is not None and name:
        _CAPTURE[name] = y.detach().float().clone()
        if _INJECT is not None and name in _INJECT and tuple(_INJECT[name].shape) == tuple(y.shape):
            return torch.tensor(_INJECT[name], dtype=y.dtype, device=y.device)  # a copy: ultralytics acts are in place
    return y


def fake_quant(x, scale, zero_point: float, qmin: float, qmax: float):
    """QuantizeLinear -> DequantizeLinear exactly as ONNX Runtime computes it: clamp(round_half_even(x / scale) +
    zero_point) - zero_point, times scale, all in float32. (torch's fake_quantize ops multiply by 1/scale, which
    rounds differently at ties: a LeakyReLU(0.1) output whose scale equals its Conv input's lands on ties by
    construction.) Gradients: straight through inside the int range, zero outside; for a tensor `scale`, LSQ's
    (round(x/s) - x/s inside, the clamp bound outside)."""
    xs = x / scale
    r = xs + (torch.round(xs) - xs).detach()
    return (torch.clamp(r + zero_point, qmin, qmax) - zero_point) * scale


def _fq(x, q: tuple, name: str | None = None):
    """ORT QuantizeLinear -> DequantizeLinear of a per-tensor quantizer q = (scale, zero_point, qmin, qmax)."""
    return _record(name, fake_quant(x, float(q[0]), float(q[1]), float(q[2]), float(q[3])))


def pow2_ceil(s):
    mant, exp = torch.frexp(s)
    return torch.ldexp(torch.ones_like(s), torch.where(mant == 0.5, exp - 1, exp))


def _ste_round_to(x, scale, lo=None, hi=None):
    """x on the grid `scale` (round half to even, optional clamp in grid units), gradient straight through."""
    q = torch.round(x.detach() / scale)
    if lo is not None:
        q = q.clamp(lo, hi)
    return x + (q * scale - x).detach()


def learned_scale(log2_scale, pow2: bool):
    """2 ** log2_scale; under pow2 profiles the exponent is rounded to an integer (gradient straight through)."""
    e = log2_scale + (torch.round(log2_scale) - log2_scale).detach() if pow2 else log2_scale
    return torch.exp2(e)


def _lfq(x, log2_scale, q: tuple, pow2: bool, name: str | None = None):
    """Fake quantization with a learned scale (LSQ gradient for the scale; zero point and int range fixed)."""
    s = learned_scale(log2_scale, pow2).to(x.dtype)
    return _record(name, fake_quant(x, s, float(q[1]), float(q[2]), float(q[3])))


def range_param_log2(e: float):
    return nn.Parameter(torch.tensor([e], dtype=torch.float32))


class QConv2d(nn.Conv2d):
    """A Conv2d (class swapped in place, same parameters and state_dict) that computes what ORT's QDQ Conv does.

    Attributes: in_q / out_q per-tensor quantizers or None, per_channel, pow2, quant_bias, onnx_node (the Conv in
    the PTQ graph), in_tensor / out_tensor (its ONNX input and output tensors), in_fq (False when the module
    producing the input already fake-quantizes it).
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
    in_tensor: str = ""
    out_tensor: str = ""
    in_fq: bool = True
    in_scale_of: tuple | None = None
    ATTRS = ("in_q", "out_q", "per_channel", "pow2", "quant_bias", "onnx_node", "in_tensor", "out_tensor", "in_fq",
             "in_scale_of")

    def weight_scale(self):
        w = self.weight.detach().float()
        absmax = w.abs().amax(dim=(1, 2, 3)) if self.per_channel else w.abs().amax().reshape(1)
        s = (2 * absmax) / torch.tensor(254.0, dtype=torch.float32, device=w.device)  # ORT: (rmax - rmin) / (127 - -127)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return pow2_ceil(s) if self.pow2 else s

    def forward(self, x):
        import torch.nn.functional as F

        ps = self._parameters
        if self.in_q is not None and self.in_fq:
            lp = ps.get(IN_RANGE_PARAM)
            x = _fq(x, self.in_q, self.in_tensor) if lp is None else _lfq(x, lp, self.in_q, self.pow2, self.in_tensor)
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
            y = _fq(y, self.out_q, self.out_tensor) if lp is None else _lfq(y, lp, self.out_q, self.pow2,
                                                                              self.out_tensor)
        return y


class OutputFakeQuant:
    """Forward hook: fake-quantize a module's output with its PTQ quantizer (picklable, no tensors), or, when the
    module owns a `qat_log2_scale` parameter, with that learned scale (PTQ zero point and int range)."""

    pow2: bool = False

    def __init__(self, q: tuple, tensor: str, pow2: bool = False):
        self.q, self.tensor, self.pow2 = tuple(q), tensor, pow2

    def __call__(self, module, inputs, output):
        lp = module._parameters.get(RANGE_PARAM)
        return _fq(output, self.q, self.tensor) if lp is None else _lfq(output, lp, self.q, self.pow2, self.tensor)

    def __repr__(self):
        return f"OutputFakeQuant({self.tensor}, scale={self.q[0]:.6g}, zp={self.q[1]}, [{self.q[2]}, {self.q[3]}])"


class _Taps:
    """Named quantization points inside a module's forward: qat_taps {role: quantizer}, qat_tensors {role: ONNX
    tensor}. A role the PTQ graph does not quantize passes through unchanged."""

    qat_taps: dict = {}
    qat_tensors: dict = {}

    def tap(self, role: str, x):
        q = self.qat_taps.get(role)
        return x if q is None else _fq(x, q, self.qat_tensors.get(role))


class QSiLU(_Taps, nn.SiLU):
    """SiLU as ONNX computes it after export: x * Sigmoid(x), the Sigmoid output quantized on its own (role
    'sigmoid'); the product is the block's output, quantized by its block's OutputFakeQuant."""

    ROLES = ("sigmoid",)

    def forward(self, x):
        return x * self.tap("sigmoid", torch.sigmoid(x))


class QAttention(_Taps, Attention):
    """ultralytics' Attention (C2PSA) with the tensors ORT quantizes inside it: 'q_scaled' (queries times the
    scale, a quantized constant whose dequantized value is `qat_scale`), 'scores', 'softmax', 'av' (values x
    attention) and 'sum' (that plus the positional encoding)."""

    ROLES = ("q_scaled", "scores", "softmax", "av", "sum")
    qat_scale: float | None = None

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, self.num_heads, self.key_dim * 2 + self.head_dim, N).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        scale = self.scale if self.qat_scale is None else self.qat_scale
        qs = self.tap("q_scaled", q * scale)
        attn = self.tap("softmax", self.tap("scores", qs.transpose(-2, -1) @ k).softmax(dim=-1))
        x = self.tap("sum", self.tap("av", v @ attn.transpose(-2, -1)).view(B, C, H, W)
                     + self.pe(v.reshape(B, C, H, W)))
        return self.proj(x)


class QPSABlock(_Taps, PSABlock):
    """ultralytics' PSABlock with its two residual Adds quantized ('attn_add', 'ffn_add': the block output)."""

    ROLES = ("attn_add", "ffn_add")

    def forward(self, x):
        x = self.tap("attn_add", x + self.attn(x)) if self.add else self.attn(x)
        return self.tap("ffn_add", x + self.ffn(x)) if self.add else self.ffn(x)


TAPPED = {nn.SiLU: QSiLU, Attention: QAttention, PSABlock: QPSABlock}  # float class -> its quantized class


def is_prepared(model) -> bool:
    return any(isinstance(m, QConv2d) for m in model.modules())


def strip_qat(model):
    """Remove every fake quantizer in place (quantized classes swapped back, hooks dropped); returns the model."""
    for m in model.modules():
        if isinstance(m, QConv2d):
            for k in QConv2d.ATTRS:
                m.__dict__.pop(k, None)
            m.__class__ = nn.Conv2d
        for base, qcls in TAPPED.items():
            if type(m) is qcls:
                for k in (*TAP_ATTRS, "qat_scale"):
                    m.__dict__.pop(k, None)
                m.__class__ = base
        for k in (RANGE_PARAM, IN_RANGE_PARAM):
            m._parameters.pop(k, None)
        for k, h in list(m._forward_hooks.items()):
            if isinstance(h, OutputFakeQuant):
                del m._forward_hooks[k]
    return model
