"""NPU targets (configs/npu/*.yaml): the integer arithmetic a target computes, applied on top of a recipe, and the
operators it runs (`qbench ops`).

A recipe says how to calibrate and what to keep float; a target says what the hardware can compute:
- its arithmetic, the hardware keys (PROFILE_KEYS), validated by the recipe validators; a target that sets them is
  a *profile* (`--profile`), whose INT8 accuracy ONNX Runtime measures on any machine; it may also set the
  placement keys (OPTIONAL_PROFILE_KEYS: shared_concat_scales, float_head_outputs), 7-bit weights
  (reduce_range) and a float input Conv (keep_input_float), which otherwise come from the recipe;
- what it runs (TARGET_KEYS): `ops` (ONNX op type -> attribute limits, see OP_CONSTRAINTS), `int_types`,
  `fallback` (unsupported ops run on the host CPU, or the compiler refuses the model) and `source` (the document
  the list comes from). A target may describe only its operators (no arithmetic keys): it then serves `qbench ops`
  and is refused as a profile.
An unknown key, a recipe key that is not a hardware key (method, calib_size, ...), half the arithmetic keys, or a
bad value is a `QbenchError` naming the target, the key and what is allowed.

`apply_profile(recipe, profile, fusion)` gives the recipe with the profile's keys; `fusion` (ort | fused |
unfused) overrides the profile's activation_fusion. The result is named e.g. `default+npu-symmetric(unfused)`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import onnx.defs

from ..errors import QbenchError
from ..files import read_yaml
from ..resources import shipped
from .recipe import (
    FUSIONS,
    KEYS,
    Recipe,
    _choice,
    available_configs,
    find_config,
    load_recipe,
    recipe_from_dict,
    short_name,
)

PROFILES_DIR = shipped("configs") / "npu"
PROFILE_KEYS = ("activation_type", "activation_symmetric", "weight_type", "weight_symmetric", "per_channel",
                "pow2_scales", "activation_fusion")
# a profile that omits them leaves the recipe's; reduce_range: a profile's `input` keeps a recipe's `true`
OPTIONAL_PROFILE_KEYS = ("shared_concat_scales", "float_head_outputs", "reduce_range", "keep_input_float")
TARGET_KEYS = ("name", "source", "int_types", "fallback", "ops")
INT_TYPES = ("int8", "int16")
FALLBACKS = ("cpu", "error")
# constraint key -> kind: "range" [min, max] (every spatial dim / the value), "values" (allowed list), "groups"
OP_CONSTRAINTS = {"kernel": "range", "stride": "range", "dilation": "range", "rank": "range", "alpha": "range",
                  "max_channels": "int", "channels_multiple": "int", "mode": "values", "scale": "values", "axis": "values",
                  "groups": ("any", "depthwise", "1"), "broadcast": "bool", "note": "text"}


@dataclass(frozen=True)
class Profile:
    name: str  # the file's stem: 'npu-symmetric'
    settings: dict  # every PROFILE_KEYS key -> validated value ({} for a target that describes only its operators)
    path: Path
    ops: dict | None = None  # ONNX op type -> {constraint: value}; None: the target says nothing about operators
    int_types: tuple = ("int8",)
    fallback: str = "cpu"
    source: str = ""


def available_targets() -> list[str]:
    """Every shipped target (configs/npu/): arithmetic profiles and operator lists."""
    return available_configs(PROFILES_DIR)


def available_profiles() -> list[str]:
    """The shipped targets that set the integer arithmetic, i.e. that `--profile` can simulate."""
    return [n for n in available_targets() if load_profile(n).settings]


def _ops(label: str, ops) -> dict:
    """A target's `ops` mapping, every constraint checked against OP_CONSTRAINTS."""
    if not isinstance(ops, dict) or not ops:
        raise QbenchError(f"{label}: 'ops' must map ONNX op types to their limits, e.g. 'Conv: {{kernel: [1, 7]}}'.")
    out = {}
    for op, limits in ops.items():
        if not isinstance(op, str) or not onnx.defs.has(op):
            raise QbenchError(f"{label}: ops key {op!r} is not an ONNX op type (e.g. Conv, LeakyRelu; the names "
                              f"are case-sensitive).")
        limits = limits or {}
        if not isinstance(limits, dict):
            raise QbenchError(f"{label}: ops.{op} must be a mapping of limits (or {{}}), not {limits!r}.")
        for key, value in limits.items():
            kind = OP_CONSTRAINTS.get(key)
            where = f"{label}: ops.{op}.{key}"
            if kind is None:
                raise QbenchError(f"{where} is not a known limit; allowed: {', '.join(OP_CONSTRAINTS)}.")
            ok = {"range": lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and
                                                                                not isinstance(x, bool) for x in v)
                           and v[0] <= v[1],
                  "values": lambda v: isinstance(v, list) and len(v) > 0,
                  "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                  "bool": lambda v: isinstance(v, bool), "text": lambda v: isinstance(v, str)}
            good = value in kind if isinstance(kind, tuple) else ok[kind](value)
            if not good:
                want = ("one of " + ", ".join(kind) if isinstance(kind, tuple) else
                        {"range": "[min, max]", "values": "a list of allowed values", "int": "a positive whole number",
                         "bool": "true or false", "text": "a string"}[kind])
                raise QbenchError(f"{where} is {value!r}; give {want}.")
        out[op] = dict(limits)
    return out


