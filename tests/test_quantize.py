"""qbench.quantization: recipes, YOLO head detection, ONNX Runtime static INT8 (real exports, real ORT sessions)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import IMGSZ, REPO
from onnx import TensorProto, helper

from qbench.calibration import CalibrationReader
from qbench.errors import QbenchError
from qbench.quantization import (
    Recipe,
    available_recipes,
    find_head,
    load_recipe,
    ort_engine,
    quantize_ort,
    recipe_from_dict,
)
from qbench.quantization.recipe import KEYS, write_recipe

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it


# --------------------------------------------------------------------------- fixtures
# untrained exports at IMGSZ (leaky_onnx, silu_onnx, relu_onnx) and the 12-image manifest (calib): conftest.py
@pytest.fixture(scope="session")
def quantized(leaky_onnx, calib, tmp_path_factory):
    """The default recipe on the untrained leaky export, run from an empty working folder (to catch litter)."""
    import os

    out = tmp_path_factory.mktemp("q") / "run" / "int8.onnx"
    cwd, old = tmp_path_factory.mktemp("cwd"), os.getcwd()
    os.chdir(cwd)
    try:
        report = quantize_ort(leaky_onnx, out, "default", calib)
    finally:
        os.chdir(old)
    report["_cwd_after"] = sorted(p.name for p in cwd.iterdir())
    return report, out


def _optimized(model: Path, tmp: Path) -> onnx.ModelProto:
    """What ONNX Runtime runs after ORT_ENABLE_ALL (QDQ groups fused into QLinear ops)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp / f"{model.stem}.opt.onnx")
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _sample_batch(calib: Path) -> np.ndarray:
    from qbench.calibration import load_manifest

    _, paths = load_manifest(calib)
    return CalibrationReader(paths[:2], IMGSZ, "images", batch=2).get_next()["images"]


# --------------------------------------------------------------------------- recipes
def test_shipped_recipes_load_and_default_values():
    names = available_recipes()
    assert {"default", "entropy", "percentile"} <= set(names)
    for n in names:
        assert isinstance(load_recipe(n), Recipe)
    r = load_recipe("default")
    assert load_recipe(None) == r
    assert (r.method, r.calib_size, r.per_channel, r.activation_type, r.weight_type) == ("minmax", 128, True,
                                                                                         "uint8", "int8")
    assert (r.activation_symmetric, r.weight_symmetric, r.format, r.keep_head_float, r.reduce_range) == (
        False, True, "qdq", True, False)
    assert recipe_from_dict({}) == Recipe()  # the file spells out the defaults
    p = load_recipe("percentile")
    assert p.effective_percentile == 99.999 and p.effective_num_bins == 2048
    assert load_recipe("entropy").effective_num_bins == 1024


