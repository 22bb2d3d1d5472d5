"""`qbench ops`: which operators of a detector a target runs on its NPU, what falls back to the CPU and why.

For each node of the FP32 graph (batch 1, shapes inferred): does the target's operator list (configs/npu/*.yaml,
`ops`) hold its op type, and do its attributes fit the limits (kernel, stride, dilation, groups, Resize mode and
scale, Softmax/Concat/Split axis, MatMul rank, broadcasting, LeakyReLU slope, channel counts)? From those verdicts:

- the share of nodes and of multiply-accumulates (Conv, MatMul, Gemm) that run on the NPU, over the whole graph
  and over its body (the YOLO decode excluded: DFL softmax, box arithmetic, class sigmoid, which deployments
  usually cut off and run on the host);
- the CPU-fallback partitions (connected groups of CPU nodes), the NPU<->CPU transitions (edges whose two ends run
  on different sides) and the bytes crossing them (int8, one byte per element; 4x that as float);
- the fallback causes ranked by the MACs (then nodes) they send to the CPU;
- the YOLO patterns that cause them, each with the level-3 rewrite that removes it: SiLU written as Sigmoid * Mul,
  the C2PSA attention block (MatMul + Softmax), the DFL decode.

Graph bookkeeping (Constant, Shape, and Identity nodes) is counted as neither side.
`activation_census` lists every activation with its parameters and layer, for `--expect-activation`.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ..errors import QbenchError
from ..files import check_writable, scratch, write_json
from ..graph.detector import find_head
from ..models.export import export_onnx
from ..quantization.profile import Profile, available_targets, load_profile
from ..train import resolve_model

BOOKKEEPING = frozenset({"Constant", "Shape", "Identity"})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
PATTERNS = {
    "silu": "SiLU written as Sigmoid * Mul: the level-3 models swap it for LeakyReLU(0.1) or ReLU "
            "(configs/models/yolo11n-l3-leaky.yaml, -relu.yaml), which NPUs run as one activation",
    "attention": "C2PSA attention (MatMul, Softmax, Transpose): the level-3 models replace C2PSA with C2f "
                 "(configs/models/yolo11n-l3-*.yaml), which is convolutions only",
    "decode": "the YOLO decode (DFL softmax, box arithmetic, class sigmoid): post-processing, usually cut off at the "
              "detect-branch convs and run on the host (the 'body' figures leave it out)",
}


@dataclass
class Verdict:
    node: str
    op: str
    npu: bool
    reason: str  # why not on the NPU ("" when it is)
    macs: int
    part: str  # "body" or "decode"
    pattern: str  # "silu", "attention", "decode" or ""


def load_graph(model: str | os.PathLike, imgsz: int | None = None) -> tuple[onnx.ModelProto, str]:
    """The FP32 ONNX graph of a .onnx, a .pt (exported) or a model YAML (built untrained, then exported), with
    batch 1 and every tensor's shape inferred; and a description of where it came from."""
    p = Path(model)
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml", ""):
        p, suffix = Path(resolve_model(str(model))), ".yaml"  # a file, a configs/models name or ultralytics' own
    elif suffix not in (".onnx", ".pt"):
        raise QbenchError(f"'{model}' is not a model qbench reads for `ops`: pass a .onnx, a .pt or a model YAML.")
    elif not p.is_file():
        raise QbenchError(f"model '{model}' does not exist; pass a .onnx, a .pt or a model YAML.")
    with scratch("ops") as td:
        if suffix == ".onnx":
            m = onnx.load(str(p))
            how = "ONNX as given"
        else:
            pt = p
            if suffix == ".yaml":
                from ..ultra import YOLO

                pt = Path(td) / "model.pt"
                YOLO(str(p)).save(str(pt))
            onx = export_onnx(pt, Path(td) / "fp32.onnx", imgsz=imgsz or (640 if suffix == ".yaml" else None))
            m = onnx.load(str(onx))
            how = "exported by qbench" + (" from the model YAML (untrained: the operators, not the weights)"
                                          if suffix != ".pt" else "")
    inp = m.graph.input[0].type.tensor_type.shape.dim
    if len(inp) == 4 and not inp[0].HasField("dim_value"):
        inp[0].dim_value = 1
    return shape_inference.infer_shapes(m), how


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _shapes(model) -> dict[str, list]:
    out = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def _numel(shape) -> int | None:
    return None if not shape or any(d is None for d in shape) else int(np.prod(shape))


