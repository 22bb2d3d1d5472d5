"""YOLO-format datasets: data.yaml, image lists, label files.

Mirrors what ultralytics (`ultralytics/data/utils.py`: `check_det_dataset`,
`img2label_paths`, `verify_image_label`; `data/base.py`: `get_img_files`)
counts as an image and as a box, so metrics computed here agree with
`yolo val`. Where ultralytics silently drops a corrupt label file, we raise a
`QbenchError` that names the file, the line and the fix.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from qbench.errors import QbenchError
from qbench.files import read_yaml

# Same set as ultralytics.data.utils.IMG_FORMATS (8.4.x), so image counts match.
IMG_FORMATS = frozenset(
    {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"}
)
SPLITS = ("train", "val", "test")
SPLIT_HINTS = {
    "train": "the folder of training images",
    "val": "the folder of validation images",
    "test": "the folder of test images",
}
COORD_TOL = 0.01  # ultralytics accepts coordinates in [-0.01, 1.01] (w, h >= 0)


@dataclass(frozen=True)
class DataSpec:
    """A parsed, validated data.yaml."""

    yaml_path: Path
    root: Path
    names: list[str]
    splits: dict[str, Path]  # resolved, as ultralytics resolves them (labels are looked up beside the resolved path)
    declared: dict[str, Path] = field(default_factory=dict)  # as written in data.yaml, joined to the root

    @property
    def nc(self) -> int:
        return len(self.names)


def load_data_yaml(path, require=("val",)) -> DataSpec:
    """Parse and check a YOLO data.yaml; splits in `require` must exist."""
    yaml_path = Path(path).expanduser().resolve()
    if not yaml_path.exists():
        raise QbenchError(f"data file {yaml_path} does not exist; pass the path of your dataset's data.yaml.")
    if yaml_path.is_dir():
        raise QbenchError(
            f"{yaml_path} is a folder; pass the data.yaml file inside it, e.g. {yaml_path / 'data.yaml'}."
        )
    data = read_yaml(yaml_path)
    if not isinstance(data, dict):
        raise QbenchError(
            f"{yaml_path} must be a YAML mapping with 'names' and split keys like 'val: images/val', "
            f"not a {type(data).__name__}."
        )

    names = _parse_names(yaml_path, data)
    if data.get("nc") is not None and not _same_number(data["nc"], len(names)):
        raise QbenchError(
            f"{yaml_path} has 'nc: {data['nc']}' but {len(names)} 'names'; "
            f"set 'nc: {len(names)}' or remove the 'nc' line."
        )

    root = yaml_path.parent
    if data.get("path") is not None:
        if not isinstance(data["path"], str):
            raise QbenchError(f"{yaml_path} 'path' must be a folder path string, e.g. 'path: .' or remove it.")
        root = (yaml_path.parent / Path(data["path"]).expanduser()).resolve()

    for key in require:
        if not data.get(key):
            hint = SPLIT_HINTS.get(key, f"the folder of {key} images")
            what = "an empty" if key in data else "no"
            raise QbenchError(f"{yaml_path} has {what} '{key}' key; add '{key}: images/{key}' ({hint}).")
    splits, declared = {}, {}
    for key in dict.fromkeys((*SPLITS, *require)):
        value = data.get(key)
        if not value:
            continue
        if not isinstance(value, str):
            raise QbenchError(
                f"{yaml_path} '{key}' must be one folder or .txt list of images, not a {type(value).__name__}; "
                f"write e.g. '{key}: images/{key}'."
            )
        declared[key] = root / Path(value).expanduser()
        splits[key] = declared[key].resolve()
    for key in require:
        if not splits[key].exists():
            raise QbenchError(
                f"{yaml_path} '{key}: {data[key]}' points to {splits[key]}, which does not exist; "
                f"fix the path (relative to {root})."
            )
    return DataSpec(yaml_path=yaml_path, root=root, names=names, splits=splits, declared=declared)


def _same_number(value, n: int) -> bool:
    try:
        return float(value) == n
    except (TypeError, ValueError):
        return False


def _parse_names(yaml_path: Path, data: dict) -> list[str]:
    """`names` as a list, or a dict {0: 'a', 1: 'b', ...} with keys 0..n-1."""
    names = data.get("names")
    if names is None:
        raise QbenchError(
            f"{yaml_path} has no 'names' key; add 'names: [class0, class1, ...]' (the class names by id)."
        )
    if isinstance(names, dict):
        keys = list(names)
        if not all(type(k) is int for k in keys) or sorted(keys) != list(range(len(keys))):
            raise QbenchError(
                f"{yaml_path} 'names' keys must be the class ids 0..{len(keys) - 1}, found {keys}; renumber them."
            )
        names = [names[i] for i in range(len(keys))]
    if not isinstance(names, list) or not names:
        raise QbenchError(f"{yaml_path} 'names' must be a non-empty list or {{id: name}} mapping of class names.")
    for i, name in enumerate(names):
        if name is None or isinstance(name, (list, dict)):
            raise QbenchError(f"{yaml_path} 'names' entry {i} is {name!r}; give every class a plain name.")
    return [str(n) for n in names]  # ultralytics does str() too (e.g. YAML booleans)


def image_files(spec: DataSpec, split: str) -> list[Path]:
    """Images of a split (folder searched recursively, or a .txt list), sorted like ultralytics."""
    if split not in spec.splits:
        hint = SPLIT_HINTS.get(split, f"the folder of {split} images")
        raise QbenchError(f"{spec.yaml_path} has no '{split}' key; add '{split}: images/{split}' ({hint}).")
    src = spec.splits[split]
    if src.is_dir():
        found = glob.glob(str(Path(glob.escape(str(src))) / "**" / "*.*"), recursive=True)
    elif src.is_file():
        found = _read_list(spec, split, src)
    else:
        raise QbenchError(
            f"{spec.yaml_path} split '{split}' points to {src}, which does not exist; "
            f"fix the path (relative to {spec.root})."
        )
    files = sorted(f for f in found if f.rpartition(".")[-1].lower() in IMG_FORMATS)
    if not files:
        raise QbenchError(
            f"{spec.yaml_path} split '{split}' ({src}) contains no images; "
            f"put .jpg/.png/... files there (supported: {', '.join(sorted(IMG_FORMATS))})."
        )
    return [Path(f) for f in files]


def _read_list(spec: DataSpec, split: str, src: Path) -> list[str]:
    """Image paths from a .txt list; relative paths resolve against the list's folder."""
    try:
        lines = src.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise QbenchError(f"cannot read image list {src} ({e}); make '{split}' a folder or a UTF-8 .txt list.") from e
    out = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        p = Path(line)
        p = p if p.is_absolute() else src.parent / p  # no resolve(): symlinked images keep their label path
        if p.suffix[1:].lower() in IMG_FORMATS and not p.is_file():
            raise QbenchError(f"{src} line {lineno}: image {p} does not exist; fix or remove that line.")
        out.append(str(p))
    return out