def test_recipe_unknown_key_and_bad_values(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("method: minmax\nfoo: 1\n")
    with pytest.raises(QbenchError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert msg.startswith(f"recipe {f}: unknown key 'foo'; allowed: ") and all(k in msg for k in KEYS)

    cases = {
        "method: kl": ("'method'", "minmax, entropy, percentile, distribution"),
        "activation_type: fp8": ("'activation_type'", "uint8, int8"),
        "weight_type: int4": ("'weight_type'", "int8, uint8"),
        "format: qoperator": ("'format'", "qdq"),
        "calib_size: 4": ("'calib_size'", "from 8 to"),
        "per_channel: maybe": ("'per_channel'", "true or false"),
        "opset: 21": ("'opset'", "from 13 to 20"),
        "method: percentile\npercentile: 50": ("'percentile'", "from 90 to 100"),
        "percentile: 99.9": ("'percentile'", "method: percentile"),
        "num_bins: 64": ("'num_bins'", "entropy, percentile, distribution"),
        "method: distribution\nnum_bins: 128": ("'num_bins'", "from 512"),
        "exclude: [1, 2]": ("'exclude'", "glob patterns"),
        "equalize: 2": ("'equalize'", "from 0 (off) to 1"),
        "equalize: half": ("'equalize'", "from 0 (off) to 1"),
        "shift_negative: sometimes": ("'shift_negative'", "true or false"),
    }
    for text, (key, allowed) in cases.items():
        f.write_text(text + "\n")
        with pytest.raises(QbenchError) as e:
            load_recipe(f)
        assert str(e.value).startswith(f"recipe {f}: {key}"), (text, str(e.value))
        assert allowed in str(e.value), (text, str(e.value))

    f.write_text("- just\n- a list\n")
    with pytest.raises(QbenchError, match="must be a YAML mapping"):
        load_recipe(f)
    f.write_text("method: [minmax\n")
    with pytest.raises(QbenchError, match=r"line \d+ is not valid YAML"):
        load_recipe(f)
    with pytest.raises(QbenchError, match="neither a file nor a recipe name .*default"):
        load_recipe("no-such-recipe")


def test_recipe_yaml_roundtrip(tmp_path):
    r = recipe_from_dict({"method": "entropy", "num_bins": 256, "exclude": ["/model.0/*"], "calib_size": 64,
                          "activation_type": "INT8"}, "x")
    assert r.activation_type == "int8" and r.exclude == ("/model.0/*",)
    p = write_recipe(r, tmp_path / "recipe.yaml", resolved={"excluded_nodes": ["/a", "/b"]})
    back = load_recipe(p)  # the informational 'resolved' section is accepted and ignored
    assert back == r
    assert "excluded_nodes" in p.read_text()
    assert r.replace(per_channel=False).per_channel is False
    with pytest.raises(QbenchError, match="'calib_size'"):
        r.replace(calib_size=2)


# --------------------------------------------------------------------------- head detection
@pytest.mark.parametrize("act", ["leaky", "silu"])
def test_head_found_from_the_graph(act, leaky_onnx, silu_onnx):
    path = {"leaky": leaky_onnx, "silu": silu_onnx}[act]
    model = onnx.load(str(path))
    head = find_head(model, path)
    nodes = {n.name: n for n in model.graph.node}
    # 3 scales x (box, class) branch convs, then the float decode
    assert len(head.branch_convs) == 6 and all(nodes[n].op_type == "Conv" for n in head.branch_convs)
    assert len(head.dfl_convs) == 1
    dfl = nodes[head.dfl_convs[0]]
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == dfl.input[1]))
    np.testing.assert_array_equal(w.reshape(-1), np.arange(16))
    ops = head.decode_op_types
    assert ops["Sigmoid"] == 1 and ops["Softmax"] == 1 and ops["Conv"] == 1 and ops["Concat"] >= 3
    assert {"Reshape", "Sub", "Add", "Mul", "Div", "Slice", "Transpose"} <= set(ops)
    produced = {o: n.name for n in model.graph.node for o in n.output}
    assert produced[model.graph.output[0].name] in head.decode  # the final concat
    # nothing of the backbone/neck: no activations, no upsampling, and the body convs are untouched
    assert not {"LeakyRelu", "Resize", "MaxPool", "Split"} & set(ops)
    if act == "silu":  # SiLU = Conv -> Sigmoid -> Mul: only the class sigmoid belongs to the head
        assert _ops(model)["Sigmoid"] > 50 and ops["Sigmoid"] == 1


def _model(nodes, inp, out, inits=(), names=None) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [inp], [out], initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    if names is not None:
        e = m.metadata_props.add()
        e.key, e.value = "names", repr(names)
    return m