def _macs(node, shapes, init) -> int:
    out = _numel(shapes.get(node.output[0]))
    if out is None:
        return 0
    if node.op_type == "Conv" and node.input[1] in init:
        w = init[node.input[1]].dims  # (Cout, Cin/group, kH, kW)
        return out * int(np.prod(w[1:]))
    if node.op_type in ("MatMul", "Gemm"):
        a = shapes.get(node.input[0]) or []
        k = a[-1] if a and a[-1] is not None else 0
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            k = a[-2] if len(a) > 1 and a[-2] is not None else 0
        return out * int(k)
    return 0


def _fits(value, limit) -> bool:
    tol = 1e-6 * max(1.0, abs(value))  # ONNX keeps a slope as float32: 0.1 is stored as 0.10000000149
    return limit[0] - tol <= value <= limit[1] + tol


def check_node(node, spec: dict | None, shapes: dict, init: dict) -> str:
    """'' when the target runs `node` on its NPU, else the reason it does not."""
    op = node.op_type
    if spec is None:
        return f"{op} is not supported"
    if op == "Conv":
        k = _attr(node, "kernel_shape") or (list(init[node.input[1]].dims[2:]) if node.input[1] in init else [])
        for key, vals in (("kernel", k), ("stride", _attr(node, "strides", [1])),
                          ("dilation", _attr(node, "dilations", [1]))):
            if key in spec and vals and not all(_fits(v, spec[key]) for v in vals):
                return f"Conv {key} {'x'.join(map(str, vals))} outside {spec[key][0]}..{spec[key][1]}"
        group = int(_attr(node, "group", 1))
        cin = (shapes.get(node.input[0]) or [None, None])[1]
        cout = init[node.input[1]].dims[0] if node.input[1] in init else None
        if spec.get("groups") == "1" and group > 1:
            return "Conv with groups > 1"
        if spec.get("groups") == "depthwise" and group not in (1, cin):
            return f"grouped Conv (groups {group}, not depthwise)"
        if "max_channels" in spec and cout and cout > spec["max_channels"]:
            return f"Conv with {cout} output channels (max {spec['max_channels']})"
    if op in ("MaxPool", "AveragePool"):
        for key, vals in (("kernel", _attr(node, "kernel_shape", [])), ("stride", _attr(node, "strides", [1])),
                          ("dilation", _attr(node, "dilations", [1]))):
            if key in spec and vals and not all(_fits(v, spec[key]) for v in vals):
                return f"{op} {key} {'x'.join(map(str, vals))} outside {spec[key][0]}..{spec[key][1]}"
    if op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if "mode" in spec and mode not in spec["mode"]:
            return f"Resize mode {mode}"
        if "scale" in spec and len(node.input) > 2 and node.input[2] in init:
            sc = numpy_helper.to_array(init[node.input[2]]).tolist()
            factors = {float(s) for s in sc[2:]} if len(sc) >= 4 else set()
            if factors and not factors <= {float(s) for s in spec["scale"]}:
                return f"Resize scale {'x'.join(f'{s:g}' for s in sc[2:])}"
    if op in ("Softmax", "Concat", "Split", "Gather") and "axis" in spec:
        rank = len(shapes.get(node.input[0]) or []) or 4
        axis = int(_attr(node, "axis", -1 if op == "Softmax" else 0))
        if axis not in spec["axis"] and (axis - rank if axis >= 0 else axis + rank) not in spec["axis"]:
            return f"{op} on axis {axis}"
    if "rank" in spec:
        rank = len(shapes.get(node.input[0]) or [])
        if rank and not _fits(rank, spec["rank"]):
            return f"{op} on a rank-{rank} input"
    if op in ELEMENTWISE and spec.get("broadcast") is False:
        s = [shapes.get(i) for i in node.input]
        if len({tuple(x) for x in s if x}) > 1:
            return f"{op} with broadcasting"
    if "channels_multiple" in spec:
        m = spec["channels_multiple"]
        for t in [*node.input, *node.output]:
            shape = shapes.get(t) or []
            if t and t not in init and len(shape) == 4 and shape[1] and shape[1] % m:
                return f"{op} with {shape[1]} channels (not a multiple of {m})"
    if op == "LeakyRelu" and "alpha" in spec and not _fits(float(_attr(node, "alpha", 0.01)), spec["alpha"]):
        return f"LeakyRelu slope {_attr(node, 'alpha', 0.01):g}"
    return ""


