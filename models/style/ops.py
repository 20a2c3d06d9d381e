"""Pieces the style networks share: reflect-padded convolutions, AdaIN and instance-norm statistics, and the
whole-image statistics that make tiles seamless.

These networks normalise with statistics of the whole image (AdaIN's mean/std, instance norm). Computed per tile
they differ from tile to tile and show as seams; here every statistic is computed once over the whole image and then
held fixed while tiles run. Two ways, as the network allows:
- held maps: where a statistic sits at low resolution (1/4 or 1/8), the whole map there is kept in memory (a few
  bytes per image pixel) and its statistics taken directly (`mean_std`);
- streaming: where it sits at full resolution, a first pass runs tiles up to that layer and accumulates exact sums
  over each tile's own (non-overlapping) part (`tiled_mean_std`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import Progress
from ..budget import fit_side
from ..tiling import even_tile

EPS = 1e-5  # AdaIN and instance norm, inside the square root


class ConvLayer(nn.Module):
    """ReflectionPad2d(k//2) then Conv2d (the layout of MicroAST's and Johnson's ConvLayer); groups from the weight."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, *, attr: str = "conv_layer"):
        super().__init__()
        self.attr = attr
        self.pad = kernel // 2
        self.add_module(attr, nn.Conv2d(cin, cout, kernel, stride, groups=groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return getattr(self, self.attr)(x)


@dataclass
class Stats:
    """Per-sample, per-channel mean and std of a feature map: [B,C,1,1] each."""

    mean: torch.Tensor
    std: torch.Tensor

    def to(self, x: torch.Tensor) -> "Stats":
        return Stats(self.mean.to(device=x.device, dtype=x.dtype), self.std.to(device=x.device, dtype=x.dtype))


def mean_std(x: torch.Tensor, *, unbiased: bool = True) -> Stats:  # x [B,C,H,W] -> [B,C,1,1] x2
    """calc_mean_std of the AdaIN papers: std = sqrt(var + eps), var unbiased (N-1) unless `unbiased=False` (instance
    norm). A map of one pixel has no unbiased variance: it counts as 0 (std sqrt(eps)) instead of NaN."""
    n = x.shape[-2] * x.shape[-1]
    correction = 1 if unbiased and n > 1 else 0
    var, mean = torch.var_mean(x.float(), dim=(-2, -1), keepdim=True, correction=correction)
    return Stats(mean.to(x.dtype), (var + EPS).sqrt().to(x.dtype))


def adain(x: torch.Tensor, content: Stats, style: Stats, alpha: float = 1.0) -> torch.Tensor:
    """(x - mean_c)/std_c * std_s + mean_s, blended with x by alpha (upstream's feature-space alpha); one pass over
    x: x * k + (mean_s - mean_c * k) with k = std_s / std_c, the alpha blend folded into k and the shift."""
    c, s = content.to(x), style.to(x)
    k = s.std / c.std  # [B,C,1,1]
    shift = s.mean - c.mean * k
    if alpha != 1.0:
        k, shift = alpha * k + (1.0 - alpha), alpha * shift
    return torch.addcmul(shift, x, k)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout: the CPU convolutions of these small networks run about 15 % faster in it (measured on MicroAST)."""
    return x.contiguous(memory_format=torch.channels_last)


def instance_norm(x: torch.Tensor, stats: Stats, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """InstanceNorm2d(affine=True) with given (whole-image) statistics."""
    s = stats.to(x)
    return (x - s.mean) / s.std * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------- streaming statistics


def tiled_mean_std(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,  # [1,C,H,W], sides multiples of `align`
    *,
    scale: float,
    context: int,
    align: int,
    tile: int,
    unbiased: bool,
    device: torch.device,
    dtype: torch.dtype,
    progress: str | None = None,
) -> Stats:
    """Exact statistics of `fn(x)` ([1,C',H*scale,W*scale]) computed tile by tile: each tile runs with `context`
    input pixels around it and adds only its own part of the output to float64 sums."""
    H, W = x.shape[-2:]
    tile = max(align, tile // align * align)
    ys, xs = range(0, H, tile), range(0, W, tile)
    s1 = s2 = None
    n = 0
    with Progress(len(ys) * len(xs), progress or "", enabled=progress is not None) as bar:
        for y in ys:
            for x0 in xs:
                y1, x1 = min(H, y + tile), min(W, x0 + tile)
                ty, tx = max(0, y - context) // align * align, max(0, x0 - context) // align * align
                by, bx = min(H, y1 + context), min(W, x1 + context)
                out = fn(x[..., ty:by, tx:bx].to(device=device, dtype=dtype))
                core = out[..., round((y - ty) * scale): round((y1 - ty) * scale),
                           round((x0 - tx) * scale): round((x1 - tx) * scale)].double()
                part1, part2 = core.sum((-2, -1)), core.square().sum((-2, -1))
                s1 = part1 if s1 is None else s1 + part1
                s2 = part2 if s2 is None else s2 + part2
                n += core.shape[-2] * core.shape[-1]
                del out, core
                bar.update()
    mean = s1 / n
    var = ((s2 - s1 * mean) / max(1, n - 1 if unbiased and n > 1 else n)).clamp_min(0)
    shape = (1, -1, 1, 1)
    return Stats(mean.view(shape).float().cpu(), (var + EPS).sqrt().view(shape).float().cpu())



def balanced_tile(H: int, W: int, bytes_per_pixel: float, budget: int, context: int, align: int = 1) -> int:
    """The tile side for `tiled_apply`: the whole image when it fits `budget`, else the smallest side that needs no
    more tiles than the largest fitting one (a tile just under the image size would otherwise double the work)."""
    side = fit_side(H, W, bytes_per_pixel, budget, align)
    if side >= max(H, W):
        return max(H, W)
    return even_tile((H, W), max(side, 2 * context + 4 * align), 2 * context, align)
