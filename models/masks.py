"""Mask helpers every family shares: pure tensor functions on masks `[B,H,W]` (a `[H,W]` mask is taken as a batch
of one), values in 0..1 (1 = the pixels to change, ComfyUI's MASK convention). They run on any device.

    grow(mask, 8)  shrink(mask, 8)        grey dilation / erosion by a disk of radius r (x^2 + y^2 <= r^2)
    blur(mask, sigma)                     Gaussian blur (truncated at 4 sigma, mirrored edges)
    feather(mask, pixels)                 soft edge `pixels` wide, centred on the mask's edge
    distance_inside(mask, limit)          exact Euclidean distance of each masked pixel to the nearest unmasked one
    edge_blend(mask, pixels)              weights 0 at the mask edge rising to 1 `pixels` inside it (0 outside)
    fill_holes(mask)                      unmasked regions enclosed by the mask become masked
    threshold(mask, t)  stabilise(mask, eps)  invert(mask)  from_alpha(alpha)  bbox(mask, pad)  bbox_mask(mask, pad)

The border of the image is not an edge: pixels beyond it count as "like the nearest pixel inside" (dilation and
erosion ignore them, distances do not run out through them). Independent references in tests/models/test_masks.py:
scipy.ndimage (grey_dilation/grey_erosion with a disk footprint, gaussian_filter, distance_transform_edt,
binary_fill_holes) and OpenCV.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError

MAX_RADIUS = 4096


def as_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:  # -> [B,H,W] float
    """Check and normalise a mask: [H,W], [B,H,W] or [B,1,H,W] -> [B,H,W] float, finite."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{name}: expected a MASK tensor [B,H,W], got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3 or 0 in mask.shape:
        raise InputError(f"{name}: expected a MASK [B,H,W] with a non-empty batch, got shape {tuple(mask.shape)}")
    if not mask.is_floating_point():
        mask = mask.float()
    if not torch.isfinite(mask).all():
        raise InputError(f"{name}: the mask has NaN or Inf values")
    return mask


def _radius(pixels: float, name: str) -> int:
    r = int(round(float(pixels)))
    if abs(r) > MAX_RADIUS:
        raise InputError(f"{name}: expected at most {MAX_RADIUS} pixels, got {pixels}")
    return r


def _disk_rows(r: int) -> list[tuple[int, int]]:
    """(dy, half width) of the rows of the disk x^2 + y^2 <= r^2 (skimage.morphology.disk's definition)."""
    return [(dy, math.isqrt(r * r - dy * dy)) for dy in range(-r, r + 1)]


class _RowMax:
    """Horizontal running maxima of any half width <= r from a sparse table (van Herk-style O(log r) levels, two
    lookups per width): max over x-half..x+half, pixels beyond the border ignored."""

    def __init__(self, m: torch.Tensor, r: int) -> None:  # m [B,H,W]
        self.r, self.W = r, m.shape[-1]
        level = F.pad(m, (r, r), value=-math.inf)  # [B,H,W+2r]
        self.levels = {1: level}
        k = 1
        while 2 * k <= 2 * r + 1:
            level = torch.maximum(level[..., :-k], level[..., k:])  # max over [j, j + 2k)
            k *= 2
            self.levels[k] = level

    def __call__(self, half: int) -> torch.Tensor:  # [B,H,W]
        w = 2 * half + 1
        k = 1 << (w.bit_length() - 1)
        t = self.levels[k]
        a = self.r - half  # window start of pixel 0, in padded coordinates
        b = a + w - k  # start of the second (overlapping) block
        return torch.maximum(t[..., a : a + self.W], t[..., b : b + self.W])


def grow(mask: torch.Tensor, pixels: float) -> torch.Tensor:  # [B,H,W] -> [B,H,W]
    """Grey dilation by a disk of radius `pixels` (negative: erosion, see `shrink`)."""
    m = as_mask(mask)
    r = _radius(pixels, "grow")
    if r < 0:
        return shrink(m, -r)
    if r == 0:
        return m.clone()
    H = m.shape[1]
    table = _RowMax(m, r)
    rows: dict[int, torch.Tensor] = {}
    out = torch.full_like(m, -math.inf)
    for dy, half in _disk_rows(r):
        if half not in rows:
            rows[half] = table(half)
        h = rows[half]
        # out[y] = max(out[y], h[y + dy]) for rows inside the image
        if dy >= 0:
            if dy < H:
                out[:, : H - dy] = torch.maximum(out[:, : H - dy], h[:, dy:])
        elif -dy < H:
            out[:, -dy:] = torch.maximum(out[:, -dy:], h[:, : H + dy])
    return out


