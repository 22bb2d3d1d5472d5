"""`qbench ops`: operator support per NPU target on small hand-built ONNX graphs (every expected figure follows from
the graph drawn in the docstring), the activation verifier on real models, and target files validated like recipes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import REPO, run_cli
from onnx import TensorProto, helper, numpy_helper, shape_inference

from qbench.analysis.ops import activation_census, analyse, check_node, load_graph, verify_activations
from qbench.errors import QbenchError
from qbench.quantization.profile import load_profile

TARGET = """\
name: tiny-npu
source: "a test target"
int_types: [int8, int16]
fallback: cpu
ops:
  Conv: {kernel: [1, 3], stride: [1, 1]}
  LeakyRelu: {alpha: [0.1, 0.1]}
  Concat: {axis: [1]}
  Add: {broadcast: false}
  Resize: {mode: [nearest], scale: [2]}
"""


def _w(name, cout, cin, k):
    return numpy_helper.from_array(np.full((cout, cin, k, k), 0.01, np.float32), name)


def _model(nodes, inits, out_shape, in_shape=(1, 3, 16, 16)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(out_shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return shape_inference.infer_shapes(m)


@pytest.fixture
def target(tmp_path):
    f = tmp_path / "tiny-npu.yaml"
    f.write_text(TARGET)
    return load_profile(f)


@pytest.fixture
def ladder():
    """images(1,3,16,16) -> c1 Conv3x3 s1 (8) -> l1 LeakyRelu(0.1) -> c2 Conv3x3 **s2** -> SiLU (s Sigmoid, m Mul)
    -> c3 Conv1x1 -> l2 LeakyRelu(**0.2**) -> head convs h1, h2 (4 each) -> Concat (the 'decode')."""
    n = helper.make_node
    nodes = [n("Conv", ["images", "w1"], ["c1"], "/model.0/conv/Conv", kernel_shape=[3, 3], pads=[1] * 4),
             n("LeakyRelu", ["c1"], ["l1"], "/model.0/act/LeakyRelu", alpha=0.1),
             n("Conv", ["l1", "w2"], ["c2"], "/model.1/conv/Conv", kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
             n("Sigmoid", ["c2"], ["s"], "/model.1/act/Sigmoid"),
             n("Mul", ["c2", "s"], ["m"], "/model.1/act/Mul"),
             n("Conv", ["m", "w3"], ["c3"], "/model.2/conv/Conv", kernel_shape=[1, 1]),
             n("LeakyRelu", ["c3"], ["l2"], "/model.2/act/LeakyRelu", alpha=0.2),
             n("Conv", ["l2", "wh1"], ["h1"], "/model.3/cv2/Conv", kernel_shape=[1, 1]),
             n("Conv", ["l2", "wh2"], ["h2"], "/model.3/cv3/Conv", kernel_shape=[1, 1]),
             n("Concat", ["h1", "h2"], ["out"], "/model.3/Concat", axis=1)]
    inits = [_w("w1", 8, 3, 3), _w("w2", 8, 8, 3), _w("w3", 8, 8, 1), _w("wh1", 4, 8, 1), _w("wh2", 4, 8, 1)]
    return _model(nodes, inits, (1, 8, 8, 8))


def test_partitions_transitions_and_shares_on_a_hand_built_graph(ladder, target):
    r = analyse(ladder, target, "ladder")
    by = {v["node"]: v for v in r["cpu_nodes"]}
    assert by["/model.1/conv/Conv"]["reason"] == "Conv stride 2x2 outside 1..1"
    assert by["/model.1/act/Sigmoid"]["reason"] == "Sigmoid is not supported"
    assert by["/model.2/act/LeakyRelu"]["reason"] == "LeakyRelu slope 0.2"
    assert list(by) == ["/model.1/conv/Conv", "/model.1/act/Sigmoid", "/model.1/act/Mul", "/model.2/act/LeakyRelu"]
    assert by["/model.1/act/Mul"]["pattern"] == by["/model.1/act/Sigmoid"]["pattern"] == "silu"
    assert by["/model.1/conv/Conv"]["macs"] == 36864 and by["/model.1/act/Mul"]["part"] == "body"
    # CPU side: {c2, Sigmoid, Mul} (connected) and {l2}: two partitions. Edges across: l1->c2, m->c3, c3->l2,
    # l2->h1, l2->h2 = 5, carrying 8x16x16 + 4 x 8x8x8 = 4096 int8 elements.
    assert (r["cpu_partitions"], r["transitions"], r["crossing_bytes_int8"]) == (2, 5, 4096)
    assert r["crossing_bytes_float32"] == 4 * 4096
    # MACs: c1 8*16*16*27, c2 8*8*8*72, c3 512*8, h1 and h2 256*8 each.
    macs = {"c1": 55296, "c2": 36864, "c3": 4096, "h": 2048}
    total = macs["c1"] + macs["c2"] + macs["c3"] + 2 * macs["h"]
    assert r["all"] == {"nodes": 10, "npu_nodes": 6, "share_nodes": 0.6, "macs": total,
                        "npu_macs": total - macs["c2"], "share_macs": round((total - macs["c2"]) / total, 4)}
    assert r["body"]["nodes"] == 9 and r["body"]["npu_nodes"] == 5
    assert [c["reason"] for c in r["causes"]] == ["Conv stride 2x2 outside 1..1", "LeakyRelu slope 0.2",
                                                 "Mul is not supported", "Sigmoid is not supported"]
    assert [p["pattern"] for p in r["patterns"]] == ["silu", "decode"]
    assert r["patterns"][0]["on_cpu"] == 2 and "LeakyReLU(0.1) or ReLU" in r["patterns"][0]["rewrite"]


def test_every_node_runs_when_the_target_allows_it(ladder, tmp_path):
    f = tmp_path / "loose.yaml"
    f.write_text(TARGET.replace("stride: [1, 1]", "stride: [1, 2]").replace("alpha: [0.1, 0.1]", "alpha: [0, 1]")
                 + "  Sigmoid: {}\n  Mul: {}\n")
    r = analyse(ladder, load_profile(f), "ladder")
    assert r["all"]["share_nodes"] == r["all"]["share_macs"] == 1.0
    assert (r["cpu_partitions"], r["transitions"], r["crossing_bytes_int8"], r["causes"]) == (0, 0, 0, [])


def _single(op, inputs, shapes, inits=(), **attrs):
    """check_node's view of one node: (node, shapes, initializers)."""
    node = helper.make_node(op, list(inputs), ["y"], op, **attrs)
    return node, dict(shapes), {t.name: t for t in inits}


