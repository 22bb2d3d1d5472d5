"""The OpenVINO deployment path: the `openvino` profile's placement (Concat inputs on the output's grid, no Q/DQ
after Split/MaxPool/Resize, the head's last convs writing float) on every family qbench accepts, checked in
OpenVINO's own compiled graph; the `mean_minmax` ranges against their definition; and `qbench run --runtime
openvino` picking that layout and recipe."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import yaml
from conftest import REPO
from onnx import numpy_helper

from qbench.errors import QbenchError
from qbench.quantization import apply_profile, quantize_ort
from qbench.quantization.profile import profile_from_dict
from qbench.quantization.recipe import load_recipe

IMGSZ = 160
MODELS = {"level-3 LeakyReLU": "synth-l3-leaky-320", "stock YOLO11n": "synth-yolo11n-320",
          "stock YOLOv8n": "synth-yolov8n-320"}


def _inits(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _ov_census(path) -> Counter:
    """(layer type, runtime precision) of every op OpenVINO's CPU plugin compiled the model into."""
    from qbench.runtime import openvino_compiled

    compiled = openvino_compiled(path, 1)
    out = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        out[(rt["layerType"].astype(str), rt["runtimePrecision"].astype(str))] += 1
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def family_models(request, tmp_path_factory, calib):
    """One family's FP32 export with its `cpu` fused and `openvino` INT8 models."""
    from qbench.models.export import export_onnx

    td = tmp_path_factory.mktemp("ov")
    weights = REPO / "results" / "training" / MODELS[request.param] / "weights" / "best.pt"
    fp32 = export_onnx(weights, td / "fp32.onnx", imgsz=IMGSZ)
    fused = quantize_ort(fp32, td / "fused" / "int8.onnx", apply_profile("default", "cpu", "fused"), calib)
    ov = quantize_ort(fp32, td / "ov" / "int8.onnx", apply_profile("mean-minmax", "openvino"), calib)
    return request.param, fp32, fused, ov, calib


@pytest.mark.slow
def test_openvino_profile_places_qdq_where_openvino_runs_int8(family_models):
    family, fp32, fused, ov, _ = family_models
    report = ov["constraints"]
    assert report["shared_concat_scales"]["groups"] > 0 and report["shared_concat_scales"]["qdq_pairs_removed"] > 0
    assert report["float_head_outputs"]["convs"] == len(ov["head"]["branch_convs"]) > 0, family
    model = onnx.load(ov["out"])
    inits = _inits(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)

    def grid(t):  # the (scale, zero point) a tensor's values lie on, through the pass-through ops
        p = producer.get(t)
        if p is not None and p.op_type == "DequantizeLinear":
            return float(inits[p.input[1]]), int(inits[p.input[2]])
        if p is not None and p.op_type in ("Split", "MaxPool", "Resize"):
            return grid(p.input[0])
        return None

    concats = 0
    for n in model.graph.node:
        if n.op_type == "Concat" and all(grid(t) for t in n.input):
            concats += 1
            assert len({grid(t) for t in n.input}) == 1, (family, n.name, [grid(t) for t in n.input])
        if n.op_type in ("Split", "MaxPool", "Resize") and grid(n.input[0]):
            assert not any(r.op_type == "QuantizeLinear" for o in n.output for r in readers.get(o, [])), n.name
        if n.name in ov["head"]["branch_convs"]:
            assert not any(r.op_type == "QuantizeLinear" for r in readers[n.output[0]]), n.name
        if n.op_type == "Conv" and len(n.input) > 2 and all(
                producer.get(t) is not None and producer[t].op_type == "DequantizeLinear" for t in n.input[:3]):
            x, w, b = (producer[t] for t in n.input[:3])  # integer kernels assume bias scale = input x weight
            want = (inits[x.input[1]].astype(np.float32) * inits[w.input[1]].astype(np.float32))
            np.testing.assert_array_equal(inits[b.input[1]], want.reshape(inits[b.input[1]].shape), err_msg=n.name)
    assert concats >= 8, family
    # OpenVINO's compiled graph: every Conv of the backbone and neck in int8 but the image's (keep_input_float; the
    # DFL conv is float in both), and the float requantizations it needs for the cpu profile's per-tensor Concat
    # inputs gone
    before, after = _ov_census(fused["out"]), _ov_census(ov["out"])
    n_convs = sum(1 for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv")
    assert after[("Convolution", "u8")] == n_convs - 2 == before[("Convolution", "u8")] - 1, (family, after)
    assert after[("FakeQuantize", "f32")] <= 6 < before[("FakeQuantize", "f32")], (family, before, after)
    assert after[("Convert", "u8")] < before[("Convert", "u8")], (family, before, after)


def test_openvino_computes_float_ops_in_float32(default_onnx, calib):
    """OpenVINO's CPU plugin runs float ops in bfloat16 by default on CPUs with bf16 instructions (avx512_bf16,
    AMX): there an FP32 model's output was 44-55 dB from ONNX Runtime's (gtsdb4 val: -0.0029 mAP50-95 with no
    quantization at all) and `--runtime openvino` scored a bf16 model as "fp32". qbench's compilation asks for
    float32, so OpenVINO computes the FP32 model as ONNX Runtime does, to float rounding, on every CPU."""
    import openvino as ov

    from qbench.calibration import calibration_paths
    from qbench.data.preprocess import load_batch
    from qbench.runtime import openvino_compiled, ort_session

    x = load_batch(calibration_paths(calib)[:2], 320)
    ref = ort_session(default_onnx, 1).run(None, {"images": x})[0].astype(np.float64)
    compiled = openvino_compiled(default_onnx, 1)
    out = compiled.create_infer_request().infer({0: x})[compiled.output(0)].astype(np.float64)
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert 10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - out) ** 2), 1e-30)) > 90


