"""Synthetic traffic-sign detection data: the embedded default dataset.

No real data ships with qbench, so it draws its own road scenes with the four
GTSDB superclasses on them:

0 prohibitory  white disc, red ring, black glyph (speed numbers, vehicles)
1 danger       white triangle pointing up, red border, black glyph
2 mandatory    blue disc, white arrow
3 other        yield, stop, priority road, no entry, end of restriction

Signs are rendered large, then warped (perspective, rotation), scaled to sizes
from tiny to large, shaded and pasted on procedural backgrounds (sky, road,
buildings, trees, signboard distractors); the whole frame then gets blur,
lighting, sensor noise and JPEG compression. Every image is drawn from its own
random stream seeded by (seed, split, index), so any subset of a split can be
regenerated bit-identically, and `generate(..., n_train=0)` yields the same val
images as a full run.

The same on every CPU: OpenCV draws only with its integer rasterizers (lines,
polygons, circles, text on uint8 images); every float step (perspective warp,
resizing, blur, exposure and gamma) is written here in NumPy elementwise
arithmetic, which IEEE fixes to the last bit whatever SIMD a CPU has, and the
few transcendental values (sin/cos, exp, pow) are rounded to 9 significant
digits first (the last bits of libm and of NumPy's SIMD kernels differ by CPU).
OpenCV's own float warp, resize and blur (version 1) gave other pixels on AVX2
than on AVX-512 machines.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

NAMES = ["prohibitory", "danger", "mandatory", "other"]
SPLIT_IDS = {"train": 1, "val": 2}
CANVAS = 128  # side of the canonical sign patch, pixels
DEFAULT_WIDTH, DEFAULT_HEIGHT = 416, 256  # road-scene aspect (GTSDB frames are 1360x800)
GENERATOR_VERSION = 2  # bump when the drawing changes; recorded in data.yaml (2: the same on every CPU)


@dataclass(frozen=True)
class SynthConfig:
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    min_size: float = 12.0  # smallest sign side, pixels
    max_size: float = 96.0
    max_signs: int = 5
    seed: int = 0


# --------------------------------------------------------------------------- colours
def _jitter(rng: np.random.Generator, bgr: tuple[int, int, int], amount: int = 25) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in bgr)


def _red(rng):
    return _jitter(rng, (30, 25, 200), 30)


def _white(rng):
    v = int(rng.integers(205, 256))
    return _jitter(rng, (v, v, v), 8)


def _black(rng):
    v = int(rng.integers(0, 50))
    return (v, v, v)


def _blue(rng):
    return _jitter(rng, (170, 80, 20), 30)


def _yellow(rng):
    return _jitter(rng, (20, 200, 240), 25)


# --------------------------------------------------------------------------- glyphs
def _text(img, text, center, height, color, thickness):
    """Black/white text fitted to `height` pixels, centred."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, thickness)
    scale = height / max(th, 1)
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    org = (int(center[0] - tw / 2), int(center[1] + th / 2))
    cv2.putText(img, text, org, font, scale, color, thickness, cv2.LINE_AA)


def _vehicle(img, rng, c, color, width):
    """A crude car or truck silhouette centred at c."""
    x, y = c
    w = width
    h = width * rng.uniform(0.35, 0.5)
    cv2.rectangle(img, (int(x - w / 2), int(y - h / 4)), (int(x + w / 2), int(y + h / 2)), color, -1, cv2.LINE_AA)
    cv2.rectangle(img, (int(x - w / 4), int(y - h * 0.7)), (int(x + w / 4), int(y)), color, -1, cv2.LINE_AA)
    r = max(2, int(w * 0.1))
    for dx in (-w / 3, w / 3):
        cv2.circle(img, (int(x + dx), int(y + h / 2)), r, color, -1, cv2.LINE_AA)


