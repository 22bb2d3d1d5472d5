"""qbench.analysis: statistics, quantization error and LeakyReLU diagnostics checked against NumPy.

A hand-built detector-shaped ONNX graph (1x1 Conv -> LeakyReLU(0.1) -> 1x1 Conv -> Reshape to (1, 6, 64)) is
quantized by ONNX Runtime itself; its activations are known in closed form from the input images, so every
statistic, code count and SQNR is recomputed here independently with NumPy (float64) and compared.
"""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qbench.analysis import inspect_models, read_histograms
from qbench.analysis.stats import TensorStats
from qbench.calibration import CalibrationReader
from qbench.errors import QbenchError
from qbench.graph.qdq import QParams

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it

S = 8  # image size
ALPHA = 0.1
RNG = np.random.default_rng(7)
W1 = RNG.normal(0, 1.0, (4, 3, 1, 1)).astype(np.float32)
B1 = np.array([-0.3, 0.2, -0.1, 0.05], np.float32)
W2 = RNG.normal(0, 0.5, (6, 4, 1, 1)).astype(np.float32)
B2 = np.zeros(6, np.float32)


def _graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c"], name="conv1"),
        helper.make_node("LeakyRelu", ["c"], ["a"], name="act1", alpha=ALPHA),
        helper.make_node("Conv", ["a", "w2", "b2"], ["h"], name="head"),
        helper.make_node("Reshape", ["h", "shape"], ["output0"], name="flat"),
    ]
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"),
             numpy_helper.from_array(W2, "w2"), numpy_helper.from_array(B2, "b2"),
             numpy_helper.from_array(np.array([1, 6, S * S], np.int64), "shape")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, S, S])],
                          [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, S * S])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """FP32 and ORT-quantized INT8 (QDQ, uint8 asymmetric activations, per-channel int8 weights) models, 12
    lossless images; the INT8 model is calibrated on the first 4 only, so the other 8 can exceed its ranges."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("tiny")
    imgs = []
    for i in range(12):
        img = RNG.integers(0, 256, (S, S, 3), dtype=np.uint8)
        if i >= 4:
            img[i % S, :, :] = 255 * (i % 2)  # rows of extremes that calibration never saw
        p = d / f"img{i:02d}.png"
        cv2.imwrite(str(p), img)
        imgs.append(p)
    fp32 = d / "fp32.onnx"
    onnx.save(_graph(), str(fp32))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.r = CalibrationReader(imgs[:4], S, "images")

        def get_next(self):
            return self.r.get_next()

    int8 = d / "int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    out = d / "inspect"
    result = inspect_models(fp32, int8, imgs, imgs[4:], out, bins=256)
    return {"fp32": fp32, "int8": int8, "imgs": imgs, "out": out, "result": result}


def _inputs(paths) -> np.ndarray:
    r = CalibrationReader(paths, S, "images")
    return np.concatenate([b["images"] for b in iter(r.get_next, None)]).astype(np.float64)


def _conv1x1(x, w, b):
    return np.einsum("oi,nihw->nohw", w[:, :, 0, 0].astype(np.float64), x) + b.astype(np.float64)[None, :, None, None]


def _qparams(model_path, tensor):
    """(scale, zero_point) of the QuantizeLinear that quantizes `tensor`, read straight from the graph."""
    m = onnx.load(str(model_path))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(init[q.input[1]]), int(init[q.input[2]])


def _fq(x, scale, zp, lo=0, hi=255):
    return (np.clip(np.round(x / scale) + zp, lo, hi) - zp) * scale


def _sqnr(ref, approx):
    return 10 * math.log10(np.sum(ref ** 2) / np.sum((ref - approx) ** 2))


def _rows(path):
    with open(path, newline="") as f:
        return {r["tensor"] if "tensor" in r else r["node"]: r for r in csv.DictReader(f)}


def test_statistics_match_numpy(tiny):
    x = _inputs(tiny["imgs"])
    c = _conv1x1(x, W1, B1)
    a = np.where(c >= 0, c, ALPHA * c)
    assert np.abs(c).min() > 1e-4  # no value so close to 0 that float32 could flip its sign
    rows = {r["tensor"]: r for r in tiny["result"]["layers"]}
    assert set(rows) == {"images", "c", "a", "h", "output0"}  # every quantized tensor (ORT quantizes them all)
    hist = read_histograms(tiny["out"] / "histograms.npz")
    for name, ref in (("images", x), ("c", c), ("a", a)):
        r = rows[name]
        assert r["min"] == pytest.approx(ref.min(), rel=1e-5, abs=1e-6)
        assert r["max"] == pytest.approx(ref.max(), rel=1e-5, abs=1e-6)
        assert r["mean"] == pytest.approx(ref.mean(), rel=1e-5, abs=1e-6)
        assert r["std"] == pytest.approx(ref.std(), rel=1e-4)
        assert r["negative_fraction"] == np.count_nonzero(ref < 0) / ref.size  # exact
        h = hist[name]
        assert int(h["counts"].sum()) == ref.size
        for p in (0.1, 1.0, 50.0, 99.0, 99.9):  # read off the histogram: within one bin of the exact value
            assert abs(r[f"p{p:g}"] - np.percentile(ref, p)) <= h["width"] + 1e-6, (name, p)
        if name == "c":  # per-channel ranges over axis 1
            spans = ref.max(axis=(0, 2, 3)) - ref.min(axis=(0, 2, 3))
            assert r["channels"] == 4
            assert r["channel_range_spread"] == pytest.approx(spans.max() / np.median(spans), rel=1e-5)
    assert rows["a"]["neg_to_pos_ratio"] == pytest.approx(-a.min() / a.max(), rel=1e-5)


def test_clipping_rate_at_the_calibrated_range(tiny):
    """The INT8 ranges come from images 0-3; images 4-11 carry extreme rows, so some values clip."""
    x = _inputs(tiny["imgs"])
    c = _conv1x1(x, W1, B1)
    rows = {r["tensor"]: r for r in tiny["result"]["layers"]}
    s, zp = _qparams(tiny["int8"], "c")
    lo, hi = (0 - zp) * s, (255 - zp) * s
    expected = np.count_nonzero((c < lo - s / 2) | (c > hi + s / 2)) / c.size
    assert expected > 0
    assert rows["c"]["clip_fraction"] == pytest.approx(expected, abs=0.5 / c.size)
    assert rows["c"]["scale"] == pytest.approx(s) and rows["c"]["zero_point"] == zp


def test_sqnr_isolated_and_cumulative_match_numpy(tiny):
    x = _inputs(tiny["imgs"][4:])  # the error images
    c = _conv1x1(x, W1, B1)
    a = np.where(c >= 0, c, ALPHA * c)
    rows = {r["tensor"]: r for r in tiny["result"]["layers"]}
    sc, zc = _qparams(tiny["int8"], "c")
    sa, za = _qparams(tiny["int8"], "a")
    si, zi = _qparams(tiny["int8"], "images")
    assert rows["c"]["sqnr_isolated_db"] == pytest.approx(_sqnr(c, _fq(c, sc, zc)), abs=0.01)
    assert rows["a"]["sqnr_isolated_db"] == pytest.approx(_sqnr(a, _fq(a, sa, za)), abs=0.01)
    cos = np.sum(c * _fq(c, sc, zc)) / math.sqrt(np.sum(c ** 2) * np.sum(_fq(c, sc, zc) ** 2))
    assert rows["c"]["cos_isolated"] == pytest.approx(cos, abs=1e-6)

    # cumulative: quantized input, int8 per-channel weights and int32 bias, as ORT's QDQ graph computes them
    m = onnx.load(str(tiny["int8"]))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    wq, ws = init["w1_quantized"].astype(np.float64), init["w1_scale"].astype(np.float64)
    bq, bs = init["b1_quantized"].astype(np.float64), init["b1_quantized_scale"].astype(np.float64)
    c_int8 = _conv1x1(_fq(x, si, zi), wq * ws[:, None, None, None], bq * bs)
    c_int8_q = _fq(c_int8, sc, zc)
    assert rows["c"]["sqnr_cumulative_db"] == pytest.approx(_sqnr(c, c_int8_q), abs=0.05)
    a_int8_q = _fq(np.where(c_int8_q >= 0, c_int8_q, ALPHA * c_int8_q), sa, za)
    assert rows["a"]["sqnr_cumulative_db"] == pytest.approx(_sqnr(a, a_int8_q), abs=0.05)


def test_leaky_relu_code_counts_and_unfused_cost(tiny):
    x_all = _inputs(tiny["imgs"])
    a_all = np.maximum(_conv1x1(x_all, W1, B1), ALPHA * _conv1x1(x_all, W1, B1))
    (row,) = tiny["result"]["leaky"]
    sa, za = _qparams(tiny["int8"], "a")
    sc, zc = _qparams(tiny["int8"], "c")
    assert row["unfused"] is True  # ORT quantizes the Conv output, then the LeakyReLU output
    assert (row["neg_codes"], row["pos_codes"]) == (za, 255 - za)  # what the deployed uint8 quantizer reserves
    # the observed range under an asymmetric uint8 quantizer, counted by hand
    lo, hi = a_all.min(), a_all.max()
    step = (hi - lo) / 255
    zp = round(-lo / step)
    assert (row["asym_neg_codes"], row["asym_pos_codes"]) == (zp, 255 - zp)
    assert row["asym_bits_lost"] == pytest.approx(math.log2(step / (hi / 255)), rel=1e-4)
    # symmetric int8: 128 codes reserved for the tail, 127 left for the positive range, ~1 bit lost
    assert (row["sym_neg_codes"], row["sym_pos_codes"]) == (128, 127)
    assert row["sym_bits_lost"] == pytest.approx(math.log2((max(-lo, hi) / 127) / (hi / 255)), rel=1e-4)
    # SQNR of the output on the error images: unfused (as deployed) vs fused, against NumPy
    c = _conv1x1(_inputs(tiny["imgs"][4:]), W1, B1)
    a = np.where(c >= 0, c, ALPHA * c)
    fq_c = _fq(c, sc, zc)
    unfused = _fq(np.where(fq_c >= 0, fq_c, ALPHA * fq_c), sa, za)
    fused = _fq(a, sa, za)
    assert row["sqnr_db"]["actual"] == pytest.approx(_sqnr(a, unfused), abs=0.01)
    assert row["sqnr_db"]["fused"] == pytest.approx(_sqnr(a, fused), abs=0.01)
    assert row["sqnr_db"]["fused"] > row["sqnr_db"]["actual"]  # requantizing the Conv output costs SQNR
    assert row["remedy"] == "fused" and row["remedy_gain_db"] == pytest.approx(
        _sqnr(a, fused) - _sqnr(a, unfused), abs=0.02)


def test_files_are_written_with_stable_columns(tiny):
    out = tiny["out"]
    from qbench.analysis.inspect import LAYER_COLUMNS, LEAKY_COLUMNS

    with open(out / "layers.csv", newline="") as f:
        r = csv.reader(f)
        assert next(r) == list(LAYER_COLUMNS)
        assert sum(1 for _ in r) == 5
    with open(out / "leaky.csv", newline="") as f:
        assert next(csv.reader(f)) == list(LEAKY_COLUMNS)
    j = json.loads((out / "inspect.json").read_text())
    assert j["summary"]["leaky_relus"] == 1 and j["summary"]["unfused_leaky_relus"] == 1
    assert j["images"] == {"statistics": 12, "error": 8}
    assert not list(out.glob(".*tmp*"))  # no temp files left behind


def test_range_diagnosis_tells_wide_channels_from_rare_values(tiny):
    """A tensor whose range one wide channel sets, one whose range rare spikes in every channel set, and a plain
    Gaussian one: the statistics inspect collects tell them apart (and say which fix can work)."""
    from qbench.analysis.inspect import CHANNEL_SPREAD_FLAG, TAIL_FLAG, range_diagnosis

    rng = np.random.default_rng(1)
    plain = rng.normal(0, 1, (4, 16, 32, 32)).astype(np.float32)
    wide = plain.copy()
    wide[:, 3] *= 30  # one channel 30x wider than the rest
    spikes = plain.copy()
    idx = rng.integers(0, plain.size, 64)  # 64 of 65536 values, spread over the channels, 40x the bulk
    spikes.reshape(-1)[idx] = 40 * np.sign(spikes.reshape(-1)[idx])
    got = {}
    for name, x in (("plain", plain), ("wide", wide), ("spikes", spikes)):
        s = TensorStats(bins=2048)
        s.update(x)
        tail, cause = range_diagnosis(s.summary())
        absx = np.abs(x.astype(np.float64))
        bulk = max(abs(np.percentile(x, 0.1)), abs(np.percentile(x, 99.9)))
        assert tail == pytest.approx(absx.max() / bulk, rel=0.05)  # percentiles come off the histogram
        got[name] = cause
    assert got == {"plain": "", "wide": "channels", "spikes": "rare values"}
    # inspect writes the same diagnosis into every quantized row and counts it in the summary
    rows = [r for r in tiny["result"]["layers"] if r["role"] == "quantized"]
    assert all((r["tail_ratio"], r["range_set_by"]) == range_diagnosis(r) for r in rows)
    assert all(r["range_set_by"] != "channels" or r["channel_range_spread"] >= CHANNEL_SPREAD_FLAG for r in rows)
    assert all(r["range_set_by"] != "rare values" or r["tail_ratio"] >= TAIL_FLAG for r in rows)
    counts = tiny["result"]["summary"]["range_set_by"]
    assert counts == {k: sum(r["range_set_by"] == k for r in rows) for k in ("channels", "rare values")}


def test_histogram_growth_keeps_exact_counts():
    """Data arriving beyond the first batch's range doubles the bins' width; counts stay exact."""
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 1, 5000), rng.normal(5, 3, 5000), rng.normal(-20, 2, 5000)]
    s = TensorStats(bins=64)
    for b in batches:
        s.update(b.astype(np.float32))
    data = np.concatenate(batches).astype(np.float32)
    ref, _ = np.histogram(data.astype(np.float64), bins=s.edges())
    assert s.hist.sum() == data.size
    assert np.abs(s.hist - ref).sum() <= 2  # float32 vs float64 rounding of values sitting on an edge
    assert s.edges()[0] <= data.min() and s.edges()[-1] > data.max()
    assert s.min == data.min() and s.max == data.max()
    assert s.percentile(50) == pytest.approx(np.percentile(data, 50), abs=s.width)


def test_qparams_follow_onnx_runtime(tiny):
    """QParams.from_range gives the scale and zero point ORT's quantizer chose for the same range."""
    m = onnx.load(str(tiny["int8"]))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    x = _inputs(tiny["imgs"][:4])  # ORT's calibration images
    c = _conv1x1(x, W1, B1)
    q = QParams.from_range(c.min(), c.max(), "uint8")
    assert q.scale == pytest.approx(float(init["c_scale"]), rel=1e-5)
    assert q.zero_point == int(init["c_zero_point"])


