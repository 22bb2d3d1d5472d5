"""Quantization recipes: validated YAML from configs/recipes/ (or any file).

A recipe says *how* to quantize (calibration method, types, symmetry,
granularity, exclusions); the engine finds *where* from the graph. Every key is
checked: an unknown key or a bad value is a `QbenchError` naming the recipe, the
key and what is allowed. `Recipe.to_yaml()` writes the recipe actually used; the
optional `resolved:` section it can carry (the node names the engine excluded)
is informational and ignored on load, so a written recipe.yaml loads again.

Keys (defaults in brackets):
  method            minmax | mean_minmax | entropy | percentile | distribution | mse   [minmax]
                    mean_minmax: each tensor's range is the mean over the calibration images of its per-image
                    minimum and maximum (NNCF's default for activations, MEAN_MINMAX), not the extremes over all
                    of them: outliers of a few images are clipped, the grid is finer for the rest
                    mse: qbench's consumer-aware ranges (qbench/quantization/ranges.py): each tensor's range
                    minimises the squared error *after* the op that reads it (a Conv output feeding
                    LeakyReLU(0.1) has its negative side's error divided by 10, so its negative tail is clipped
                    harder; Relu, SiLU and plain tensors get their own weighting), from signed histograms
  percentile        float in [90, 100], method percentile only     [99.999]
  num_bins          histogram bins, histogram methods (entropy/percentile/distribution/mse) only
                    [entropy 1024, percentile/distribution/mse 2048]
  calib_size        calibration images used (a prefix of the manifest) [128], at least 8
  per_channel       per-output-channel weight scales                [true]
  activation_type   uint8 | int8                                    [uint8]
  weight_type       int8 | uint8                                    [int8]
  activation_symmetric  symmetric activation ranges                 [false]
  weight_symmetric  symmetric weight ranges                         [true]
  reduce_range      7-bit weights ([-64, 64]): true (every weight), input (only the Convs that read the model
                    input, the image: NNCF's "overflow fix" for its first layer), or false  [false]
                    On x86 CPUs without VNNI the int8 kernels of ONNX Runtime and OpenVINO add pairs of
                    uint8 x int8 products in saturating 16-bit arithmetic; 7-bit weights cannot overflow it. The
                    image's full 0-255 codes make the first Conv the one that overflows most.
  format            qdq                                             [qdq]
  opset             13..20, or null to keep the model's opset       [null]
  exclude           node-name glob patterns kept float              [[]]
  include           node-name glob patterns quantized even when excluded otherwise [[]]
  keep_head_float   keep the YOLO detect-head decode in float       [true]
  keep_input_float  keep the Convs that read the model input (the image) float; their outputs are quantized as
                    usual   [false]
                    The image's full 0-255 codes overflow the saturating 16-bit pair sums of ONNX Runtime's and
                    OpenVINO's int8 kernels on x86 CPUs without VNNI; a float first Conv cannot overflow and keeps
                    every bit of its weights (7-bit weights, reduce_range: input, cost 0.25 points of mAP50-95 on
                    the gtsdb4 YOLOv8n's held-out set, docs/runtimes.md). It is about 1% of a YOLO's MACs, and
                    about 5% of its latency on OpenVINO (3-11% measured).
  pow2_scales       every scale a power of two (activation, per-channel weight and int32 bias scales), each
                    rounded UP to 2**ceil(log2(s)) so nothing calibrated is clipped; weights and biases are
                    requantized from the float model. Needs zero points of 0: activation_symmetric and
                    weight_symmetric true, activation_type and weight_type int8   [false]
  activation_fusion how a Conv and the activation after it are quantized     [ort]
                    ort: what ONNX Runtime's QDQ quantizer does: with asymmetric activations it folds Relu/Clip
                         into the Conv's output range (with symmetric ones it keeps them, each with its own Q/DQ);
                         LeakyRelu, Sigmoid and SiLU's Mul always get their own Q/DQ after the Conv's
                    fused: the NPU computes Conv + activation in one kernel: the Q/DQ between a Conv output and
                         its activation (LeakyRelu, Relu, Clip, PRelu, HardSwish, SiLU's Sigmoid and Mul) is
                         removed when that Conv output feeds nothing else
                    unfused: every activation requantized separately, Relu/Clip included
  shared_concat_scales  the runtime concatenates int8 codes only when every input of a Concat has the
                    output's grid, and passes them through Split/MaxPool/Resize unchanged (OpenVINO's CPU plugin;
                    most NPUs): every group of tensors joined by those ops gets one range (the union of theirs),
                    and the then value-preserving Q/DQ after each of them is removed   [false]
  float_head_outputs  the last Conv of each detect-head branch writes float (its accumulator dequantized), not
                    8-bit logits, into the float decode (OpenVINO; NNCF's placement)   [false]
  equalize          activation-range equalization exponent in [0, 1] for Conv -> LeakyRelu/Relu -> Conv chains
                    (qbench/quantize/equalize.py): channel c of the first Conv is divided by
                    (r_c / max r) ** equalize and the second Conv's input channel multiplied by it (the same
                    function in float); 0 = off. Not with precomputed ranges  [0]
  shift_negative    shift-negative correction (qbench/quantize/shift.py): each LeakyReLU output and the image
                    input are shifted by their mid-range before they are quantized, and the shift is folded into
                    the next Conv's bias (with an explicit Pad where it pads), so a symmetric int8 grid has the step
                    of an asymmetric one. For symmetric activations (npu-symmetric profiles); with asymmetric ones
                    it changes nothing but adds ops. Not with precomputed ranges, not in QAT  [false]

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
from ..files import atomic_write_text, display_path, read_yaml
from ..resources import shipped

RECIPES_DIR = shipped("configs") / "recipes"
METHODS = ("minmax", "mean_minmax", "entropy", "percentile", "distribution", "mse")
HIST_METHODS = ("entropy", "percentile", "distribution", "mse")
ACT_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("int8", "uint8")
FORMATS = ("qdq",)
FUSIONS = ("ort", "fused", "unfused")
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
DEFAULT_NUM_BINS = {"entropy": 1024, "percentile": 2048, "distribution": 2048, "mse": 2048}
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
    reduce_range: bool | str = False  # True, False or "input" (only the Convs that read the model input)
    format: str = "qdq"
    opset: int | None = None
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    keep_head_float: bool = True
    keep_input_float: bool = False
    pow2_scales: bool = False
    activation_fusion: str = "ort"
    shared_concat_scales: bool = False
    float_head_outputs: bool = False
    equalize: float = 0.0
    shift_negative: bool = False
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


# The validators take the label that starts their message: "recipe NAME" or "profile NAME".
def _bool(label, key, v):
    if not isinstance(v, bool):
        raise QbenchError(f"{label}: '{key}' is {v!r}; allowed: true or false.")
    return v


def _choice(label, key, v, allowed):
    if not isinstance(v, str) or v.lower() not in allowed:
        raise QbenchError(f"{label}: '{key}' is {v!r}; allowed: {', '.join(allowed)}.")
    return v.lower()


def _int(label, key, v, lo, hi, extra=""):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise QbenchError(f"{label}: '{key}' is {v!r}; allowed: a whole number from {lo} to {hi}{extra}.")
    return v


def _patterns(label, key, v):
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in v):
        raise QbenchError(f"{label}: '{key}' is {v!r}; allowed: a list of node-name glob patterns, "
                          f"e.g. ['/model.23/*'].")
    return tuple(p.strip() for p in v)


POW2_NEEDS = {"activation_symmetric": True, "weight_symmetric": True, "activation_type": "int8",
              "weight_type": "int8"}  # zero points of 0


def _check_pow2(label: str, r: dict) -> None:
    """pow2_scales only with zero points of 0 (symmetric int8 activations and weights)."""
    if not r["pow2_scales"]:
        return
    bad = [f"{k}: {str(r[k]).lower()}" for k, want in POW2_NEEDS.items() if r[k] != want]
    if bad:
        need = ", ".join(f"{k}: {str(v).lower()}" for k, v in POW2_NEEDS.items())
        raise QbenchError(f"{label}: 'pow2_scales: true' needs zero points of 0 ({need}), but it has "
                          f"{', '.join(bad)}; change those keys or set 'pow2_scales: false'.")


def _check_shared_scales(label: str, r: dict) -> None:
    """shared_concat_scales removes the Q/DQ after each Concat, so pow2_scales could no longer find the input scale
    of the Conv behind it (its int32 bias must be input x weight scale): the two are not combined."""
    if r["shared_concat_scales"] and r["pow2_scales"]:
        raise QbenchError(f"{label}: 'shared_concat_scales: true' and 'pow2_scales: true' cannot be combined yet "
                          "(the power-of-two bias scales need the Q/DQ that shared scales remove after each Concat); "
                          "set one of them to false.")


def recipe_from_dict(data: dict, name: str = "custom", kind: str = "recipe") -> Recipe:
    """Validate a mapping of recipe keys (unknown keys and bad values raise QbenchError).

    `kind` starts every message ("recipe NAME: ..."); profiles validate their values here too.
    """
    label = f"{kind} {name}"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QbenchError(f"{label} must be a YAML mapping of keys ({', '.join(KEYS)}), "
                          f"not a {type(data).__name__}.")
    for key in data:
        if key not in KEYS and key not in INFO_KEYS:
            raise QbenchError(f"{label}: unknown key {key!r}; allowed: {', '.join(KEYS)}.")
    d = {k: v for k, v in data.items() if k in KEYS}
    r = {}
    r["method"] = _choice(label, "method", d.get("method", "minmax"), METHODS)
    method = r["method"]
    p = d.get("percentile")
    if p is not None:
        if method != "percentile":
            raise QbenchError(f"{label}: 'percentile' is only used with 'method: percentile' (method is "
                              f"{method}); remove it or set 'method: percentile'.")
        lo, hi = PERCENTILE_RANGE
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not lo <= p <= hi:
            raise QbenchError(f"{label}: 'percentile' is {p!r}; allowed: a number from {lo:g} to {hi:g} "
                              f"(e.g. 99.99).")
        p = float(p)
    r["percentile"] = p
    nb = d.get("num_bins")
    if nb is not None:
        if method not in HIST_METHODS:
            raise QbenchError(f"{label}: 'num_bins' is only used by the histogram methods "
                              f"({', '.join(HIST_METHODS)}), not '{method}'; remove it or change 'method'.")
        # ORT's distribution calibrator needs 512+; entropy needs more bins than its 128 quantized bins to search
        lo = {"distribution": 512, "mse": 512, "entropy": 2 * ENTROPY_QUANTIZED_BINS}.get(method, NUM_BINS_RANGE[0])
        nb = _int(label, "num_bins", nb, lo, NUM_BINS_RANGE[1], f" for method {method}")
    r["num_bins"] = nb
    r["calib_size"] = _int(label, "calib_size", d.get("calib_size", 128), MIN_CALIB, MAX_CALIB,
                           f" (fewer than {MIN_CALIB} images give unstable ranges)")
    rr = d.get("reduce_range", False)
    if not isinstance(rr, bool) and not (isinstance(rr, str) and rr.lower() == "input"):
        raise QbenchError(f"{label}: 'reduce_range' is {rr!r}; allowed: true (every weight 7-bit), input (the Convs "
                          "that read the model input) or false.")
    r["reduce_range"] = rr if isinstance(rr, bool) else "input"
    for key in ("per_channel", "activation_symmetric", "weight_symmetric", "keep_head_float", "keep_input_float",
                "pow2_scales", "shift_negative", "shared_concat_scales", "float_head_outputs"):
        r[key] = _bool(label, key, d.get(key, Recipe.__dataclass_fields__[key].default))
    r["activation_type"] = _choice(label, "activation_type", d.get("activation_type", "uint8"), ACT_TYPES)
    r["weight_type"] = _choice(label, "weight_type", d.get("weight_type", "int8"), WEIGHT_TYPES)
    r["format"] = _choice(label, "format", d.get("format", "qdq"), FORMATS)
    op = d.get("opset")
    r["opset"] = None if op is None else _int(label, "opset", op, MIN_OPSET, MAX_OPSET,
                                              ", or null to keep the model's opset")
    r["exclude"] = _patterns(label, "exclude", d.get("exclude"))
    r["include"] = _patterns(label, "include", d.get("include"))
    r["activation_fusion"] = _choice(label, "activation_fusion", d.get("activation_fusion", "ort"), FUSIONS)
    eq = d.get("equalize", 0.0)
    if eq is False or eq is None:
        eq = 0.0
    if isinstance(eq, bool) or not isinstance(eq, (int, float)) or not math.isfinite(eq) or not 0 <= eq <= 1:
        raise QbenchError(f"{label}: 'equalize' is {eq!r}; allowed: a number from 0 (off) to 1, e.g. 0.5.")
    r["equalize"] = float(eq)
    _check_pow2(label, r)
    _check_shared_scales(label, r)
    return Recipe(**r, name=name)


def available_configs(folder: Path) -> list[str]:
    """Names of the YAML configs in a folder (configs/recipes/, configs/npu/)."""
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_config(path_or_name: str | os.PathLike, folder: Path, kind: str) -> Path:
    """A YAML file given as a path, or by name from `folder`; QbenchError naming the available ones otherwise."""
    src = path_or_name
    p = Path(src)
    if p.is_file():
        return p
    named = folder / f"{src}.yaml"
    if isinstance(src, str) and "/" not in src and not src.endswith((".yaml", ".yml")) and named.is_file():
        return named
    names = ", ".join(available_configs(folder))
    if p.is_dir():
        raise QbenchError(f"{kind} '{p}' is a folder; pass a {kind} .yaml file or a {kind} name ({names}).")
    raise QbenchError(f"{kind} '{src}' is neither a file nor a {kind} name in {folder} ({names}); pass a path to "
                      f"a {kind} YAML or one of those.")


def available_recipes() -> list[str]:
    return available_configs(RECIPES_DIR)


def load_recipe(path_or_name: str | os.PathLike | Recipe | None = None) -> Recipe:
    """A recipe from a YAML file, or by name from configs/recipes/ ('default' when None)."""
    if isinstance(path_or_name, Recipe):
        return path_or_name
    p = find_config("default" if path_or_name is None else path_or_name, RECIPES_DIR, "recipe")
    return recipe_from_dict(read_yaml(p, "recipe"), str(p))


def short_name(recipe: Recipe) -> str:
    """'default' for a recipe loaded from .../default.yaml; the name itself otherwise."""
    return Path(recipe.name).stem if recipe.name.endswith((".yaml", ".yml")) else recipe.name


def recipe_label(recipe: Recipe | str) -> str:
    """How a summary names a recipe: a shipped one by its name ('default'), a profile variant as built
    ('default+npu-symmetric(fused)'), a user's file by its path as a person would type it here."""
    name = recipe.name if isinstance(recipe, Recipe) else str(recipe)
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.parent.resolve() == RECIPES_DIR.resolve():
        return p.stem
    if p.suffix in (".yaml", ".yml") and p.exists():

        return display_path(p)
    return name


def write_recipe(recipe: Recipe, path: str | os.PathLike, resolved: dict | None = None) -> Path:
    """Write `recipe.to_yaml(resolved)` atomically."""

    return atomic_write_text(path, recipe.to_yaml(resolved))
