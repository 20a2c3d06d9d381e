"""The loss curve of a training run as an IMAGE, drawn with OpenCV (no plotting library).

Each loss is drawn twice: the raw value per step in a light tint and an exponentially smoothed curve (debiased, as
TensorBoard smooths) in bold, with a legend giving the last smoothed value. The y axis turns logarithmic when the
losses span more than `LOG_RATIO` (typical of a diffusion loss falling from ~1 to ~0.03); the x axis is the step.
"""
from __future__ import annotations

import math

import numpy as np
import torch

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))  # RGB, one per loss
LOG_RATIO = 20.0  # max/min above which the y axis is logarithmic
_FONT, _SCALE, _INK, _GRID = 0, 0.4, (40, 40, 40), (225, 225, 225)  # cv2.FONT_HERSHEY_SIMPLEX


def smooth(values: list[float], beta: float | None = None) -> np.ndarray:
    """Debiased exponential moving average; beta defaults to 1 - 10/len (at most 0.99)."""
    v = np.asarray(values, dtype=np.float64)
    if beta is None:
        beta = min(0.99, max(0.0, 1.0 - 10.0 / max(len(v), 1)))
    out, s = np.empty_like(v), 0.0
    for i, x in enumerate(v):
        s = beta * s + (1 - beta) * x
        out[i] = s / (1 - beta ** (i + 1)) if beta > 0 else x
    return out


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 x 10^k apart) covering lo..hi, about n of them."""
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_scale(values: np.ndarray) -> bool:
    """Whether the positive values span more than LOG_RATIO (then the y axis is logarithmic)."""
    return bool(values.size) and float(values.min()) > 0 and float(values.max()) / float(values.min()) > LOG_RATIO


def _log_ticks(lo: float, hi: float) -> list[float]:  # lo, hi: log10 of the range
    ticks = [float(e) for e in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    if len(ticks) < 3:  # a narrow range: 2 and 5 of every decade too
        ticks = sorted(t for e in range(math.floor(lo) - 1, math.ceil(hi) + 1)
                       for t in (e, e + math.log10(2), e + math.log10(5)) if lo - 1e-9 <= t <= hi + 1e-9)
    return ticks


def _label(v: float) -> str:
    return f"{v:.3g}"


def _text(img: np.ndarray, text: str, org: tuple[int, int], colour=_INK, anchor: str = "left") -> None:
    import cv2

    (w, h), _ = cv2.getTextSize(text, _FONT, _SCALE, 1)
    x, y = org
    x = x - w if anchor == "right" else x - w // 2 if anchor == "center" else x
    cv2.putText(img, text, (int(x), int(y + h // 2)), _FONT, _SCALE, colour, 1, cv2.LINE_AA)


def loss_curve(history: dict[str, list[float]], width: int = 640, height: int = 360) -> torch.Tensor:
    """[1,H,W,3] float IMAGE in 0..1 of the losses per step (`TrainResult.history`)."""
    import cv2

    width, height = max(160, int(width)), max(120, int(height))
    img = np.full((height, width, 3), 255, np.uint8)  # [H,W,3] RGB
    curves = {k: np.asarray(v, np.float64) for k, v in history.items() if len(v)}
    finite = np.concatenate([c[np.isfinite(c)] for c in curves.values()]) if curves else np.zeros(0)
    left, right, top, bottom = 64, 16, 16, 40
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area (y0 top)
    cv2.rectangle(img, (x0, y0), (x1, y1), _INK, 1)
    if not finite.size:
        _text(img, "no losses yet", ((x0 + x1) // 2, (y0 + y1) // 2), anchor="center")
        return torch.from_numpy(img.astype(np.float32) / 255.0)[None]
    use_log = log_scale(finite)
    fy = np.log10 if use_log else (lambda a: a)
    lo, hi = float(fy(finite).min()), float(fy(finite).max())
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-6)
    lo, hi = lo - pad, hi + pad
    steps = max(len(c) for c in curves.values())

    def px(i: np.ndarray) -> np.ndarray:  # step index (0-based) -> x pixel
        return x0 + i / max(steps - 1, 1) * (x1 - x0)

    def py(v: np.ndarray) -> np.ndarray:  # value (already on the axis scale) -> y pixel
        return y1 - (v - lo) / (hi - lo) * (y1 - y0)

    for t in (_log_ticks(lo, hi) if use_log else nice_ticks(lo, hi)):
        y = int(round(float(py(np.float64(t)))))
        cv2.line(img, (x0 + 1, y), (x1 - 1, y), _GRID, 1)
        _text(img, _label(10 ** t if use_log else t), (x0 - 6, y), anchor="right")
    for t in nice_ticks(1, max(steps, 2)):
        if t != int(t):
            continue
        x = int(round(float(px(np.float64(t - 1)))))
        cv2.line(img, (x, y1), (x, y1 + 4), _INK, 1)
        _text(img, str(int(t)), (x, y1 + 12), anchor="center")
    _text(img, "step" + (" (log-scale loss)" if use_log else ""), ((x0 + x1) // 2, height - 10), anchor="center")
    legend = []
    for n, (name, c) in enumerate(curves.items()):
        colour = COLOURS[n % len(COLOURS)]
        light = tuple(int(255 - (255 - ch) * 0.35) for ch in colour)
        ok = np.isfinite(c) & ((c > 0) if use_log else True)
        idx = np.nonzero(ok)[0]
        if not idx.size:
            continue
        sm = smooth(c[idx].tolist())
        for vals, col, thick in ((c[idx], light, 1), (sm, colour, 2)):
            pts = np.stack([px(idx.astype(np.float64)), py(fy(vals))], -1)
            pts = np.round(pts).astype(np.int32).reshape(-1, 1, 2)
            if len(pts) == 1:
                cv2.circle(img, tuple(int(a) for a in pts[0, 0]), thick + 1, col, -1, cv2.LINE_AA)
            else:
                cv2.polylines(img, [pts], False, col, thick, cv2.LINE_AA)
        legend.append((f"{name} {_label(float(sm[-1]))}", colour))
    if legend:
        cv2.rectangle(img, (x1 - 156, y0 + 3), (x1 - 4, y0 + 20 + 16 * (len(legend) - 1)), (255, 255, 255), -1)
    for n, (text, colour) in enumerate(legend):
        y = y0 + 12 + 16 * n
        cv2.line(img, (x1 - 150, y), (x1 - 130, y), colour, 2, cv2.LINE_AA)
        _text(img, text, (x1 - 124, y))
    return torch.from_numpy(img.astype(np.float32) / 255.0)[None]  # [1,H,W,3]