def _patterns(model) -> dict[str, str]:
    """node name -> the YOLO pattern it belongs to ("silu", "attention"; the decode is found by find_head)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type == "Mul":
            for a, b in (n.input, n.input[::-1]):
                p = producer.get(b)
                if p is not None and p.op_type == "Sigmoid" and p.input[0] == a:
                    out[n.name] = out[p.name] = "silu"
        if "/attn/" in n.name and n.op_type not in ("Conv",):
            out[n.name] = "attention"
    return out


def analyse(model: onnx.ModelProto, target: Profile, path: str = "model") -> dict:
    """The op-support analysis of one (shape-inferred, batch-1) graph under one target (see the module doc)."""
    if target.ops is None:
        raise QbenchError(f"target {target.name} does not list the operators it runs (no 'ops'); pick a target "
                          f"that does: {', '.join(targets_with_ops())}.")
    g = model.graph
    shapes = _shapes(model)
    init = {t.name: t for t in g.initializer}
    decode = set(find_head(model, path).decode)
    pattern = _patterns(model)
    verdicts = []
    for n in g.node:
        if n.op_type in BOOKKEEPING:
            continue
        reason = check_node(n, target.ops.get(n.op_type), shapes, init)
        part = "decode" if n.name in decode else "body"
        verdicts.append(Verdict(n.name, n.op_type, not reason, reason, _macs(n, shapes, init), part,
                                "decode" if part == "decode" else pattern.get(n.name, "")))
    side = {v.node: v.npu for v in verdicts}
    producer = {o: n.name for n in g.node for o in n.output}
    crossings, crossing_elems = 0, 0
    parent = {v.node: v.node for v in verdicts if not v.npu}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for n in g.node:
        if n.name not in side:
            continue
        for t in n.input:
            src = producer.get(t)
            if src not in side:
                continue
            if side[src] != side[n.name]:
                crossings += 1
                crossing_elems += _numel(shapes.get(t)) or 0
            elif not side[src]:
                parent[find(src)] = find(n.name)
    partitions = len({find(x) for x in parent})

    def shares(vs):
        total, npu = len(vs), sum(v.npu for v in vs)
        macs, npu_macs = sum(v.macs for v in vs), sum(v.macs for v in vs if v.npu)
        return {"nodes": total, "npu_nodes": npu, "share_nodes": round(npu / total, 4) if total else None,
                "macs": macs, "npu_macs": npu_macs, "share_macs": round(npu_macs / macs, 4) if macs else None}

    causes = Counter()
    cause_macs = Counter()
    for v in verdicts:
        if not v.npu:
            key = v.reason if v.part == "body" else f"{v.reason} (decode)"
            causes[key] += 1
            cause_macs[key] += v.macs
    ranked = sorted(causes, key=lambda k: (-cause_macs[k], -causes[k], k))
    found = Counter(v.pattern for v in verdicts if v.pattern)
    fallback = Counter(v.pattern for v in verdicts if v.pattern and not v.npu)
    return {
        "target": target.name, "source": target.source, "fallback": target.fallback,
        "int_types": list(target.int_types),
        "all": shares(verdicts), "body": shares([v for v in verdicts if v.part == "body"]),
        "cpu_partitions": partitions, "transitions": crossings,
        "crossing_bytes_int8": crossing_elems, "crossing_bytes_float32": 4 * crossing_elems,
        "causes": [{"reason": k, "nodes": causes[k], "macs": cause_macs[k]} for k in ranked],
        "patterns": [{"pattern": p, "nodes": found[p], "on_cpu": fallback.get(p, 0), "rewrite": PATTERNS[p]}
                     for p in ("silu", "attention", "decode") if found.get(p)],
        "cpu_nodes": [{k: v for k, v in asdict(x).items() if k != "npu"} for x in verdicts if not x.npu],
    }


# --------------------------------------------------------------------------- activation census
ACT_NAMES = {"LeakyRelu": "LeakyReLU", "Relu": "ReLU", "Sigmoid": "Sigmoid", "HardSwish": "Hardswish",
             "HardSigmoid": "Hardsigmoid", "PRelu": "PReLU", "Clip": "ReLU6", "Tanh": "Tanh", "Elu": "ELU",
             "Mish": "Mish", "Softplus": "Softplus", "Gelu": "GELU"}


def activation_census(model: onnx.ModelProto) -> list[dict]:
    """Every activation of the graph's body (the decode's class sigmoid excluded): {layer, type, param, node},
    SiLU recognised as Sigmoid * Mul, LeakyReLU with its slope."""
    decode = set(find_head(model).decode)
    pattern = _patterns(model)
    out = []
    for n in model.graph.node:
        if n.name in decode:
            continue
        layer = ".".join(p for p in n.name.strip("/").split("/")[:-1])
        if pattern.get(n.name) == "silu":
            if n.op_type == "Mul":
                out.append({"layer": layer, "type": "SiLU", "param": None, "node": n.name})
            continue
        if n.op_type in ACT_NAMES:
            param = float(_attr(n, "alpha", 0.01)) if n.op_type == "LeakyRelu" else None
            out.append({"layer": layer, "type": ACT_NAMES[n.op_type], "param": param, "node": n.name})
    return out


def parse_activation(spec: str) -> tuple[str, float | None]:
    """'LeakyReLU(0.1)' -> ('LeakyReLU', 0.1); 'SiLU' -> ('SiLU', None)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9]+)\s*(?:\(\s*([-+0-9.eE]+)\s*\))?\s*", spec or "")
    names = {v.lower(): v for v in [*ACT_NAMES.values(), "SiLU"]}
    if not m or m.group(1).lower() not in names:
        raise QbenchError(f"--expect-activation {spec!r} is not an activation; write e.g. 'LeakyReLU(0.1)', 'ReLU' "
                          f"or 'SiLU' (known: {', '.join(sorted(set(names.values())))}).")
    return names[m.group(1).lower()], float(m.group(2)) if m.group(2) else None