@pytest.mark.parametrize("scale, reason", [([1, 1, 2, 2], ""), ([1, 1, 3, 3], "Resize scale 3x3")])
def test_resize_scale(target, scale, reason):
    sc = numpy_helper.from_array(np.array(scale, np.float32), "sc")
    node, shapes, init = _single("Resize", ["x", "", "sc"], {"x": [1, 8, 4, 4]}, [sc], mode="nearest")
    assert check_node(node, target.ops["Resize"], shapes, init) == reason
    node, shapes, init = _single("Resize", ["x", "", "sc"], {"x": [1, 8, 4, 4]}, [sc], mode="linear")
    assert check_node(node, target.ops["Resize"], shapes, init) == "Resize mode linear"


def test_broadcasting_add_and_axis(target):
    node, shapes, init = _single("Add", ["a", "b"], {"a": [1, 8, 4, 4], "b": [1, 8, 4, 4]})
    assert check_node(node, target.ops["Add"], shapes, init) == ""
    node, shapes, init = _single("Add", ["a", "b"], {"a": [1, 8, 4, 4], "b": [1, 8, 1, 1]})
    assert check_node(node, target.ops["Add"], shapes, init) == "Add with broadcasting"
    node, shapes, init = _single("Concat", ["a", "b"], {"a": [1, 8, 4, 4], "b": [1, 8, 4, 4]}, axis=2)
    assert check_node(node, target.ops["Concat"], shapes, init) == "Concat on axis 2"
    node, shapes, init = _single("Concat", ["a", "b"], {"a": [1, 8, 4, 4], "b": [1, 8, 4, 4]}, axis=-3)
    assert check_node(node, target.ops["Concat"], shapes, init) == ""  # -3 of rank 4 is axis 1


def test_census_and_verifier_on_the_hand_built_graph(ladder):
    census = activation_census(ladder)
    assert [(a["layer"], a["type"], a["param"]) for a in census] == [
        ("model.0.act", "LeakyReLU", pytest.approx(0.1)), ("model.1.act", "SiLU", None),
        ("model.2.act", "LeakyReLU", pytest.approx(0.2))]
    assert [a["layer"] for a in verify_activations(census, "LeakyReLU(0.1)")] == ["model.1.act", "model.2.act"]
    assert [a["layer"] for a in verify_activations(census, "leakyrelu")] == ["model.1.act"]
    with pytest.raises(QbenchError, match="--expect-activation 'Swish' is not an activation"):
        verify_activations(census, "Swish")


