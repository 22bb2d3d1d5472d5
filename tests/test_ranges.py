"""Consumer-aware error-minimising ranges (recipe `method: mse`): the search itself on known distributions, the
consumer each tensor gets in real exported models, and the ranges landing in a real INT8 model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qbench.quantization.ort_engine import quantize_ort
from qbench.quantization.ranges import best_range, consumer_functions

BINS = 2048


def _conv_output(seed=0, n=200_000):
    """A Conv output as the level-3 models have them: mostly in [-1, 3], a sparse negative tail down to about -12
    and a few large positive values."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 0.8, n)
    tail = rng.random(n) < 0.01
    x[tail] = -rng.exponential(3.0, tail.sum())
    big = rng.random(n) < 0.002
    x[big] = rng.uniform(3, 6, big.sum())
    return x.astype(np.float32)


def _histogram(x):
    t = float(np.abs(x).max())
    hist, edges = np.histogram(x, BINS, range=(-t, t))  # ORT's collect_value layout
    return hist, edges, float(x.min()), float(x.max())


def _uint8(x, lo, hi):
    """ONNX Runtime's asymmetric uint8 quantize-dequantize of x with range [lo, hi] (0 inside)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return ((np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale).astype(np.float32)


def _leaky(x, a=0.1):
    return np.where(x < 0, a * x, x)


def test_leaky_consumer_clips_the_negative_tail_and_lowers_the_error_after_the_activation():
    x = _conv_output()
    hist, edges, mn, mx = _histogram(x)
    lo_id, hi_id = best_range(hist, edges, mn, mx, ("identity",))
    lo, hi = best_range(hist, edges, mn, mx, ("leaky", 0.1))
    # the negative side matters 1/10 after LeakyReLU(0.1): its tail is clipped harder than for a plain tensor
    assert mn < lo_id < lo < 0
    after_minmax = np.mean((_leaky(_uint8(x, mn, mx)) - _leaky(x)) ** 2)
    after_mse = np.mean((_leaky(_uint8(x, lo, hi)) - _leaky(x)) ** 2)
    after_plain = np.mean((_leaky(_uint8(x, lo_id, hi_id)) - _leaky(x)) ** 2)
    assert after_mse < 0.6 * after_minmax  # measured on the values themselves, not the model's estimate
    assert after_mse < after_plain  # knowing the consumer pays
    # and for the tensor itself (plain consumer) the plain search beats min/max
    assert np.mean((_uint8(x, lo_id, hi_id) - x) ** 2) < np.mean((_uint8(x, mn, mx) - x) ** 2)


def test_relu_consumer_starts_at_zero_and_symmetric_search_is_symmetric():
    x = _conv_output(seed=1)
    hist, edges, mn, mx = _histogram(x)
    assert best_range(hist, edges, mn, mx, ("relu",))[0] == 0.0
    lo, hi = best_range(hist, edges, mn, mx, ("leaky", 0.1), symmetric=True, levels=254)
    assert lo == -hi and 0 < hi <= max(-mn, mx)


def test_silu_consumer_weights_the_negative_side_little():
    x = _conv_output(seed=2)
    hist, edges, mn, mx = _histogram(x)
    lo_silu, _ = best_range(hist, edges, mn, mx, ("silu",))
    lo_id, _ = best_range(hist, edges, mn, mx, ("identity",))
    assert lo_id < lo_silu <= 0  # SiLU's slope is under 0.1 below -2.4


def test_empty_or_constant_tensors_keep_their_range():
    edges = np.linspace(-1, 1, 9)
    assert best_range(np.zeros(8), edges, -1.0, 1.0) == (-1.0, 1.0)
    assert best_range(np.ones(8), edges, 0.0, 0.0) == (0.0, 0.0)


@pytest.mark.parametrize("act, kind", [("leaky", "leaky"), ("relu", "relu"), ("silu", "silu")])
def test_consumers_of_real_exports(act, kind, request):
    model = onnx.load(str(request.getfixturevalue(f"{act}_onnx")))
    kinds = consumer_functions(model)
    acts = {"leaky": "LeakyRelu", "relu": "Relu", "silu": "Sigmoid"}[act]
    n_act = sum(n.op_type == acts for n in model.graph.node)
    found = [k for k in kinds.values() if k[0] == kind]
    # every activation's input is recognised (the head's class Sigmoid is no SiLU: it has no Mul after it)
    assert len(found) == n_act - (1 if act == "silu" else 0)
    if kind == "leaky":
        assert {round(k[1], 6) for k in found} == {0.1}


def test_mse_recipe_narrows_ranges_in_a_real_int8_model(leaky_onnx, calib, tmp_path):
    """The searched ranges reach the INT8 ONNX: no activation scale above min/max's, LeakyReLU inputs narrower, and
    ONNX Runtime runs it."""
    from qbench.quantization.recipe import load_recipe
    from qbench.runtime import ort_session

    base = quantize_ort(leaky_onnx, tmp_path / "minmax.onnx", "default", calib)
    rep = quantize_ort(leaky_onnx, tmp_path / "mse.onnx", load_recipe("mse"), calib)
    summary = rep["calibration"]["consumer_aware_ranges"]
    assert rep["calibration"]["method"] == "mse" and summary["by_consumer"]["leaky"] >= 57
    assert "consumer_aware_ranges" not in base["calibration"]

    def act_scales(path):
        m = onnx.load(str(path))
        init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        return {n.input[0]: float(init[n.input[1]]) for n in m.graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] not in init and init[n.input[1]].size == 1}

    a, b = act_scales(tmp_path / "minmax.onnx"), act_scales(tmp_path / "mse.onnx")
    assert a.keys() == b.keys()
    assert all(b[k] <= a[k] * (1 + 1e-5) for k in a)
    leaky_in = {n.input[0] for n in onnx.load(str(leaky_onnx)).graph.node if n.op_type == "LeakyRelu"}
    narrower = [k for k in a if k in leaky_in and b[k] < a[k] * 0.999]
    assert len(narrower) >= len(leaky_in) // 2
    x = np.random.default_rng(0).random((1, 3, 64, 64), np.float32)
    assert np.isfinite(ort_session(tmp_path / "mse.onnx", 1).run(None, {"images": x})[0]).all()
