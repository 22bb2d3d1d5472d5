"""Quantization recipes: validated YAML from configs/recipes/ (or any file).

A recipe says *how* to quantize (calibration method, types, symmetry,
granularity, exclusions); the engine finds *where* from the graph. Every key is
checked: an unknown key or a bad value is a `QbenchError` naming the recipe, the
key and what is allowed. `Recipe.to_yaml()` writes the recipe actually used; the
optional `resolved:` section it can carry (the node names the engine excluded)
is informational and ignored on load, so a written recipe.yaml loads again.

Keys (defaults in brackets):
  method            minmax | entropy | percentile | distribution   [minmax]
  percentile        float in [90, 100], method percentile only     [99.999]
  num_bins          histogram bins, methods entropy/percentile/distribution only
                    [entropy 128, percentile/distribution 2048 (ORT's defaults)]
  calib_size        calibration images used (a prefix of the manifest) [128], at least 8
  per_channel       per-output-channel weight scales                [true]
  activation_type   uint8 | int8                                    [uint8]
  weight_type       int8 | uint8                                    [int8]
  activation_symmetric  symmetric activation ranges                 [false]
  weight_symmetric  symmetric weight ranges                         [true]
  reduce_range      7-bit weights (old non-VNNI x86)                [false]
  format            qdq                                             [qdq]
  opset             13..20, or null to keep the model's opset       [null]
  exclude           node-name glob patterns kept float              [[]]
  include           node-name glob patterns quantized even when excluded otherwise [[]]
  keep_head_float   keep the YOLO detect-head decode in float       [true]

Note on percentile: ONNX Runtime's percentile calibrator builds the histogram of
|x| and takes a symmetric threshold, then clamps it to the observed min/max, so a
post-activation tensor still gets (min, t); activation_symmetric only changes how
the quantizer places the zero point.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import QbenchError
from ..files import read_yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipes"
METHODS = ("minmax", "entropy", "percentile", "distribution")
HIST_METHODS = ("entropy", "percentile", "distribution")
ACT_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("int8", "uint8")
FORMATS = ("qdq",)
MIN_OPSET, MAX_OPSET = 13, 20  # per-channel QDQ needs 13; ORT's static INT8 rejects >= 21
MIN_CALIB = 8  # fewer images give unstable ranges
MAX_CALIB = 100_000
PERCENTILE_RANGE = (90.0, 100.0)
NUM_BINS_RANGE = (16, 1 << 16)
DEFAULT_PERCENTILE = 99.999
# ORT's entropy search compares thresholds from num_quantized_bins (128) up to num_bins: with ORT's own default of
# 128 bins there is one candidate, the full range, so "entropy" silently equals minmax. TensorRT uses 2048; 1024
# keeps ORT's pure-Python KL search (quadratic in bins) practical on a CPU.
ENTROPY_QUANTIZED_BINS = 128
DEFAULT_NUM_BINS = {"entropy": 1024, "percentile": 2048, "distribution": 2048}
INFO_KEYS = ("resolved",)  # written by the engine next to a model, ignored on load


@dataclass(frozen=True)
class Recipe:
    method: str = "minmax"
    percentile: float | None = None
    num_bins: int | None = None
    calib_size: int = 128
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    reduce_range: bool = False
    format: str = "qdq"
    opset: int | None = None
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    keep_head_float: bool = True
    name: str = field(default="custom", compare=False)  # where it came from, for messages; not a YAML key

    # ---- derived values the engine uses
    @property
    def effective_percentile(self) -> float | None:
        return (self.percentile if self.percentile is not None else DEFAULT_PERCENTILE) \
            if self.method == "percentile" else None

    @property
    def effective_num_bins(self) -> int | None:
        return (self.num_bins or DEFAULT_NUM_BINS[self.method]) if self.method in HIST_METHODS else None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        d["exclude"], d["include"] = list(self.exclude), list(self.include)
        return d

    def to_yaml(self, resolved: dict | None = None) -> str:
        """The recipe as YAML (every key, defaults included); `resolved` adds an informational section."""
        head = f"# qbench quantization recipe (from {self.name})\n"
        text = head + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if resolved:
            text += "# What the engine resolved for this model (informational; ignored when the recipe is loaded).\n"
            text += yaml.safe_dump({"resolved": resolved}, sort_keys=False, default_flow_style=False, width=120)
        return text

    def replace(self, **changes) -> "Recipe":
        """A validated copy with some keys changed."""
        return recipe_from_dict({**self.to_dict(), **changes}, self.name)


KEYS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "name")


def _bool(name, key, v):
    if not isinstance(v, bool):
        raise QbenchError(f"recipe {name}: '{key}' is {v!r}; allowed: true or false.")
    return v


def _choice(name, key, v, allowed):
    if not isinstance(v, str) or v.lower() not in allowed:
        raise QbenchError(f"recipe {name}: '{key}' is {v!r}; allowed: {', '.join(allowed)}.")
    return v.lower()


def _int(name, key, v, lo, hi, extra=""):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise QbenchError(f"recipe {name}: '{key}' is {v!r}; allowed: a whole number from {lo} to {hi}{extra}.")
    return v


def _patterns(name, key, v):
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in v):
        raise QbenchError(f"recipe {name}: '{key}' is {v!r}; allowed: a list of node-name glob patterns, "
                          f"e.g. ['/model.23/*'].")
    return tuple(p.strip() for p in v)


def recipe_from_dict(data: dict, name: str = "custom") -> Recipe:
    """Validate a mapping of recipe keys (unknown keys and bad values raise QbenchError)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QbenchError(f"recipe {name} must be a YAML mapping of keys ({', '.join(KEYS)}), "
                          f"not a {type(data).__name__}.")
    for key in data:
        if key not in KEYS and key not in INFO_KEYS:
            raise QbenchError(f"recipe {name}: unknown key {key!r}; allowed: {', '.join(KEYS)}.")
    d = {k: v for k, v in data.items() if k in KEYS}
    r = {}
    r["method"] = _choice(name, "method", d.get("method", "minmax"), METHODS)
    method = r["method"]
    p = d.get("percentile")
    if p is not None:
        if method != "percentile":
            raise QbenchError(f"recipe {name}: 'percentile' is only used with 'method: percentile' (method is "
                              f"{method}); remove it or set 'method: percentile'.")
        lo, hi = PERCENTILE_RANGE
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not lo <= p <= hi:
            raise QbenchError(f"recipe {name}: 'percentile' is {p!r}; allowed: a number from {lo:g} to {hi:g} "
                              f"(e.g. 99.99).")
        p = float(p)
    r["percentile"] = p
    nb = d.get("num_bins")
    if nb is not None:
        if method not in HIST_METHODS:
            raise QbenchError(f"recipe {name}: 'num_bins' is only used by the histogram methods "
                              f"({', '.join(HIST_METHODS)}), not '{method}'; remove it or change 'method'.")
        # ORT's distribution calibrator needs 512+; entropy needs more bins than its 128 quantized bins to search
        lo = {"distribution": 512, "entropy": 2 * ENTROPY_QUANTIZED_BINS}.get(method, NUM_BINS_RANGE[0])
        nb = _int(name, "num_bins", nb, lo, NUM_BINS_RANGE[1], f" for method {method}")
    r["num_bins"] = nb
    r["calib_size"] = _int(name, "calib_size", d.get("calib_size", 128), MIN_CALIB, MAX_CALIB,
                           f" (fewer than {MIN_CALIB} images give unstable ranges)")
    for key in ("per_channel", "activation_symmetric", "weight_symmetric", "reduce_range", "keep_head_float"):
        r[key] = _bool(name, key, d.get(key, Recipe.__dataclass_fields__[key].default))
    r["activation_type"] = _choice(name, "activation_type", d.get("activation_type", "uint8"), ACT_TYPES)
    r["weight_type"] = _choice(name, "weight_type", d.get("weight_type", "int8"), WEIGHT_TYPES)
    r["format"] = _choice(name, "format", d.get("format", "qdq"), FORMATS)
    op = d.get("opset")
    r["opset"] = None if op is None else _int(name, "opset", op, MIN_OPSET, MAX_OPSET,
                                              ", or null to keep the model's opset")
    r["exclude"] = _patterns(name, "exclude", d.get("exclude"))
    r["include"] = _patterns(name, "include", d.get("include"))
    return Recipe(**r, name=name)


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def load_recipe(path_or_name: str | os.PathLike | Recipe | None = None) -> Recipe:
    """A recipe from a YAML file, or by name from configs/recipes/ ('default' when None)."""
    if isinstance(path_or_name, Recipe):
        return path_or_name
    src = "default" if path_or_name is None else path_or_name
    p = Path(src)
    if not p.is_file():
        named = RECIPES_DIR / f"{src}.yaml"
        if isinstance(src, str) and "/" not in src and not src.endswith((".yaml", ".yml")) and named.is_file():
            p = named
        elif p.is_dir():
            raise QbenchError(f"recipe '{p}' is a folder; pass a recipe .yaml file or a recipe name "
                              f"({', '.join(available_recipes())}).")
        else:
            raise QbenchError(f"recipe '{src}' is neither a file nor a recipe name in {RECIPES_DIR} "
                              f"({', '.join(available_recipes())}); pass a path to a recipe YAML or one of those.")
    data = read_yaml(p, "recipe")
    return recipe_from_dict(data, str(p))


def write_recipe(recipe: Recipe, path: str | os.PathLike, resolved: dict | None = None) -> Path:
    """Write `recipe.to_yaml(resolved)` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(recipe.to_yaml(resolved), encoding="utf-8")
    tmp.replace(path)
    return path