def shrink(mask: torch.Tensor, pixels: float) -> torch.Tensor:  # [B,H,W] -> [B,H,W]
    """Grey erosion by a disk of radius `pixels` (the dual of `grow`: 1 - grow(1 - mask))."""
    m = as_mask(mask)
    r = _radius(pixels, "shrink")
    if r < 0:
        return grow(m, -r)
    return 1 - grow(1 - m, r)


def blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:  # [B,H,W] -> [B,H,W]
    """Separable Gaussian blur, kernel truncated at 4 sigma (scipy's default), edges mirrored (scipy 'mirror')."""
    m = as_mask(mask)
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise InputError(f"blur: expected a sigma >= 0, got {sigma}")
    if sigma == 0:
        return m.clone()
    rad = int(4.0 * sigma + 0.5)
    t = torch.arange(-rad, rad + 1, device=m.device, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(m.dtype)
    x = m.unsqueeze(1)  # [B,1,H,W]
    for dim in (-1, -2):
        size = x.shape[dim]
        if size > rad:
            x = F.pad(x, (rad, rad, 0, 0) if dim == -1 else (0, 0, rad, rad), mode="reflect")
        elif size > 1:  # a side shorter than the kernel: mirror repeatedly
            x = _mirror_long(x, dim, rad)
        else:
            x = _replicate(x, dim, rad)
        kk = k.view(1, 1, 1, -1) if dim == -1 else k.view(1, 1, -1, 1)
        x = F.conv2d(x, kk)
    return x[:, 0]


def _replicate(x: torch.Tensor, dim: int, rad: int) -> torch.Tensor:
    return F.pad(x, (rad, rad, 0, 0) if dim == -1 else (0, 0, rad, rad), mode="replicate")


def _mirror_long(x: torch.Tensor, dim: int, rad: int) -> torch.Tensor:
    """Whole-sample mirror padding by `rad` on both sides along `dim`, for sides shorter than `rad`."""
    size = x.shape[dim]
    period = 2 * size - 2
    idx = torch.arange(-rad, size + rad, device=x.device) % period
    idx = torch.where(idx >= size, period - idx, idx)
    return x.index_select(dim % 4, idx)


def feather(mask: torch.Tensor, pixels: float) -> torch.Tensor:  # [B,H,W] -> [B,H,W]
    """A soft edge about `pixels` wide centred on the mask's edge: a Gaussian blur with sigma = pixels / 4
    (the 10-90 % rise of a blurred step spans 2.56 sigma; +-2 sigma covers 95 %)."""
    p = float(pixels)
    if not math.isfinite(p) or p < 0:
        raise InputError(f"feather: expected pixels >= 0, got {pixels}")
    return blur(mask, p / 4.0)


def distance_inside(mask: torch.Tensor, limit: int) -> torch.Tensor:  # [B,H,W] -> [B,H,W] float
    """Exact Euclidean distance from each pixel with mask > 0.5 to the nearest pixel with mask <= 0.5, capped at
    `limit` (0 outside the mask). Beyond the image border counts as masked (the border is not an edge).
    Two exact separable passes over a band of `limit` pixels (Meijster et al. 2000, brute-force within the band)."""
    m = as_mask(mask) > 0.5
    limit = max(1, _radius(limit, "distance limit"))
    B, H, W = m.shape
    cap = float(limit + 1)
    big = torch.full((B, H, W), cap, device=m.device)
    # vertical pass: distance along the column to the nearest outside pixel, capped
    g = torch.where(m, big, torch.zeros_like(big))
    for d in range(1, min(limit, H - 1) + 1):
        out_dn = ~m[:, d:]  # pixel y+d is outside
        g[:, :-d] = torch.where(out_dn, torch.minimum(g[:, :-d], torch.full_like(g[:, :-d], d)), g[:, :-d])
        out_up = ~m[:, :-d]
        g[:, d:] = torch.where(out_up, torch.minimum(g[:, d:], torch.full_like(g[:, d:], d)), g[:, d:])
    # horizontal pass: D(x) = min over |dx| <= limit of sqrt(g(x + dx)^2 + dx^2)
    g2 = g * g
    best = g2.clone()
    for d in range(1, min(limit, W - 1) + 1):
        best[..., :-d] = torch.minimum(best[..., :-d], g2[..., d:] + d * d)
        best[..., d:] = torch.minimum(best[..., d:], g2[..., :-d] + d * d)
    return best.sqrt().clamp_(max=float(limit)) * m


def edge_blend(mask: torch.Tensor, pixels: int) -> torch.Tensor:  # [B,H,W] -> [B,H,W]
    """Blend weights for pasting a fill back: the mask's value, times a linear ramp from 0 at the mask's edge to 1
    at `pixels` inside it (distance / pixels). Exactly 0 wherever the mask is 0, so what is pasted never reaches
    unmasked pixels; 0 pixels: the mask itself."""
    m = as_mask(mask)
    n = _radius(pixels, "blend")
    if n <= 0:
        return m.clone()
    ramp = (distance_inside(m, n) / n).clamp_(0, 1)
    return torch.where(m > 0, m * ramp, torch.zeros_like(m))


def fill_holes(mask: torch.Tensor) -> torch.Tensor:  # [B,H,W] -> [B,H,W]
    """Unmasked regions (mask <= 0.5) not connected to the image border (4-connectivity) become 1; other values
    are kept. Row and column sweeps spread 'reaches the border' through whole runs at once until nothing changes."""
    m = as_mask(mask)
    bg = m <= 0.5  # [B,H,W]
    reach = torch.zeros_like(bg)
    reach[:, 0], reach[:, -1], reach[:, :, 0], reach[:, :, -1] = bg[:, 0], bg[:, -1], bg[:, :, 0], bg[:, :, -1]
    while True:
        before = int(reach.sum())
        reach = _sweep(reach, bg, dim=2)
        reach = _sweep(reach, bg, dim=1)
        if int(reach.sum()) == before:
            break
    return torch.where(bg & ~reach, torch.ones_like(m), m)


def _sweep(reach: torch.Tensor, bg: torch.Tensor, dim: int) -> torch.Tensor:
    """Within each run of background pixels along `dim`, any reached pixel reaches the whole run."""
    r = reach.transpose(dim, 2).contiguous() if dim != 2 else reach
    b = bg.transpose(dim, 2).contiguous() if dim != 2 else bg
    B, H, W = b.shape
    run = torch.cumsum((~b).long(), dim=2)  # run id per row: walls separate runs
    key = (torch.arange(B * H, device=b.device).view(B, H, 1) * (W + 1) + run).view(-1)
    hit = torch.zeros(B * H * (W + 1), dtype=torch.long, device=b.device)
    hit.scatter_reduce_(0, key, (r & b).long().reshape(-1), reduce="amax")
    out = (hit[key].view(B, H, W) > 0) & b
    return out.transpose(dim, 2) if dim != 2 else out


def threshold(mask: torch.Tensor, t: float = 0.5) -> torch.Tensor:  # [B,H,W] -> [B,H,W] in {0,1}
    """1 where mask > t, else 0."""
    m = as_mask(mask)
    return (m > float(t)).to(m.dtype)


def stabilise(mask: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:  # [B,H,W] -> [B,H,W]
    """Values within `eps` of 0 or 1 snapped to exactly 0 or 1 (a 0.9999 that looks opaque becomes 1); others kept,
    then clamped to 0..1."""
    m = as_mask(mask)
    eps = float(eps)
    if not 0 <= eps < 0.5:
        raise InputError(f"eps: expected 0 <= eps < 0.5, got {eps}")
    out = m.clamp(0, 1)
    out = torch.where(out <= eps, torch.zeros_like(out), out)
    return torch.where(out >= 1 - eps, torch.ones_like(out), out)


def invert(mask: torch.Tensor) -> torch.Tensor:  # [B,H,W] -> [B,H,W]
    return 1 - as_mask(mask)


def from_alpha(alpha: torch.Tensor) -> torch.Tensor:  # [B,H,W] alpha -> [B,H,W] mask
    """ComfyUI's convention (LoadImage): the mask is 1 - alpha, so transparent pixels are the ones to fill."""
    return 1 - as_mask(alpha, "alpha").clamp(0, 1)


def bbox(mask: torch.Tensor, pad: int = 0) -> list[tuple[int, int, int, int] | None]:
    """Per item, the box (y0, y1, x0, x1) (end exclusive) around mask > 0, grown by `pad` and clipped to the
    image; None for an empty mask."""
    m = as_mask(mask)
    out: list[tuple[int, int, int, int] | None] = []
    H, W = m.shape[1:]
    for item in m:
        rows = torch.nonzero(item.amax(dim=1) > 0).flatten()
        cols = torch.nonzero(item.amax(dim=0) > 0).flatten()
        if rows.numel() == 0:
            out.append(None)
            continue
        y0, y1 = int(rows[0]) - pad, int(rows[-1]) + 1 + pad
        x0, x1 = int(cols[0]) - pad, int(cols[-1]) + 1 + pad
        out.append((max(0, y0), min(H, y1), max(0, x0), min(W, x1)))
    return out


def bbox_mask(mask: torch.Tensor, pad: int = 0) -> torch.Tensor:  # [B,H,W] -> [B,H,W] in {0,1}
    """The bounding box of each mask (grown by `pad`) as a mask; an empty mask stays empty."""
    m = as_mask(mask)
    out = torch.zeros_like(m)
    for i, box in enumerate(bbox(m, pad)):
        if box is not None:
            y0, y1, x0, x1 = box
            out[i, y0:y1, x0:x1] = 1
    return out