def test_non_yolo_onnx_is_rejected(tmp_path, calib):
    x4 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    add = _model([helper.make_node("Add", ["x", "x"], ["y"], name="add")], x4,
                 helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8]))
    onnx.save(add, tmp_path / "add.onnx")
    with pytest.raises(QbenchError, match=r"'.*add.onnx' is not a YOLO detector: its output is shaped \[1, 3, 8, 8\]"):
        quantize_ort(tmp_path / "add.onnx", tmp_path / "o.onnx", "default", calib)

    x2 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    flat = _model([helper.make_node("Add", ["x", "x"], ["y"], name="add")], x2,
                  helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]))
    onnx.save(flat, tmp_path / "flat.onnx")
    with pytest.raises(QbenchError, match="not a YOLO detector: it needs one 4-D image input"):
        quantize_ort(tmp_path / "flat.onnx", tmp_path / "o.onnx", "default", calib)

    # the right output shape, but no convolution: the head walk reaches the input
    shape = onnx.numpy_helper.from_array(np.array([1, 8, 24], np.int64), "shape")
    reshape = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")], x4,
                     helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 24]), [shape])
    onnx.save(reshape, tmp_path / "reshape.onnx")
    with pytest.raises(QbenchError, match="not a YOLO detector: its output is computed from the input without"):
        quantize_ort(tmp_path / "reshape.onnx", tmp_path / "o.onnx", "default", calib)

    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(QbenchError, match="junk.onnx"):
        quantize_ort(tmp_path / "junk.onnx", tmp_path / "o.onnx", "default", calib)
    assert not (tmp_path / "o.onnx").exists() and not list(tmp_path.glob("*recipe.yaml"))


def test_calibration_set_too_small_or_empty(leaky_onnx, calib, tmp_path):
    from qbench.calibration import load_manifest

    _, paths = load_manifest(calib)
    with pytest.raises(QbenchError, match="5 images is too small for stable ranges; use at least 8 \\(default 128\\)"):
        quantize_ort(leaky_onnx, tmp_path / "o.onnx", "default", paths[:5])
    with pytest.raises(QbenchError, match="calibration set is empty"):
        quantize_ort(leaky_onnx, tmp_path / "o.onnx", "default", [])
    with pytest.raises(QbenchError, match="takes 64x64 images, not 96"):
        quantize_ort(leaky_onnx, tmp_path / "o.onnx", "default", paths, imgsz=96)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- quantization
def test_quantized_model_runs_and_is_fused_by_ort(quantized, leaky_onnx, calib, tmp_path):
    import onnxruntime as ort

    from qbench.models.export import read_onnx_meta
    from qbench.runtime import ort_session

    report, out = quantized
    q = onnx.load(str(out))
    ops = _ops(q)
    assert ops["QuantizeLinear"] > 100 and ops["DequantizeLinear"] > 100
    assert report["nodes"]["QuantizeLinear"] == ops["QuantizeLinear"]

    fp32 = onnx.load(str(leaky_onnx))
    n_conv = _ops(fp32)["Conv"]
    opt = _optimized(out, tmp_path)
    oops = _ops(opt)
    # every conv but the fixed DFL conv runs as int8 QLinearConv; LeakyReLU fuses into QLinearLeakyRelu
    assert oops["QLinearConv"] == n_conv - 1 == 63
    assert oops["QLinearLeakyRelu"] == _ops(fp32)["LeakyRelu"]
    assert oops["Conv"] == 1
    assert report["qlinear_ops"]["QLinearConv"] == oops["QLinearConv"]
    assert "QLinearSigmoid" not in oops and "QLinearSoftmax" not in oops

    # it runs on CPU and, even untrained, agrees with the FP32 model on real images
    x = _sample_batch(calib)
    y32 = ort_session(leaky_onnx, 1).run(None, {"images": x})[0]
    y8 = ort_session(out, 1).run(None, {"images": x})[0]
    assert y8.shape == y32.shape == (2, 8, 84) and np.isfinite(y8).all()
    assert np.abs(y8[:, :4] - y32[:, :4]).max() < 1.0  # pixels
    assert np.abs(y8[:, 4:] - y32[:, 4:]).max() < 0.01
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[0] == "batch"

    meta = read_onnx_meta(out)  # class names and imgsz travel with the model
    assert meta["names"] == read_onnx_meta(leaky_onnx)["names"] and meta["imgsz"] == IMGSZ
    assert meta["metadata"]["qbench_quant_method"] == "minmax"

    assert report["calibration"]["images"] == 12 and report["calibration"]["requested"] == 128
    assert report["size_bytes"]["int8"] < report["size_bytes"]["fp32"] / 3
    json.dumps(report)  # JSON-able


