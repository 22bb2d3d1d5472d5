"""Letterbox preprocessing, pixel-identical to ultralytics' validation pipeline.

ultralytics validates (rect=False) in two steps: `BaseDataset.load_image` resizes
the long side to imgsz (sizes rounded up, INTER_LINEAR), then
`LetterBox(new_shape=imgsz, scaleup=False)` pads to imgsz x imgsz with grey 114,
centred. Labels follow the same arithmetic. Doing exactly the same here is what
lets `qbench eval` agree with `yolo val`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .dataset import read_image

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """Where the original image landed in the square model input."""

    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]  # after the long-side resize (before padding)
    left: int
    top: int
    imgsz: int

    def boxes_to_input(self, xywhn: np.ndarray) -> np.ndarray:
        """Normalized (cx, cy, w, h) labels -> xyxy pixels in the model input."""
        h, w = self.resized_hw
        cx, cy, bw, bh = (xywhn[:, i] for i in range(4))
        out = np.stack([(cx - bw / 2) * w + self.left, (cy - bh / 2) * h + self.top,
                        (cx + bw / 2) * w + self.left, (cy + bh / 2) * h + self.top], axis=1)
        return out.astype(np.float32)


def letterbox(img: np.ndarray, imgsz: int) -> tuple[np.ndarray, Letterbox]:
    """BGR HxWx3 uint8 -> (imgsz x imgsz x 3 BGR uint8, geometry)."""
    h0, w0 = img.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        w, h = min(math.ceil(w0 * r), imgsz), min(math.ceil(h0 * r), imgsz)
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    h, w = img.shape[:2]
    # LetterBox(scaleup=False): the image already fits, so it is only padded.
    r2 = min(imgsz / h, imgsz / w, 1.0)
    new_w, new_h = max(round(w * r2), 1), max(round(h * r2), 1)
    if (w, h) != (new_w, new_h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (imgsz - new_w) / 2, (imgsz - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, Letterbox((h0, w0), (new_h, new_w), left, top, imgsz)


def to_input(images: list[np.ndarray]) -> np.ndarray:
    """Letterboxed BGR uint8 images -> float32 NCHW RGB in [0, 1], the model's input."""
    batch = np.stack(images)[..., ::-1].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32) / 255.0


def load_batch(paths, imgsz: int) -> np.ndarray:
    """Image files -> the model's input batch (read, letterboxed to imgsz, float32 NCHW RGB in [0, 1])."""

    return to_input([letterbox(read_image(p), imgsz)[0] for p in paths])
