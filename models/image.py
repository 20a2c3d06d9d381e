"""Image helpers every family shares: alpha, channels, padding, resizing, crop/paste, value ranges.

Images here are [B,C,H,W] float tensors, colour values in [0,1] unless a range is named.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError

MAX_SIDE = 16384  # the largest image side any node makes or takes (ComfyUI's MAX_RESOLUTION)


def split_alpha(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B,4,H,W] -> ([B,3,H,W], [B,1,H,W]); [B,2,H,W] (grey+alpha) -> ([B,1,H,W], [B,1,H,W]); else (x, None)."""
    if x.shape[1] in (2, 4):
        return x[:, :-1], x[:, -1:]
    return x, None


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey <-> RGB conversion so an image fits a model's channel count (luma for RGB -> grey)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise InputError(f"image: expected 1 or 3 channels for a {channels}-channel model, got {c}")


def pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:  # [B,C,h,w] -> [B,C,height,width]
    """Pad at the bottom and right: by reflection where the image is large enough, else by replication."""
    ph, pw = height - x.shape[-2], width - x.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"pad_to: {height}x{width} is smaller than the image {x.shape[-2]}x{x.shape[-1]}")
    if not (ph or pw):
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def pad_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (bottom, right) so both sides are multiples of `multiple` (see pad_to)."""
    m = max(1, int(multiple))
    return pad_to(x, x.shape[-2] + (-x.shape[-2]) % m, x.shape[-1] + (-x.shape[-1]) % m)


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:  # [B,C,h,w] -> [B,C,height,width]
    """High-quality resize: bicubic with antialiasing when shrinking, clamped to 0..1."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    y = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return y.clamp_(0, 1)


def crop(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The region box = (top, left, height, width) of [B,C,H,W] (a view)."""
    t, l, h, w = box
    return x[..., t : t + h, l : l + w]


def paste(dst: torch.Tensor, src: torch.Tensor, box: tuple[int, int, int, int],
          weight: torch.Tensor | None = None) -> torch.Tensor:
    """Write src [B,C,h,w] into dst at box (in place); with `weight` [B|1,1,h,w] in 0..1, blend src over dst."""
    region = crop(dst, box)
    if weight is None:
        region.copy_(src)
    else:
        region.lerp_(src.to(region), weight.to(region))
    return dst


def to_range(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """[0,1] values -> value_range (e.g. (-1, 1) for most generators and diffusion models)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    return x * (hi - lo) + lo


def to_unit(x: torch.Tensor, value_range: tuple[float, float], inplace: bool = False) -> torch.Tensor:
    """Values in value_range -> [0,1], clamped (`inplace`: reuse x when it is float32 already)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    y = x if inplace and x.dtype == torch.float32 else x.float().clone()
    return y.sub_(lo).mul_(1.0 / (hi - lo)).clamp_(0, 1)
