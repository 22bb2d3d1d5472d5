"""Shift-negative correction of LeakyReLU outputs for symmetric int8 activations (recipe key `shift_negative`).

A LeakyReLU(0.1) output spans about [-0.1 m, m]. A symmetric int8 grid (zero point 0, what symmetric NPUs take)
must cover [-m, m], so the negative half of the codes holds a tail one tenth as long and the positive values get
7 bits instead of 8 (`qbench inspect` reports it per layer as "bits lost" and ranks "shift_negative" as the
remedy). Shifting the output by its mid-range, y = LeakyRelu(x) - c with c = (lo + hi) / 2, centres it, so the
symmetric grid over [-(hi - lo) / 2, (hi - lo) / 2] has the step of an asymmetric grid over [lo, hi]. The NPU
does the subtraction in the activation's requantization (an output offset); the shift is undone where the
tensor is consumed, so the float function is unchanged:

- a Conv reading a shifted tensor gets bias += sum over its kernel of W * c, and when it pads, an explicit Pad
  whose constant is -c (the shifted image of the zero padding) with the Conv's own pads set to 0, as Sony's
  Model Compression Toolkit does; a Conv with pads whose input shift differs per channel gets the shift undone;
- Split, MaxPool, Resize and Identity pass the shift through, Concat concatenates the shifts of its inputs (0 for
  unshifted ones) per channel, Add adds them;
- any other reader (the detect-head decode, a graph output) gets an explicit Add that undoes the shift.

The image input, [0, 1], is shifted the same way (by 0.5; an NPU reads uint8 pixels, i.e. the same grid).

The shift is an Add(-c) node named `<tensor>_qb_shift` after the LeakyRelu (or the input); it and the op before it
are one activation: `constraints.fuse_shifts` removes the Q/DQ that ONNX Runtime's quantizer puts between the two,
so only the shifted tensor is quantized. ort_engine quantizes twice: the second time with every shift snapped to
its tensor's INT8 grid (`snap_shifts`), so the explicit Pads hold exactly representable values. The bias a Conv got, sum of W * c over the FLOAT weights, is then
recomputed from its dequantized INT8 weights (`constraints.correct_shift_biases`): the shift is a large constant
that every tap sees, so the weights' rounding error, summed against it, would otherwise bias the output.

Shifts come from each tensor's min/max over the first MAX_IMAGES calibration images. A tensor is shifted when
centring makes its symmetric step at least MIN_GAIN_BITS finer: log2(max(|lo|, |hi|) / ((hi - lo) / 2)), about
0.86 bits for a LeakyReLU(0.1) output and 1 bit for the image.
"""

from __future__ import annotations

import numpy as np

from .equalize import probe_session

MAX_IMAGES = 32  # LeakyReLU output ranges for the shifts: the first images of the calibration set
PASS_THROUGH = frozenset({"MaxPool", "Resize", "Identity"})
SOURCES = frozenset({"LeakyRelu"})  # activations whose outputs are shifted (and the graph's image input)
MIN_GAIN_BITS = 0.25  # shift a tensor only if centring its range makes the symmetric step this many bits finer
SHIFT_SUFFIX = "_qb_shift"
ABSORBED = "_absorbed"  # report key: {conv: (input shift per channel, bias added)}, numpy, not for JSON