def test_head_decode_stays_float(quantized, leaky_onnx, tmp_path):
    report, out = quantized
    q = onnx.load(str(out))
    prod = {o: n for n in q.graph.node for o in n.output}
    cons = {}
    for n in q.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    head = report["head"]
    excluded = {e["node"]: e for e in report["excluded"]}
    assert set(excluded) == set(head["decode"])
    assert excluded[head["dfl_convs"][0]]["reason"].startswith("DFL conv")
    assert head["qdq_in_decode"] == []

    def float_node(n):
        assert not any(prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in n.input), n.name
        assert not any(c.op_type == "QuantizeLinear" for o in n.output for c in cons.get(o, [])), n.name

    by_op = {}
    for n in q.graph.node:
        if n.name in excluded:
            by_op.setdefault(n.op_type, []).append(n)
    # the class sigmoid, the DFL softmax and conv, all concats of the decode, the box arithmetic
    for op in ("Sigmoid", "Softmax", "Conv", "Concat", "Sub", "Add", "Mul", "Div", "Slice"):
        assert by_op[op], op
        for n in by_op[op]:
            float_node(n)
    final = prod[q.graph.output[0].name]
    assert final.op_type == "Concat" and final.name in excluded
    dfl = by_op["Conv"][0]
    assert dfl.input[1] in {t.name for t in q.graph.initializer}  # float weights, no DequantizeLinear
    # the decode reads the branch convs' outputs through exactly one DequantizeLinear each
    for conv in head["branch_convs"]:
        (c,) = [n for n in q.graph.node if n.name == conv]
        (qn,) = cons[c.output[0]]
        assert qn.op_type == "QuantizeLinear"
        (dq,) = cons[qn.output[0]]
        assert dq.op_type == "DequantizeLinear" and all(n.name in excluded for n in cons[dq.output[0]])
    # after ORT's fusion the output still comes from a float Concat fed by float Sigmoid and box math
    opt = _optimized(out, tmp_path)
    oprod = {o: n for n in opt.graph.node for o in n.output}
    last = oprod[opt.graph.output[0].name]
    assert last.op_type == "Concat" and {oprod[i].op_type for i in last.input} == {"Mul", "Sigmoid"}


def test_recipe_yaml_written_next_to_the_model(quantized):
    report, out = quantized
    rp = out.with_name("recipe.yaml")
    assert report["recipe_file"] == str(rp)
    assert sorted(p.name for p in out.parent.iterdir()) == ["int8.onnx", "recipe.yaml"]  # no temp files left
    # nothing in the working folder either (ORT's shape inference drops sym_shape_infer_temp.onnx + <uuid>.data
    # into the current folder when it gives up, which it does on batch-dynamic exports)
    assert report["_cwd_after"] == [] and report["preprocess"]["shape_inference"] == "symbolic+auto_merge"
    assert load_recipe(rp) == load_recipe("default")
    import yaml

    resolved = yaml.safe_load(rp.read_text())["resolved"]
    assert resolved["excluded_nodes"] == [e["node"] for e in report["excluded"]]
    assert len(resolved["head_branch_convs"]) == 6


