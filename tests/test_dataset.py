"""qbench.data.dataset: data.yaml parsing, image lists, label checks (real files in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from qbench.data.dataset import (
    DataSpec,
    check_split,
    image_files,
    label_path,
    load_data_yaml,
    read_image,
    read_labels,
)
from qbench.errors import QbenchError

NAMES = ["prohibitory", "danger", "mandatory", "other"]
REAL_YAML = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "gtsdb4" / "data.yaml"


def write_image(path: Path, w: int = 16, h: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, np.full((h, w, 3), 127, np.uint8))
    assert ok
    buf.tofile(str(path))
    return path


def write_label(image: Path, text: str) -> Path:
    lp = label_path(image)
    lp.parent.mkdir(parents=True, exist_ok=True)
    lp.write_text(text)
    return lp


def make_dataset(root: Path, yaml_text: str | None = None) -> Path:
    """root/{images,labels}/val with 2 labelled images and 1 background image; returns data.yaml."""
    a = write_image(root / "images" / "val" / "a.jpg")
    b = write_image(root / "images" / "val" / "sub" / "b.png")  # nested: folders are searched recursively
    write_image(root / "images" / "val" / "c.jpg")  # no label file: background image
    (root / "images" / "val" / "notes.md").write_text("not an image")
    write_label(a, "0 0.5 0.5 0.2 0.2\n3 0.1 0.1 0.1 0.1\n")
    write_label(b, "1 0.5 0.5 0.4 0.4\n")
    y = root / "data.yaml"
    y.write_text(yaml_text if yaml_text is not None else f"val: images/val\nnames: {NAMES}\n")
    return y


def write_yaml(tmp_path: Path, text: str) -> Path:
    y = tmp_path / "data.yaml"
    y.write_text(text)
    return y


def raises(match_parts, fn, *args, **kwargs) -> str:
    with pytest.raises(QbenchError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    for part in match_parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


# ---- valid datasets -------------------------------------------------------------------------------


def test_valid_list_names(tmp_path):
    spec = load_data_yaml(make_dataset(tmp_path))
    assert isinstance(spec, DataSpec)
    assert spec.names == NAMES and spec.nc == 4
    assert spec.root == tmp_path.resolve()
    assert spec.yaml_path == (tmp_path / "data.yaml").resolve()
    assert spec.splits == {"val": (tmp_path / "images" / "val").resolve()}
    files = image_files(spec, "val")
    assert [f.name for f in files] == ["a.jpg", "c.jpg", "b.png"]  # sorted by path string, like ultralytics
    assert check_split(spec, "val") == {"images": 3, "instances": 3, "per_class": [1, 1, 0, 1]}


def test_valid_dict_names_and_nc(tmp_path):
    text = "val: images/val\nnc: 4\nnames:\n  1: danger\n  0: prohibitory\n  2: mandatory\n  3: other\n"
    spec = load_data_yaml(make_dataset(tmp_path, text))
    assert spec.names == NAMES


def test_path_key_relative_absolute_absent(tmp_path):
    make_dataset(tmp_path / "ds")
    rel = write_yaml(tmp_path, f"path: ds\nval: images/val\nnames: {NAMES}\n")
    assert load_data_yaml(rel).root == (tmp_path / "ds").resolve()
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    absolute = cfg / "abs.yaml"
    absolute.write_text(f"path: {tmp_path / 'ds'}\nval: images/val\nnames: {NAMES}\n")
    spec = load_data_yaml(absolute)
    assert spec.root == (tmp_path / "ds").resolve()
    assert len(image_files(spec, "val")) == 3
    assert load_data_yaml(tmp_path / "ds" / "data.yaml").root == (tmp_path / "ds").resolve()


def test_txt_split_list(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "val.txt").write_text("./images/val/a.jpg\nimages/val/sub/b.png\n\n")
    spec = load_data_yaml(write_yaml(tmp_path, f"val: val.txt\ntrain: images/val\nnames: {NAMES}\n"))
    assert set(spec.splits) == {"train", "val"}
    files = image_files(spec, "val")
    assert [f.name for f in files] == ["a.jpg", "b.png"]
    assert check_split(spec, "val")["instances"] == 3


def test_progress_called_per_file(tmp_path):
    spec = load_data_yaml(make_dataset(tmp_path))
    calls = []
    check_split(spec, "val", progress=calls.append)
    assert calls == [1, 1, 1]


def test_label_path_rule():
    assert label_path(Path("/d/images/x/images/val/a.b.jpg")) == Path("/d/images/x/labels/val/a.b.txt")
    assert label_path(Path("/d/imgs/a.jpg")) == Path("/d/imgs/a.txt")


def test_read_image(tmp_path):
    im = read_image(write_image(tmp_path / "odd dir [1]" / "ü.png", w=7, h=5))
    assert im.shape == (5, 7, 3) and im.dtype == np.uint8


# ---- labels ---------------------------------------------------------------------------------------


def test_missing_and_empty_labels(tmp_path):
    img = write_image(tmp_path / "images" / "val" / "a.jpg")
    assert read_labels(img, 4).shape == (0, 5)
    write_label(img, "\n  \n")
    lb = read_labels(img, 4)
    assert lb.shape == (0, 5) and lb.dtype == np.float32


def test_duplicate_rows_removed(tmp_path):
    img = write_image(tmp_path / "images" / "val" / "a.jpg")
    write_label(img, "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n0 0.50 0.5 0.2 0.20\n")
    lb = read_labels(img, 4)
    assert lb.dtype == np.float32
    np.testing.assert_allclose(lb, [[0, 0.5, 0.5, 0.2, 0.2], [1, 0.3, 0.3, 0.1, 0.1]])


def test_polygon_row_converted(tmp_path):
    img = write_image(tmp_path / "images" / "val" / "a.jpg")
    write_label(img, "2 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n1 0.2 0.2 0.4 0.3 0.3 0.5\n")
    np.testing.assert_allclose(
        read_labels(img, 4), [[2, 0.3, 0.4, 0.4, 0.4], [1, 0.3, 0.35, 0.2, 0.3]], atol=1e-6
    )


def test_tolerance_like_ultralytics(tmp_path):
    img = write_image(tmp_path / "images" / "val" / "a.jpg")
    write_label(img, "0 1.005 0.5 0.2 0.2\n0 -0.005 0.5 0.2 0.2\n")  # within ultralytics' 0.01 slack
    assert read_labels(img, 4).shape == (2, 5)


@pytest.mark.parametrize(
    "row, expect",
    [
        ("0 0.5 0.5 0.2", "found 4 numbers"),
        ("0 0.5 0.5 0.2 0.2 0.1", "found 6 numbers"),
        ("0 0.5 0.5 0.2 0.2 0.1 0.1 0.1", "found 8 numbers"),
        ("0 0.5 abc 0.2 0.2", "non-numeric"),
        ("-1 0.5 0.5 0.2 0.2", "not a non-negative integer"),
        ("1.5 0.5 0.5 0.2 0.2", "not a non-negative integer"),
        ("7 0.5 0.5 0.2 0.2", "class id 7 is out of range for the 4 classes in data.yaml (0-3)"),
        ("0 1.2 0.5 0.2 0.2", "normalized"),
        ("0 0.5 -0.5 0.2 0.2", "normalized"),
        ("0 0.5 0.5 -0.001 0.2", "normalized"),
        ("0 120 80 30 40", "normalized"),
        ("0 nan 0.5 0.2 0.2", "nan"),
        ("0 0.1 0.1 0.2 0.1 0.2 0.2", "polygon row in a file whose first row is a box"),
    ],
)
def test_bad_label_rows(tmp_path, row, expect):
    img = write_image(tmp_path / "images" / "val" / "x.jpg")
    write_label(img, f"0 0.5 0.5 0.2 0.2\n\n{row}\n")
    raises([str(Path("labels") / "val" / "x.txt") + " line 3", expect], read_labels, img, 4)


def test_check_split_raises_on_bad_label(tmp_path):
    spec = load_data_yaml(make_dataset(tmp_path))
    write_label(tmp_path / "images" / "val" / "c.jpg", "9 0.5 0.5 0.2 0.2\n")
    raises(["c.txt line 1", "class id 9"], check_split, spec, "val")


def test_unreadable_image(tmp_path):
    bad = tmp_path / "images" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    raises(["broken.jpg"], read_image, bad)
    empty = tmp_path / "images" / "empty.jpg"
    empty.write_bytes(b"")
    raises(["empty.jpg"], read_image, empty)
    raises(["missing.jpg"], read_image, tmp_path / "missing.jpg")


# ---- bad data.yaml --------------------------------------------------------------------------------


def test_yaml_missing_or_directory(tmp_path):
    raises(["nope.yaml", "does not exist"], load_data_yaml, tmp_path / "nope.yaml")
    raises([str(tmp_path.resolve()), "is a folder"], load_data_yaml, tmp_path)


@pytest.mark.parametrize(
    "text, expect",
    [
        ("val: [images/val\nnames: [a]\n", "not valid YAML"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("just a string\n", "must be a YAML mapping"),
        ("", "must be a YAML mapping"),
        ("val: images/val\n", "no 'names' key"),
        ("names: [a, b]\n", "no 'val' key; add 'val: images/val' (the folder of validation images)"),
        ("val:\nnames: [a, b]\n", "empty 'val' key"),
        ("val: images/val\nnc: 3\nnames: [a, b]\n", "'nc: 3' but 2 'names'"),
        ("val: images/val\nnames: {0: a, 2: b}\n", "keys must be the class ids 0..1"),
        ("val: images/val\nnames: {a: x, b: y}\n", "keys must be the class ids"),
        ("val: images/val\nnames: []\n", "non-empty"),
        ("val: images/val\nnames: [a, null]\n", "entry 1"),
        ("val: [images/val, images/x]\nnames: [a]\n", "one folder or .txt list"),
        ("val: images/elsewhere\nnames: [a]\n", "does not exist"),
    ],
)
def test_bad_yaml(tmp_path, text, expect):
    write_image(tmp_path / "images" / "val" / "a.jpg")
    raises(["data.yaml", expect], load_data_yaml, write_yaml(tmp_path, text))


def test_missing_path_names_resolved_path(tmp_path):
    y = write_yaml(tmp_path, "val: images/elsewhere\nnames: [a]\n")
    raises([str((tmp_path / "images" / "elsewhere").resolve())], load_data_yaml, y)


def test_require_train(tmp_path):
    y = make_dataset(tmp_path)
    raises(["no 'train' key", "training images"], load_data_yaml, y, require=("train", "val"))
    spec = load_data_yaml(y, require=())
    raises(["no 'test' key"], image_files, spec, "test")


def test_split_without_images(tmp_path):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "images" / "val" / "readme.txt").write_text("x")
    spec = load_data_yaml(write_yaml(tmp_path, "val: images/val\nnames: [a]\n"))
    raises(["data.yaml", "images/val", "contains no images"], image_files, spec, "val")


def test_optional_split_missing_on_disk(tmp_path):
    y = make_dataset(tmp_path, f"val: images/val\ntest: images/test\nnames: {NAMES}\n")
    spec = load_data_yaml(y)  # only required splits are checked on load
    raises([str((tmp_path / "images" / "test").resolve()), "does not exist"], image_files, spec, "test")


def test_txt_list_with_missing_image(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "val.txt").write_text("./images/val/a.jpg\n./images/val/gone.jpg\n")
    spec = load_data_yaml(write_yaml(tmp_path, f"val: val.txt\nnames: {NAMES}\n"))
    raises(["val.txt line 2", "gone.jpg"], image_files, spec, "val")


# ---- real data ------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_gtsdb4():
    if not REAL_YAML.is_file():
        pytest.skip(f"{REAL_YAML} not present")
    spec = load_data_yaml(REAL_YAML)
    assert spec.nc == 4
    assert len(image_files(spec, "val")) == 111
    stats = check_split(spec, "val")
    assert stats["images"] == 111 and stats["instances"] == 179
    assert sum(stats["per_class"]) == 179
