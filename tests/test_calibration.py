"""qbench.calibration: stratified manifests, hash verification, the streaming calibration reader (real files)."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from qbench.calibration import CalibrationReader, build_manifest, load_manifest, save_manifest
from qbench.data.dataset import label_path
from qbench.errors import QbenchError

NAMES = ["prohibitory", "danger", "mandatory", "other"]


def _image(path: Path, value: int, w: int = 40, h: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value % 256, np.uint8)
    img[: h // 2, : w // 2] = (value * 7) % 256  # distinct content, so every file has its own hash
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def skewed(tmp_path_factory) -> Path:
    """30 train images: class 0 in 24, class 1 in 5, class 2 in exactly 1, class 3 in none, 4 backgrounds."""
    root = tmp_path_factory.mktemp("skewed")
    plan = ["0 1"] * 3 + ["1"] * 2 + ["0 2"] + [None] * 4 + ["0"] * 20
    for i, classes in enumerate(plan):
        img = _image(root / "images" / "train" / f"im{i:02d}.png", i)
        if classes is not None:
            lp = label_path(img)
            lp.parent.mkdir(parents=True, exist_ok=True)
            lp.write_text("".join(f"{c} 0.5 0.5 0.2 0.2\n" for c in classes.split()))
    for i in range(3):
        _image(root / "images" / "val" / f"v{i}.png", 100 + i)
    (root / "images" / "empty").mkdir()
    y = root / "data.yaml"
    y.write_text(f"train: images/train\nval: images/val\nnames: {NAMES}\n")
    return y


def test_manifest_is_deterministic_and_records_hashes(skewed):
    a = build_manifest(skewed, 8, seed=3)
    b = build_manifest(skewed, 8, seed=3)
    assert a == b
    assert build_manifest(skewed, 8, seed=4)["images"] != a["images"]  # the seed matters
    assert a["version"] == 1 and a["split"] == "train" and a["seed"] == 3 and a["n"] == 8
    assert a["data"] == str(skewed)
    paths = [e["path"] for e in a["images"]]
    assert len(set(paths)) == 8 and all(p.startswith("images/train/") for p in paths)
    assert all(len(e["sha256"]) == 64 for e in a["images"])


def test_stratification_covers_every_class_even_the_rarest(skewed):
    for seed in range(5):
        m = build_manifest(skewed, 4, seed=seed)
        counts = m["class_counts"]
        # class 2 is in 1 image of 30, class 1 in 5: both make it into 4 picks; class 3 is absent from train
        assert counts["prohibitory"] > 0 and counts["danger"] > 0 and counts["mandatory"] == 1
        assert counts["other"] == 0
        assert m["split_classes"] == ["prohibitory", "danger", "mandatory"]
        # background at its share of the split: round(4 * 4/30) = 1
        assert m["background"] == 1
        # rarest first: the first picks already cover all present classes
        first = [e["path"] for e in m["images"][:3]]
        labels = {int(line.split()[0]) for p in first
                  for line in label_path(skewed.parent / p).read_text().splitlines()}
        assert labels == {0, 1, 2}


def test_whole_split_and_instances(skewed):
    m = build_manifest(skewed, 30, seed=0)
    assert len({e["path"] for e in m["images"]}) == 30 and m["background"] == 4
    assert m["class_counts"] == {"prohibitory": 24, "danger": 5, "mandatory": 1, "other": 0}
    assert m["instances"] == m["class_counts"]  # one box per class per image here


def test_too_big_or_bad_n_is_refused(skewed, tmp_path):
    with pytest.raises(QbenchError, match=r"asks for 31 images but 'train' has 30; lower --n"):
        build_manifest(skewed, 31)
    with pytest.raises(QbenchError, match="at least 1"):
        build_manifest(skewed, 0)
    with pytest.raises(QbenchError, match="whole number"):
        build_manifest(skewed, 2.5)
    empty = skewed.parent / "empty.yaml"
    empty.write_text(f"train: images/empty\nval: images/val\nnames: {NAMES}\n")
    with pytest.raises(QbenchError, match="contains no images"):
        build_manifest(empty, 1)
    with pytest.raises(QbenchError, match="no 'test' key"):
        build_manifest(skewed, 1, split="test")


def test_save_load_and_detect_changed_or_missing_images(tmp_path):
    root = tmp_path / "d"
    for i in range(6):
        _image(root / "images" / "train" / f"t{i}.jpg", 10 * i)
    y = root / "data.yaml"
    y.write_text(f"train: images/train\nnames: {NAMES}\n")
    m = build_manifest(y, 5, seed=1)
    mp = save_manifest(m, tmp_path / "run" / "calib.json")
    assert not list(mp.parent.glob(".*tmp"))  # written atomically
    loaded, paths = load_manifest(mp)
    assert loaded == json.loads(mp.read_text()) == {**m, "data_from_manifest": "../d/data.yaml"}
    assert [p.relative_to(root).as_posix() for p in paths] == [e["path"] for e in m["images"]]

    # a committed manifest travels with its dataset: move both, the images are still found and verified
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved / "d")
    shutil.copytree(mp.parent, moved / "run")
    _, moved_paths = load_manifest(moved / "run" / "calib.json")
    assert all(str(q).startswith(str(moved)) for q in moved_paths)

    victim = paths[2]
    victim.write_bytes(victim.read_bytes() + b"\0")  # same name, other bytes
    changed = r"changed since the manifest .* was made; rebuild it with `qbench calib`"
    with pytest.raises(QbenchError, match=changed) as e:
        load_manifest(mp)
    assert victim.name in str(e.value)
    assert len(load_manifest(mp, verify=False)[1]) == 5  # verify=False skips the hashes

    victim.unlink()
    with pytest.raises(QbenchError, match=f"{victim.name}.* is missing; rebuild it"):
        load_manifest(mp)
    with pytest.raises(QbenchError, match="does not exist"):
        load_manifest(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(QbenchError, match="not readable JSON"):
        load_manifest(tmp_path / "bad.json")


def test_reader_streams_batches_and_rewinds(skewed):
    paths = sorted((skewed.parent / "images" / "train").glob("*.png"))[:10]
    r = CalibrationReader(paths, 64, "images", batch=4)
    assert len(r) == 3
    shapes = []
    first = None
    while (item := r.get_next()) is not None:
        assert list(item) == ["images"]
        x = item["images"]
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        shapes.append(x.shape)
        first = x if first is None else first
    assert shapes == [(4, 3, 64, 64), (4, 3, 64, 64), (2, 3, 64, 64)]
    assert r.images_read == 10 and r.get_next() is None
    r.rewind()
    np.testing.assert_array_equal(r.get_next()["images"], first)
    # ORT's iteration protocol and strided ranges
    r.set_range(1, 2)
    assert [b["images"].shape[0] for b in r] == [4]
    # nothing but the path list is kept between calls
    assert not any(isinstance(v, np.ndarray) for v in vars(r).values())
    with pytest.raises(QbenchError, match="batch"):
        CalibrationReader(paths, 64, "images", batch=0)


def _peak_while_reading(paths) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        r = CalibrationReader(paths, 96, "images", batch=2)
        while r.get_next() is not None:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reader_memory_does_not_grow_with_the_set(skewed):
    paths = sorted((skewed.parent / "images" / "train").glob("*.png"))
    small = _peak_while_reading(paths[:4])
    big = _peak_while_reading(paths * 4)  # 120 images
    one_batch = 2 * 3 * 96 * 96 * 4
    assert big < small + one_batch, (small, big)


@pytest.mark.parametrize("name", ["gtsdb4", "road-signs"])
def test_committed_manifests_match_the_shared_datasets(name):
    """The manifests under calibration/ still describe ../shared/datasets byte for byte (skipped when absent)."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo.parent / "shared" / "datasets" / name / "data.yaml").exists():
        pytest.skip(f"../shared/datasets/{name} is absent")
    m, paths = load_manifest(repo / "calibration" / f"{name}-train-512.json")  # verifies every sha256
    assert len(paths) == m["n"] == 512 and m["split"] == "train"
    assert all("/train/" in p.as_posix() for p in paths)
    assert min(m["class_counts"].values()) > 0