def label_path(image: Path) -> Path:
    """Label file of an image: last '/images/' -> '/labels/', extension -> .txt (ultralytics img2label_paths)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(os.fspath(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def read_labels(image: Path, nc: int) -> np.ndarray:
    """Boxes of an image as float32 (n, 5): cls, cx, cy, w, h (normalized); duplicates removed."""
    lp = label_path(Path(image))
    if not lp.is_file():
        return np.zeros((0, 5), np.float32)
    try:
        text = lp.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise QbenchError(
            f"cannot read label file {lp} ({e}); rewrite it as UTF-8 text, one 'class cx cy w h' row per box."
        ) from e

    boxes, seen = [], set()
    kind = None  # 'box' or 'polygon' of the first row: ultralytics rejects files that mix both
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{lp} line {lineno}"
        try:
            row = np.array([float(p) for p in parts], np.float32)
        except ValueError:
            msg = f"{where}: found non-numeric {line.strip()!r}; write 'class cx cy w h' numbers."
            raise QbenchError(msg) from None
        n = len(row)
        if n == 5:
            this = "box"
            box = row
        elif n > 5 and n % 2 == 1:
            this = "polygon"
            xy = row[1:].reshape(-1, 2)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            box = np.array([row[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], np.float32)
        else:
            raise QbenchError(
                f"{where}: found {n} numbers {line.strip()!r}; a box row needs 5 (class cx cy w h) "
                f"and a polygon row an odd count above 5 (class x1 y1 x2 y2 x3 y3 ...)."
            )
        if kind is None:
            kind = this
        elif this != kind:
            raise QbenchError(
                f"{where}: {this} row in a file whose first row is a {kind}; "
                f"ultralytics ignores files that mix boxes and polygons, so use one kind per file."
            )
        if not np.isfinite(row).all():
            raise QbenchError(f"{where}: found {line.strip()!r} with nan/inf; replace it with finite numbers.")
        cls = box[0]
        if cls < 0 or cls % 1 != 0:
            raise QbenchError(f"{where}: class id {parts[0]} is not a non-negative integer; use a class id 0-{nc - 1}.")
        if cls >= nc:
            raise QbenchError(
                f"{where}: class id {int(cls)} is out of range for the {nc} classes in data.yaml (0-{nc - 1}); "
                f"fix the label or the names in data.yaml."
            )
        xywh = box[1:]
        if xywh.max() > 1 + COORD_TOL or xywh[:2].min() < -COORD_TOL or xywh[2:].min() < 0:
            raise QbenchError(
                f"{where}: box {' '.join(f'{v:g}' for v in xywh)} is outside the image; "
                f"coordinates must be normalized to 0-1 (cx cy w h divided by image width/height)."
            )
        key = tuple(row.tolist())  # ultralytics dedups boxes, or polygons by their points
        if key in seen:
            continue
        seen.add(key)
        boxes.append(box)
    return np.stack(boxes) if boxes else np.zeros((0, 5), np.float32)


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 HxWx3 image (np.fromfile + cv2.imdecode, so unusual paths work)."""
    try:
        buf = np.fromfile(str(path), np.uint8)
    except OSError as e:
        raise QbenchError(
            f"cannot read image {path} ({e.strerror or e}); check that the file exists and is readable."
        ) from e
    im = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if im is None:
        raise QbenchError(f"image {path} cannot be decoded (corrupt or unsupported format); replace or remove it.")
    return im


