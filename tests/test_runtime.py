"""ONNX Runtime sessions compute int8 exactly on every CPU (qbench.runtime.int8_host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from qbench.runtime import int8_host, ort_session, qdq_conv_model

SCRIPT = """
import json, sys, numpy as np
from qbench.runtime import int8_host, ort_session
model, x = sys.argv[1], np.load(sys.argv[2])
y = ort_session(model, 1).run(None, {"x": x})[0]
np.save(sys.argv[3], y)
print(json.dumps(int8_host()))
"""


def _overflowing_conv(tmp_path, w_values=(-128, -127, 127, 126, 100, -100)):
    """A one-QLinearConv model whose uint8 x int8 pair sums overflow int16 (bright inputs, full-range weights),
    its input, and its exact output computed in NumPy: (path, x, expected, y_scale)."""
    rng = np.random.default_rng(0)
    cout, cin = 8, 32
    w = rng.choice(np.array(w_values, np.int8), size=(cout, cin, 3, 3))
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
    path = tmp_path / f"conv{len(list(tmp_path.glob('conv*.onnx')))}.onnx"
    path.write_bytes(model.SerializeToString())
    expected = (np.clip(np.round(exact / y_scale) + y_zero, 0, 255) - y_zero) * y_scale
    return path, x, expected, y_scale


def _run_in_process(tmp_path, path, x, **env) -> tuple[np.ndarray, dict]:
    """The model's output and int8_host() in a fresh Python process with `env` added to the environment."""
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return np.load(tmp_path / "y.npy")[0], json.loads(r.stdout.strip().splitlines()[-1])


def test_int8_convolutions_are_exact_on_every_cpu(tmp_path):
    """Bright uint8 inputs times full-range int8 weights: pair sums of products overflow int16, which ORT's fast
    u8s8 kernels clamp on x86 CPUs without VNNI. Through qbench's sessions the QLinearConv output equals the
    integer result computed in NumPy (to one output step: rounding), on whatever CPU this runs; where this CPU
    does saturate, ORT's default kernels (QBENCH_EXACT_INT8=0) are shown to be far off, so the probe is right."""
    path, x, expected, y_scale = _overflowing_conv(tmp_path)

    host = int8_host()
    assert set(host) >= {"cpu", "u8s8_saturates", "exact_mode", "int8_kernels"} and host["u8s8_saturates"] is not None
    assert host["exact_mode"] == host["u8s8_saturates"]  # exact mode exactly where it is needed (default settings)
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    if flags & {"avx2", "avx512f"}:  # named next to every timing: what decides int8 speed (and saturation)
        assert ("no VNNI" in host["isa"]) == (not flags & {"avx512_vnni", "avx_vnni"}), host["isa"]
        assert ("AVX-512" in host["isa"]) == ("avx512f" in flags) and ("AMX" in host["isa"]) == ("amx_int8" in flags)
    y = ort_session(path, 1).run(None, {"x": x})[0][0]
    assert np.abs(y - expected).max() <= 1.01 * y_scale

    if host["u8s8_saturates"]:  # the same model with ONNX Runtime's default kernels, in a fresh process
        fast, fast_host = _run_in_process(tmp_path, path, x, QBENCH_EXACT_INT8="0")
        assert fast_host["exact_mode"] is False
        assert np.abs(fast - expected).max() > 20 * y_scale


def test_int8_is_exact_on_a_cpu_without_vnni(tmp_path, maskcpu):
    """The branch the test above only reaches on an AVX2 CPU, reached on any x86 CPU: with VNNI hidden from CPUID
    (tests/isa/maskcpu.c), ONNX Runtime takes its saturating u8s8 kernels, qbench's probe sees it and turns on exact
    mode, and the conv computes the exact result; with QBENCH_EXACT_INT8=0 it is far off, and weights that fit in
    7 bits (recipe reduce-range) are exact on the fast kernels. The CPU is named as one with VNNI hidden where
    /proc/cpuinfo lists VNNI."""
    lib = maskcpu
    path, x, expected, y_scale = _overflowing_conv(tmp_path)

    y, host = _run_in_process(tmp_path, path, x, LD_PRELOAD=str(lib))
    assert host["u8s8_saturates"] is True and host["exact_mode"] is True
    assert np.abs(y - expected).max() <= 1.01 * y_scale
    with open("/proc/cpuinfo") as f:
        vnni = bool({"avx512_vnni", "avx_vnni"} & set(f.read().split()))
    assert ("VNNI hidden from CPUID" in host["cpu"]) == vnni
    # the extensions named next to the CPU are the kernel's list, said to be so where the process sees others
    assert host["isa"].startswith("as listed by the kernel: ") == vnni and ("no VNNI" in host["isa"]) != vnni

    fast, host = _run_in_process(tmp_path, path, x, LD_PRELOAD=str(lib), QBENCH_EXACT_INT8="0")
    assert host["u8s8_saturates"] is True and host["exact_mode"] is False and "SATURATING" in host["int8_kernels"]
    assert np.abs(fast - expected).max() > 20 * y_scale

    path7, x7, expected7, step7 = _overflowing_conv(tmp_path, w_values=(-64, -63, 63, 62, 50, -50))
    y7, _ = _run_in_process(tmp_path, path7, x7, LD_PRELOAD=str(lib), QBENCH_EXACT_INT8="0")
    assert np.abs(y7 - expected7).max() <= 1.01 * step7


def test_a_model_exact_mode_cannot_load_is_scored_with_a_warning(tmp_path, maskcpu, default_onnx, calib,
                                                                 synth_small):
    """ONNX Runtime's exact int8 mode cannot load some models (an int8 constant whose DequantizeLinear feeds two
    nodes: `quantize_static`'s defaults quantize a YOLO decode's anchors so). On a CPU without VNNI (hidden from
    CPUID), `qbench compare` used to stop there, blaming the export; it now scores the model on ONNX Runtime's
    default kernels and says so under the table and in compare.json, and a plain session names the cause."""
    from qbench.calibration import calibration_paths
    from qbench.models.export import read_onnx_meta
    from qbench.peers import _ort_plain

    lib = maskcpu
    int8 = tmp_path / "ort-plain.onnx"
    _ort_plain(default_onnx, int8, calibration_paths(calib)[:8], read_onnx_meta(default_onnx)["imgsz"])
    env = {**os.environ, "LD_PRELOAD": str(lib), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "qbench", "compare", str(default_onnx), str(int8), "--data",
                        str(synth_small), "--out", str(tmp_path / "cmp")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "re-export" not in r.stdout + r.stderr
    row = json.loads((tmp_path / "cmp" / "compare.json").read_text())["models"]["int8"]
    assert "exact int8 mode" in row["runtime_caveat"] and "saturate" in row["runtime_caveat"]
    assert "Warning: int8" in (tmp_path / "cmp" / "compare.md").read_text()

    check = ("import sys\nfrom qbench.runtime import ort_session\nfrom qbench.errors import QbenchError\n"
             "try:\n    ort_session(sys.argv[1])\nexcept QbenchError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", check, str(int8)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "exact int8 mode" in r.stdout and "QBENCH_EXACT_INT8=0" in r.stdout, r.stderr