def test_silu_entropy_with_patterns(silu_onnx, calib, tmp_path):
    """A SiLU model, the entropy method (histograms, several calibration chunks), exclude/include patterns."""
    r = recipe_from_dict({"method": "entropy", "exclude": ["/model.0/*", "/nothing/*"],
                          "include": ["/model.23/Sigmoid"], "calib_size": 10}, "t")
    out = tmp_path / "int8.onnx"
    report = quantize_ort(silu_onnx, out, r, calib)
    assert report["calibration"]["images"] == 10 and report["calibration"]["num_bins"] == 1024
    reasons = {e["node"]: e["reason"] for e in report["excluded"]}
    assert reasons["/model.0/conv/Conv"] == "recipe exclude '/model.0/*'"
    assert report["forced_in"] == ["/model.23/Sigmoid"] and "/model.23/Sigmoid" not in reasons
    assert report["unmatched_patterns"] == {"exclude": ["/nothing/*"], "include": []}
    oops = _ops(_optimized(out, tmp_path))
    fp32 = _ops(onnx.load(str(silu_onnx)))
    # first conv and the DFL conv stay float; SiLU's sigmoid/mul run as int8; the forced class sigmoid too
    assert oops["QLinearConv"] == fp32["Conv"] - 2
    assert oops["QLinearSigmoid"] == fp32["Sigmoid"] - 1  # the first conv's SiLU sigmoid is excluded
    x = _sample_batch(calib)
    from qbench.runtime import ort_session

    assert np.isfinite(ort_session(out, 1).run(None, {"images": x})[0]).all()


def test_keep_head_float_off_quantizes_the_decode(leaky_onnx, calib, tmp_path):
    report = quantize_ort(leaky_onnx, tmp_path / "int8.onnx", load_recipe("default").replace(keep_head_float=False),
                          calib)
    assert report["excluded"] == []
    oops = _ops(_optimized(tmp_path / "int8.onnx", tmp_path))
    assert oops["QLinearConv"] == 64 and oops["QLinearSigmoid"] == 1


def test_without_ort_calibration_cache_quantize_static_recalibrates(leaky_onnx, calib, tmp_path, monkeypatch):
    """ORT before calibration_cache_path: quantize_static calibrates itself, strided (one batch per call)."""
    monkeypatch.setattr(ort_engine, "_ort_has_calibration_cache", lambda: False)
    report = quantize_ort(leaky_onnx, tmp_path / "int8.onnx", "default", calib)
    assert report["calibration"]["ranges"].startswith("recalibrated by quantize_static")
    assert report["qlinear_ops"]["QLinearConv"] == 63


@pytest.mark.skipif(not (REPO / "results/training/synth-l3-leaky-320/weights/best.pt").exists(),
                    reason="the trained default model is not there yet")
def test_trained_default_model_percentile(calib, tmp_path):
    from qbench.models.export import export_onnx

    fp32 = export_onnx(REPO / "results/training/synth-l3-leaky-320/weights/best.pt", tmp_path / "fp32.onnx",
                       imgsz=96)
    report = quantize_ort(fp32, tmp_path / "int8.onnx", "percentile", calib)
    assert report["calibration"]["percentile"] == 99.999
    assert report["qlinear_ops"]["QLinearConv"] == report["nodes"]["quantized"]["Conv"]
    assert report["head"]["qdq_in_decode"] == []


def test_streamed_histograms_equal_ort_one_shot(leaky_onnx, calib, tmp_path):
    """Entropy ranges from our chunked, pre-sized histograms are exactly what ORT computes from all images at once."""
    import contextlib
    import io

    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from qbench.calibration import load_manifest

    _, paths = load_manifest(calib)
    pre = tmp_path / "pre.onnx"
    ort_engine._preprocess(leaky_onnx, pre)
    ops = ort_engine._op_types_to_quantize()
    reader = CalibrationReader(paths, IMGSZ, "images")
    recipe = load_recipe("entropy").replace(num_bins=256)  # small enough for a fast KL search
    ours, _, seeded, _ = ort_engine._calibrate(pre, tmp_path, recipe, reader, ops, leaky_onnx)
    assert len(paths) > ort_engine.CHUNK_IMAGES  # really several chunks
    assert reader.images_read == 2 * len(paths)  # a min/max pass, then the histograms
    with contextlib.redirect_stdout(io.StringIO()):
        c = create_calibrator(pre, ops, augmented_model_path=str(tmp_path / "a.onnx"),
                              calibrate_method=CalibrationMethod.Entropy,
                              extra_options={"symmetric": False, "num_bins": 256})
        c.collect_data(CalibrationReader(paths, IMGSZ, "images"))
        ref = c.compute_data()
        m = create_calibrator(pre, ops, augmented_model_path=str(tmp_path / "m.onnx"))
        m.collect_data(CalibrationReader(paths, IMGSZ, "images"))
        minmax = m.compute_data()
    assert seeded > 150 and set(ours.keys()) == set(ref.keys())
    for k in ref.keys():
        for a, b in zip(ours[k].range_value, ref[k].range_value):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
    # and entropy really searched: with more bins than its 128 quantized bins it clips some ranges below min/max
    # (ORT's default of 128 bins leaves one candidate and silently returns the min/max range)
    clipped = [k for k in ref.keys()
               if float(np.ravel(ref[k].range_value[1])[0]) < float(np.ravel(minmax[k].range_value[1])[0]) - 1e-6]
    assert len(clipped) >= 3, len(clipped)