@pytest.mark.slow
def test_committed_default_manifest_matches_the_regenerated_synthetic_set():
    """calibration/synth-train-512.json names the embedded set (not a path of this machine's cache); every
    regenerated image matches its committed sha256 (on any CPU: tests/test_synth.py). Rebuilding it picks the same
    images with the same classes, and an edited image is refused."""
    from qbench.data.default import DEFAULT_CALIB, default_data

    m, paths = load_manifest(DEFAULT_CALIB)  # generates the default set if needed, verifies every image
    assert m["data"] == "qbench:default" and "data_from_manifest" not in m
    assert len(paths) == m["n"] == 512 and all(p.is_file() for p in paths)
    rebuilt = build_manifest(default_data(), 512, seed=m["seed"])
    assert [e["path"] for e in rebuilt["images"]] == [e["path"] for e in m["images"]]
    assert rebuilt["class_counts"] == m["class_counts"] and rebuilt["instances"] == m["instances"]
    victim = paths[0]
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:-64] + bytes(64))  # same size, other bytes
        with pytest.raises(QbenchError, match="changed since the manifest"):
            load_manifest(DEFAULT_CALIB)
    finally:
        victim.write_bytes(original)
    assert load_manifest(DEFAULT_CALIB)[1] == paths


def test_heldout_data_scores_what_calibration_does_not_use(tmp_path, synth_small):
    """`qbench data heldout`: a data.yaml whose val split is train minus the calibration images a recipe uses;
    scoring on it passes the scored-split check that the train split itself fails."""
    from qbench.calibration import heldout_data, scored_overlap
    from qbench.data.dataset import image_files, load_data_yaml

    m = save_manifest(build_manifest(synth_small, 8, seed=0), tmp_path / "calib.json")
    y = heldout_data(synth_small, m, tmp_path / "cfg" / "held.yaml", n_used=5)
    spec = load_data_yaml(y, require=("val", "train"))
    assert len(image_files(spec, "val")) == len(image_files(spec, "train")) - 5 == 3
    assert scored_overlap(m, y, "val", n_used=5)["in_scored_split"] == 0
    with pytest.raises(QbenchError, match="split being scored"):
        scored_overlap(m, y, "val", n_used=8)  # the recipe would use 3 of the scored images
    with pytest.raises(QbenchError, match="already exists"):
        heldout_data(synth_small, m, y, n_used=5)
