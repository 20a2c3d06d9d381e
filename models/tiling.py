"""The one tiling engine: overlapping tiles, several per call, smooth blending, out-of-memory back-off.

Each tile is cut with `context` extra input pixels on every interior side and contributes only pixels at least
`context` away from its interior edges; neighbours cross-fade with a raised cosine over `blend` pixels. With `context`
at least the model's receptive field, every contributing pixel is exactly what the untiled call computes, so tiled
output equals untiled output up to float rounding, while the cross-fade hides what remains for models that see
further (attention, normalisation over the whole image).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from . import host
from .budget import fit_side
from .errors import InputError, TilingError
from .image import pad_to
from .progress import Progress

log = logging.getLogger(__name__)

TileFn = Callable[[torch.Tensor], torch.Tensor]


def tiled_apply(
    fn: TileFn,
    x: torch.Tensor,  # [B,C,H,W]
    *,
    scale: float = 1,
    out_channels: int | None = None,
    tile: int | tuple[int, int] | None = None,
    context: int = 16,
    blend: int = 16,
    align: int = 1,
    bytes_per_pixel: float | None = None,
    budget_bytes: int | None = None,
    max_batch: int = 8,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: str | None = "tiles",
    max_retries: int = 4,
) -> torch.Tensor:  # [B,C',H*scale,W*scale] float32 on x.device
    """Apply `fn` ([N,C,h,w] -> [N,C',h*scale,w*scale]) to `x` tile by tile. See the module docstring. `tile`: a
    side, or (height, width) for rectangular tiles (`plan_tiles`)."""
    if x.ndim != 4:
        raise InputError(f"tiled_apply: expected a [B,C,H,W] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("tiled_apply: the batch is empty")
    align = max(1, int(align))
    if abs(align * scale - round(align * scale)) > 1e-6:
        raise InputError(f"tiled_apply: align={align} times scale={scale} must be a whole number of output pixels")
    device = device or x.device
    dtype = dtype or torch.float32
    H, W = x.shape[-2:]
    if tile is None:
        tile = fit_side(H, W, bytes_per_pixel, budget_bytes, align, dtype)
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    batch = max(1, max_batch)
    attempts: list[str] = []
    for _ in range(max_retries + 1):
        th, tw = _fit_tile(th, context, blend, align), _fit_tile(tw, context, blend, align)
        attempts.append(f"{th}px" if th == tw else f"{th}x{tw}px")
        try:
            return _tiled(fn, x, scale, out_channels, (th, tw), context, blend, align, batch, device, dtype, progress)
        except Exception as e:  # noqa: BLE001 (only out-of-memory is retried)
            if not host.is_oom(e):
                raise
            log.warning("out of memory with %s tiles (batch %d); retrying smaller", attempts[-1], batch)
            host.empty_cache()
            if batch > 1:
                batch = 1
            else:
                th, tw = th // 2, tw // 2
    raise TilingError(
        f"out of memory at every tile size tried ({', '.join(attempts)}); "
        f"last tile {attempts[-1]} with context {context}px. Free memory or lower the tile size by hand."
    )


def _fit_tile(tile: int, context: int, blend: int, align: int) -> int:
    """A tile must hold its context on both sides plus something to contribute."""
    smallest = 2 * (2 * context + blend) + align
    return max(int(tile) // align * align, math.ceil(smallest / align) * align)


def _tiled(fn, x, scale, out_channels, tile, context, blend, align, batch, device, dtype, progress):
    B, _, H, W = x.shape
    pad_h, pad_w = (-H) % align, (-W) % align
    if pad_h or pad_w:
        x = pad_to(x, H + pad_h, W + pad_w)
    Hp, Wp = x.shape[-2:]
    ys, th = _starts(Hp, tile[0], 2 * context + blend, align)
    xs, tw = _starts(Wp, tile[1], 2 * context + blend, align)
    oh, ow = round(Hp * scale), round(Wp * scale)
    wy = _axis_weights(ys, th, Hp, context, scale, oh)  # [n_y, oh] per tile along y
    wx = _axis_weights(xs, tw, Wp, context, scale, ow)
    jobs = [(b, i, j) for b in range(B) for i in range(len(ys)) for j in range(len(xs))]
    single = len(ys) == 1 and len(xs) == 1
    out = None
    calls = math.ceil(len(jobs) / batch)
    with Progress(calls, progress or "", enabled=progress is not None and calls > 1) as bar:
        for k in range(0, len(jobs), batch):
            group = jobs[k : k + batch]
            inp = torch.cat([x[b : b + 1, :, ys[i] : ys[i] + th, xs[j] : xs[j] + tw] for b, i, j in group])
            res = fn(inp.to(device=device, dtype=dtype))
            expect = (len(group), round(th * scale), round(tw * scale))
            if (res.shape[0], res.shape[2], res.shape[3]) != expect:
                raise InputError(f"tiled_apply: tile function returned {tuple(res.shape)}, expected [N,C,H,W] = {expect}")
            res = res.to(device=x.device, dtype=torch.float32)
            if single:
                out = res if out is None else torch.cat([out, res])
            else:
                if out is None:  # channels last: the [B,H,W,C] IMAGE a node hands back is then a view, not a copy
                    out = torch.zeros(B, oh, ow, out_channels or res.shape[1], dtype=torch.float32,
                                      device=x.device).permute(0, 3, 1, 2)
                _accumulate(out, res, group, ys, xs, wy, wx, scale)
            del res, inp
            bar.update()
    if not single:
        out /= (wy.sum(0)[:, None] * wx.sum(0)[None, :]).to(out.device)
    return out[..., : round(H * scale), : round(W * scale)]


def _accumulate(out, res, group, ys, xs, wy, wx, scale):
    sh, sw = res.shape[-2:]
    for n, (b, i, j) in enumerate(group):
        y0, x0 = round(ys[i] * scale), round(xs[j] * scale)
        w = wy[i, y0 : y0 + sh, None] * wx[j, None, x0 : x0 + sw]  # [sh,sw]
        out[b, :, y0 : y0 + sh, x0 : x0 + sw].addcmul_(res[n], w.to(res.device))


def _starts(length: int, tile: int, overlap: int, align: int) -> tuple[list[int], int]:
    """Evenly spread tile starts (multiples of align) covering [0,length) with at least `overlap` between tiles."""
    if length <= tile:
        return [0], length
    n = _tile_count(length, tile, overlap)
    span = length - tile
    starts = sorted({min(span, round(i * span / (n - 1) / align) * align) for i in range(n)})
    if starts[-1] != span:  # span is a multiple of align because length and tile are
        starts.append(span)
    return starts, tile


def _tile_count(length: int, side: int, overlap: int) -> int:
    """How many tiles of `side` overlapping by `overlap` cover `length`."""
    return 1 if length <= side else math.ceil((length - overlap) / (side - overlap))


def _axis_weights(starts: list[int], size: int, length: int, context: int, scale: float, out_len: int) -> torch.Tensor:
    """Per-tile weights along one axis in output pixels: zero within `context` of interior edges, cosine cross-fade."""
    w = torch.zeros(len(starts), out_len, dtype=torch.float64)
    pos = (torch.arange(out_len, dtype=torch.float64) + 0.5) / scale  # output pixel centres in input coordinates
    for i, s in enumerate(starts):
        e = s + size
        wi = ((pos >= s) & (pos < e)).double()
        if i > 0:  # fade in over the band inside the overlap with the previous tile
            wi = wi * _ramp(pos, s + context, starts[i - 1] + size - context)
        if i < len(starts) - 1:
            wi = wi * (1 - _ramp(pos, starts[i + 1] + context, e - context))
        w[i] = wi
    return w.float()


def _ramp(pos: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """0 before a, raised cosine from a to b, 1 after b (a hard step at the middle when the band is empty)."""
    if b <= a:
        return (pos >= (a + b) / 2).double()
    t = ((pos - a) / (b - a)).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


# ---------------------------------------------------------------- tile geometry and receptive fields


def even_tile(lengths: tuple[int, ...], max_tile: int, overlap: int, align: int = 1) -> int:
    """The smallest tile side (a multiple of align) that covers each length with as few tiles as `max_tile` allows
    (three tiles of 43 overlapping by 22 cost less than two of 60 that overlap by 56); an axis that fits is one tile."""
    side = max(align, max_tile // align * align)
    if side >= max(lengths) or side <= overlap:
        return side if side < max(lengths) else max(lengths)
    best = 0
    for L in lengths:
        if L <= side:
            best = max(best, L)
            continue
        n = _tile_count(L, side, overlap)
        t = math.ceil((L + (n - 1) * overlap) / n)
        best = max(best, min(side, math.ceil(t / align) * align))
    return best


def plan_tiles(H: int, W: int, max_pixels: float, overlap: int, align: int = 1,
               width_cost: Callable[[int], float] = lambda w: 1.0) -> tuple[int, int]:
    """Rectangular tiles (height, width), multiples of align, of at most `max_pixels` each, covering H x W with
    `overlap` between neighbours at the least cost: the pixels all tiles compute, each weighted by `width_cost(tile
    width)` (e.g. a convolution library that runs rows of some widths faster). Every column count is tried, each with
    its even width and the widths up to 64 px wider that `width_cost` prefers; rows then take what the width leaves."""
    def even(length: int, n: int) -> int:  # the side n tiles need to cover length
        return length if n == 1 else min(length, math.ceil((length + (n - 1) * overlap) / n / align) * align)

    smallest = 2 * overlap + align
    best: tuple[float, int, int] | None = None
    for nx in range(1, max(1, W // max(1, overlap)) + 2):
        base = even(W, nx)
        if nx > 1 and base < smallest:
            break
        widths = {base} | {w for w in range(base, min(W, base + 64) + 1, align) if width_cost(w) < width_cost(base)}
        for tw in sorted(widths):
            rows = int(max_pixels // tw) // align * align
            if rows >= H:
                th = H
            elif rows < smallest:
                continue
            else:
                th = even(H, _tile_count(H, rows, overlap))
            cost = _tile_count(H, th, overlap) * _tile_count(W, tw, overlap) * th * tw * width_cost(tw)
            if best is None or cost < best[0]:
                best = (cost, th, tw)
    if best is None:  # nothing fits max_pixels: square tiles of the smallest workable side
        return smallest, smallest
    return best[1], best[2]


def conv_receptive_radius(seq: torch.nn.Module) -> float:
    """How far (in input pixels) an output pixel of a stack of convolutions and upsamplings sees, each side: the
    exact bound for plain stacks (sum of kernel radii, scaled by the strides and upsamplings before them)."""
    radius, step = 0.0, 1.0
    for m in seq.modules():
        if isinstance(m, torch.nn.Conv2d):
            radius += (m.kernel_size[0] - 1) / 2 * m.dilation[0] * step
            step *= m.stride[0]
        elif isinstance(m, torch.nn.Upsample):
            step /= float(m.scale_factor)
    return radius


def measure_receptive_field(
    call: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,  # [1,C,H,W] a real image (W >= 2 * max_context)
    scale: int,
    *,
    tol: float = 1 / 255,
    step: int = 1,
    max_context: int | None = None,
    band: int = 16,
) -> int | None:
    """The smallest context c (multiple of `step`) at which cutting the image c pixels beyond a vertical seam no
    longer changes the output within `band` input pixels of the seam by more than `tol` (from both sides, two
    consecutive steps). None when no context up to `max_context` achieves it (a "global" model)."""
    W = image.shape[-1]
    m = (W // 2) // step * step
    max_context = min(max_context or m, m - step, W - m - step)
    with torch.inference_mode():
        full = call(image)
        ok_run = 0
        c = 0
        while c <= max_context:
            left = call(image[..., : m + c])[..., : m * scale]
            right = call(image[..., m - c :])[..., c * scale :]
            err_l = (left - full[..., : m * scale])[..., (m - band) * scale :].abs().max().item()
            err_r = (right - full[..., m * scale :])[..., : band * scale].abs().max().item()
            ok_run = ok_run + 1 if max(err_l, err_r) <= tol else 0
            if ok_run == 2:
                return c - step
            c += step
    return None
