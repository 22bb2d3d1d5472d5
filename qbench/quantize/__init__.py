"""Quantization: validated recipes (configs/recipes/) and engines.

`load_recipe(name_or_path)` gives a `Recipe`; `quantize_ort(fp32, out, recipe, calib_paths)` runs ONNX Runtime
static QDQ quantization with the YOLO detect-head decode kept in float (`find_head`).
"""

from .ort_engine import check_detector, find_head, quantize_ort
from .recipe import Recipe, available_recipes, load_recipe, recipe_from_dict, write_recipe

__all__ = ["Recipe", "available_recipes", "check_detector", "find_head", "load_recipe", "quantize_ort",
           "recipe_from_dict", "write_recipe"]