def _attr(node, name, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def output_ranges(model, tensors: list[str], reader, images: int) -> dict:
    """{tensor: (min, max)} of `model` (float) over `images` batches of `reader`."""

    sess = probe_session(model, tensors)
    r: dict[str, tuple] = {}
    for _ in range(images):
        feed = reader.get_next()
        if feed is None:
            break
        for t, v in zip(tensors, sess.run(tensors, feed)):
            lo, hi = float(v.min()), float(v.max())
            r[t] = (lo, hi) if t not in r else (min(r[t][0], lo), max(r[t][1], hi))
    return r


def _channels(model) -> dict:
    """tensor -> channel count (dim 1) from ONNX shape inference, where known."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value"):
            out[vi.name] = dims[1].dim_value
    return out


def shift_negative(model, reader=None, images: int = MAX_IMAGES, *, ranges: dict | None = None,
                   snapped: dict | None = None) -> dict:
    """Apply shift-negative correction to `model` (an FP32 ModelProto) in place; a JSON-able report.

    The tensors' (min, max) are measured on `images` batches of `reader`, or given as `ranges` (the report's
    "ranges" of an earlier call on the same model). `snapped`: {tensor: shift} replacing the mid-range of those
    tensors (`snap_shifts`), so a second call puts every shift on its tensor's INT8 grid.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    init = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    inputs = [i.name for i in g.input if i.name not in init]
    sources = [n.output[0] for n in g.node if n.op_type in SOURCES and n.output[0] not in outputs]
    report = {"images": 0, "shifted": [], "absorbed_by_conv": 0, "pads_added": 0, "undone": [], ABSORBED: {}}
    if not sources:
        return report
    if ranges is None:
        ranges = output_ranges(model, [*inputs, *sources], reader, images)
        report["images"] = getattr(reader, "images_read", images)
    report["ranges"] = ranges
    chans = _channels(model)
    shift: dict[str, np.ndarray] = {}  # tensor -> its shift, shape (C,) or (1,) (uniform)
    new_nodes, new_inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def uniform(s: np.ndarray) -> bool:
        return s.size == 1 or bool(np.all(s == s[0]))

    def per_channel(t: str, s: np.ndarray) -> np.ndarray:
        if s.size > 1:
            return s
        c = chans.get(t)
        if c is None:
            raise KeyError(t)
        return np.full(c, float(s[0]), np.float32)

    def undo(node, k: int) -> None:
        """Give input k of `node` back its unshifted value through an explicit Add."""
        t = node.input[k]
        s = shift[t]
        value = s.reshape(1, -1, 1, 1) if s.size > 1 else s.reshape(())
        out = f"{t}_qb_unshift_{node.name}"
        new_nodes.append(helper.make_node("Add", [t, const(out + "_c", value)], [out], name=out))
        node.input[k] = out
        report["undone"].append(node.name)

    def source(t: str, name: str) -> str | None:
        """Shift tensor `t` by its mid-range if that saves at least MIN_GAIN_BITS; returns the shifted name."""
        lo, hi = ranges[t]
        c = 0.5 * (lo + hi)
        half = 0.5 * (hi - lo)
        if half <= 0 or np.log2(max(abs(lo), abs(hi)) / half) < MIN_GAIN_BITS:
            return None
        if snapped is not None and t in snapped:
            c = float(snapped[t])
        shifted = t + SHIFT_SUFFIX
        new_nodes.append(helper.make_node("Add", [t, const(shifted + "_c", np.array(-c, np.float32))], [shifted],
                                          name=shifted))
        shift[shifted] = np.array([c], np.float32)
        if t in chans:
            chans[shifted] = chans[t]
        report["shifted"].append({"tensor": t, "by": name, "min": lo, "max": hi, "shift": c,
                                  "bits_gained": round(float(np.log2(max(abs(lo), abs(hi)) / half)), 3)})
        return shifted

    renamed: dict[str, str] = {}  # original tensor -> its shifted version, for every later reader
    for i in inputs:
        s_name = source(i, "graph input")
        if s_name is not None:
            renamed[i] = s_name
    for n in list(g.node):
        for k, i in enumerate(n.input):
            if i in renamed:
                n.input[k] = renamed[i]
        ins = [i for i in n.input if i in shift]
        if ins:
            op = n.op_type
            try:
                if op == "Conv" and n.input[0] in shift and len(ins) == 1:
                    _absorb_conv(n, shift[n.input[0]], init, new_nodes, new_inits, report)
                elif op in PASS_THROUGH and ins == [n.input[0]]:
                    shift[n.output[0]] = shift[n.input[0]]
                elif op == "Split" and ins == [n.input[0]] and _attr(n, "axis", 0) == 1:
                    s = shift[n.input[0]]
                    if s.size == 1:
                        for o in n.output:
                            shift[o] = s
                    else:
                        sizes = [chans[o] for o in n.output]
                        for o, part in zip(n.output, np.split(s, np.cumsum(sizes)[:-1])):
                            shift[o] = part
                elif op == "Concat" and _attr(n, "axis") == 1:
                    parts = [per_channel(i, shift[i]) if i in shift else np.zeros(chans[i], np.float32)
                             for i in n.input]
                    s = np.concatenate(parts).astype(np.float32)
                    shift[n.output[0]] = s[:1] if uniform(s) else s
                elif op == "Add" and len(n.input) == 2 and all(i not in init for i in n.input):
                    a = shift.get(n.input[0], np.zeros(1, np.float32))
                    b = shift.get(n.input[1], np.zeros(1, np.float32))
                    shift[n.output[0]] = (a + b).astype(np.float32) if 1 in (a.size, b.size) or a.size == b.size \
                        else per_channel(n.input[0], a) + per_channel(n.input[1], b)
                else:
                    raise KeyError(op)
            except KeyError:
                for k, i in enumerate(n.input):
                    if i in shift:
                        undo(n, k)
        new_nodes.append(n)
        if n.op_type in SOURCES and n.output[0] in ranges and not any(i in shift for i in n.input):
            s_name = source(n.output[0], n.name)
            if s_name is not None:
                renamed[n.output[0]] = s_name
    for o in g.output:  # graph outputs are read by the caller, who knows nothing of shifts
        if o.name in shift:
            raise RuntimeError(f"graph output {o.name} would carry a shift-negative offset")
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    report["undone"] = sorted(set(report["undone"]))
    report["shift_nodes"] = [t["tensor"] + SHIFT_SUFFIX for t in report["shifted"]]
    return report