@pytest.mark.parametrize("method", ["percentile", "distribution"])
def test_other_histogram_methods_quantize(method, leaky_onnx, calib, tmp_path):
    report = quantize_ort(leaky_onnx, tmp_path / "int8.onnx", recipe_from_dict({"method": method}, method), calib)
    assert report["calibration"]["passes"] == 2 and report["calibration"]["num_bins"] == 2048
    assert report["qlinear_ops"]["QLinearConv"] == 63 and report["head"]["qdq_in_decode"] == []


def test_plain_ultralytics_dynamic_export(calib, tmp_path):
    """ultralytics' own dynamic=True export computes anchors from Shape ops at run time: still found and kept float."""
    from ultralytics import YOLO

    import qbench.ultra  # noqa: F401

    pt = tmp_path / "m.pt"
    YOLO(str(REPO / "configs" / "models" / "yolo11n-l3-leaky.yaml")).save(str(pt))
    f = Path(YOLO(str(pt)).export(format="onnx", imgsz=IMGSZ, dynamic=True, simplify=True, opset=17, device="cpu"))
    with pytest.raises(QbenchError, match="dynamic input size; pass imgsz"):
        quantize_ort(f, tmp_path / "q" / "int8.onnx", "default", calib)
    report = quantize_ort(f, tmp_path / "q" / "int8.onnx", "default", calib, imgsz=IMGSZ)
    assert report["head"]["decode_op_types"]["Shape"] >= 3 and report["head"]["qdq_in_decode"] == []
    assert report["qlinear_ops"]["QLinearConv"] == 63