def verify_activations(census: list[dict], expect: str) -> list[dict]:
    """The activations that are not `expect` (type, and slope when given), each with what it is instead."""
    kind, param = parse_activation(expect)
    return [a for a in census if a["type"] != kind or (param is not None and (a["param"] is None or
                                                                             not math.isclose(a["param"], param,
                                                                                              rel_tol=1e-4)))]


def targets_with_ops() -> list[str]:
    return [n for n in available_targets() if load_profile(n).ops is not None]


def ops_report(models: list[str], targets: list[str] | None = None, out: str | os.PathLike | None = None,
               expect_activation: str | None = None, imgsz: int | None = None, command: str | None = None) -> dict:
    """`qbench ops`: every model under every target (all shipped targets that list operators when None), the
    activation census of each model and, with `expect_activation`, the activations that are not it. Writes
    ops.json and ops.md into `out` when given."""
    names = targets or targets_with_ops()
    loaded = [load_profile(t) for t in names]
    if expect_activation:
        parse_activation(expect_activation)  # a bad spec is refused before any export
    if out is not None:
        check_writable(out, "the ops report")
    result = {"command": command, "targets": {t.name: {"source": t.source, "fallback": t.fallback,
                                                       "int_types": list(t.int_types)} for t in loaded},
              "expect_activation": expect_activation, "models": []}
    for model in models:
        graph, how = load_graph(model, imgsz)
        census = activation_census(graph)
        entry = {"model": str(model), "graph": how, "activations": dict(Counter(
                     a["type"] + (f"({a['param']:g})" if a["param"] is not None else "") for a in census)),
                 "census": census, "targets": [analyse(graph, t, str(model)) for t in loaded]}
        if expect_activation:
            entry["offenders"] = verify_activations(census, expect_activation)
        result["models"].append(entry)
    if out is not None:
        out = Path(out)
        write_json(result, out / "ops.json")
        (out / "ops.md").write_text(ops_md(result))
    return result


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def ops_md(r: dict) -> str:
    """The ladder table (models x targets) and, per model, its activations and main fallback causes."""
    lines = ["# Operators on NPU targets", ""]
    if r.get("command"):
        lines += [f"Reproduce: `{r['command']}`", ""]
    lines += ["Share of the graph's nodes and of its multiply-accumulates (Conv, MatMul) a target runs on its NPU, "
              "over the whole graph and over its body (the YOLO decode left out, as deployments cut it off); CPU "
              "partitions: connected groups of nodes that fall back; transitions: graph edges between the two "
              "sides; MB crossing: their tensors at one byte per element (int8), batch 1.", "",
              "| model | target | nodes (all) | nodes (body) | MACs (all) | MACs (body) | CPU partitions | "
              "transitions | MB crossing | main fallback causes |", "|" + "---|" * 10]
    for m in r["models"]:
        for t in m["targets"]:
            causes = "; ".join(f"{c['reason']} x{c['nodes']}" for c in t["causes"][:3]) or "none"
            lines.append(f"| {Path(m['model']).name} | {t['target']} | {_pct(t['all']['share_nodes'])} | "
                         f"{_pct(t['body']['share_nodes'])} | {_pct(t['all']['share_macs'])} | "
                         f"{_pct(t['body']['share_macs'])} | {t['cpu_partitions']} | {t['transitions']} | "
                         f"{t['crossing_bytes_int8'] / 1e6:.1f} | {causes} |")
    lines += ["", "## Models", ""]
    for m in r["models"]:
        acts = ", ".join(f"{k} x{v}" for k, v in m["activations"].items()) or "none"
        lines.append(f"- `{m['model']}` ({m['graph']}): activations {acts}.")
        pats = {p["pattern"]: p for t in m["targets"] for p in t["patterns"]}
        for p in pats.values():
            lines.append(f"  - {p['nodes']} nodes of {p['rewrite']}")
        if "offenders" in m:
            lines.append(f"  - expected {r['expect_activation']}: "
                         + (f"{len(m['offenders'])} offenders, e.g. " + ", ".join(
                             f"{o['layer']} {o['type']}" + (f"({o['param']:g})" if o['param'] is not None else "")
                             for o in m["offenders"][:3]) if m["offenders"] else "every activation matches"))
    lines += ["", "## Targets", ""]
    lines += [f"- {name}: {t['source']} (int types {', '.join(t['int_types'])}; unsupported ops: "
              f"{'run on the host CPU' if t['fallback'] == 'cpu' else 'refused by the compiler'})"
              for name, t in r["targets"].items()]
    return "\n".join(lines) + "\n"
