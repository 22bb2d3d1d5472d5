"""How much slower ONNX Runtime runs a stream of images when its worker threads sleep between runs
(session.intra_op.allow_spinning=0, how qbench's evaluation sessions run) than with its default (threads spin):
the reason qbench times latency on spinning sessions in steady-state blocks (`comparison.measure_latency`).

Paired: each round runs both sessions of a model in random order, each one untimed run and then a block of 5 timed
runs; the ratio of the two block medians is that round's; the median over 30 rounds with its bootstrap 95% interval.
FP32 and qbench's default INT8 of the gtsdb4 reference model at 640, 2 threads.

Run from the repository root: `python results/bench/ort-spinning/spinning.py >> results/bench/ort-spinning/spinning.txt`
(about 1 min; nothing else running). spinning.txt holds two runs, one after the other: the FP32 ratio is small
and moves between runs (1.025 and 1.033 there), the INT8 one less (1.107 and 1.110)."""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from qbench.quantization import quantize_ort
from qbench.runtime import _cpu_name, cpu_isa, ort_session

FP32 = Path("results/runs/gtsdb4-l3-leaky-640/fp32.onnx")  # qbench export of results/training/.../best.pt
CALIB = Path("calibration/gtsdb4-train-512.json")
ROUNDS, BLOCK, THREADS = 30, 5, 2


def paired(path: Path) -> str:
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    runs = {}
    for spin in (False, True):
        sess = ort_session(path, THREADS, spinning=spin)
        name = sess.get_inputs()[0].name
        runs[spin] = (lambda s, n: lambda: s.run(None, {n: x}))(sess, name)
        for _ in range(3):
            runs[spin]()
    ratios, medians = [], {False: [], True: []}
    rng = random.Random(0)
    for _ in range(ROUNDS):
        order = [False, True]
        rng.shuffle(order)
        block = {}
        for spin in order:
            runs[spin]()
            t = []
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                runs[spin]()
                t.append(time.perf_counter() - t0)
            block[spin] = statistics.median(t)
            medians[spin].append(block[spin])
        ratios.append(block[False] / block[True])
    r = np.array(ratios)
    boot = [np.median(np.random.default_rng(i).choice(r, len(r))) for i in range(1000)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return (f"sleeping / spinning latency {np.median(r):.3f} [{lo:.3f}, {hi:.3f}]; medians "
            f"{1000 * statistics.median(medians[False]):.1f} ms sleeping, {1000 * statistics.median(medians[True]):.1f} ms "
            "spinning")


def main() -> None:
    print(f"# {_cpu_name()} ({cpu_isa()}), {THREADS} threads, batch 1 at 640, {ROUNDS} rounds of {BLOCK}-run blocks")
    print(f"fp32          {paired(FP32)}", flush=True)
    with tempfile.TemporaryDirectory() as td:
        int8 = quantize_ort(FP32, Path(td) / "int8.onnx", "default", CALIB)["out"]
        print(f"int8 default  {paired(Path(int8))}", flush=True)


if __name__ == "__main__":
    main()
