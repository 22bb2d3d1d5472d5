"""Integer-hardware constraints applied to ONNX Runtime's QDQ graph (NPU profiles simulated in ORT).

`quantize_static` writes a QDQ graph for x86; an NPU's integer arithmetic is more constrained. These functions
rewrite that graph, after `quantize_static` and before it is saved, so that ONNX Runtime computes what the
NPU would (a QDQ graph is a simulation: ORT runs it on any machine). Patterns are found from op types and edges,
never from node names.

- `fuse_conv_activations`: the NPU computes Conv + activation in one kernel, so the Conv's output is never
  requantized on its own: the QuantizeLinear -> DequantizeLinear pair between a Conv output and its activation
  is removed (LeakyRelu, Relu, Clip, PRelu, HardSwish, and SiLU = Sigmoid(x) * x, whose sigmoid output loses its
  pair too), when that Conv output feeds nothing else.
- `fuse_shifts`: a shift-negative Add (recipe key shift_negative) and the activation before it are one op, so
  the Q/DQ pair between them is removed; `correct_shift_biases` then recomputes the bias each shift went into
  from the Conv's final (dequantized) weights.
- `share_concat_scales`: the runtime concatenates int8 codes only when every input of a Concat has the Concat
  output's scale and zero point (OpenVINO's CPU plugin, and most NPUs; otherwise it requantizes each input in
  float), and passes values through Split, MaxPool and Resize on their input's grid. Each group of tensors
  linked by those ops gets one range, the union of its members' calibrated ranges, and the Q/DQ pair after a
  pass-through op whose output now has its input's grid is removed (the values are unchanged). Every int32 Conv
  bias whose input scale changed is requantized to input scale x weight scale.
- `float_head_outputs`: the last Conv of each detect-head branch writes float (its int32 accumulator dequantized)
  instead of requantizing the box and class logits to 8 bits before the float decode; the Q/DQ pair on its
  output is removed.
- `round_scales_to_pow2`: every scale a power of two, rounded UP (2**ceil(log2(s))) so nothing inside the
  calibrated range is clipped. Activation scales are rounded in place; weights are requantized with their new
  scales from the FLOAT weights (looked up in the FP32 model through the node that reads them), and every int32
  bias gets scale = input scale x weight scale (a power of two too) and is requantized from the float bias. A
  weight or bias whose float value cannot be found is dequantized and requantized instead, and named in the
  report.

`apply_constraints(qmodel, recipe, float_model)` runs what the recipe asks for and returns a JSON-able report.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .shift import kernel_sum

ACTIVATIONS = frozenset({"LeakyRelu", "Relu", "Clip", "PRelu", "HardSwish"})  # one-input activations after a Conv


# --------------------------------------------------------------------------- graph index
class _Graph:
    """Producers, consumers and initializers of an ONNX graph (rebuild after editing edges)."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.init = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def only_consumer(self, tensor: str, op_type: str):
        """The one node reading `tensor` if it is of `op_type` (and `tensor` is no graph output), else None."""
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == op_type and tensor not in self.outputs:
            return users[0]
        return None

    def qdq_after(self, tensor: str):
        """(Q, DQ) when `tensor` feeds exactly one QuantizeLinear whose output feeds exactly one DequantizeLinear."""
        q = self.only_consumer(tensor, "QuantizeLinear")
        dq = self.only_consumer(q.output[0], "DequantizeLinear") if q is not None else None
        return (q, dq) if dq is not None and dq.output[0] not in self.outputs else None

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.init[name])

    def set_array(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.init[name].CopyFrom(numpy_helper.from_array(value, name))


def _rewire(reader, old: str, new: str) -> None:
    """Make `reader` read tensor `new` wherever it read `old`."""
    for k, name in enumerate(reader.input):
        if name == old:
            reader.input[k] = new


def _remove_nodes(graph, outputs: set[str]) -> None:
    """Drop the nodes that produce `outputs` (tensor names are unique) and the initializers nothing reads any more
    (their scales and zero points)."""

    def kept(items, keep):
        out = []
        for item in items:
            if keep(item):
                c = type(item)()
                c.CopyFrom(item)
                out.append(c)
        return out

    nodes = kept(graph.node, lambda n: not set(n.output) & outputs)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    inits = kept(graph.initializer, lambda t: t.name in used)
    del graph.initializer[:]
    graph.initializer.extend(inits)


# --------------------------------------------------------------------------- activation fusion
def fuse_conv_activations(model) -> dict:
    """Remove the Q/DQ pair between each Conv output and its activation (see the module doc), in place.

    Returns {"fused": {activation: count}, "qdq_pairs_removed": n}.
    """
    graph = model.graph
    g = _Graph(graph)
    removed, fused = set(), Counter()

    def drop(pair) -> None:
        removed.update(n.output[0] for n in pair)

    for conv in graph.node:
        if conv.op_type != "Conv":
            continue
        c = conv.output[0]
        pair = g.qdq_after(c)
        if pair is None:
            continue
        dq_out = pair[1].output[0]
        users = g.consumers.get(dq_out, [])
        if len(users) == 1 and users[0].op_type in ACTIVATIONS and users[0].input[0] == dq_out:
            _rewire(users[0], dq_out, c)
            drop(pair)
            fused[users[0].op_type] += 1
            continue
        # SiLU: Sigmoid(c) and Mul(c, sigmoid), the sigmoid output through its own Q/DQ or straight
        if sorted(u.op_type for u in users) != ["Mul", "Sigmoid"]:
            continue
        sig, mul = sorted(users, key=lambda u: u.op_type != "Sigmoid")
        s = sig.output[0]
        s_pair = g.qdq_after(s)
        s_read = s_pair[1].output[0] if s_pair is not None else s
        if sig.input[0] != dq_out or sorted(mul.input) != sorted([dq_out, s_read]) \
                or g.consumers.get(s_read, []) != [mul] or s in g.outputs:
            continue
        _rewire(sig, dq_out, c)
        _rewire(mul, dq_out, c)
        drop(pair)
        if s_pair is not None:
            _rewire(mul, s_read, s)
            drop(s_pair)
        fused["SiLU"] += 1
    if removed:
        _remove_nodes(graph, removed)
    return {"fused": dict(sorted(fused.items())), "qdq_pairs_removed": len(removed) // 2}


# --------------------------------------------------------------------------- shared concat scales
PASS_THROUGH = ("Split", "MaxPool", "Resize")  # ops whose output values lie on their input's grid


def _dq_params(g: _Graph, tensor: str):
    """(scale, zero point) initializer names of the DequantizeLinear that produces `tensor`, else None."""
    p = g.producer.get(tensor)
    if p is None or p.op_type != "DequantizeLinear" or len(p.input) < 3 or p.input[1] not in g.init \
            or p.input[2] not in g.init:
        return None
    return p.input[1], p.input[2]


def _q_after(g: _Graph, tensor: str):
    """The one QuantizeLinear reading `tensor` when it is `tensor`'s only reader (and has a zero point), else None."""
    q = g.only_consumer(tensor, "QuantizeLinear")
    if q is None or len(q.input) < 3 or q.input[1] not in g.init or q.input[2] not in g.init:
        return None
    return q


def _range(g: _Graph, params) -> tuple[float, float]:
    """The float range a per-tensor (scale, zero point) pair represents."""
    s, z = float(g.array(params[0])), g.array(params[1])
    info = np.iinfo(z.dtype)
    return (info.min - int(z)) * s, (info.max - int(z)) * s


def _requantize_conv_biases(g: _Graph) -> int:
    """Every int32 bias whose scale is no longer input scale x weight scale of its reader (`_bias_scale`) is
    requantized (from its dequantized value) to that scale, as integer kernels assume; returns how many."""
    n = 0
    for dq in g.graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in g.init or g.array(dq.input[0]).dtype != np.int32:
            continue
        want = _bias_scale(g, dq)
        old = g.array(dq.input[1])
        if want is None or np.array_equal(old.reshape(-1), want):
            continue
        q, _ = _requantize(_dequantize(g, dq), want, _axis(dq), np.int32)
        g.set_array(dq.input[0], q)
        g.set_array(dq.input[1], want.reshape(old.shape))
        n += 1
    return n


def _drop_qdq(g: _Graph, tensor: str, removed: set) -> bool:
    """Remove the QuantizeLinear that alone reads `tensor` and every DequantizeLinear after it, their readers reading
    `tensor` instead (the outputs to delete go into `removed`); False, changing nothing, when the pattern is not
    there or touches a graph output."""
    q = _q_after(g, tensor)
    dqs = g.consumers.get(q.output[0], []) if q is not None else []
    if not dqs or q.output[0] in g.outputs or any(d.op_type != "DequantizeLinear" or d.output[0] in g.outputs
                                                  for d in dqs):
        return False
    for d in dqs:
        for reader in g.consumers.get(d.output[0], []):
            _rewire(reader, d.output[0], tensor)
        removed.add(d.output[0])
    removed.add(q.output[0])
    return True


def share_concat_scales(model) -> dict:
    """One (scale, zero point) per group of tensors joined by Concat, Split, MaxPool and Resize (see the module
    doc), in place. Returns {"groups": n, "tensors_rescaled": n, "qdq_pairs_removed": n, "biases_requantized": n}."""
    graph = model.graph
    g = _Graph(graph)
    parent: dict = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for node in graph.node:
        if node.op_type != "Concat" and node.op_type not in PASS_THROUGH:
            continue
        inputs = list(node.input) if node.op_type == "Concat" else [node.input[0]]
        qs = [_q_after(g, o) for o in node.output]
        members = [_dq_params(g, t) for t in inputs] + [(q.input[1], q.input[2]) if q is not None else None
                                                          for q in qs]
        if any(m is None for m in members) or any(np.size(g.array(m[0])) != 1 for m in members):
            continue
        if len({g.init[m[1]].data_type for m in members}) != 1:
            continue
        for m in members[1:]:
            parent[find(m)] = find(members[0])
    groups: dict = {}
    for m in list(parent):
        groups.setdefault(find(m), []).append(m)
    rescaled = 0
    shared = [ms for ms in groups.values() if len(ms) > 1]
    for members in shared:
        zdtype = g.array(members[0][1]).dtype
        info = np.iinfo(zdtype)
        mid = (int(info.min) + int(info.max) + 1) // 2  # a symmetric quantizer's zero point (0, or 128 for uint8)
        if all(int(g.array(z)) == mid for _, z in members):  # symmetric: keep the zero point, take the widest
            scale, zero = np.float32(max(float(g.array(s)) for s, _ in members)), np.array(mid, dtype=zdtype)
        else:
            ranges = [_range(g, m) for m in members]
            lo, hi = min(0.0, *(r[0] for r in ranges)), max(0.0, *(r[1] for r in ranges))
            scale = np.float32((hi - lo) / (int(info.max) - int(info.min))) if hi > lo else np.float32(1.0)
            zero = np.array(np.clip(round(int(info.min) - lo / float(scale)), info.min, info.max), dtype=zdtype)
        for s_name, z_name in members:
            if float(g.array(s_name)) != float(scale) or int(g.array(z_name)) != int(zero):
                rescaled += 1
            g.set_array(s_name, np.array(scale, dtype=np.float32).reshape(g.array(s_name).shape))
            g.set_array(z_name, zero.reshape(g.array(z_name).shape))
    biases = _requantize_conv_biases(g)
    # the Q/DQ after a pass-through op (or a Concat) whose output has its inputs' grid changes no value; `through`:
    # the grid of each output whose pair went (nodes come in topological order, so a chain is followed)
    removed, pairs, through = set(), 0, {}
    for node in graph.node:
        if node.op_type != "Concat" and node.op_type not in PASS_THROUGH:
            continue
        inputs = list(node.input) if node.op_type == "Concat" else [node.input[0]]
        ins = [_dq_params(g, t) or through.get(t) for t in inputs]
        if any(m is None for m in ins):
            continue
        grid = {(float(g.array(s)), int(g.array(z)), g.init[z].data_type) for s, z in ins}
        for out in node.output:
            q = _q_after(g, out)
            if q is None or len(grid) != 1 or \
                    (float(g.array(q.input[1])), int(g.array(q.input[2])), g.init[q.input[2]].data_type) not in grid:
                continue
            if _drop_qdq(g, out, removed):
                through[out] = (q.input[1], q.input[2])
                pairs += 1
    if removed:
        _remove_nodes(graph, removed)
    return {"groups": len(shared), "tensors_rescaled": rescaled, "qdq_pairs_removed": pairs,
            "biases_requantized": biases}


# --------------------------------------------------------------------------- float head outputs
def float_head_outputs(model, branch_convs) -> dict:
    """Remove the Q/DQ pair on the output of each of `branch_convs` (the detect head's last Conv per branch, which
    the float decode reads), in place. Returns {"convs": n}."""
    graph = model.graph
    g = _Graph(graph)
    wanted = set(branch_convs)
    removed, n = set(), 0
    for conv in graph.node:
        if conv.name in wanted and conv.op_type == "Conv" and _drop_qdq(g, conv.output[0], removed):
            n += 1
    if removed:
        _remove_nodes(graph, removed)
    return {"convs": n}


# --------------------------------------------------------------------------- power-of-two scales
def pow2_ceil(scale: np.ndarray) -> np.ndarray:
    """The smallest power of two >= each scale (exact, via frexp); float32. Non-positive scales become 1."""
    s = np.asarray(scale, np.float32)
    mant, exp = np.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    p = np.ldexp(np.float32(1), np.where(mant == 0.5, exp - 1, exp)).astype(np.float32)
    return np.where(s > 0, p, np.float32(1)).astype(np.float32)


def _channel_shape(scale: np.ndarray, ndim: int, axis: int) -> tuple:
    """Shape that broadcasts a per-channel scale along `axis` of an ndim tensor (a scalar stays a scalar)."""
    if scale.size == 1 or ndim == 0:
        return scale.reshape(()).shape
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return tuple(shape)


def _axis(dq) -> int:
    return next((a.i for a in dq.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1


def _dequantize(g: _Graph, dq, scale: np.ndarray | None = None) -> np.ndarray:
    """The float64 values a DequantizeLinear of an initializer gives, with `scale` instead of its own if given."""
    q = g.array(dq.input[0]).astype(np.float64)
    scale = np.asarray(g.array(dq.input[1]) if scale is None else scale, np.float64)
    zp = g.array(dq.input[2]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    shape = _channel_shape(scale, q.ndim, _axis(dq))
    return (q - zp.reshape(shape)) * scale.reshape(shape)


def _float_value(g: _Graph, dq, float_nodes: dict, float_inits: dict):
    """The float tensor a weight/bias DequantizeLinear stands for: the FP32 model's input at the same slot of the
    same (named) node that reads it here. None when no reader matches."""
    out = dq.output[0]
    for reader in g.consumers.get(out, []):
        src = float_nodes.get(reader.name)
        if src is None:
            continue
        for k, name in enumerate(reader.input):
            if name == out and k < len(src.input) and src.input[k] in float_inits:
                return float_inits[src.input[k]]
    return None


def _requantize(value: np.ndarray, scale: np.ndarray, axis: int, dtype) -> tuple[np.ndarray, int]:
    """round(value / scale), clipped to the symmetric range of dtype; returns (q, values clipped)."""
    info = np.iinfo(dtype)
    lo, hi = info.min + 1, info.max  # symmetric: int8 -> [-127, 127], as ORT's symmetric weights
    q = np.round(value.astype(np.float64) / scale.astype(np.float64).reshape(_channel_shape(scale, value.ndim, axis)))
    clipped = int(np.count_nonzero((q < lo) | (q > hi)))
    return np.clip(q, lo, hi).astype(dtype), clipped


def round_scales_to_pow2(model, float_model=None) -> dict:
    """Make every scale initializer of a QDQ graph a power of two (see the module doc), in place.

    float_model: the FP32 model ORT quantized (its nodes carry the same names); None dequantizes instead.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    float_nodes = {n.name: n for n in float_model.graph.node} if float_model is not None else {}
    float_inits = {t.name: t for t in float_model.graph.initializer} if float_model is not None else {}
    act, weights, biases = set(), [], []
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in g.init:
            (biases if g.init[n.input[0]].data_type == TensorProto.INT32 else weights).append(n)
        else:
            act.add(n.input[1])
    report = {"activation_scales": len(act), "weight_scales": len(weights), "bias_scales": len(biases),
              "values_rounded": 0, "requantized_from_float": 0, "requantized_from_int8": [],
              "bias_values_clipped": 0}

    def round_in_place(name: str) -> np.ndarray:
        old = g.array(name)
        new = pow2_ceil(old).reshape(old.shape)
        report["values_rounded"] += int(np.count_nonzero(new != old))
        g.set_array(name, new)
        return new

    def source(dq, old_scale: np.ndarray) -> np.ndarray:
        """The float tensor behind a weight/bias DQ, or its dequantized int values when it cannot be found."""
        t = _float_value(g, dq, float_nodes, float_inits)
        q = g.array(dq.input[0])
        if t is not None and tuple(t.dims) == q.shape:
            report["requantized_from_float"] += 1
            return numpy_helper.to_array(t)
        report["requantized_from_int8"].append(dq.input[0])
        return _dequantize(g, dq, old_scale)

    for name in sorted(act):
        round_in_place(name)
    for dq in weights:
        old = g.array(dq.input[1])
        w = source(dq, old)
        new = round_in_place(dq.input[1])
        q, _ = _requantize(w, new, _axis(dq), g.array(dq.input[0]).dtype)
        g.set_array(dq.input[0], q)
    for dq in biases:
        old = g.array(dq.input[1])
        b = source(dq, old)
        new = _bias_scale(g, dq)
        if new is None:  # no (input DQ, weight DQ) pair in front of its reader: round its own scale
            new = pow2_ceil(old)
            report.setdefault("bias_scales_rounded_alone", []).append(dq.input[1])
        new = new.reshape(old.shape)
        report["values_rounded"] += int(np.count_nonzero(new != old))
        g.set_array(dq.input[1], new)
        q, clipped = _requantize(b, new, _axis(dq), np.int32)
        report["bias_values_clipped"] += clipped
        g.set_array(dq.input[0], q)
    return report


def _bias_scale(g: _Graph, bias_dq) -> np.ndarray | None:
    """input scale x weight scale of the Conv/Gemm that reads this bias (both already powers of two)."""
    for reader in g.consumers.get(bias_dq.output[0], []):
        if len(reader.input) < 3 or reader.input[2] != bias_dq.output[0]:
            continue
        x_dq, w_dq = g.producer.get(reader.input[0]), g.producer.get(reader.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        return (g.array(x_dq.input[1]).astype(np.float32) * g.array(w_dq.input[1]).astype(np.float32)).reshape(-1)
    return None


# --------------------------------------------------------------------------- entry point
# --------------------------------------------------------------------------- shift-negative correction
def fuse_shifts(model, shift_nodes) -> dict:
    """Remove the Q/DQ pair in front of each shift-negative Add (`shift.py`; kept float, its constant unquantized):
    the activation (or the image input) and its shift are one op whose shifted output alone is quantized."""
    graph = model.graph
    g = _Graph(graph)
    names = set(shift_nodes)
    removed = set()
    for node in graph.node:
        if node.name not in names:
            continue
        dq = g.producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or g.qdq_after(q.input[0]) != (q, dq) \
                or g.consumers.get(dq.output[0], []) != [node]:
            continue
        _rewire(node, dq.output[0], q.input[0])
        removed.update((q.output[0], dq.output[0]))
    if removed:
        _remove_nodes(graph, removed)
    return {"shifts": len(names), "qdq_pairs_removed": len(removed) // 2}


def correct_shift_biases(model, absorbed: dict) -> dict:
    """Recompute the bias of every Conv that absorbed a shift-negative offset from its dequantized weights.

    absorbed: {conv name: (input shift per input channel c, bias added in float = sum_k W * c)}. The Conv computes
    W_q * x_shifted + b', and W_q * x = W_q * x_shifted + sum_k W_q * c, so b' must hold sum_k W_q * c, not the
    float weights' sum. An int32 bias is requantized with its own scale; a float bias is rewritten.
    """

    g = _Graph(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    done, max_change = 0, 0.0
    for name, (c, added) in absorbed.items():
        conv = nodes.get(name)
        if conv is None or len(conv.input) < 3 or not conv.input[2]:
            continue
        wdq = g.producer.get(conv.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in g.init:
            continue
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        change = kernel_sum(_dequantize(g, wdq), c, group) - np.asarray(added, np.float64)
        bdq = g.producer.get(conv.input[2])
        if bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in g.init:
            q, _ = _requantize(_dequantize(g, bdq) + change, g.array(bdq.input[1]), _axis(bdq), np.int32)
            g.set_array(bdq.input[0], q)
        elif conv.input[2] in g.init:
            g.set_array(conv.input[2], (g.array(conv.input[2]).astype(np.float64) + change).astype(np.float32))
        else:
            continue
        done += 1
        max_change = max(max_change, float(np.abs(change).max()))
    return {"biases_corrected": done, "max_bias_change": round(max_change, 6)}


def apply_constraints(qmodel, recipe, float_model=None, shift_nodes=(), shift_absorbed=None,
                      head_convs=()) -> dict:
    """Apply the recipe's activation_fusion, shared_concat_scales, float_head_outputs (on `head_convs`, the detect
    head's branch convs) and pow2_scales (and the shift-negative fusion of `shift_nodes`) to ORT's QDQ model in
    place; a JSON-able report.

    float_model: the FP32 ModelProto (or path) that quantize_static read, for requantizing weights and biases
    from their float values (pow2_scales only).
    """
    report = {"activation_fusion": recipe.activation_fusion, "pow2_scales": recipe.pow2_scales}
    if shift_nodes:
        report["shift_negative"] = fuse_shifts(qmodel, shift_nodes)
    if recipe.activation_fusion == "fused":
        report.update(fuse_conv_activations(qmodel))
    if recipe.float_head_outputs:
        report["float_head_outputs"] = float_head_outputs(qmodel, head_convs)
    if recipe.shared_concat_scales:
        report["shared_concat_scales"] = share_concat_scales(qmodel)
    if recipe.pow2_scales:
        if float_model is not None and not hasattr(float_model, "graph"):
            import onnx

            float_model = onnx.load(str(float_model))
        report["pow2"] = round_scales_to_pow2(qmodel, float_model)
    if shift_absorbed:  # last: the weights are final
        report["shift_negative"].update(correct_shift_biases(qmodel, shift_absorbed))
    return report


# --------------------------------------------------------------------------- int8 activations as uint8 (x86 speed)
def activations_to_uint8(model) -> dict:
    """Rewrite every int8 ACTIVATION Q/DQ pair as uint8 with zero point + 128, in place; weights stay int8.

    An int8 quantizer (scale s, zero point z, codes -128..127) and a uint8 one (scale s, zero point z + 128, codes
    0..255) represent exactly the same values and saturate at the same ones (q_u8 = q_s8 + 128), so the model
    computes the same numbers; but ONNX Runtime on x86 runs u8 activations x s8 weights with its fast int8 kernels
    (QLinearConv, QLinearLeakyRelu, ...), while s8 x s8 falls back to slow paths or stays float. A symmetric NPU
    profile (int8, zero point 0) thereby runs at x86 int8 speed with unchanged accuracy.

    Returns {"zero_points": rewritten zero-point initializers, "quantize_nodes": activation Q nodes affected}.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    weight_zps = {n.input[2] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in g.init
                  and len(n.input) > 2}
    act_zps, n_q = {}, 0
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in g.init or len(q.input) < 3 or q.input[2] not in g.init:
            continue
        if g.init[q.input[2]].data_type != TensorProto.INT8:
            continue
        n_q += 1
        zp = q.input[2]
        if zp in weight_zps:  # shared with a weight (never in ORT's output): give the activation its own copy
            new = f"{zp}_act_u8"
            if new not in g.init:
                t = graph.initializer.add()
                t.CopyFrom(g.init[zp])
                t.name = new
                g.init[new] = t
            q.input[2] = new
            for dq in g.consumers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear" and len(dq.input) > 2 and dq.input[2] == zp:
                    dq.input[2] = new
            zp = new
        act_zps[zp] = True
        for dq in g.consumers.get(q.output[0], []):  # a DQ reading a different zero point than its Q: same value
            if dq.op_type == "DequantizeLinear" and len(dq.input) > 2 and dq.input[2] != zp:
                act_zps[dq.input[2]] = True
    for zp in act_zps:
        old = g.array(zp)
        if old.dtype != np.int8:
            continue
        g.init[zp].CopyFrom(numpy_helper.from_array((old.astype(np.int16) + 128).astype(np.uint8), zp))
    return {"zero_points": len(act_zps), "quantize_nodes": n_q}
