"""Quantization-aware fine-tuning (QAT) that matches a PTQ recipe/profile, and its INT8 ONNX export.

`qat(weights, data, out, recipe, profile, ...)` runs these stages in one folder (each skipped when its output is
already there, so re-running the same command after an interruption resumes):

1. `fp32.onnx`: the FP32 export of `weights`; `ptq/`: ONNX Runtime static PTQ of it with the recipe + profile
   (`quantize_ort`), which also saves the calibrated activation ranges (`ptq/ranges.json`). With recipe key
   `equalize`, fp32.onnx is the equalized export and `equalize.json` holds the scales, which the PyTorch model
   gets too (`qbench.quantization.equalize.equalize_torch`) before the fake quantization goes in.
2. fake quantization read FROM THAT PTQ GRAPH (`prepare_qat`): the ultralytics model is fused (Conv+BN folded, so
   the fake-quantized weights are the deployed ones) and
   - every Conv the PTQ graph quantizes becomes a `QConv2d` (same class layout, same state_dict): its input is
     fake-quantized with the PTQ graph's scale/zero point, its weight per output channel, symmetric int8
     (scale = absmax / 127 as ORT computes it; rounded up to a power of two under pow2 profiles), its bias on the
     int32 grid input scale x weight scale, and its output when the PTQ graph requantizes the Conv output on its
     own (profiles that do not fuse Conv+activation; the detect-branch convs whose outputs the float decode reads);
   - every other quantized tensor that is the output of a module (a Conv block's activation, a Bottleneck's
     residual Add, a Concat layer) gets an `OutputFakeQuant` forward hook with its PTQ scale/zero point;
   - tensors inside a module's forward get a quantization point of that module's quantized class: SiLU's Sigmoid
     (exported as x * Sigmoid(x)), the C2PSA attention's scores, softmax and residual Adds (`fakequant`);
   - tensors that only pass through with their input's quantizer (Split, MaxPool, Resize) need nothing, and
     tensors read only by quantized Convs (C2f's inner Concat, the image) are fake-quantized at those Convs' inputs.
   Each activation tensor is fake-quantized once (a conv whose input another module already quantizes skips its
   own input quantizer). With `learn_ranges` each of those quantizers learns its scale, LSQ-style:
   a log2 scale parameter initialised at the PTQ value, its exponent rounded to an integer under pow2 profiles
   (zero point and int range stay the PTQ ones, so symmetric stays symmetric); otherwise they stay frozen at the
   PTQ values. The DFL conv and the decode stay float, as in the PTQ graph. Gradients pass straight through (STE).
   Anything the PyTorch model cannot reproduce is refused (`unmapped`), and before training the fake-quant
   model is checked against the PTQ ONNX on calibration images, tensor by tensor (`check.fake_quant_match`):
   a placement that computes something else stops the run, naming the first tensor that differs.
3. `train/`: fine-tuning with ultralytics' DetectionTrainer (its loss, augmentation, LR schedule, EMA, validation),
   checkpointing `train/weights/last.pt` every epoch; an interrupted run resumes from it on the next call, which
   must ask for the same epochs (the checkpoint's) and settings (`train/qat_settings.json`: range mode, range_lr,
   distill weight, recipe, profile, weights digest, data, imgsz, batch, ...), or is refused naming what changed.
   A guard stops the first epoch when its first batches lose far more than the checkpoint's own last training
   epoch did (a fake-quant model that is not the checkpoint's function). Every epoch makes at least one optimizer
   step (ultralytics' nominal batch is lowered for small train splits).
4. `qat.pt` (the trained model with the fake quantizers stripped: a plain fused ultralytics checkpoint),
   `qat-fp32.onnx` (its FP32 export), `qat/int8.onnx` (quantize_ort with the PTQ ranges, or with
   `qat/ranges.json`, the ranges that give back the learned scales exactly: every activation scale equals the
   fake-quant model's, which is checked).
5. checks and scores: the QAT INT8 ONNX against the PyTorch fake-quant model on a few val images (refused below
   `check.MIN_MATCH_DB`), its int8 weights against PTQ's (refused when training changed none), the int8 kernels
   ORT fused, and FP32 / PTQ / QAT through `qbench.comparison.compare` (one evaluation path, latency in turns);
   `summary.md` and `report.html` (qbench.report: the FP32 / PTQ / QAT table, the training per epoch, the checks);
   `qat.json` is written last (atomically): a folder with qat.json is a finished run.

`u8_activations` (default on) writes int8 activation Q/DQ as uint8 with zero point + 128 in both INT8 models:
the same numbers, but ORT's fast x86 u8s8 kernels (see `constraints.activations_to_uint8`).
"""

from .check import MIN_MATCH_DB, fake_quant_match, match_onnx
from .fakequant import (
                        IN_RANGE_PARAM,
                        RANGE_PARAM,
                        OutputFakeQuant,
                        QAttention,
                        QConv2d,
                        QPSABlock,
                        QSiLU,
                        is_prepared,
                        strip_qat,
)
from .placement import learned_params, learned_scales, prepare_qat, read_ranges, write_learned_ranges
from .run import QAT_JSON, load_qat_model, qat, qat_command
from .trainer import DistillLoss

__all__ = ["DistillLoss", "IN_RANGE_PARAM", "MIN_MATCH_DB", "OutputFakeQuant", "QAT_JSON", "QAttention", "QConv2d",
           "QPSABlock", "QSiLU", "RANGE_PARAM", "fake_quant_match", "is_prepared", "learned_params",
           "learned_scales", "load_qat_model", "match_onnx", "prepare_qat", "qat", "qat_command", "read_ranges",
           "strip_qat", "write_learned_ranges"]