@pytest.mark.slow
def test_openvino_and_onnx_runtime_compute_the_same_int8_model(family_models):
    """The placement changes no value ORT's QDQ semantics define: OpenVINO's int8 execution of the openvino model
    stays close to ONNX Runtime's, and both to the FP32 model."""
    from qbench.data.preprocess import load_batch
    from qbench.runtime import openvino_compiled, ort_session

    from qbench.calibration import calibration_paths

    family, fp32, _, q, calib = family_models
    x = load_batch(calibration_paths(calib)[:1], IMGSZ)
    ort_out = ort_session(q["out"], 1).run(None, {"images": x})[0]
    ref = ort_session(str(fp32), 1).run(None, {"images": x})[0]
    compiled = openvino_compiled(q["out"], 1)
    ov_out = compiled.create_infer_request().infer({0: x})[compiled.output(0)]

    def db(a, b):
        return 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / max(np.sum((a - b).astype(np.float64) ** 2), 1e-30))

    assert db(ort_out, ov_out) > 25, family
    assert db(ref, ort_out) > 15 and db(ref, ov_out) > 15, family


@pytest.mark.slow
def test_openvino_runs_int8_activations_wrong_so_qbench_stores_them_as_uint8(family_models, tmp_path):
    """OpenVINO 2026.4's CPU plugin runs int8 (signed) activations far from the model's own arithmetic and the same
    values stored as uint8 close to it: the reason `--runtime openvino` quantizes with uint8 activations and warns
    about a model that has signed ones."""
    import onnxruntime as ort

    from qbench.calibration import calibration_paths
    from qbench.data.preprocess import load_batch
    from qbench.runtime import openvino_caveat, openvino_compiled, signed_activation_quantizers

    family, fp32, _, _, calib = family_models
    rec = apply_profile("default", "npu-symmetric")  # int8 activations, zero point 0
    signed = quantize_ort(fp32, tmp_path / "s8" / "int8.onnx", rec, calib)["out"]
    u8 = quantize_ort(fp32, tmp_path / "u8" / "int8.onnx", rec, calib, u8_activations=True)["out"]
    assert signed_activation_quantizers(signed) > 0 and signed_activation_quantizers(u8) == 0, family
    x = load_batch(calibration_paths(calib)[:2], IMGSZ)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as written: the model's values
    ref = ort.InferenceSession(signed, so, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]

    def ov_db(path):
        c = openvino_compiled(path, 1)
        out = c.create_infer_request().infer({0: x})[c.output(0)]
        return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - out).astype(np.float64) ** 2),
                                                                         1e-30))

    assert ov_db(signed) < 30 and ov_db(u8) > 35, family
    assert "int8 (signed)" in openvino_caveat(signed) and openvino_caveat(u8) is None