def profile_from_dict(data, name: str, path: Path | None = None) -> Profile:
    """Validate a target: hardware keys and/or operator keys (QbenchError naming the key and the allowed values)."""
    label = f"target {name}"
    allowed = ", ".join(PROFILE_KEYS + OPTIONAL_PROFILE_KEYS + TARGET_KEYS)
    if not isinstance(data, dict):
        raise QbenchError(f"{label} must be a YAML mapping of the hardware keys ({allowed}), "
                          f"not a {type(data).__name__}.")
    for key in data:
        if key in KEYS and key not in PROFILE_KEYS + OPTIONAL_PROFILE_KEYS:
            raise QbenchError(f"{label}: {key!r} is a recipe key, not a hardware key; a target holds only "
                              f"{allowed} (set {key!r} in the recipe).")
        if key not in PROFILE_KEYS + OPTIONAL_PROFILE_KEYS and key not in TARGET_KEYS:
            raise QbenchError(f"{label}: unknown key {key!r}; allowed: {allowed}.")
    arithmetic = [k for k in PROFILE_KEYS if k in data]
    missing = [k for k in PROFILE_KEYS if k not in data]
    if arithmetic and missing or not arithmetic and "ops" not in data:
        raise QbenchError(f"{label}: missing {', '.join(repr(k) for k in missing)}; a target sets every hardware "
                          f"key ({', '.join(PROFILE_KEYS)}), or none of them and 'ops'.")
    settings = {}
    optional = [k for k in OPTIONAL_PROFILE_KEYS if k in data]
    if optional and not arithmetic:
        raise QbenchError(f"{label}: {', '.join(optional)} need the arithmetic keys too ({', '.join(PROFILE_KEYS)}).")
    if arithmetic:
        keys = PROFILE_KEYS + tuple(optional)
        checked = recipe_from_dict({k: data[k] for k in keys}, name, kind="target")
        settings = {k: getattr(checked, k) for k in keys}
    int_types = data.get("int_types", ["int8"])
    if not isinstance(int_types, list) or not int_types or any(t not in INT_TYPES for t in int_types):
        raise QbenchError(f"{label}: int_types is {int_types!r}; give a list of {', '.join(INT_TYPES)}.")
    fallback = data.get("fallback", "cpu")
    if fallback not in FALLBACKS:
        raise QbenchError(f"{label}: fallback is {fallback!r}; allowed: {', '.join(FALLBACKS)}.")
    source = data.get("source", "")
    if not isinstance(source, str):
        raise QbenchError(f"{label}: source must be a string naming the document the operator list comes from.")
    ops = _ops(label, data["ops"]) if "ops" in data else None
    return Profile(name, settings, Path(path) if path else Path(name), ops, tuple(int_types), fallback, source)


def load_profile(name_or_path: str | os.PathLike | Profile) -> Profile:
    """A profile by name from configs/npu/ (cpu, npu-symmetric, ...) or from a YAML file."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    p = find_config(name_or_path, PROFILES_DIR, "profile")
    return profile_from_dict(read_yaml(p, "profile"), p.stem, p)


def apply_profile(recipe: Recipe | str | os.PathLike | None, profile: Profile | str | os.PathLike | None,
                  fusion: str | None = None) -> Recipe:
    """The recipe with the profile's hardware keys, `fusion` overriding activation_fusion.

    Named '<recipe>+<profile>(<fusion>)'. Without a profile only `fusion` applies ('<recipe>(<fusion>)'); with
    neither the recipe comes back unchanged.
    """
    recipe = load_recipe(recipe)
    if profile is None and fusion is None:
        return recipe
    prof = load_profile(profile) if profile is not None else None
    if prof is not None and not prof.settings:
        raise QbenchError(f"target {prof.name} describes only the operators it runs, not its integer arithmetic, so "
                          "it cannot simulate INT8 (--profile); use it with `qbench ops`, and a profile that sets "
                          f"{', '.join(PROFILE_KEYS)} for accuracy.")
    changes = dict(prof.settings) if prof else {}
    if changes.get("reduce_range") == "input" and recipe.reduce_range is True:
        changes["reduce_range"] = True  # every weight 7-bit includes the input Convs'
    if fusion is not None:
        changes["activation_fusion"] = _choice(f"target {prof.name}" if prof else f"recipe {recipe.name}",
                                               "fusion", fusion, FUSIONS)
    applied = recipe.replace(**changes)
    label = f"+{prof.name}" if prof else ""
    return dataclasses.replace(applied, name=f"{short_name(recipe)}{label}({applied.activation_fusion})")
