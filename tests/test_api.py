"""The Python API (`import qbench`): the CLI's verbs as functions with typed results, engines chosen by the
configuration's type."""

from __future__ import annotations

import json

import pytest

from qbench.errors import QbenchError


@pytest.mark.slow
def test_quantize_then_compare_through_the_python_api(tmp_path, default_weights, synth_small):
    import qbench

    calib = qbench.CalibrationSet.sample(synth_small, n=8)
    assert len(calib) == 8 and all(p.is_file() for p in calib)
    saved = calib.save(tmp_path / "calib.json")
    assert qbench.CalibrationSet.load(saved).paths == calib.paths

    q = qbench.quantize(default_weights, tmp_path / "q" / "int8.onnx", "default", calib=calib)
    assert q.engine == "ort" and q.config == "default" and q.model.is_file()
    assert q.fp32 == tmp_path / "q" / "fp32.onnx" and q.fp32.is_file()  # the .pt's export, kept beside it
    assert q.qlinear_convs > 50 and (tmp_path / "q" / "recipe.yaml").is_file()
    assert json.loads((tmp_path / "q" / "quantize.json").read_text())["qlinear_ops"] == q.to_json()["qlinear_ops"]

    c = qbench.compare(q.fp32, q.model, synth_small)
    assert c.models == ["fp32", "int8"]
    assert c.delta("int8") == pytest.approx(c.map50_95("int8") - c.map50_95("fp32"), abs=1e-12)
    lo, hi = c.interval("int8")
    assert lo <= c.delta("int8") <= hi and c.speedup("int8") > 0
    e = qbench.evaluate(q.model, synth_small)  # the one evaluation path: the same number
    assert e.map50_95 == c.map50_95("int8") and e.to_json()["data"]["images"] == 12
    # the runtime is an API argument as it is a CLI option: OpenVINO's numbers come back named as OpenVINO's
    ov = qbench.compare(q.fp32, q.model, synth_small, runtime="openvino")
    assert ov.to_json()["models"]["int8"]["runtime"] == "openvino"
    e_ov = qbench.evaluate(q.model, synth_small, runtime="openvino")
    assert e_ov.to_json()["model"]["runtime"] == "openvino" and e_ov.map50_95 == ov.map50_95("int8")

    ins = qbench.inspect(q.fp32, q.model, saved, synth_small, out=tmp_path / "ins", images=4, error_images=2)
    assert ins.summary["quantized_tensors"] > 100 and len(ins.leaky) == 57 and ins.silu == []


def test_the_configuration_type_picks_the_engine(tmp_path, default_weights, default_onnx, synth_small, calib):
    import qbench
    from qbench.quantization.engines import engine_for
    from qbench.quantization.recipe import load_recipe

    assert engine_for(load_recipe("default")).name == "ort" and engine_for(qbench.IncConfig()).name == "inc"
    with pytest.raises(QbenchError, match="not a quantization configuration"):
        engine_for({"method": "minmax"})
    with pytest.raises(QbenchError, match="pass the trained .pt"):  # INC tunes the PyTorch model
        qbench.quantize(default_onnx, tmp_path / "x.onnx", qbench.IncConfig(), calib=calib, data=synth_small)
    with pytest.raises(QbenchError, match="scores its trials"):
        qbench.quantize(default_weights, tmp_path / "x.onnx", qbench.IncConfig(), calib=calib)
    with pytest.raises(QbenchError, match="profiles and fusion"):
        qbench.quantize(default_weights, tmp_path / "x.onnx", qbench.IncConfig(), calib=calib, data=synth_small,
                        profile="npu-symmetric")
    assert not (tmp_path / "x.onnx").exists()
