"""qbench report: summary.md and a self-contained report.html, rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(tmp_path, *args):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run) to test the report")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_report_renders_in_chromium_with_the_key_numbers(small_run, tmp_path):
    r = run_cli("report", str(small_run))
    assert r.returncode == 0, r.stderr
    page = (small_run / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # self-contained: nothing fetched
    dom = _chromium(tmp_path, "--dump-dom", (small_run / "report.html").as_uri())
    text = re.sub(r"<[^>]+>", " ", dom)
    cmp = json.loads((small_run / "compare.json").read_text())
    ins = json.loads((small_run / "inspect.json").read_text())
    for k in ("fp32", "int8"):
        assert f"{cmp['models'][k]['metrics']['mAP50-95']:.4f}" in text, k
    assert f"{cmp['models']['int8']['delta']['mAP50-95']:+.4f}" in text
    assert f"{ins['summary']['output_sqnr_db']:.1f}" in text
    top = ins["leaky"][0]
    assert top["layer"] in text and f"{top['harm_db']:.1f}" in text
    assert dom.count("data:image/png;base64,") >= 4  # accuracy, depth, histograms, LeakyReLU charts
    shot = tmp_path / "page.png"
    _chromium(tmp_path, "--window-size=1280,2000", f"--screenshot={shot}", (small_run / "report.html").as_uri())
    assert shot.stat().st_size > 50_000  # a drawn page, not a blank one
    # the npu-symmetric variant: scored in the same table, inspected into its own folder, compared per profile
    variant = json.loads((small_run / "profiles" / "npu-symmetric-fused" / "inspect.json").read_text())
    assert variant["summary"]["unfused_leaky_relus"] == 0  # the profile fuses Conv+LeakyReLU
    assert variant["summary"]["leaky_relus"] == ins["summary"]["leaky_relus"]
    row = "int8[npu-symmetric,fused]"
    assert row in text and f"{cmp['models'][row]['delta']['mAP50-95']:+.4f}" in text
    assert f"{variant['summary']['output_sqnr_db']:.1f}" in text
    assert "accuracy and per-layer error per profile" in text
    md = (small_run / "summary.md").read_text()
    assert f"{cmp['models']['int8']['metrics']['mAP50-95']:.4f}" in md and top["layer"] in md


def test_side_by_side_report_and_bad_input(small_run, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(small_run, twin)
    r = run_cli("report", str(small_run), str(twin))
    assert r.returncode == 2 and "needs --out" in r.stderr
    r = run_cli("report", str(small_run), str(twin), "--out", str(tmp_path / "both"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "both" / "report.html").read_text()
    assert "small vs twin" in page and page.count("<h3>twin") >= 2
    r = run_cli("report", str(tmp_path / "both"))
    assert r.returncode == 2 and "not a finished qbench run folder" in r.stderr and "Traceback" not in r.stderr


def test_the_activation_matrix_names_each_runs_own_activations(tmp_path):
    """The side-by-side matrix over the committed gtsdb4 runs: the ReLU run was inspected by a qbench that counted
    LeakyReLU only; its row must say ReLU (from model.json), not 'LeakyReLU x0'. Also: FP32 mAP50 is a column (the
    seeds' LeakyReLU-vs-ReLU claim is in mAP50)."""
    from conftest import REPO

    from qbench.report.render import report

    runs = [REPO / "results" / "runs" / n for n in ("gtsdb4-l3-leaky-640", "gtsdb4-l3-relu-640")]
    report(runs, tmp_path / "side")
    md = (tmp_path / "side" / "summary.md").read_text()
    table = md.split("### All runs: Δ mAP50-95 per INT8 variant", 1)[1]
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| gtsdb4-")}
    # the ReLU run's inspection now has the full census (ONNX op type Relu, shown as people write it)
    assert rows["gtsdb4-l3-relu-640"].split("|")[2].strip().startswith("ReLU x57") and "LeakyReLU x0" not in md
    assert "Relu x" not in md
    assert "| LeakyReLU x57 (57 unfused) |" in rows["gtsdb4-l3-leaky-640"]
    assert "| FP32 mAP50 | FP32 mAP50-95 |" in table and "| 0.7844 | 0.5920 |" in rows["gtsdb4-l3-relu-640"]
