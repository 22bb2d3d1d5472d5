"""Shared fixtures: the committed default model, small synthetic data, the real datasets when present."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMGSZ = 64  # the untrained exports below: a few seconds to quantize
SHARED = REPO.parent / "shared" / "datasets"
GTSDB4 = SHARED / "gtsdb4" / "data.yaml"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Every test session gets its own qbench cache (ultralytics settings, fonts, default data)."""
    if not os.environ.get("QBENCH_CACHE"):
        os.environ["QBENCH_CACHE"] = str(tmp_path_factory.mktemp("qbench-cache"))


@pytest.fixture(scope="session")
def default_weights() -> Path:
    from qbench.data.default import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS.exists(), "the committed default model is missing"
    return DEFAULT_WEIGHTS


@pytest.fixture(scope="session")
def synth_val(tmp_path_factory) -> Path:
    """The default synthetic val split (all 200 images, identical to the default set's), no train images."""
    from qbench.data.default import DEFAULT_VAL, synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("synth") / "val200", n_train=0, n_val=DEFAULT_VAL)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A tiny synthetic set (8 train, 12 val) for smoke tests."""
    from qbench.data.default import synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("synth") / "small", n_train=8, n_val=12)


@pytest.fixture(scope="session")
def default_onnx(tmp_path_factory, default_weights) -> Path:
    from qbench.models.export import export_onnx

    return export_onnx(default_weights, tmp_path_factory.mktemp("onnx") / "fp32.onnx")


def _untrained_onnx(tmp: Path, act: str) -> Path:
    """configs/models/yolo11n-l3-{act}.yaml, untrained, exported at IMGSZ."""
    from ultralytics import YOLO

    import qbench.ultra  # noqa: F401  (offline ultralytics first)
    from qbench.models.export import export_onnx

    pt = tmp / f"{act}.pt"
    YOLO(str(REPO / "configs" / "models" / f"yolo11n-l3-{act}.yaml")).save(str(pt))
    return export_onnx(pt, tmp / f"{act}.onnx", imgsz=IMGSZ)


@pytest.fixture(scope="session")
def leaky_onnx(tmp_path_factory) -> Path:
    return _untrained_onnx(tmp_path_factory.mktemp("leaky"), "leaky")


@pytest.fixture(scope="session")
def silu_onnx(tmp_path_factory) -> Path:
    return _untrained_onnx(tmp_path_factory.mktemp("silu"), "silu")


@pytest.fixture(scope="session")
def relu_onnx(tmp_path_factory) -> Path:
    return _untrained_onnx(tmp_path_factory.mktemp("relu"), "relu")


@pytest.fixture(scope="session")
def calib(tmp_path_factory) -> Path:
    """A manifest of 12 stratified images from a tiny synthetic train split."""
    from qbench.calibration import build_manifest, save_manifest
    from qbench.data.default import synth_dataset

    d = tmp_path_factory.mktemp("calib")
    y = synth_dataset(d / "data", n_train=12, n_val=0)
    return save_manifest(build_manifest(y, 12, seed=0), d / "calib.json")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `qbench` command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "qbench", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, synth_small, default_weights) -> Path:
    """A finished `qbench run` folder (default model on the tiny synthetic set, plus its npu-symmetric variant)
    with `qbench inspect` results for both."""
    from qbench.analysis import inspect_run
    from qbench.pipeline import run

    out = run(weights=default_weights, data=synth_small, out=tmp_path_factory.mktemp("runs") / "small",
              profiles=["npu-symmetric"])
    inspect_run(out, images=8, error_images=4)
    return out


@pytest.fixture(scope="session")
def maskcpu(tmp_path_factory) -> Path:
    """tests/isa/maskcpu.c built as an LD_PRELOAD library that hides AVX-512 and VNNI from CPUID (a process run with
    it takes the kernels of an AVX2 CPU without VNNI), or a skip where this machine cannot run it."""
    flags: set[str] = set()
    if sys.platform.startswith("linux"):
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    if platform.machine() not in ("x86_64", "AMD64") or "cpuid_fault" not in flags:
        pytest.skip("needs Linux on x86-64 with CPUID faulting (flag cpuid_fault)")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("needs a C compiler to build tests/isa/maskcpu.c")
    lib = tmp_path_factory.mktemp("maskcpu") / "maskcpu.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(REPO / "tests" / "isa" / "maskcpu.c")],
                   check=True)
    return lib
