"""ONNX Runtime sessions compute int8 exactly on every CPU (qbench.runtime.int8_host)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from qbench.runtime import int8_host, ort_session, qdq_conv_model

SCRIPT = """
import sys, numpy as np
from qbench.runtime import int8_host, ort_session
model, x = sys.argv[1], np.load(sys.argv[2])
y = ort_session(model, 1).run(None, {"x": x})[0]
np.save(sys.argv[3], y)
print(int8_host()["exact_mode"])
"""


def test_int8_convolutions_are_exact_on_every_cpu(tmp_path):
    """Bright uint8 inputs times full-range int8 weights: pair sums of products overflow int16, which ORT's fast
    u8s8 kernels clamp on x86 CPUs without VNNI. Through qbench's sessions the QLinearConv output equals the
    integer result computed in NumPy (to one output step: rounding), on whatever CPU this runs; where this CPU
    does saturate, ORT's default kernels (QBENCH_EXACT_INT8=0) are shown to be far off, so the probe is right."""
    rng = np.random.default_rng(0)
    cout, cin = 8, 32
    w = rng.choice(np.array([-128, -127, 127, 126, 100, -100], np.int8), size=(cout, cin, 3, 3))
    w_scale = rng.uniform(0.5, 2.0, cout)
    x = rng.integers(200, 256, size=(1, cin, 8, 8)).astype(np.float32)
    # the exact integer convolution (zero padding), scaled per output channel
    xp = np.pad(x[0].astype(np.int64), ((0, 0), (1, 1), (1, 1)))
    acc = np.zeros((cout, 8, 8), np.int64)
    for dy in range(3):
        for dx in range(3):
            acc += np.einsum("oc,chw->ohw", w[:, :, dy, dx].astype(np.int64), xp[:, dy:dy + 8, dx:dx + 8])
    exact = acc * w_scale[:, None, None]
    lo, hi = float(exact.min()), float(exact.max())
    y_scale = (hi - lo) / 255
    y_zero = int(round(-lo / y_scale))
    model = qdq_conv_model(w, w_scale, y_scale, y_zero, hw=8, pad=1)  # ORT runs it as one QLinearConv
    path = tmp_path / "conv.onnx"
    path.write_bytes(model.SerializeToString())

    host = int8_host()
    assert set(host) >= {"cpu", "u8s8_saturates", "exact_mode", "int8_kernels"} and host["u8s8_saturates"] is not None
    assert host["exact_mode"] == host["u8s8_saturates"]  # exact mode exactly where it is needed (default settings)
    y = ort_session(path, 1).run(None, {"x": x})[0][0]
    expected = (np.clip(np.round(exact / y_scale) + y_zero, 0, 255) - y_zero) * y_scale
    assert np.abs(y - expected).max() <= 1.01 * y_scale

    if host["u8s8_saturates"]:  # the same model with ONNX Runtime's default kernels, in a fresh process
        np.save(tmp_path / "x.npy", x)
        env = {**os.environ, "QBENCH_EXACT_INT8": "0"}
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "False"
        fast = np.load(tmp_path / "y.npy")[0]
        assert np.abs(fast - expected).max() > 20 * y_scale