OV_RUN = """
import sys, numpy as np
from qbench.runtime import openvino_compiled
c = openvino_compiled(sys.argv[1], 1)
np.save(sys.argv[3], c.create_infer_request().infer({0: np.load(sys.argv[2])})[c.output(0)])
"""


CAVEATS = """
import json, sys
from qbench.runtime import openvino_caveat
print(json.dumps([openvino_caveat(p) for p in sys.argv[1:]]))
"""


@pytest.mark.slow
def test_openvino_profile_computes_the_same_on_a_cpu_without_vnni(family_models, tmp_path, maskcpu):
    """On x86 CPUs without VNNI OpenVINO's int8 kernels add pairs of uint8 x int8 products in saturating 16-bit
    arithmetic, and the image's 0-255 codes overflow it in the first Conv (on gtsdb4 that cost the openvino path
    2.4 points of mAP50-95). The `openvino` profile keeps the Convs that read the image float (keep_input_float):
    with VNNI hidden from CPUID (tests/isa/maskcpu.c) OpenVINO then computes the model as on this CPU, where the
    same model with those Convs in int8 does not. 7-bit weights there (reduce_range: input, NNCF's overflow fix)
    also compute the same. Next to OpenVINO's numbers, qbench flags the model that does not, on that CPU only."""
    import os
    import subprocess
    import sys

    from qbench.calibration import calibration_paths
    from qbench.data.preprocess import load_batch
    from qbench.quantization.ort_engine import input_conv_weights, input_convs

    family, fp32, _, q, calib = family_models
    first_nodes = [n.name for n in input_convs(onnx.load(str(fp32)))]
    first = set(input_conv_weights(onnx.load(str(fp32))))
    assert first_nodes, family
    assert [e["node"] for e in q["excluded"] if "keep_input_float" in e["reason"]] == first_nodes, family
    resolved = yaml.safe_load(open(q["recipe_file"]))["resolved"]
    assert resolved["float_input_convs"] == first_nodes and "seven_bit_weights" not in resolved, family

    def conv_weights(path) -> dict:
        model = onnx.load(path)
        inits = _inits(model)
        return {n.input[0][: -len("_quantized")]: inits[n.input[0]] for n in model.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4}

    weights = conv_weights(q["out"])
    assert not first & set(weights) and max(np.abs(v).max() for v in weights.values()) == 127, family
    base = apply_profile("mean-minmax", "openvino").replace(keep_input_float=False)
    full = quantize_ort(fp32, tmp_path / "full" / "int8.onnx", base, calib)["out"]
    seven = quantize_ort(fp32, tmp_path / "seven" / "int8.onnx", base.replace(reduce_range="input"), calib)["out"]
    narrow = conv_weights(seven)
    assert all(np.abs(narrow[w]).max() <= 64 for w in first), family
    assert max(np.abs(v).max() for k, v in narrow.items() if k not in first) == 127, family
    x = np.maximum(load_batch(calibration_paths(calib)[:2], IMGSZ), 0.8)  # bright: the codes that overflow
    np.save(tmp_path / "x.npy", x)

    def ov_out(path, masked):
        env = {**os.environ, **({"LD_PRELOAD": str(maskcpu)} if masked else {})}
        r = subprocess.run([sys.executable, "-c", OV_RUN, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return np.load(tmp_path / "y.npy").astype(np.float64)

    def db(a, b):
        return 10 * np.log10(np.sum(a ** 2) / max(np.sum((a - b) ** 2), 1e-30))

    kept, seven_db, full_db = (db(ov_out(p, False), ov_out(p, True)) for p in (q["out"], seven, full))
    assert kept > 40 and seven_db > 40 and full_db < min(kept, seven_db) - 10, (family, kept, seven_db, full_db)

    def caveats(masked) -> list[str]:  # what qbench says next to OpenVINO's numbers for each model, on each CPU
        env = {**os.environ, **({"LD_PRELOAD": str(maskcpu)} if masked else {})}
        r = subprocess.run([sys.executable, "-c", CAVEATS, str(q["out"]), str(seven), str(full)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    # only the model that computes something else without VNNI is flagged, and only on such a CPU
    assert caveats(False) == [None, None, None], family
    kept_says, seven_says, full_says = caveats(True)
    assert kept_says is None and seven_says is None, (family, kept_says, seven_says)
    assert "no VNNI" in full_says and first_nodes[0] in full_says, (family, full_says)


@pytest.mark.slow
def test_compare_on_openvino_warns_that_a_signed_model_s_numbers_are_the_runtime_s(tmp_path, default_onnx, calib,
                                                                                    synth_small):
    from qbench.comparison import compare, compare_md
    from qbench.evaluation import EvalSettings

    signed = quantize_ort(default_onnx, tmp_path / "s8" / "int8.onnx", apply_profile("default", "npu-symmetric"),
                          calib)["out"]
    c = compare(default_onnx, signed, synth_small, EvalSettings(threads=1, runtime="openvino"), rounds=1)
    assert "int8 (signed)" in c["models"]["int8"]["runtime_caveat"] and "runtime_caveat" not in c["models"]["fp32"]
    assert "**Warning: int8's numbers are its runtime's" in compare_md(c)
    c = compare(default_onnx, signed, synth_small, EvalSettings(threads=1), rounds=1)  # ONNX Runtime: no caveat
    assert not any("runtime_caveat" in r for r in c["models"].values()) and "Warning" not in compare_md(c)


@pytest.mark.slow
def test_mean_minmax_ranges_are_the_mean_of_each_images_min_and_max(tmp_path, leaky_onnx, calib):
    """10 images fed in chunks of 4, 4, 2: each saved range is the plain mean over the images of that image's
    minimum and maximum (ORT's own moving average, constant 0.01, weighs the chunks otherwise)."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import load_tensors_data

    from qbench.calibration import calibration_paths
    from qbench.data.preprocess import load_batch

    paths = calibration_paths(calib)[:10]
    recipe = load_recipe("mean-minmax").replace(calib_size=10)
    ranges = tmp_path / "ranges.json"
    quantize_ort(leaky_onnx, tmp_path / "int8.onnx", recipe, paths, save_ranges=ranges)
    got = {k: (float(np.asarray(v.range_value[0]).reshape(-1)[0]), float(np.asarray(v.range_value[1]).reshape(-1)[0]))
           for k, v in load_tensors_data(ranges).data.items()}

    model = onnx.load(str(leaky_onnx))
    wanted = [n.output[0] for n in model.graph.node if n.op_type in ("LeakyRelu", "Concat", "Add", "Conv")
              and n.output[0] in got]
    assert len(wanted) > 30
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [sess.run(wanted, {sess.get_inputs()[0].name: load_batch([p], 64)}) for p in paths]
    mins = np.mean([[o.min() for o in per_image] for per_image in outs], axis=0)
    maxs = np.mean([[o.max() for o in per_image] for per_image in outs], axis=0)
    for t, lo, hi in zip(wanted, mins, maxs):
        assert got[t][0] == pytest.approx(lo, rel=1e-4, abs=1e-6), t
        assert got[t][1] == pytest.approx(hi, rel=1e-4, abs=1e-6), t
    # and a true mean differs from the extremes min/max would give
    assert any(np.max([o.max() for o in [outs[i][j] for i in range(len(paths))]]) > 1.05 * maxs[j]
               for j in range(len(wanted)))


def test_profile_placement_keys_validate():
    base = {k: v for k, v in profile_from_dict(
        {"activation_type": "uint8", "activation_symmetric": False, "weight_type": "int8", "weight_symmetric": True,
         "per_channel": True, "pow2_scales": False, "activation_fusion": "fused"}, "t").settings.items()}
    p = profile_from_dict({**base, "shared_concat_scales": True}, "t")
    assert p.settings["shared_concat_scales"] is True and "float_head_outputs" not in p.settings
    assert apply_profile("default", p).shared_concat_scales and not apply_profile("default", p).float_head_outputs
    with pytest.raises(QbenchError, match="shared_concat_scales.*allowed: true or false"):
        profile_from_dict({**base, "shared_concat_scales": "yes"}, "t")
    with pytest.raises(QbenchError, match="need the arithmetic keys"):
        profile_from_dict({"float_head_outputs": True, "ops": {"Conv": {}}}, "t")
    with pytest.raises(QbenchError, match="'shared_concat_scales: true' and 'pow2_scales: true' cannot be combined"):
        apply_profile("default", "npu-symmetric-pow2").replace(shared_concat_scales=True)
    with pytest.raises(QbenchError, match="'num_bins' is only used by the histogram methods"):
        load_recipe("mean-minmax").replace(num_bins=1024)


@pytest.mark.slow
def test_run_on_openvino_picks_the_openvino_layout_and_recipe(tmp_path, synth_small, default_weights):
    from qbench.pipeline import run

    out = run(weights=default_weights, data=synth_small, out=tmp_path / "ov", imgsz=96, runtime="openvino",
              profiles=["npu-symmetric"])
    info = json.loads((out / "run.json").read_text())
    q = json.loads((out / "quantize.json").read_text())
    assert "profile openvino" in info["layout"] and q["recipe"]["method"] == "mean_minmax"
    assert q["recipe"]["shared_concat_scales"] and q["recipe"]["float_head_outputs"]
    assert q["recipe"]["activation_fusion"] == "fused"
    cmp = json.loads((out / "compare.json").read_text())
    assert {m["runtime"] for m in cmp["models"].values()} == {"openvino"}
    # the npu-symmetric variant (int8 activations) is stored as uint8, which OpenVINO runs right: no caveat
    from qbench.runtime import signed_activation_quantizers

    variant = next((out / "profiles").glob("npu-symmetric-*/int8.onnx"))
    assert signed_activation_quantizers(variant) == 0
    assert not any("runtime_caveat" in m for m in cmp["models"].values())
    md = (out / "summary.md").read_text()  # the variants' latency is said to be OpenVINO's, as it is
    assert "latency is OpenVINO (CPU) on this CPU" in md and "ONNX Runtime's on this CPU" not in md
    # an explicit recipe is kept; the layout still comes from the runtime
    out2 = run(weights=default_weights, data=synth_small, out=tmp_path / "ov2", imgsz=96, runtime="openvino",
               recipe="default")
    q2 = json.loads((out2 / "quantize.json").read_text())
    assert q2["recipe"]["method"] == "minmax" and q2["recipe"]["shared_concat_scales"]


def test_qat_refuses_the_openvino_placement_with_its_reason(tmp_path, default_weights, synth_small):
    from qbench.qatrain import qat

    with pytest.raises(QbenchError, match="shared_concat_scales and float_head_outputs, which QAT does not support"):
        qat(default_weights, synth_small, tmp_path / "qat", profile="openvino")
    assert not (tmp_path / "qat").exists()