@pytest.mark.slow
def test_verifier_fails_on_a_silu_model_and_passes_on_the_leaky_one(tmp_path):
    leaky = REPO / "results" / "training" / "synth-l3-leaky-320" / "weights" / "best.pt"
    r = run_cli("ops", "yolov8n.yaml", str(leaky), "--imgsz", "160", "--expect-activation", "LeakyReLU(0.1)",
                "--target", "generic-strict", "--out", str(tmp_path / "ops"))
    assert r.returncode == 1, r.stderr
    assert "yolov8n.yaml: 57 activations are not LeakyReLU(0.1):" in r.stderr
    assert "  model.0.act: SiLU" in r.stderr and str(leaky) + ":" not in r.stderr
    rep = json.loads((tmp_path / "ops" / "ops.json").read_text())
    silu, leaky_m = rep["models"]
    assert silu["activations"] == {"SiLU": 57} and len(silu["offenders"]) == 57
    assert leaky_m["offenders"] == [] and set(leaky_m["activations"]) == {"LeakyReLU(0.1)"}
    # the level-3 LeakyReLU model runs on more of the strict target than stock YOLOv8n
    share = {m["model"]: m["targets"][0]["body"]["share_nodes"] for m in rep["models"]}
    assert share[str(leaky)] > share["yolov8n.yaml"]
    assert (tmp_path / "ops" / "ops.md").read_text().startswith("# Operators on NPU targets")
    r = run_cli("ops", str(leaky), "--imgsz", "160", "--expect-activation", "LeakyReLU(0.1)", "--target",
                "generic-strict")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_ops_refuses_bad_input(tmp_path):
    r = run_cli("ops", str(tmp_path / "nothing.onnx"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ops", "yolov8n.yaml", "--target", "npu-symmetric")
    assert r.returncode == 2 and "target npu-symmetric does not list the operators it runs" in r.stderr
    r = run_cli("ops", "yolov8n.yaml", "--expect-activation", "Swish(2)")
    assert r.returncode == 2 and "is not an activation" in r.stderr
    with pytest.raises(QbenchError, match="is not a model qbench reads"):
        load_graph(tmp_path / "model.tflite")


@pytest.mark.parametrize("line, msg", [
    ("  Conv: {kernal: [1, 3]}\n", "target bad: ops.Conv.kernal is not a known limit; allowed: kernel"),
    ("  Conv: {kernel: 3}\n", "target bad: ops.Conv.kernel is 3; give [min, max]."),
    ("  Conv: {groups: some}\n", "target bad: ops.Conv.groups is 'some'; give one of any, depthwise, 1."),
    ("  Leakyrelu: {}\n", "target bad: ops key 'Leakyrelu' is not an ONNX op type"),
    ("  Add: {broadcast: maybe}\n", "target bad: ops.Add.broadcast is 'maybe'; give true or false."),
])
def test_a_bad_target_file_is_refused_in_one_sentence(tmp_path, line, msg):
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\nsource: x\nint_types: [int8]\nfallback: cpu\nops:\n" + line)
    with pytest.raises(QbenchError) as e:
        load_profile(f)
    assert str(e.value).startswith(msg), str(e.value)


@pytest.mark.slow
def test_an_ops_only_target_is_refused_as_an_arithmetic_profile(tmp_path, synth_small, default_weights):
    r = run_cli("run", "--weights", str(default_weights), "--data", str(synth_small), "--profiles",
                "generic-strict", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "generic-strict" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_generic_strict_is_a_subset_of_every_vendor_target():
    from qbench.analysis.ops import targets_with_ops

    vendors = [load_profile(t) for t in targets_with_ops() if t != "generic-strict"]
    assert {t.name for t in vendors} >= {"rknn-rk3588", "tidl-c7x-mma", "nxp-neutron"}
    for t in vendors:
        assert t.source and "accessed" in t.source and t.fallback in ("cpu", "error")
    strict = load_profile("generic-strict")
    for op in strict.ops:
        assert all(op in t.ops for t in vendors), op
    assert not {"LeakyRelu", "Sigmoid", "Mul", "MatMul", "Softmax"} & set(strict.ops)


@pytest.mark.slow
def test_run_with_targets_reports_ops_next_to_the_accuracy_under_their_arithmetic(tmp_path, synth_small,
                                                                                   default_weights):
    from qbench.report.render import report

    out = tmp_path / "run"
    r = run_cli("run", "--weights", str(default_weights), "--data", str(synth_small), "--out", str(out),
                "--target", "rknn-rk3588", "--target", "tidl-c7x-mma")
    assert r.returncode == 0, r.stderr
    ops = json.loads((out / "ops.json").read_text())
    assert [t["target"] for t in ops["targets"]] == ["rknn-rk3588", "tidl-c7x-mma"]
    assert "--target rknn-rk3588" in ops["command"]
    models = json.loads((out / "compare.json").read_text())["models"]
    assert "int8[rknn-rk3588,fused]" in models and not any(k.startswith("int8[tidl") for k in models)
    q = json.loads((out / "profiles" / "rknn-rk3588-fused" / "quantize.json").read_text())
    assert q["recipe"]["activation_type"] == "int8" and q["recipe"]["activation_symmetric"] is False
    report([out])
    md = (out / "summary.md").read_text()
    sec = md.split("## NPU targets", 1)[1].split("\n## ", 1)[0]
    assert "| rknn-rk3588 | 100.0% |" in sec and "int8[rknn-rk3588,fused]: " in sec
    assert "| tidl-c7x-mma |" in sec and "MaxPool kernel 5x5 outside 1..3" in sec
    assert "not simulated: the target file sets no integer arithmetic" in sec
    r = run_cli("run", "--weights", str(default_weights), "--data", str(synth_small), "--out", str(tmp_path / "x"),
                "--target", "npu-symmetric")
    assert r.returncode == 2 and "--target npu-symmetric lists no operators" in r.stderr
    assert not (tmp_path / "x").exists()
