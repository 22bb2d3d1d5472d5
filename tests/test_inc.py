"""Intel Neural Compressor engine: real model, real INC autotune, real ONNX Runtime session, no mocks."""

from __future__ import annotations

import numpy as np
import pytest

from qbench.errors import QbenchError

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it

IMGSZ = 160  # the default model (trained at 320) exported small: a trial takes seconds, mAP stays above 0


@pytest.fixture(scope="module")
def inc_run(tmp_path_factory, default_weights, synth_small):
    from qbench.calibration import build_manifest, save_manifest
    from qbench.models.export import export_onnx
    from qbench.quantization.inc_engine import quantize_inc

    d = tmp_path_factory.mktemp("inc")
    fp32 = export_onnx(default_weights, d / "fp32.onnx", imgsz=IMGSZ)
    calib = save_manifest(build_manifest(synth_small, 4, seed=0), d / "calib.json")
    out = d / "int8-inc.onnx"
    report = quantize_inc(default_weights, fp32, out, synth_small, calib, max_trials=1, eval_images=4,
                          calib_images=4)
    return fp32, out, report, synth_small


def _int8_convs_with_quantized_output(proto) -> int:
    """Convs whose weight is an int8 initializer behind DequantizeLinear and whose output is quantized: the ones
    ONNX Runtime must turn into QLinearConv."""
    import onnx

    init = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    users = {}
    for n in proto.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    count = 0
    for n in proto.graph.node:
        if n.op_type != "Conv":
            continue
        w = producer.get(n.input[1])
        int8_w = (w is not None and w.op_type == "DequantizeLinear" and w.input[0] in init
                  and init[w.input[0]].data_type == onnx.TensorProto.INT8)
        outs = users.get(n.output[0], [])
        if int8_w and outs and all(u.op_type == "QuantizeLinear" for u in outs):
            count += 1
    return count


@pytest.mark.slow
def test_inc_model_is_int8_in_ort_and_close_to_fp32(inc_run):
    import onnx

    from qbench.data.dataset import image_files, load_data_yaml, read_image
    from qbench.data.preprocess import letterbox, to_input
    from qbench.quantization.inc_engine import float_weight_quantizers, optimized_op_counts
    from qbench.runtime import open_model

    fp32, out, report, data = inc_run
    proto = onnx.load(str(out))
    # weights are real int8 initializers; no float weight is quantized at run time (no Q -> Clip -> DQ left)
    assert float_weight_quantizers(proto) == 0
    assert report["graph"]["weights_folded_to_int8"] > 0
    assert not [n for n in proto.graph.node if n.op_type == "Clip"]
    # ONNX Runtime fuses every conv that has int8 weights and a quantized output into QLinearConv
    ops = optimized_op_counts(out)
    expected = _int8_convs_with_quantized_output(proto)
    assert ops["QLinearConv"] == report["graph"]["qlinearconv"] == expected > 0
    assert ops.get("Conv", 0) + ops.get("FusedConv", 0) < expected  # the float rest: the head's last convs, DFL
    # the decode stays float: the output concat and the box/class ops are not quantized
    assert report["tuning"]["decode_float"]["dfl_excluded"]
    # metadata copied: qbench opens it like any export, and its output is close to FP32
    det, ref = open_model(out), open_model(fp32)
    assert det.names == ref.names and det.imgsz == ref.imgsz == IMGSZ and not det.dynamic_batch
    spec = load_data_yaml(data, require=("val",))
    for f in image_files(spec, "val")[:3]:
        x = to_input([letterbox(read_image(f), IMGSZ)[0]])
        a, b = det.forward(x).ravel(), ref.forward(x).ravel()
        cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos > 0.99, cos
    # the ONNX agrees with INC's own PyTorch model on a real calibration image (int8 kernels vs PT2E's reference)
    c = report["check"]
    print("INC ONNX vs torch:", c)
    assert c["image"].endswith(".jpg") and c["sqnr_db_onnx_vs_torch"] > 20, c
    # the report is what the tuning did
    t = report["tuning"]
    assert len(t["trials"]) == 1 and t["chosen"]["w_dtype"] == "int8" and t["chosen"]["act_dtype"] == "uint8"
    assert t["baseline_mAP50-95"] is not None and report["inc_version"]


@pytest.mark.slow
def test_inc_bad_input_raises_and_writes_nothing(inc_run, default_weights, tmp_path):
    from qbench.quantization.inc_engine import IncError, quantize_inc

    fp32, _, _, data = inc_run
    out = tmp_path / "x.onnx"
    with pytest.raises(QbenchError, match="does not exist"):
        quantize_inc(tmp_path / "missing.pt", fp32, out, data, [])
    with pytest.raises(IncError, match="tolerable_loss"):
        quantize_inc(tmp_path / "missing.pt", fp32, out, data, [], tolerable_loss=2)
    with pytest.raises(IncError, match="calibration"):
        quantize_inc(default_weights, fp32, out, data, [tmp_path / "nope.jpg"])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_inc_zero_baseline_is_a_clear_error(default_weights, synth_small, tmp_path):
    """At imgsz 64 the default model finds nothing: INC's relative-loss tuning would divide by zero."""
    from qbench.models.export import export_onnx
    from qbench.quantization.inc_engine import IncError, quantize_inc

    fp32 = export_onnx(default_weights, tmp_path / "fp32-64.onnx", imgsz=64)
    out = tmp_path / "int8.onnx"
    with pytest.raises(IncError, match="no baseline"):
        quantize_inc(default_weights, fp32, out, synth_small, [fp32], max_trials=1, eval_images=2)
    assert not out.exists()
