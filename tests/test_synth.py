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