def kernel_sum(w: np.ndarray, shift: np.ndarray, group: int = 1) -> np.ndarray:
    """Per output channel, sum over the kernel of W * shift: what a Conv with weights `w` (Cout, Cin/group, k...)
    adds when every input channel i is raised by shift[i]."""
    per_group = np.asarray(w, np.float64).reshape(group, w.shape[0] // group, w.shape[1], -1)
    s = np.asarray(shift, np.float64).reshape(group, 1, w.shape[1], 1)
    return (per_group * s).sum(axis=(2, 3)).reshape(-1)


def _absorb_conv(n, s: np.ndarray, init: dict, new_nodes: list, new_inits: list, report: dict) -> None:
    """Fold the input shift `s` of Conv `n` into its bias (and an explicit Pad when it pads); KeyError if it can't."""
    from onnx import helper, numpy_helper

    if n.input[1] not in init:
        raise KeyError("weight")
    w = numpy_helper.to_array(init[n.input[1]]).astype(np.float64)
    group = _attr(n, "group", 1)
    cin = w.shape[1] * group
    sv = np.full(cin, float(s[0])) if s.size == 1 else s.astype(np.float64)
    if sv.size != cin:
        raise KeyError("channels")
    pads = list(_attr(n, "pads", [0] * (2 * (w.ndim - 2))))
    auto_pad = _attr(n, "auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise KeyError("auto_pad")
    if any(pads) and s.size > 1 and not np.all(sv == sv[0]):
        raise KeyError("per-channel shift with padding")
    delta = kernel_sum(w, sv, group)  # W * (x_shifted + s) = W * x_shifted + sum_k W * s
    if len(n.input) > 2 and n.input[2]:
        if n.input[2] not in init:
            raise KeyError("bias")
        b = numpy_helper.to_array(init[n.input[2]]).astype(np.float64)
        name = n.input[2]
        init[name].CopyFrom(numpy_helper.from_array((b + delta).astype(np.float32), name))
    else:
        name = n.name + "_qb_bias"
        new_inits.append(numpy_helper.from_array(delta.astype(np.float32), name))
        while len(n.input) < 3:
            n.input.append("")
        n.input[2] = name
    if any(pads):
        x = n.input[0]
        padded = f"{x}_qb_pad_{n.name}"
        nd = len(pads) // 2
        onnx_pads = [0, 0, *pads[:nd], 0, 0, *pads[nd:]]
        pads_name = padded + "_pads"
        value_name = padded + "_value"
        new_inits.append(numpy_helper.from_array(np.array(onnx_pads, np.int64), pads_name))
        new_inits.append(numpy_helper.from_array(np.array(-float(sv[0]), np.float32), value_name))
        new_nodes.append(helper.make_node("Pad", [x, pads_name, value_name], [padded], name=padded, mode="constant"))
        n.input[0] = padded
        _set_attr(n, "pads", [0] * len(pads))
        report["pads_added"] += 1
    report["absorbed_by_conv"] += 1
    report[ABSORBED][n.name] = (sv.astype(np.float32), delta.astype(np.float32))


def snap_shifts(qmodel, report: dict) -> dict:
    """{tensor: shift} with every shift of `report` moved to the nearest point of the INT8 grid of its shifted
    tensor in the quantized model `qmodel` (the QuantizeLinear after the shift Add; ONNX Runtime gives Split,
    MaxPool, Resize and Pad outputs their input's grid). The explicit Pads then pad with a value the grid holds
    exactly: off the grid, the padded border would carry the same rounding error on every channel and tap, which
    the next Conv sums into a bias along the image border."""
    from onnx import numpy_helper

    init = {t.name: t for t in qmodel.graph.initializer}
    quantizer = {n.input[0]: n for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    out = {}
    for item in report.get("shifted", []):
        q = quantizer.get(item["tensor"] + SHIFT_SUFFIX)
        if q is None or q.input[1] not in init:
            continue
        scale = float(numpy_helper.to_array(init[q.input[1]]).reshape(-1)[0])
        if scale > 0:
            out[item["tensor"]] = float(np.round(item["shift"] / scale) * scale)
    return out
