"""Streaming statistics of one tensor and the quantization arithmetic they are judged by.

`TensorStats.update(x)` takes one batch of a tensor at a time and keeps only
fixed-size state: count, min, max, sums for mean/std, the count of negative
values and of values outside the calibrated range, per-channel min/max (axis 1
of a 4-D tensor), and a histogram of `bins` equal bins. The histogram starts on
a given range (the tensor's quantization range, when there is one) and, when
data falls outside it, doubles its bin width while keeping the bin count (pairs
of bins merge, the edges stay aligned), so counts are always exact and memory
never grows with the number of images. Percentiles are read off the histogram,
linearly interpolated inside a bin: exact to within one bin width. To keep the
cost per image bounded, a tensor larger than HIST_SAMPLES elements enters the
histogram through a fixed 1-in-k stride (its percentiles are then estimates);
min, max, moments, the negative count and clipping always see every element.

`QParams` is a per-tensor affine quantizer (scale, zero point, integer range);
`fake_quant` applies it exactly as ONNX Runtime's QuantizeLinear ->
DequantizeLinear does (round half to even, saturate). `ErrorStats` accumulates
SQNR and cosine similarity between a reference tensor and its approximation.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph.qdq import QParams, sqnr_db

PERCENTILES = (0.01, 0.1, 1.0, 50.0, 99.0, 99.9, 99.99)
DEFAULT_BINS = 2048
CHUNK = 1 << 18  # elements per histogram step: stays in cache
HIST_SAMPLES = 1 << 18  # elements of one tensor of one image that the histogram takes at most (1-in-k stride)
_SCRATCH_F = np.empty(CHUNK, np.float32)
_SCRATCH_I = np.empty(CHUNK, np.intp)


class ErrorStats:
    """SQNR (dB) and cosine similarity of approximations y of a reference x, pooled over every update."""

    __slots__ = ("xx", "yy", "xy", "ee", "n")

    def __init__(self):
        self.xx = self.yy = self.xy = self.ee = 0.0
        self.n = 0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        a = np.asarray(x, np.float32).ravel()
        b = np.asarray(y, np.float32).ravel()
        e = a - b
        self.xx += float(np.dot(a, a))
        self.yy += float(np.dot(b, b))
        self.xy += float(np.dot(a, b))
        self.ee += float(np.dot(e, e))
        self.n += a.size

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.xx, self.ee)

    @property
    def cosine(self) -> float:
        d = math.sqrt(self.xx * self.yy)
        return self.xy / d if d > 0 else (1.0 if self.ee == 0 else 0.0)

    @property
    def mse(self) -> float:
        return self.ee / self.n if self.n else 0.0


class TensorStats:
    """Streaming statistics of one tensor (see the module doc)."""

    def __init__(self, bins: int = DEFAULT_BINS, qparams: QParams | None = None,
                 ranges: dict[str, QParams] | None = None):
        """`qparams`: the quantizer the histogram starts on; `ranges`: quantizers (e.g. one per INT8 variant) whose
        clipping is counted, by name (`qparams` alone counts as "")."""
        if bins < 2 or bins % 2:
            raise ValueError("bins must be an even number >= 2")
        self.bins = bins
        self.ranges = dict(ranges) if ranges else ({"": qparams} if qparams is not None else {})
        self.qparams = qparams if qparams is not None else next(iter(self.ranges.values()), None)
        self.clipped = {k: [0, 0] for k in self.ranges}  # name -> [below, above]
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.sum = 0.0
        self.sumsq = 0.0
        self.negative = 0
        self.hist: np.ndarray | None = None
        self.lo = 0.0  # histogram range [lo, lo + bins * width)
        self.width = 0.0
        self.ch_min: np.ndarray | None = None
        self.ch_max: np.ndarray | None = None
        self.hist_stride = 1  # > 1: the histogram (and so the percentiles) came from a 1-in-k subsample

    # ------------------------------------------------------------------ accumulation
    def _init_hist(self, mn: float, mx: float) -> None:
        if self.qparams is not None and self.qparams.hi > self.qparams.lo:
            # the codes' rounding intervals, [lo - step/2, hi + step/2]: with 2048 bins and 256 codes, each code
            # owns 8 whole bins and the clipping thresholds are bin edges
            s = self.qparams.scale
            lo, hi = self.qparams.lo - 0.5 * s, self.qparams.hi + 0.5 * s
            width = (hi - lo) / self.bins
        else:
            lo, hi = mn, mx
            width = (hi - lo) / self.bins if hi > lo else max(abs(lo), 1.0) * 2.0 ** -20
        self.lo, self.width = float(lo), float(width)
        self.hist = np.zeros(self.bins, np.int64)

    def _grow(self, mn: float, mx: float) -> None:
        """Double the bin width (merging pairs of bins) until [mn, mx] fits; edges stay aligned."""
        while mn < self.lo or mx >= self.lo + self.bins * self.width:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            half = self.bins // 2
            if mn < self.lo:  # extend downwards: the old bins become the upper half
                self.hist = np.concatenate([np.zeros(half, np.int64), merged])
                self.lo -= self.bins * self.width
            else:  # extend upwards: the old bins become the lower half
                self.hist = np.concatenate([merged, np.zeros(half, np.int64)])
            self.width *= 2.0

    def update(self, x: np.ndarray) -> None:
        """Add one batch. About ten passes over the data: per-channel min/max (the global ones follow), sum, sum
        of squares, the negative count, the histogram (index + bincount); clip counts only when the batch
        reaches past the calibrated range."""
        x = np.asarray(x, np.float32)
        if x.size == 0:
            return
        if x.ndim == 4 and x.shape[1] > 1:  # NCHW: channels as contiguous rows
            rows = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) if x.shape[0] > 1 else x.reshape(x.shape[1], -1)
            cmin, cmax = rows.min(axis=1), rows.max(axis=1)
            self.ch_min = cmin if self.ch_min is None else np.minimum(self.ch_min, cmin)
            self.ch_max = cmax if self.ch_max is None else np.maximum(self.ch_max, cmax)
            mn, mx = float(cmin.min()), float(cmax.max())
        else:
            mn, mx = float(x.min()), float(x.max())
        if not (math.isfinite(mn) and math.isfinite(mx)):
            raise ValueError("non-finite activation values")
        flat = x.reshape(-1)
        if self.hist is None:
            self._init_hist(mn, mx)
        self._grow(mn, mx)
        self.count += flat.size
        self.min, self.max = min(self.min, mn), max(self.max, mx)
        self.sum += float(np.add.reduce(flat, dtype=np.float32))
        self.sumsq += float(np.dot(flat, flat))
        if mn < 0 and mx < 0:
            self.negative += flat.size
        for name, q in self.ranges.items():
            # a value is clipped when it rounds outside the integer range: beyond half a step past either end
            half = 0.5 * q.scale
            if mn < q.lo - half:
                self.clipped[name][0] += int(np.count_nonzero(flat < np.float32(q.lo - half)))
            if mx > q.hi + half:
                self.clipped[name][1] += int(np.count_nonzero(flat > np.float32(q.hi + half)))
        if mn < 0 <= mx:
            self.negative += int(np.count_nonzero(flat < 0))
        # the histogram takes every element of a tensor of up to HIST_SAMPLES, else a fixed 1-in-k stride
        stride = -(-flat.size // HIST_SAMPLES)
        sample = flat[::stride] if stride > 1 else flat
        self.hist_stride = max(self.hist_stride, stride)
        lo, inv = np.float32(self.lo), np.float32(1.0 / self.width)
        counts = np.zeros(self.bins + 1, np.int64)
        for start in range(0, sample.size, CHUNK):  # cache-sized pieces, into scratch buffers: no big temporaries
            part = sample[start:start + CHUNK]
            n = part.size
            f, i = _SCRATCH_F[:n], _SCRATCH_I[:n]
            np.subtract(part, lo, out=f)
            np.multiply(f, inv, out=f)
            np.copyto(i, f, casting="unsafe")  # truncation: f >= 0 once the range covers the data
            np.minimum(i, self.bins, out=i)  # float32 rounding at the top edge lands in the overflow slot
            counts += np.bincount(i, minlength=self.bins + 1)
        counts[self.bins - 1] += counts[self.bins]
        self.hist += counts[: self.bins]

    # ------------------------------------------------------------------ results
    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        return math.sqrt(max(self.sumsq / self.count - self.mean ** 2, 0.0))

    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1, dtype=np.float64)

    def percentile(self, p: float) -> float:
        """The p-th percentile (0..100), interpolated linearly inside its bin and clamped to [min, max]."""
        if not self.count:
            return math.nan
        cum = np.cumsum(self.hist)
        target = p / 100.0 * cum[-1]
        k = int(np.searchsorted(cum, target, side="left"))
        k = min(k, self.bins - 1)
        below = cum[k - 1] if k > 0 else 0
        inside = self.hist[k]
        frac = (target - below) / inside if inside else 0.0
        v = self.lo + self.width * (k + frac)
        return float(min(max(v, self.min), self.max))

    def channel_spread(self) -> dict:
        """Per-channel ranges: how unequal the channels of one tensor are (what per-tensor scales suffer from)."""
        if self.ch_min is None:
            return {}
        r = (self.ch_max - self.ch_min).astype(np.float64)
        med = float(np.median(r))
        return {"channels": int(r.size), "channel_range_min": float(r.min()), "channel_range_median": med,
                "channel_range_max": float(r.max()),
                "channel_range_spread": float(r.max() / med) if med > 0 else math.inf}

    def summary(self, range_name: str | None = None) -> dict:
        """Statistics as a flat dict; clipping against `range_name` (default: the first range)."""
        d = {"count": self.count, "min": self.min, "max": self.max, "mean": self.mean, "std": self.std}
        for p in PERCENTILES:
            d[f"p{p:g}"] = self.percentile(p)
        d["hist_stride"] = self.hist_stride
        d["negative_fraction"] = self.negative / self.count if self.count else 0.0
        d["neg_to_pos_ratio"] = abs(self.min) / self.max if self.max > 0 and self.min < 0 else 0.0
        name = range_name if range_name is not None else next(iter(self.ranges), None)
        if name in self.clipped:
            low, high = self.clipped[name]
            d["clip_fraction"] = (low + high) / self.count if self.count else 0.0
            d["clip_low"], d["clip_high"] = low, high
        d.update(self.channel_spread())
        return d