def test_equalize_keeps_the_float_function_and_evens_channel_ranges(calib, tmp_path):
    import onnx
    import onnxruntime as ort

    from qbench.calibration import CalibrationReader, load_manifest
    from qbench.graph.detector import PREPARED_FP32, PREPARED_META, preparation_of
    from qbench.models.export import export_onnx
    from qbench.quantization.equalize import channel_ranges, equalize, find_chains
    from qbench.runtime import ort_session

    fp32 = export_onnx(REPO / "results/training/synth-l3-leaky-320/weights/best.pt", tmp_path / "fp32.onnx",
                       imgsz=96)
    model = onnx.load(str(fp32))
    chains = find_chains(model)
    assert len(chains) > 15 and all(a.op_type == "Conv" and act.op_type == "LeakyRelu" and b.op_type == "Conv"
                                    for a, act, b in chains)
    _, paths = load_manifest(calib)
    name = model.graph.input[0].name
    tensors = [a.output[0] for a, _, _ in chains]
    before = channel_ranges(model, tensors, CalibrationReader(paths, 96, name), 8)
    rep = equalize(model, CalibrationReader(paths, 96, name), alpha=1.0, images=8)
    assert rep["chains"] == len(rep["layers"]) == len(chains) and rep["images"] == 8
    after = channel_ranges(model, tensors, CalibrationReader(paths, 96, name), 8)
    for t in tensors:  # alpha 1: every channel of the calibration images reaches the tensor's range
        assert np.isclose(after[t].max(), before[t].max(), rtol=1e-3)
        assert np.median(after[t] / after[t].max()) > 0.99 > np.median(before[t] / before[t].max())
    x = CalibrationReader(paths[8:10], 96, name).get_next()
    y0 = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, x)[0]
    y1 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(y1, y0, rtol=1e-3, atol=1e-2 * np.abs(y0).max())  # the same function in float

    rec = load_recipe("default").replace(equalize=0.5, calib_size=12)
    r = quantize_ort(fp32, tmp_path / "int8.onnx", rec, calib)  # writes its float reference next to it
    assert r["equalize"]["chains"] == len(chains) and r["qlinear_ops"]["QLinearConv"] > 50
    q = onnx.load(str(tmp_path / "int8.onnx"))
    tag = {p.key: p.value for p in q.metadata_props}[PREPARED_META]
    assert tag.startswith("equalize 0.5 ") and preparation_of(onnx.load(str(tmp_path / PREPARED_FP32))) == tag
    with pytest.raises(QbenchError, match="precomputed ranges"):
        quantize_ort(fp32, tmp_path / "x.onnx", rec, None, ranges=tmp_path / "ranges.json")
    from qbench.quantization.fallback import conv_layers, keep_float

    with pytest.raises(QbenchError, match="equalize"):  # float fallback would mix rescaled and original weights
        keep_float(q, onnx.load(str(fp32)), conv_layers(q)[:1])
    feq = onnx.load(str(tmp_path / PREPARED_FP32))  # ... so it falls back to the equalized FP32 weights
    y2 = ort.InferenceSession(feq.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(y2, y0, rtol=1e-3, atol=1e-2 * np.abs(y0).max())
    layers = conv_layers(q)
    mixed = keep_float(q, feq, layers)  # every conv back in float: close to the float model, not garbage
    y3 = ort.InferenceSession(mixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    y4 = ort_session(tmp_path / "int8.onnx").run(None, x)[0]  # exact int8 on every CPU
    assert np.abs(y3 - y0).mean() < np.abs(y4 - y0).mean()
    from qbench.analysis.inspect import inspect_models

    with pytest.raises(QbenchError, match=PREPARED_FP32):  # its tensors are not the original FP32 model's ...
        inspect_models(fp32, tmp_path / "int8.onnx", paths[:2], paths[:2], out=tmp_path / "inspect")
    quantize_ort(fp32, tmp_path / "plain" / "int8.onnx", rec.replace(equalize=0.0), calib)
    with pytest.raises(QbenchError, match="quantized from"):  # ... nor the equalized FP32's those of a plain INT8
        inspect_models(tmp_path / PREPARED_FP32, tmp_path / "plain" / "int8.onnx", paths[:2], paths[:2],
                       out=tmp_path / "inspect")
    res = inspect_models(tmp_path / PREPARED_FP32, tmp_path / "int8.onnx", paths[:2], paths[2:4],
                         out=tmp_path / "inspect")  # ... but they are the equalized FP32 model's
    s = res["summary"]  # every tensor, the rescaled ones included, close to its float reference (16.7 / 32 dB here)
    assert s["quantized_tensors"] > 100 and s["min_cumulative_sqnr_db"] > 10 and s["output_sqnr_db"] > 25


def test_shift_negative_keeps_the_float_function_and_gives_symmetric_int8_the_asymmetric_step(calib, tmp_path):
    import onnxruntime as ort

    from qbench.calibration import load_manifest
    from qbench.graph.detector import PREPARED_FP32, PREPARED_META, preparation_of
    from qbench.models.export import export_onnx
    from qbench.quantization.fallback import conv_layers, keep_float
    from qbench.quantization.profile import apply_profile
    from qbench.quantization.shift import SHIFT_SUFFIX, shift_negative
    from qbench.runtime import ort_session

    fp32 = export_onnx(REPO / "results/training/synth-l3-leaky-320/weights/best.pt", tmp_path / "fp32.onnx",
                       imgsz=96)
    model = onnx.load(str(fp32))
    n_leaky = sum(n.op_type == "LeakyRelu" for n in model.graph.node)
    _, paths = load_manifest(calib)
    name = model.graph.input[0].name
    rep = shift_negative(model, CalibrationReader(paths, 96, name), images=8)
    shifted = {s["tensor"]: s for s in rep["shifted"]}
    assert name in shifted and abs(shifted[name]["shift"] - 0.5) < 0.05  # the [0, 1] image, centred
    assert len(shifted) > 0.9 * n_leaky and not rep["undone"]  # Split, Concat, Add, MaxPool, Resize carry shifts
    assert rep["pads_added"] > 10 and rep["absorbed_by_conv"] >= len(shifted)
    x = CalibrationReader(paths, 96, name, batch=len(paths)).get_next()
    y0 = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, x)[0]
    y1 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(y1, y0, rtol=1e-3, atol=1e-3 * np.abs(y0).max())  # the same function in float

    def err(q):  # qbench's sessions: exact int8 on every CPU (ORT's u8s8 kernels saturate without VNNI)
        y = ort_session(q).run(None, x)[0]
        return float(np.mean((y - y0) ** 2))

    for fusion in ("fused", "unfused"):
        plain = apply_profile("default", "npu-symmetric", fusion).replace(calib_size=12)
        rec = plain.replace(shift_negative=True)
        r = quantize_ort(fp32, tmp_path / fusion / "int8.onnx", rec, calib)
        assert r["constraints"]["shift_negative"]["qdq_pairs_removed"] == len(shifted) - 1  # the input has none
        quantize_ort(fp32, tmp_path / fusion / "plain.onnx", plain, calib)
        q = onnx.load(str(tmp_path / fusion / "int8.onnx"))
        prod = {o: n for n in q.graph.node for o in n.output}
        adds = [n for n in q.graph.node if n.name.endswith(SHIFT_SUFFIX)]
        assert len(adds) == len(shifted)
        for a in adds:  # the activation and its shift are one op: nothing quantized between them, the output is
            assert prod.get(a.input[0]) is None or prod[a.input[0]].op_type == "LeakyRelu"
            assert all(c.op_type == "QuantizeLinear" for c in q.graph.node if a.output[0] in c.input)
        # centred tensors on the symmetric grid: measurably closer to FP32 than without the shifts
        ratio = err(tmp_path / fusion / "int8.onnx") / err(tmp_path / fusion / "plain.onnx")
        print(f"shift-negative {fusion}: output MSE {ratio:.3f}x the unshifted model's")
        assert ratio < 0.9, (fusion, ratio)
        assert r["shift_negative"]["snapped_to_grid"] == len(shifted)  # the Pads pad with values on the grid
        assert r["shift_negative"]["images"] == 12  # the shifts' images (calib_size 12 < MAX_IMAGES)

    tag = {p.key: p.value for p in q.metadata_props}[PREPARED_META]
    prepared = onnx.load(str(tmp_path / "unfused" / PREPARED_FP32))
    assert tag.startswith("shift_negative ") and preparation_of(prepared) == tag
    with pytest.raises(QbenchError, match="shift_negative"):  # the shifts come from calibration images
        quantize_ort(fp32, tmp_path / "x.onnx", rec, None, ranges=tmp_path / "ranges.json")
    with pytest.raises(QbenchError, match="prepared alike"):  # fallback to the unshifted weights would be wrong ...
        keep_float(q, onnx.load(str(fp32)), conv_layers(q)[:1])
    mixed = keep_float(q, prepared, conv_layers(q))  # ... to the shifted ones: every conv float, close to FP32
    y3 = ort.InferenceSession(mixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert float(np.mean((y3 - y0) ** 2)) < err(tmp_path / "unfused" / "int8.onnx")