def _danger_glyph(img, rng, color):
    c = (64, 80)
    kind = rng.integers(0, 5)
    if kind == 0:  # exclamation mark
        cv2.line(img, (64, 58), (64, 88), color, 9, cv2.LINE_AA)
        cv2.circle(img, (64, 100), 5, color, -1, cv2.LINE_AA)
    elif kind == 1:  # bend
        pts = np.array([[56, 104], [56, 84], [72, 72], [72, 56]], np.int32)
        cv2.polylines(img, [pts], False, color, 7, cv2.LINE_AA)
    elif kind == 2:  # pedestrian-ish
        cv2.circle(img, (64, 60), 6, color, -1, cv2.LINE_AA)
        cv2.line(img, (64, 66), (62, 88), color, 6, cv2.LINE_AA)
        cv2.line(img, (62, 88), (54, 104), color, 5, cv2.LINE_AA)
        cv2.line(img, (62, 88), (72, 104), color, 5, cv2.LINE_AA)
        cv2.line(img, (56, 74), (72, 78), color, 4, cv2.LINE_AA)
    elif kind == 3:  # crossroads
        cv2.line(img, (64, 56), (64, 106), color, 7, cv2.LINE_AA)
        cv2.line(img, (46, 82), (82, 82), color, 7, cv2.LINE_AA)
    else:  # traffic-light-ish / roadworks blob
        _vehicle(img, rng, c, color, 34)


def _arrow(img, rng, color):
    kind = rng.integers(0, 5)
    t = 10
    if kind == 0:  # straight
        cv2.arrowedLine(img, (64, 98), (64, 30), color, t, cv2.LINE_AA, tipLength=0.4)
    elif kind == 1:  # right
        cv2.arrowedLine(img, (30, 64), (98, 64), color, t, cv2.LINE_AA, tipLength=0.4)
    elif kind == 2:  # left
        cv2.arrowedLine(img, (98, 64), (30, 64), color, t, cv2.LINE_AA, tipLength=0.4)
    elif kind == 3:  # turn right ahead
        cv2.line(img, (54, 100), (54, 58), color, t, cv2.LINE_AA)
        cv2.arrowedLine(img, (54, 58), (98, 58), color, t, cv2.LINE_AA, tipLength=0.45)
    else:  # roundabout: three short arrows on a circle
        for k in range(3):
            a0 = k * 2 * math.pi / 3
            p0 = (int(64 + 30 * math.cos(a0)), int(64 + 30 * math.sin(a0)))
            p1 = (int(64 + 30 * math.cos(a0 + 1.2)), int(64 + 30 * math.sin(a0 + 1.2)))
            cv2.arrowedLine(img, p0, p1, color, 7, cv2.LINE_AA, tipLength=0.5)


# --------------------------------------------------------------------------- signs
def _blank():
    return np.zeros((CANVAS, CANVAS, 3), np.uint8), np.zeros((CANVAS, CANVAS), np.uint8)


def _triangle(up: bool, r: float):
    c = CANVAS / 2
    if up:
        pts = [(c, c - r), (c - r * 0.95, c + r * 0.75), (c + r * 0.95, c + r * 0.75)]
    else:
        pts = [(c, c + r), (c - r * 0.95, c - r * 0.75), (c + r * 0.95, c - r * 0.75)]
    return np.array(pts, np.float32)


def _poly(img, pts, color):
    cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], color, cv2.LINE_AA, shift=4)


def _shrink(pts, k):
    cen = pts.mean(axis=0, keepdims=True)
    return cen + (pts - cen) * k


