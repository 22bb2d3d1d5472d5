"""The synthetic traffic-sign generator: deterministic, valid YOLO labels, all four classes."""

from __future__ import annotations

import numpy as np
import pytest

from qbench.data import synth
from qbench.data.dataset import image_files, load_data_yaml, read_image, read_labels
from qbench.data.default import synth_dataset
from qbench.errors import QbenchError


def test_same_seed_same_bytes_and_subsets_agree(tmp_path):
    a = synth_dataset(tmp_path / "a", n_train=3, n_val=4, seed=7)
    b = synth_dataset(tmp_path / "b", n_train=0, n_val=2, seed=7)  # val only, fewer images
    for name in ("val_00000", "val_00001"):
        assert (a.parent / "images/val" / f"{name}.jpg").read_bytes() == (b.parent / "images/val" / f"{name}.jpg").read_bytes()
        assert (a.parent / "labels/val" / f"{name}.txt").read_text() == (b.parent / "labels/val" / f"{name}.txt").read_text()


def test_the_default_set_is_the_same_whatever_simd_the_cpu_has():
    """The committed manifest's sha256 hold for images drawn with OpenCV's optimised code off and NumPy's SIMD
    dispatch off (every dispatchable feature this CPU has): the bytes do not depend on which vector units a CPU has
    (version 1 of the generator drew other pixels on AVX2 than on AVX-512 machines)."""
    import json
    import os
    import subprocess
    import sys

    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    from qbench.data.default import DEFAULT_CALIB

    entries = json.loads(DEFAULT_CALIB.read_text())["images"][:24]
    code = ("import cv2, hashlib, sys; cv2.setUseOptimized(False); from qbench.data import synth; "
            "print(' '.join(hashlib.sha256(synth.render_image(synth.SynthConfig(), 'train', int(i))[0]).hexdigest() "
            "for i in sys.argv[1:]))")
    indices = [e["path"].rsplit("_", 1)[1].split(".")[0] for e in entries]
    off = " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))
    for env in ({}, {"NPY_DISABLE_CPU_FEATURES": off} if off else None):
        if env is None:
            continue
        r = subprocess.run([sys.executable, "-c", code, *indices], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [e["sha256"] for e in entries], env


def test_different_seed_differs():
    j0, _ = synth.render_image(synth.SynthConfig(seed=0), "val", 0)
    j1, _ = synth.render_image(synth.SynthConfig(seed=1), "val", 0)
    assert j0 != j1


def test_labels_valid_and_classes_covered(synth_small):
    spec = load_data_yaml(synth_small, require=("train", "val"))
    assert spec.names == synth.NAMES
    seen = np.zeros(4, int)
    sizes = []
    for split in ("train", "val"):
        for f in image_files(spec, split):
            img = read_image(f)
            assert img.shape == (synth.DEFAULT_HEIGHT, synth.DEFAULT_WIDTH, 3)
            lab = read_labels(f, spec.nc)
            assert ((lab[:, 1:] >= 0) & (lab[:, 1:] <= 1)).all()
            seen += np.bincount(lab[:, 0].astype(int), minlength=4)
            sizes += list(lab[:, 3] * synth.DEFAULT_WIDTH)
    assert (seen > 0).all(), seen
    assert min(sizes) < 20 and max(sizes) > 40  # small and large signs both present


def test_refuses_to_overwrite(tmp_path, synth_small):
    with pytest.raises(QbenchError, match="already holds a dataset"):
        synth_dataset(synth_small.parent, n_train=1, n_val=1)