def test_bad_inputs_are_refused(tiny, tmp_path):
    with pytest.raises(QbenchError, match="does not exist"):
        inspect_models(tmp_path / "nope.onnx", tiny["int8"], tiny["imgs"], tiny["imgs"], tmp_path / "o")
    with pytest.raises(QbenchError, match="no quantized activations"):
        inspect_models(tiny["fp32"], tiny["fp32"], tiny["imgs"], tiny["imgs"], tmp_path / "o")
    other = _graph()
    for n in other.graph.node:  # rename every tensor: the INT8 model no longer belongs to it
        n.output[:] = [o if o == "output0" else o + "_x" for o in n.output]
        n.input[:] = [i + "_x" if i in ("c", "a", "h") else i for i in n.input]
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(QbenchError, match="was not quantized from"):
        inspect_models(tmp_path / "other.onnx", tiny["int8"], tiny["imgs"], tiny["imgs"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_large_tensors_enter_the_histogram_through_a_stride():
    """Past HIST_SAMPLES elements a tensor's histogram is a fixed 1-in-k subsample: percentiles stay close, every
    other statistic still sees every element."""
    from qbench.analysis import stats as st

    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 2.0, (1, 8, 256, 256)).astype(np.float32)  # 524288 elements: stride 2
    s = TensorStats(bins=2048)
    s.update(x)
    assert s.hist_stride == -(-x.size // st.HIST_SAMPLES) == 2
    assert s.hist.sum() == x[0].reshape(-1)[::2].size and s.count == x.size
    assert s.negative == np.count_nonzero(x < 0) and s.min == x.min() and s.max == x.max()
    for p in (1.0, 50.0, 99.0):
        assert abs(s.percentile(p) - np.percentile(x, p)) < 0.02