def scored_labels(spec: DataSpec, split: str, files: list[Path]) -> list[np.ndarray]:
    """The labels of the images a split is scored on; a split with no labelled object at all cannot be scored
    (every mAP would read 0), so it is refused, saying where the labels were looked for."""
    labels = [read_labels(f, spec.nc) for f in files]
    if any(len(lb) for lb in labels):
        return labels
    found = [label_path(f) for f in files if label_path(f).is_file()]
    src = spec.declared.get(split)
    if found:
        raise QbenchError(f"all {len(found)} label files of {spec.yaml_path} split '{split}' are empty (e.g. "
                          f"{found[0]}): there is no object to score; label the images or score another split.")
    link = next((p for p in [src, *(src.parents if src else [])] if p is not None and p.is_symlink()), None)
    hint = (f" {link} is a symbolic link to {link.resolve()}: as ultralytics does, labels are looked up beside "
            f"the folder it points to, not beside the link; put (or link) the labels/ folder there." if link else "")
    raise QbenchError(f"none of the {len(files)} images of {spec.yaml_path} split '{split}' has a label file (the "
                      f"first would be {label_path(files[0])}: YOLO labels live in labels/ beside images/, one .txt "
                      f"per image), so nothing can be scored.{hint}")


def check_split(spec: DataSpec, split: str, progress: Callable[[int], object] | None = None) -> dict:
    """Read every label file of a split (not the images); raise on the first bad one; count instances."""
    per_class = np.zeros(spec.nc, np.int64)
    files = image_files(spec, split)
    for f in files:
        lb = read_labels(f, spec.nc)
        per_class += np.bincount(lb[:, 0].astype(np.int64), minlength=spec.nc)
        if progress is not None:
            progress(1)
    return {"images": len(files), "instances": int(per_class.sum()), "per_class": per_class.tolist()}
