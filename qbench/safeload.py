"""Checkpoints are loaded without running code from them.

A `.pt` is a pickle: unpickling it can call any function it names (`os.system`, ...). Every checkpoint qbench
reads, and every one ultralytics reads inside a qbench process (qbench.ultra routes ultralytics' loader here),
goes through `load()`:

1. torch lists the globals the pickle names beyond tensors and storages
   (`torch.serialization.get_unsafe_globals_in_checkpoint`), without unpickling anything;
2. each must be a class a YOLO checkpoint may hold: a torch.nn / ultralytics.nn module class, the model classes
   of ultralytics.nn.tasks, qbench's QAT fake-quantization classes, or a small set of containers; its module is
   imported only when its name is on that list;
3. torch's restricted unpickler (`weights_only=True`) then loads it with exactly those classes allowed.

Anything else is refused with one sentence naming the first offending global, before a byte of the pickle runs.
A user who vouches for a file opts in with `trust()` (CLI: `qbench --trust-weights FILE ...`): that file is then
loaded as ultralytics would (full unpickling), with a warning.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path

from .errors import QbenchError
from .files import sha256_file

LOG = logging.getLogger("qbench")

MODULE_CLASS_PACKAGES = ("torch.nn.modules.", "ultralytics.nn.modules.")  # nn.Module subclasses from these
MODEL_MODULES = ("ultralytics.nn.tasks",)  # DetectionModel & co.
QBENCH_CLASSES = frozenset({  # QAT checkpoints (train/weights/*.pt) hold qbench's fake-quantization classes
    "qbench.qatrain.fakequant.QConv2d", "qbench.qatrain.fakequant.OutputFakeQuant", "qbench.qatrain.fakequant.QSiLU",
    "qbench.qatrain.fakequant.QAttention", "qbench.qatrain.fakequant.QPSABlock"})
CONTAINERS = frozenset({"builtins.set", "builtins.frozenset", "builtins.slice", "collections.OrderedDict",
                        "__builtin__.set", "torch.Size", "torch.device", "torch.dtype", "numpy.dtype",
                        "ultralytics.utils.IterableSimpleNamespace"})
NUMPY_SCALAR = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")  # numpy values in train metrics
GETATTR = ("builtins.getattr", "__builtin__.getattr")


def _module_getattr(obj, name):
    """getattr as a checkpoint may use it: a fused ultralytics module's `forward` is its bound `forward_fuse`,
    pickled as getattr(module, "forward_fuse"); nothing else (the restricted unpickler calls only allowed
    globals, so what this returns is never called during the load)."""
    import pickle

    import torch

    if isinstance(obj, torch.nn.Module) and name in ("forward", "forward_fuse"):
        return getattr(type(obj), name).__get__(obj)
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not allowed in a checkpoint")


_trusted: set[str] = set()
_lock = threading.Lock()


def trust(path: str | os.PathLike) -> None:
    """Load `path` (these bytes, wherever they are copied) with full unpickling, which may run code: only for files
    the user vouches for."""

    p = Path(path)
    if not p.is_file():
        raise QbenchError(f"--trust-weights '{p}' is not a file; pass the .pt you vouch for.")
    _trusted.add(sha256_file(p))


def _resolve(name: str):
    """The object a pickle global names, if a YOLO checkpoint may hold it; None otherwise (nothing imported)."""
    module, _, attr = name.rpartition(".")
    if name in GETATTR:
        return (_module_getattr, name)
    if name in NUMPY_SCALAR:
        import numpy as np

        return (np.float64(0).__reduce__()[0], name)
    if name in CONTAINERS:
        module = "builtins" if module == "__builtin__" else module
    elif not (name in QBENCH_CLASSES or module in MODEL_MODULES
              or any(module.startswith(p) for p in MODULE_CLASS_PACKAGES)):
        return None
    if module.startswith("ultralytics"):
        from . import offline  # noqa: F401  (ultralytics' environment before its first import)
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    if name in CONTAINERS or name in QBENCH_CLASSES:
        return obj
    import torch

    return obj if isinstance(obj, type) and issubclass(obj, torch.nn.Module) else None


def checkpoint_globals(path: str | os.PathLike) -> list[str]:
    """The globals a torch.save() archive names beyond tensors and storages (read, not unpickled)."""
    import torch

    return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def load(path: str | os.PathLike, map_location="cpu"):
    """torch.load of a checkpoint with only YOLO checkpoint classes allowed (see the module doc)."""
    import torch

    p = Path(path)
    if _trusted and p.is_file() and sha256_file(p) in _trusted:
        LOG.warning(f"loading '{p}' with full unpickling (--trust-weights): any code pickled in it runs now.")
        return torch.load(p, map_location=map_location, weights_only=False)
    try:
        names = checkpoint_globals(p)
    except ValueError:  # not a zip archive: torch.load's own error says what it is
        names = []
    allowed, bad = [], []
    for n in names:
        obj = _resolve(n)
        (allowed if obj is not None else bad).append(obj if obj is not None else n)
    if bad:
        raise QbenchError(f"'{p}' names '{bad[0]}'" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                          + ", which no YOLO checkpoint holds, and loading it could run code from the file; it was "
                          "not loaded. If you trust where it came from, pass --trust-weights "
                          f"'{p}' (qbench --trust-weights FILE COMMAND ...).")
    with _lock:  # registered for the process (torch's safe_globals() context is not thread-safe)
        torch.serialization.add_safe_globals(allowed)
    return torch.load(p, map_location=map_location, weights_only=True)


def torch_load(f, *args, **kwargs):
    """Drop-in for ultralytics.utils.patches.torch_load: file paths go through `load`."""
    import torch

    if isinstance(f, (str, os.PathLike)):
        return load(f, kwargs.get("map_location", args[0] if args else "cpu"))
    kwargs["weights_only"] = True
    return torch.load(f, *args, **kwargs)
