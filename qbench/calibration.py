"""Calibration sets: a seeded, class-stratified sample of training images, and a streaming reader.

`build_manifest()` picks n images from a split (train by default: never calibrate
on the split you score) so that every class is represented, rare ones included:
images are taken round-robin over the classes, rarest class first, each class
drawing from its own seeded shuffle of the images that contain it, while
background images (no labels) are mixed in at their share of the split. The
selection order is kept in the manifest, so any prefix of it is stratified too
(`quantize_ort` uses the first `calib_size` images).

The manifest records each image's path (relative to the data root) and sha256,
so `load_manifest()` can prove that the images are the ones it was built from.

`CalibrationReader` feeds ONNX Runtime's calibrators: it reads, letterboxes and
batches images lazily in `get_next()`, holding one batch at a time, so memory
does not grow with the size of the calibration set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .data.dataset import image_files, load_data_yaml, read_image, read_labels
from .data.default import default_data, default_data_dir
from .data.preprocess import letterbox, to_input
from .errors import QbenchError
from .files import atomic_write_text, check_writable, sha256_file, write_json

MANIFEST_VERSION = 1
REBUILD = "rebuild it with `qbench calib`"
DEFAULT_DATA = "qbench:default"  # a manifest's `data` for the embedded synthetic set (regenerated, not shipped)

try:  # the ORT base class gives ORT's own iteration protocol; the reader works without it too
    from onnxruntime.quantization import CalibrationDataReader as _ReaderBase
except ImportError:  # pragma: no cover - onnxruntime is a dependency
    _ReaderBase = object


def _check_count(n, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise QbenchError(f"calibration size {what}={n!r} is not a whole number; pass e.g. --n 128.")
    if n < 1:
        raise QbenchError(f"calibration size {what}={n} must be at least 1; pass e.g. --n 128.")
    return int(n)


def _stratified_order(classes_of: list[np.ndarray], n: int, seed: int) -> list[int]:
    """Indices of n images: round-robin over classes (rarest first), background mixed in at its share."""
    rng = np.random.default_rng(seed)
    n_total = len(classes_of)
    by_class: dict[int, list[int]] = {}
    background = []
    for i, cls in enumerate(classes_of):
        if cls.size == 0:
            background.append(i)
        for c in cls:
            by_class.setdefault(int(c), []).append(i)
    # Shuffle each list with the one seeded stream, in a fixed order (class id), so the result is deterministic.
    queues = {c: [by_class[c][j] for j in rng.permutation(len(by_class[c]))] for c in sorted(by_class)}
    background = [background[j] for j in rng.permutation(len(background))]
    n_bg = min(len(background), round(n * len(background) / n_total)) if n_total else 0
    n_lab = n - n_bg

    picked: set[int] = set()
    labelled: list[int] = []
    # Rarest class first (ties by class id); each round takes the next unpicked image of every class.
    order = sorted(queues, key=lambda c: (len(queues[c]), c))
    pos = dict.fromkeys(order, 0)
    while len(labelled) < n_lab and any(pos[c] < len(queues[c]) for c in order):
        for c in order:
            if len(labelled) >= n_lab:
                break
            q = queues[c]
            while pos[c] < len(q) and q[pos[c]] in picked:
                pos[c] += 1
            if pos[c] < len(q):
                labelled.append(q[pos[c]])
                picked.add(q[pos[c]])
                pos[c] += 1
    bg = background[:n_bg]
    picked.update(bg)
    # Too few labelled images for their share: top up with the remaining background images.
    extra = [i for i in background[n_bg:] if i not in picked][: n - len(labelled) - len(bg)]
    bg += extra

    # Interleave: a background image whenever the prefix holds fewer than its share of them.
    frac = len(bg) / n if n else 0.0
    out, li, bi = [], 0, 0
    while li < len(labelled) or bi < len(bg):
        take_bg = bi < len(bg) and (li >= len(labelled) or bi + 1 <= frac * (len(out) + 1) + 1e-9)
        if take_bg:
            out.append(bg[bi])
            bi += 1
        else:
            out.append(labelled[li])
            li += 1
    return out


def build_manifest(data_yaml: str | os.PathLike, n: int, split: str = "train", seed: int = 0) -> dict:
    """A seeded, class-stratified calibration sample of n images from `split` (see the module doc)."""
    n = _check_count(n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise QbenchError(f"calibration seed {seed!r} must be a non-negative whole number; pass e.g. --seed 0.")
    spec = load_data_yaml(data_yaml, require=(split,))
    files = image_files(spec, split)  # QbenchError when the split is empty
    if len(files) < n:
        raise QbenchError(f"{spec.yaml_path}: the calibration set asks for {n} images but '{split}' has "
                          f"{len(files)}; lower --n to at most {len(files)}.")
    labels = [read_labels(f, spec.nc) for f in files]
    classes_of = [np.unique(lb[:, 0].astype(np.int64)) for lb in labels]
    idx = _stratified_order(classes_of, n, int(seed))

    class_images = np.zeros(spec.nc, np.int64)
    instances = np.zeros(spec.nc, np.int64)
    background = 0
    images = []
    for i in idx:
        f = files[i]
        try:
            rel = Path(os.path.relpath(f, spec.root))
            path = rel.as_posix() if not rel.as_posix().startswith("../") else Path(f).resolve().as_posix()
        except ValueError:  # another drive (Windows)
            path = Path(f).resolve().as_posix()
        images.append({"path": path, "sha256": sha256_file(f)})
        class_images[classes_of[i]] += 1
        instances += np.bincount(labels[i][:, 0].astype(np.int64), minlength=spec.nc)
        background += classes_of[i].size == 0
    present = np.zeros(spec.nc, bool)
    for cls in classes_of:
        present[cls] = True
    return {
        "version": MANIFEST_VERSION,
        "data": str(data_yaml),
        "root": spec.root.as_posix(),
        "split": split,
        "seed": int(seed),
        "n": n,
        "images": images,
        # images of the sample that contain each class (the unit of stratification), and their boxes
        "class_counts": {name: int(c) for name, c in zip(spec.names, class_images)},
        "instances": {name: int(c) for name, c in zip(spec.names, instances)},
        "background": int(background),
        "split_images": len(files),
        "split_classes": [name for name, p in zip(spec.names, present) if p],
    }


def save_manifest(m: dict, path: str | os.PathLike) -> Path:
    """Write a manifest as JSON, atomically (temp name, then rename).

    The dataset's data.yaml is also recorded relative to the manifest's folder (`data_from_manifest`), so a
    committed manifest still finds its images from another clone or machine with the same layout. A sample of the
    embedded synthetic set is recorded as `data: qbench:default` instead: its images live in qbench's cache and
    are regenerated, bit-identically on every CPU, wherever the manifest is loaded.
    """

    path = Path(path)
    data = Path(m["data"]).resolve()
    if data.parent == default_data_dir().resolve():
        m = {**m, "data": DEFAULT_DATA, "root": DEFAULT_DATA}
    else:
        m = {**m, "data_from_manifest": Path(os.path.relpath(data, path.resolve().parent)).as_posix()}
    return write_json(m, path)


def load_manifest(path: str | os.PathLike, verify: bool = True) -> tuple[dict, list[Path]]:
    """Read a manifest; returns it and the absolute image paths. With verify, every image must exist and match
    its recorded sha256."""
    p = Path(path)
    if not p.is_file():
        raise QbenchError(f"calibration manifest '{p}' does not exist; build one with `qbench calib`.")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QbenchError(f"calibration manifest '{p}' is not readable JSON ({e}); {REBUILD}.") from e
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or not isinstance(m.get("images"), list):
        raise QbenchError(f"'{p}' is not a version-{MANIFEST_VERSION} calibration manifest; {REBUILD}.")
    root = Path(m.get("root") or p.parent)
    rel = m.get("data_from_manifest")
    embedded = m.get("data") == DEFAULT_DATA
    if embedded:  # the embedded synthetic set: generated on first use

        root = default_data().parent
    elif rel and (p.parent / rel).is_file():  # portable: the data.yaml next to which the images were found
        root = load_data_yaml(p.parent / rel, require=()).root
    paths = []
    for k, entry in enumerate(m["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise QbenchError(f"calibration manifest '{p}' entry {k} has no image path; {REBUILD}.")
        img = Path(entry["path"])
        img = img if img.is_absolute() else root / img
        if verify:
            if not img.is_file():
                raise QbenchError(f"calibration image '{img}' listed in '{p}' is missing; {REBUILD}.")
            if sha256_file(img) != entry.get("sha256"):
                raise QbenchError(f"calibration image '{img}' changed since the manifest '{p}' was made; {REBUILD}.")
        paths.append(img)
    if not paths:
        raise QbenchError(f"calibration manifest '{p}' lists no images; {REBUILD}.")
    return m, paths


def calibration_paths(calib) -> list[Path]:
    """The images of a calibration set given as a manifest path (verified against its sha256) or as image paths
    (each must exist); None gives none."""
    if calib is None:
        return []
    if isinstance(calib, (str, os.PathLike)):
        p = Path(calib)
        if p.suffix.lower() != ".json":
            raise QbenchError(f"calibration set '{p}' is not a manifest .json; build one with `qbench calib`, or "
                              "pass a list of image paths.")
        return load_manifest(p, verify=True)[1]
    paths = [Path(c) for c in calib]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise QbenchError(f"calibration image '{missing}' does not exist; pass existing image files.")
    return paths


def scored_overlap(calib, data, split: str = "val", allow: bool = False, n_used: int | None = None) -> dict:
    """How many calibration images (the first `n_used` of the manifest: those a recipe's calib_size takes) are
    images of the split being scored. Calibrating on what is scored fits the INT8 ranges to those very images and
    flatters the result, so any overlap is refused unless `allow` (`--allow-scored-calib`), and then recorded:
    {"images", "in_scored_split", "split", "manifest"}."""

    if isinstance(calib, (str, os.PathLike)) and Path(calib).suffix.lower() == ".json":
        manifest, paths = load_manifest(calib, verify=False)
        name = Path(calib)
    else:
        manifest, paths, name = {}, [Path(c) for c in (calib or [])], None
    paths = paths[:n_used] if n_used else paths
    scored = {os.path.realpath(f) for f in image_files(load_data_yaml(data, require=(split,)), split)}
    n = sum(os.path.realpath(p) in scored for p in paths)
    if n and not allow:
        where = f"calibration manifest '{name}'" if name else "the calibration set"
        raise QbenchError(f"{where} takes {n} of its {len(paths)} images from the '{split}' split being scored "
                          f"({data}): INT8 ranges fitted to the scored images flatter its accuracy. Build the "
                          f"manifest from the train split (`qbench calib --data {data}`), or pass "
                          "--allow-scored-calib to measure it anyway (every summary then says so).")
    return {"images": len(paths), "in_scored_split": n, "split": manifest.get("split"),
            "manifest": str(name) if name else None}


def heldout_data(data, calib, out, n_used: int = 128, split: str = "train") -> Path:
    """A data.yaml whose 'val' split is `split` minus the first `n_used` images of the manifest `calib` (those a
    recipe with calib_size n_used calibrates on), listed in a .txt beside it: more images to score INT8 against
    FP32 on, none of them used for calibration. (If the model was trained on `split`, this measures how closely
    INT8 follows FP32 on more images, not accuracy on unseen data.)"""
    import yaml

    out = Path(out)
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise QbenchError(f"output '{out}' must be a .yaml path, e.g. configs/data/mydata-heldout.yaml.")
    if out.exists():
        raise QbenchError(f"'{out}' already exists; choose another --out or delete it.")
    spec = load_data_yaml(data, require=(split,))
    _, cpaths = load_manifest(calib)
    used = {os.path.realpath(p) for p in cpaths[:n_used]}
    files = [f for f in image_files(spec, split) if os.path.realpath(f) not in used]
    if not files:
        raise QbenchError(f"every '{split}' image of {data} is among the {n_used} calibration images; nothing left.")
    check_writable(out.parent, "the held-out data.yaml")
    lst = out.with_suffix(".txt")
    atomic_write_text(lst, "".join(os.path.relpath(f, lst.parent) + "\n" for f in files))
    text = (f"# {split} images of {os.path.relpath(spec.yaml_path, out.parent)} not among the first {n_used} of "
            f"{os.path.relpath(calib, out.parent)} ({len(files)} images), scored as val.\n"
            f"# made by: qbench data heldout --data {data} --calib {calib} --n-used {n_used} --out {out}\n"
            + yaml.safe_dump({"train": os.path.relpath(spec.splits["train"], out.parent) if "train" in spec.splits
                              else None, "val": lst.name, "names": dict(enumerate(spec.names))}, sort_keys=False))
    atomic_write_text(out, text)
    return out


class CalibrationReader(_ReaderBase):
    """Streams letterboxed float32 NCHW batches {input_name: array} for ONNX Runtime calibration.

    Images are read in `get_next()`, one batch at a time; nothing but the path list is kept between calls.
    `rewind()` starts over; `set_range(start, end)` limits it to batches [start, end) (ORT's strided calibration).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], imgsz: int, input_name: str, batch: int = 1,
                 on_batch: Callable[[int], object] | None = None):
        if isinstance(imgsz, bool) or not isinstance(imgsz, (int, np.integer)) or imgsz <= 0:
            raise QbenchError(f"calibration image size {imgsz!r} must be a positive whole number, e.g. 640.")
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise QbenchError(f"calibration batch {batch!r} must be a whole number of at least 1.")
        self.paths = [Path(p) for p in paths]
        self.imgsz, self.input_name, self.batch = int(imgsz), input_name, int(batch)
        self.on_batch = on_batch
        self._start, self._end = 0, len(self)
        self._next = 0
        self.images_read = 0

    def __len__(self) -> int:
        """Number of batches."""
        return -(-len(self.paths) // self.batch)

    def get_next(self) -> dict | None:
        if self._next >= self._end:
            return None
        i = self._next
        self._next += 1
        chunk = self.paths[i * self.batch:(i + 1) * self.batch]
        batch = to_input([letterbox(read_image(f), self.imgsz)[0] for f in chunk])
        self.images_read += len(chunk)
        if self.on_batch is not None:
            self.on_batch(len(chunk))
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next = self._start

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = max(0, start_index), min(len(self), end_index)
        self._next = self._start