def draw_sign(cls: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one sign of class `cls` on a CANVASxCANVAS patch: (bgr, alpha)."""
    img, mask = _blank()
    c = (CANVAS // 2, CANVAS // 2)
    R = 60
    if cls == 0:  # prohibitory
        cv2.circle(mask, c, R, 255, -1, cv2.LINE_AA)
        cv2.circle(img, c, R, _red(rng), -1, cv2.LINE_AA)
        cv2.circle(img, c, int(R * rng.uniform(0.72, 0.8)), _white(rng), -1, cv2.LINE_AA)
        k = rng.integers(0, 4)
        if k <= 1:
            _text(img, str(int(rng.choice([20, 30, 40, 50, 60, 70, 80, 100, 120]))), c, 34, _black(rng), 5)
        elif k == 2:
            _vehicle(img, rng, c, _black(rng), 46)
        else:  # no overtaking: two cars, one red
            _vehicle(img, rng, (46, 66), _red(rng), 30)
            _vehicle(img, rng, (82, 66), _black(rng), 30)
    elif cls == 1:  # danger
        tri = _triangle(True, R)
        _poly(mask, tri, 255)
        _poly(img, tri, _red(rng))
        _poly(img, _shrink(tri, rng.uniform(0.62, 0.72)), _white(rng))
        _danger_glyph(img, rng, _black(rng))
    elif cls == 2:  # mandatory
        cv2.circle(mask, c, R, 255, -1, cv2.LINE_AA)
        cv2.circle(img, c, R, _blue(rng), -1, cv2.LINE_AA)
        if rng.random() < 0.5:
            cv2.circle(img, c, R, _white(rng), 2, cv2.LINE_AA)
        _arrow(img, rng, _white(rng))
    else:  # other
        k = rng.integers(0, 5)
        if k == 0:  # yield
            tri = _triangle(False, R)
            _poly(mask, tri, 255)
            _poly(img, tri, _red(rng))
            _poly(img, _shrink(tri, rng.uniform(0.55, 0.65)), _white(rng))
        elif k == 1:  # stop
            ang = np.arange(8) * math.pi / 4 + math.pi / 8
            octo = np.stack([c[0] + R * np.cos(ang), c[1] + R * np.sin(ang)], 1).astype(np.float32)
            _poly(mask, octo, 255)
            _poly(img, octo, _white(rng))
            _poly(img, _shrink(octo, 0.9), _red(rng))
            _text(img, "STOP", c, 22, _white(rng), 4)
        elif k == 2:  # priority road: yellow diamond with white border
            d = np.array([[c[0], c[1] - R], [c[0] + R, c[1]], [c[0], c[1] + R], [c[0] - R, c[1]]], np.float32)
            _poly(mask, d, 255)
            _poly(img, d, _white(rng))
            _poly(img, _shrink(d, 0.92), _black(rng))
            _poly(img, _shrink(d, 0.86), _white(rng))
            _poly(img, _shrink(d, 0.58), _yellow(rng))
        elif k == 3:  # no entry
            cv2.circle(mask, c, R, 255, -1, cv2.LINE_AA)
            cv2.circle(img, c, R, _red(rng), -1, cv2.LINE_AA)
            cv2.rectangle(img, (c[0] - 42, c[1] - 10), (c[0] + 42, c[1] + 10), _white(rng), -1, cv2.LINE_AA)
        else:  # end of restriction: white disc, grey diagonal stripes
            cv2.circle(mask, c, R, 255, -1, cv2.LINE_AA)
            cv2.circle(img, c, R, _white(rng), -1, cv2.LINE_AA)
            cv2.circle(img, c, R, (90, 90, 90), 2, cv2.LINE_AA)
            for off in (-14, 0, 14):
                cv2.line(img, (c[0] - 40 + off, c[1] + 40 + off), (c[0] + 40 + off, c[1] - 40 + off), (70, 70, 70), 4, cv2.LINE_AA)
    return img, mask


def draw_distractor(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sign-like clutter that carries no label: boards, lights, plain discs, cones."""
    img, mask = _blank()
    k = rng.integers(0, 5)
    if k == 0:  # rectangular signboard with text
        w, h = int(rng.integers(70, 124)), int(rng.integers(40, 90))
        p0 = ((CANVAS - w) // 2, (CANVAS - h) // 2)
        p1 = (p0[0] + w, p0[1] + h)
        colour = [(140, 60, 10), (40, 120, 30), (235, 235, 235), (40, 60, 110)][rng.integers(0, 4)]
        cv2.rectangle(mask, p0, p1, 255, -1)
        cv2.rectangle(img, p0, p1, _jitter(rng, colour, 20), -1)
        cv2.rectangle(img, p0, p1, _white(rng), 2)
        _text(img, "".join(rng.choice(list("ABEKMNRSTUW"), 4)), (64, 64), h * 0.3, _white(rng) if colour[0] < 200 else _black(rng), 2)
    elif k == 1:  # traffic light housing
        cv2.rectangle(mask, (44, 10), (84, 118), 255, -1)
        cv2.rectangle(img, (44, 10), (84, 118), (30, 30, 30), -1)
        on = rng.integers(0, 3)
        for i, col in enumerate([(30, 30, 220), (30, 190, 230), (60, 200, 60)]):
            cv2.circle(img, (64, 30 + 34 * i), 13, col if i == on else (50, 50, 50), -1, cv2.LINE_AA)
    elif k == 2:  # plain coloured disc (no ring, no glyph)
        cv2.circle(mask, (64, 64), 58, 255, -1, cv2.LINE_AA)
        cv2.circle(img, (64, 64), 58, _jitter(rng, (60, 140, 230), 60), -1, cv2.LINE_AA)
    elif k == 3:  # traffic cone
        pts = np.array([[64, 10], [34, 118], [94, 118]], np.float32)
        _poly(mask, pts, 255)
        _poly(img, pts, _jitter(rng, (30, 110, 245), 20))
        cv2.line(img, (52, 62), (76, 62), _white(rng), 9)
    else:  # house number / white square plate
        cv2.rectangle(mask, (24, 34), (104, 94), 255, -1)
        cv2.rectangle(img, (24, 34), (104, 94), _white(rng), -1)
        _text(img, str(int(rng.integers(1, 99))), (64, 64), 30, _black(rng), 4)
    return img, mask


# --------------------------------------------------------------------------- CPU-independent float steps
def _r9(v: float) -> float:
    """A transcendental result rounded to 9 significant digits: libm's last bits differ between CPUs."""
    return float(f"{v:.9g}")


def _bilinear(src: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """src (H, W[, C]) sampled at float64 coordinates (sx, sy), bilinear, 0 outside; float64 result."""
    h, w = src.shape[:2]
    a = src.astype(np.float64)
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    out = 0.0
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            v = a[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
            wgt = np.where(ok, wx * wy, 0.0)
            out = out + (v * wgt[..., None] if v.ndim == 3 else v * wgt)
    return out


def _resize(src: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear resize (pixel centres aligned, edges clamped), float64."""
    sh, sw = src.shape[:2]
    xs = np.clip((np.arange(w) + 0.5) * (sw / w) - 0.5, 0, sw - 1)
    ys = np.clip((np.arange(h) + 0.5) * (sh / h) - 0.5, 0, sh - 1)
    sx, sy = np.meshgrid(xs, ys)
    return _bilinear(src, sx, sy)


def _homography(src: np.ndarray, dst: np.ndarray) -> list[list[float]]:
    """The 3x3 perspective transform taking the 4 points src to dst, solved in plain Python floats."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist()):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        rhs.append(u)
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
        rhs.append(v)
    n = 8
    m = [r + [b] for r, b in zip(rows, rhs)]
    for c in range(n):  # Gauss-Jordan with partial pivoting
        piv = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[piv] = m[piv], m[c]
        for r in range(n):
            if r != c and m[r][c] != 0.0:
                f = m[r][c] / m[c][c]
                m[r] = [a - f * b for a, b in zip(m[r], m[c])]
    h = [m[r][n] / m[r][r] for r in range(n)] + [1.0]
    return [h[0:3], h[3:6], h[6:9]]


def _inverse3(a: list[list[float]]) -> list[list[float]]:
    (p, q, r), (s_, t, u), (v, w, x) = a
    det = p * (t * x - u * w) - q * (s_ * x - u * v) + r * (s_ * w - t * v)
    adj = [[t * x - u * w, r * w - q * x, q * u - r * t],
           [u * v - s_ * x, p * x - r * v, r * s_ - p * u],
           [s_ * w - t * v, q * v - p * w, p * t - q * s_]]
    return [[e / det for e in row] for row in adj]


def _warp_perspective(src: np.ndarray, m: list[list[float]], w: int, h: int) -> np.ndarray:
    """src warped by m into (h, w) (inverse mapping, bilinear, 0 outside), uint8."""
    inv = _inverse3(m)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    den = inv[2][0] * xs + inv[2][1] * ys + inv[2][2]
    sx = (inv[0][0] * xs + inv[0][1] * ys + inv[0][2]) / den
    sy = (inv[1][0] * xs + inv[1][1] * ys + inv[1][2]) / den
    return np.clip(np.round(_bilinear(src, sx, sy)), 0, 255).astype(np.uint8)


def _filter_rows_cols(img: np.ndarray, kx: list[float], ky: list[float]) -> np.ndarray:
    """Separable filter (taps summed in a fixed order, borders reflected as OpenCV's BORDER_REFLECT_101)."""
    out = img.astype(np.float64)
    for axis, k in ((1, kx), (0, ky)):
        r = len(k) // 2
        if r == 0:
            continue
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = 0.0
        for i, c in enumerate(k):
            acc = acc + c * np.take(p, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def _gaussian_kernel(sigma: float) -> list[float]:
    r = max(1, int(math.ceil(3 * sigma)))
    k = [_r9(math.exp(-(i * i) / (2 * sigma * sigma))) for i in range(-r, r + 1)]
    total = sum(k)
    return [v / total for v in k]


def _gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    """255 * (img / 255) ** gamma through a 9-digit table of the 256 integer levels, linear in between."""
    lut = np.array([_r9(255.0 * (i / 255.0) ** gamma) for i in range(256)], np.float64)
    x = np.clip(img, 0, 255)
    i0 = np.minimum(np.floor(x).astype(np.int64), 254)
    f = x - i0
    return lut[i0] * (1.0 - f) + lut[i0 + 1] * f


# --------------------------------------------------------------------------- scene
def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    horizon = int(h * rng.uniform(0.3, 0.6))
    sky_top = np.array(_jitter(rng, (rng.choice([230, 200, 170]), 190, 150), 40), np.float32)
    sky_bot = np.array(_jitter(rng, (220, 215, 210), 35), np.float32)
    t = np.linspace(0, 1, max(horizon, 1))[:, None, None]
    img[:horizon] = sky_top * (1 - t) + sky_bot * t
    ground = np.array(_jitter(rng, (90, 100, 95), 30), np.float32)
    img[horizon:] = ground
    # road trapezoid with lane markings
    road = np.array([[w * rng.uniform(0.35, 0.48), horizon], [w * rng.uniform(0.52, 0.65), horizon],
                     [w * rng.uniform(0.85, 1.2), h], [w * rng.uniform(-0.2, 0.15), h]], np.int32)
    grey = float(rng.integers(60, 120))
    cv2.fillPoly(img, [road], (grey, grey, grey + 5))
    mx = int((road[0, 0] + road[1, 0]) / 2)
    for y0 in range(horizon + 4, h, 18):
        f = (y0 - horizon) / max(h - horizon, 1)
        cv2.line(img, (mx, y0), (mx, min(h, y0 + int(3 + 8 * f))), (220, 220, 220), max(1, int(3 * f)))
    img = img.astype(np.uint8)
    # buildings
    for _ in range(rng.integers(0, 5)):
        bw, bh = int(rng.integers(w // 10, w // 3)), int(rng.integers(h // 8, horizon + 1))
        x0 = int(rng.integers(-bw // 2, w))
        col = _jitter(rng, (150, 150, 160), 60)
        cv2.rectangle(img, (x0, horizon - bh), (x0 + bw, horizon), col, -1)
        for wy in range(horizon - bh + 6, horizon - 6, 14):
            for wx in range(x0 + 5, x0 + bw - 5, 12):
                if rng.random() < 0.7:
                    cv2.rectangle(img, (wx, wy), (wx + 5, wy + 7), _jitter(rng, (90, 80, 70), 30), -1)
    # trees and bushes
    for _ in range(rng.integers(0, 8)):
        cx, cy = int(rng.integers(0, w)), int(horizon + rng.integers(-h // 4, h // 8))
        for _ in range(rng.integers(3, 8)):
            ax, ay = int(rng.integers(6, w // 12 + 8)), int(rng.integers(6, h // 8 + 8))
            cv2.ellipse(img, (cx + int(rng.integers(-20, 20)), cy + int(rng.integers(-20, 10))), (ax, ay), 0, 0, 360,
                        _jitter(rng, (50, 110, 60), 30), -1, cv2.LINE_AA)
    # poles, cars, random clutter
    for _ in range(rng.integers(0, 6)):
        x = int(rng.integers(0, w))
        cv2.line(img, (x, int(rng.integers(0, horizon + 1))), (x, h), _jitter(rng, (110, 110, 110), 40), int(rng.integers(1, 4)))
    for _ in range(rng.integers(0, 4)):
        cw = int(rng.integers(w // 12, w // 5))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(horizon, h))
        col = _jitter(rng, tuple(int(v) for v in rng.integers(0, 255, 3)), 0)
        cv2.rectangle(img, (cx, cy - cw // 2), (cx + cw, cy), col, -1)
        cv2.rectangle(img, (cx + cw // 5, cy - cw // 2 - cw // 4), (cx + 4 * cw // 5, cy - cw // 2), col, -1)
        for dx in (cw // 5, 4 * cw // 5):
            cv2.circle(img, (cx + dx, cy), max(2, cw // 8), (25, 25, 25), -1)
    # low-frequency texture
    tex = _resize(rng.normal(0, 1, (max(h // 16, 2), max(w // 16, 2))), w, h)
    img = np.clip(img.astype(np.float64) + tex[..., None] * rng.uniform(4, 14), 0, 255).astype(np.uint8)
    return img


def _warp(patch: np.ndarray, mask: np.ndarray, size: float, rng: np.random.Generator):
    """Perspective-warp and scale a sign patch to about `size` pixels."""
    s = CANVAS
    src = np.array([[0, 0], [s, 0], [s, s], [0, s]], np.float32)
    persp = rng.uniform(-0.08, 0.08, (4, 2)) * s
    ang = math.radians(rng.uniform(-10, 10))
    c, sn = _r9(math.cos(ang)), _r9(math.sin(ang))
    rot = np.array([[c, -sn], [sn, c]])
    aspect = rng.uniform(0.8, 1.05)  # signs seen at an angle look narrower
    dst = (src - s / 2 + persp) @ rot.T * np.array([aspect, 1.0]) + s / 2
    dst = (dst - dst.min(0)) * (size / s)
    ow, oh = int(math.ceil(dst[:, 0].max())) + 2, int(math.ceil(dst[:, 1].max())) + 2
    m = _homography(src, dst)
    return _warp_perspective(patch, m, ow, oh), _warp_perspective(mask, m, ow, oh)


def _paste(scene, img, alpha, x, y, shade):
    h, w = alpha.shape
    H, W = scene.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return None
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x].astype(np.float32)[..., None] / 255.0
    src = img[y0 - y:y1 - y, x0 - x:x1 - x].astype(np.float32) * shade
    region = scene[y0:y1, x0:x1].astype(np.float32)
    scene[y0:y1, x0:x1] = np.clip(src * a + region * (1 - a), 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(alpha[y0 - y:y1 - y, x0 - x:x1 - x] > 127)
    if len(xs) == 0:
        return None
    return x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1


def _iou_any(box, boxes, thr=0.05):
    for b in boxes:
        ix = max(0, min(box[2], b[2]) - max(box[0], b[0]))
        iy = max(0, min(box[3], b[3]) - max(box[1], b[1]))
        inter = ix * iy
        union = (box[2] - box[0]) * (box[3] - box[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        if inter / max(union, 1e-9) > thr:
            return True
    return False


def render_image(cfg: SynthConfig, split: str, index: int) -> tuple[bytes, list[tuple[int, float, float, float, float]]]:
    """Draw image `index` of `split`: (JPEG bytes, [(cls, cx, cy, w, h) normalized])."""
    rng = np.random.default_rng([cfg.seed, SPLIT_IDS[split], index])
    W, H = cfg.width, cfg.height
    scene = _background(rng, W, H)
    placed: list[tuple[float, float, float, float]] = []
    labels = []
    n_signs = int(rng.integers(1, cfg.max_signs + 1)) if rng.random() > 0.05 else 0
    n_distract = int(rng.integers(0, 4))
    objects = [(int(rng.integers(0, len(NAMES))), True) for _ in range(n_signs)] + [(-1, False)] * n_distract
    rng.shuffle(objects)
    lo, hi = math.log(cfg.min_size), math.log(cfg.max_size)
    for cls, is_sign in objects:
        size = _r9(math.exp(rng.uniform(lo, hi)))
        patch, mask = draw_sign(cls, rng) if is_sign else draw_distractor(rng)
        img, alpha = _warp(patch, mask, size, rng)
        h, w = alpha.shape
        for _ in range(20):  # find a spot that overlaps nothing placed so far
            x = int(rng.integers(-w // 8, W - w + w // 8 + 1))
            y = int(rng.integers(-h // 8, int(H * 0.8) - h + 1)) if H * 0.8 > h else 0
            cand = (x, y, x + w, y + h)
            if not _iou_any(cand, placed, 0.0):
                break
        else:
            continue
        if is_sign and rng.random() < 0.6:  # a pole under the sign
            px = x + w // 2
            cv2.line(scene, (px, y + h), (px, H), _jitter(rng, (120, 120, 120), 30), max(1, w // 12))
        shade = rng.uniform(0.55, 1.15)
        box = _paste(scene, img, alpha, x, y, shade)
        if box is None:
            continue
        placed.append(cand)
        bw, bh = box[2] - box[0], box[3] - box[1]
        if is_sign and bw >= 4 and bh >= 4:
            labels.append((cls, (box[0] + box[2]) / 2 / W, (box[1] + box[3]) / 2 / H, bw / W, bh / H))
    # camera effects
    img = scene.astype(np.float64)
    img = img * rng.uniform(0.6, 1.3) + rng.uniform(-30, 30)  # exposure
    img = _gamma(img, rng.uniform(0.7, 1.4))
    tint = rng.uniform(0.9, 1.1, 3)
    img = img * tint
    r = rng.random()
    if r < 0.4:
        k = _gaussian_kernel(rng.uniform(0.3, 1.3))
        img = _filter_rows_cols(img, k, k)
    elif r < 0.55:  # horizontal motion blur
        n = int(rng.integers(3, 6))
        img = _filter_rows_cols(img, [1.0 / n] * n if n % 2 else [1.0 / n] * n + [0.0], [1.0])
    img = img + rng.normal(0, rng.uniform(0, 8), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    quality = int(rng.integers(55, 96))
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes(), labels


def generate(out: str | os.PathLike, n_train: int = 1200, n_val: int = 200, cfg: SynthConfig = SynthConfig(),
             progress=None) -> Path:
    """Write a YOLO-format dataset to `out`; returns the path of its data.yaml.

    `progress`, if given, is called with the number of images written after each.
    """
    out = Path(out)
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir, lbl_dir = out / "images" / split, out / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            jpeg, labels = render_image(cfg, split, i)
            stem = f"{split}_{i:05d}"
            (img_dir / f"{stem}.jpg").write_bytes(jpeg)
            (lbl_dir / f"{stem}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels))
            if progress:
                progress(1)
    yaml_path = out / "data.yaml"
    lines = [
        "# Synthetic traffic signs generated by qbench (qbench data synth).",
        f"# generator_version={GENERATOR_VERSION} seed={cfg.seed} size={cfg.width}x{cfg.height}"
        f" n_train={n_train} n_val={n_val}",
        "train: images/train",
        "val: images/val",
        "names:",
        *[f"  {i}: {n}" for i, n in enumerate(NAMES)],
    ]
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path
