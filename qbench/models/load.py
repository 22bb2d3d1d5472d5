"""Load and describe ultralytics YOLO detection checkpoints.

`load_checkpoint()` checks a .pt before ultralytics sees it, so that a wrong
path, a damaged file or a checkpoint of another kind ends in one clear
`QbenchError` instead of a traceback from deep inside torch.load. Only the
exceptions that mean "this file is not what we need" are translated; anything
else propagates.

`model_facts()` summarises a loaded model as a JSON-serialisable dict:
architecture (blocks, activations, convs), size (params, GFLOPs) and where it
came from (path, sha256, training arguments).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QbenchError
from ..files import sha256_file
from ..safeload import load

if TYPE_CHECKING:  # pragma: no cover
    from ultralytics import YOLO

DEFAULT_IMGSZ = 640  # ultralytics' default when a model has no training arguments
TRAIN_ARG_KEYS = ("imgsz", "epochs", "data")

# RuntimeError texts that torch.load gives for a damaged zip archive (as opposed to a real failure).
_DAMAGED_ZIP_MARKERS = ("PytorchStreamReader", "inline_container", "zip archive", "central directory")


def _check_path(p: Path) -> None:
    if not p.exists():
        raise QbenchError(f"Checkpoint '{p}' does not exist; pass the path of a trained .pt file "
                          f"(qbench train writes <out>/weights/best.pt).")
    if p.is_dir():
        best = p / "weights" / "best.pt"
        hint = f"pass '{best}'" if best.is_file() else "pass the .pt file inside it (e.g. weights/best.pt)"
        raise QbenchError(f"Checkpoint '{p}' is a directory, not a file; {hint}.")
    if p.suffix.lower() != ".pt":
        what = "an ONNX model" if p.suffix.lower() == ".onnx" else f"a '{p.suffix or 'suffix-less'}' file"
        raise QbenchError(f"Checkpoint '{p}' is {what}, not a PyTorch .pt checkpoint; "
                          f"pass the best.pt that training wrote.")


def _check_archive(p: Path) -> None:
    """torch.save has written zip archives since torch 1.6, and ultralytics checkpoints always are.

    Looking at the archive first turns random bytes, text, empty and truncated files into one precise message
    instead of whatever the unpickler happens to trip over (UnpicklingError, ValueError, MemoryError, ...).
    """
    if not zipfile.is_zipfile(p):
        raise QbenchError(f"'{p}' is not a PyTorch checkpoint (empty, truncated, or not written by torch.save); "
                          f"pass the best.pt that training wrote, or re-copy it if the transfer was cut short.")
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise QbenchError(f"'{p}' is a damaged zip archive ({e}); re-copy or re-train the checkpoint.") from e
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise QbenchError(f"'{p}' is a zip archive but not a PyTorch checkpoint (it has no data.pkl); "
                          f"pass the best.pt that training wrote.")
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise QbenchError(f"'{p}' is a TorchScript export, not a training checkpoint; "
                          f"pass the best.pt it was exported from.")


def _read_checkpoint(p: Path) -> Any:
    from .. import ultra  # noqa: F401  (offline ultralytics before any ultralytics import)

    try:
        # only the classes a YOLO checkpoint holds are unpickled (safeload); anything else is refused unread
        return load(p)
    except (pickle.UnpicklingError, EOFError) as e:
        raise QbenchError(f"'{p}' is a corrupted PyTorch checkpoint ({type(e).__name__}: {e}); "
                          f"re-copy or re-train it.") from e
    except RuntimeError as e:
        if not any(m in str(e) for m in _DAMAGED_ZIP_MARKERS):
            raise
        first = str(e).strip().splitlines()[0]
        raise QbenchError(f"'{p}' is a corrupted PyTorch checkpoint ({first}); re-copy or re-train it.") from e
    except ModuleNotFoundError as e:
        raise QbenchError(f"'{p}' needs the Python module '{e.name}', which is not installed, so it was not saved by "
                          f"ultralytics 8 (YOLOv5 and other code bases are not supported); "
                          f"retrain it with `qbench train`.") from e


def _checked_model(p: Path, ckpt: Any):
    """The model a checkpoint holds (ultralytics' own choice: 'ema' first, then 'model'), or a QbenchError."""
    import torch
    from ultralytics.nn.tasks import BaseModel, guess_model_task

    from .. import ultra  # noqa: F401

    if not isinstance(ckpt, dict):
        raise QbenchError(f"'{p}' holds a {type(ckpt).__name__}, not an ultralytics checkpoint dict; "
                          f"save models with YOLO.save() or train them with `qbench train`.")
    if "model" not in ckpt and "ema" not in ckpt:
        keys = ", ".join(map(str, list(ckpt)[:6])) or "nothing"
        raise QbenchError(f"'{p}' has no 'model' or 'ema' entry (it holds {keys}), so it is not an ultralytics "
                          f"checkpoint; pass the best.pt that training wrote.")
    model = ckpt.get("ema") or ckpt.get("model")  # same precedence as ultralytics.nn.tasks.load_checkpoint
    if model is None:
        raise QbenchError(f"'{p}' has empty 'model' and 'ema' entries; pass a checkpoint that holds a trained model "
                          f"(best.pt).")
    if not isinstance(model, torch.nn.Module):
        kind = "a state_dict" if isinstance(model, dict) else f"a {type(model).__name__}"
        raise QbenchError(f"'{p}' stores {kind} instead of a model object, which ultralytics cannot rebuild; "
                          f"save it with YOLO.save() or pass the best.pt that training wrote.")
    if not isinstance(model, BaseModel):
        raise QbenchError(f"'{p}' holds a {type(model).__name__}, not an ultralytics YOLO model; "
                          f"pass a checkpoint trained with ultralytics or `qbench train`.")
    task = getattr(model, "task", None) or guess_model_task(model)
    if task != "detect":
        raise QbenchError(f"'{p}' is a '{task}' model, but qbench handles detection models only; "
                          f"pass a YOLO detection checkpoint (task=detect).")
    return model


def load_checkpoint(path: str | os.PathLike) -> "YOLO":
    """Validate `path` and load it as an ultralytics YOLO detector (FP32, eval mode, on CPU).

    Raises QbenchError (one sentence naming the file and the fix) when the path is missing or a directory, the file
    is not a torch checkpoint (random bytes, text, an unrelated zip, TorchScript), it holds no model, or the model is
    not a detector.
    """
    p = Path(path)
    _check_path(p)
    _check_archive(p)
    _checked_model(p, _read_checkpoint(p))

    from ..ultra import YOLO

    # ultralytics reads the file again: a second unpickle is cheap next to anything done with the model, and the
    # YOLO object then is exactly what YOLO(path) gives (ckpt, overrides, ckpt_path) for export, val and predict.
    return YOLO(str(p), task="detect")


def _square(imgsz: Any, where: str) -> int:
    if isinstance(imgsz, (list, tuple)):
        if len(set(imgsz)) != 1:
            raise QbenchError(f"{where} has a non-square image size {list(imgsz)}; qbench works with square inputs, "
                              f"so pass imgsz as one number.")
        imgsz = imgsz[0]
    return int(imgsz)


def train_args(yolo: "YOLO") -> dict:
    """The training arguments stored in the checkpoint ({} for a model built from a YAML)."""
    ckpt = getattr(yolo, "ckpt", None) or {}
    args = ckpt.get("train_args") if isinstance(ckpt, dict) else None
    return dict(args) if isinstance(args, dict) else {}


def checkpoint_imgsz(yolo: "YOLO") -> int | None:
    """The image size the model was trained at, from the checkpoint's train_args (None if unknown)."""
    imgsz = train_args(yolo).get("imgsz")
    source = getattr(yolo, "ckpt_path", None) or "the model"
    return None if imgsz is None else _square(imgsz, f"'{source}'")


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def model_facts(yolo: "YOLO | str | os.PathLike", imgsz: int | None = None) -> dict:
    """A JSON-serialisable description of a YOLO detector (a loaded YOLO, or a .pt path to load).

    imgsz (for GFLOPs) defaults to the training image size, or ultralytics' 640 when the checkpoint has none;
    `imgsz_source` says which ("argument", "train_args" or "default").
    """
    if isinstance(yolo, (str, os.PathLike)):
        yolo = load_checkpoint(yolo)

    import torch
    from ultralytics.utils.torch_utils import get_flops

    from .. import ultra  # noqa: F401

    model = yolo.model
    if not isinstance(model, torch.nn.Module):
        raise QbenchError(f"'{model}' is not a PyTorch model; model facts need a .pt checkpoint, "
                          f"so pass the best.pt it was exported from.")
    source = getattr(yolo, "ckpt_path", None)
    source = str(source) if source else None
    targs = train_args(yolo)

    if imgsz is not None:
        imgsz, imgsz_source = _square(imgsz, "imgsz"), "argument"
    elif (ti := checkpoint_imgsz(yolo)) is not None:
        imgsz, imgsz_source = ti, "train_args"
    else:
        imgsz, imgsz_source = DEFAULT_IMGSZ, "default"

    # Conv layers share ONE activation instance (ultralytics' Conv.default_act), so count every reference to it.
    activations: Counter = Counter()
    slopes: set[float] = set()
    census = []  # every activation with its layer and slope: what `qbench ops --expect-activation` verifies
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m).__module__ == "torch.nn.modules.activation" and not isinstance(m, torch.nn.MultiheadAttention):
            activations[type(m).__name__] += 1
            slope = float(m.negative_slope) if isinstance(m, torch.nn.LeakyReLU) else None
            if slope is not None:
                slopes.add(slope)
            census.append({"layer": name, "type": type(m).__name__, "param": slope})

    head = model.model[-1]
    names = model.names or {}
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    return _jsonable({
        "source": source,
        "sha256": sha256_file(source) if source and Path(source).is_file() else None,
        "task": getattr(model, "task", None),
        "nc": int(getattr(head, "nc", len(names))),
        "names": names,
        "imgsz": imgsz,
        "imgsz_source": imgsz_source,
        "stride": [int(s) for s in model.stride.tolist()],
        "params": int(sum(p.numel() for p in model.parameters())),
        "gflops": round(float(get_flops(model, imgsz)), 4),
        "activations": dict(sorted(activations.items())),
        "leaky_relu_negative_slopes": sorted(slopes),
        "activation_census": census,
        "n_conv": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
        "blocks": dict(sorted(Counter(type(m).__name__ for m in model.model).items())),
        "head": type(head).__name__,
        "yaml": getattr(model, "yaml", None),
        "train_args": {k: targs[k] for k in TRAIN_ARG_KEYS if k in targs},
    })
