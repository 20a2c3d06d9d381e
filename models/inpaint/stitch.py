"""Crop around the mask and stitch back, for any inpainter (ours, core's diffusion through VAE Encode ->
SetLatentNoiseMask -> KSampler, another pack's):

    crop = crop_for_inpaint(image, mask, context=1.5, padding=32, mode="size", size=512, multiple=8)
    ... inpaint crop.image with crop.mask at whatever size ...
    out = stitch(crop, result, blend=16)

One box for the whole batch: the union of the masks' boxes, scaled by `context` around its centre plus `padding`
pixels, shifted inside the image, then grown from real pixels to the `multiple`. The crop is resized (antialiased
bicubic; the mask bilinear) to `size` on its longest side (mode "size"), kept at native pixels ("native"), or scaled
so that its longest side is at least `size` ("min size"), each side a multiple of `multiple`.

`stitch` resizes the result back to the box and pastes it with weights `masks.edge_blend(mask, blend)`: the mask's
value times a ramp from 0 at the mask edge to 1 `blend` pixels inside it. Outside the mask the weight is exactly 0, so
unmasked pixels come back bit-exact whatever the inpainter did to them (a VAE round trip changes them all).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import masks as M
from ..errors import InputError

CROP_MODES = ("size", "native", "min size")


@dataclass
class CropInfo:
    """What stitch needs: the originals, the box, the crop's size before and after resizing."""

    original: torch.Tensor  # [B,C,H,W]
    mask: torch.Tensor  # [B,H,W] on the original
    box: tuple[int, int, int, int]  # y0, y1, x0, x1 (end exclusive)
    crop_size: tuple[int, int]  # (h, w) after resizing: what the inpainter got
    image: torch.Tensor  # [B,C,h,w] the crop, resized
    crop_mask: torch.Tensor  # [B,h,w]


def _round_to(v: float, m: int) -> int:
    return max(m, int(round(v / m)) * m)


def _place(c: float, size: int, limit: int) -> tuple[int, int]:
    """A span of `size` centred on c, shifted inside [0, limit)."""
    size = min(size, limit)
    a = int(math.floor(c - size / 2))
    a = min(max(0, a), limit - size)
    return a, a + size


def crop_box(mask: torch.Tensor, context: float, padding: int, multiple: int, H: int, W: int
             ) -> tuple[int, int, int, int]:
    """The crop box around the union of the masks (see the module docstring); the whole image for an empty mask."""
    union = (mask > 0).any(0)[None].float()
    box = M.bbox(union)[0]
    if box is None:
        return 0, H, 0, W
    y0, y1, x0, x1 = box
    h = (y1 - y0) * context + 2 * padding
    w = (x1 - x0) * context + 2 * padding
    h = min(H, math.ceil(h / multiple) * multiple) if H >= multiple else H
    w = min(W, math.ceil(w / multiple) * multiple) if W >= multiple else W
    by0, by1 = _place((y0 + y1) / 2, int(h), H)
    bx0, bx1 = _place((x0 + x1) / 2, int(w), W)
    return by0, by1, bx0, bx1


def crop_for_inpaint(
    image: torch.Tensor,  # [B,C,H,W]
    mask: torch.Tensor,  # [B|1,H,W]
    *,
    context: float = 1.5,
    padding: int = 32,
    mode: str = "size",
    size: int = 512,
    multiple: int = 8,
) -> CropInfo:
    """Cut the region around the mask and resize it for an inpainter; see the module docstring."""
    if image.ndim != 4 or 0 in image.shape:
        raise InputError(f"image: expected [B,C,H,W], got {tuple(image.shape)}")
    B, C, H, W = image.shape
    m = M.as_mask(mask).clamp(0, 1)
    if m.shape[0] not in (1, B) or tuple(m.shape[1:]) != (H, W):
        raise InputError(f"mask: expected {W}x{H} with a batch of 1 or {B}, got {m.shape[0]}x{m.shape[2]}x{m.shape[1]}"
                         " (batch x width x height)")
    if mode not in CROP_MODES:
        raise InputError(f"mode: expected one of {CROP_MODES}, got {mode!r}")
    if context < 1 or padding < 0 or multiple < 1 or size < multiple:
        raise InputError(f"context/padding/multiple/size: expected context >= 1, padding >= 0, multiple >= 1 and "
                         f"size >= multiple, got {context}, {padding}, {multiple}, {size}")
    m = m.expand(B, H, W).to(image.device, image.dtype)
    y0, y1, x0, x1 = crop_box(m, context, padding, multiple, H, W)
    h, w = y1 - y0, x1 - x0
    longest = max(h, w)
    if mode == "native" or (mode == "min size" and longest >= size):
        s = 1.0
    else:
        s = size / longest
    th, tw = _round_to(h * s, multiple), _round_to(w * s, multiple)
    crop = image[..., y0:y1, x0:x1]
    cm = m[:, y0:y1, x0:x1]
    if (th, tw) != (h, w):
        crop = F.interpolate(crop, size=(th, tw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        cm = F.interpolate(cm[:, None], size=(th, tw), mode="bilinear", antialias=True, align_corners=False)[:, 0]
        cm = cm.clamp(0, 1)
    return CropInfo(image, m, (y0, y1, x0, x1), (th, tw), crop.contiguous(), cm.contiguous())


def stitch(info: CropInfo, result: torch.Tensor, blend: int = 16) -> torch.Tensor:  # [B,C,H,W]
    """Paste `result` ([B|1,C',h,w], the inpainted crop at any size) back into the original; see the module
    docstring. Channels follow the original (grey <-> RGB, alpha kept)."""
    orig = info.original
    B, C, H, W = orig.shape
    if result.ndim != 4 or result.shape[0] not in (1, B):
        raise InputError(f"image: expected the inpainted crop [B,C,H,W] with a batch of 1 or {B}, got "
                         f"{tuple(result.shape)}")
    if blend < 0:
        raise InputError(f"blend: expected pixels >= 0, got {blend}")
    y0, y1, x0, x1 = info.box
    cc = C - 1 if C in (2, 4) else C  # colour channels; alpha stays the original's
    r = _match(result.to(orig.device, orig.dtype), cc)
    if tuple(r.shape[-2:]) != (y1 - y0, x1 - x0):
        r = F.interpolate(r, size=(y1 - y0, x1 - x0), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    wgt = M.edge_blend(info.mask[:, y0:y1, x0:x1], blend)[:, None]  # [B,1,h,w]
    region = orig[:, :cc, y0:y1, x0:x1]
    mixed = region * (1 - wgt) + r.expand(B, -1, -1, -1) * wgt
    out = orig.clone()
    out[:, :cc, y0:y1, x0:x1] = torch.where(wgt > 0, mixed, region)
    return out


def _match(x: torch.Tensor, c: int) -> torch.Tensor:
    """Grey <-> RGB so x has c channels (alpha dropped)."""
    if x.shape[1] in (2, 4):
        x = x[:, :-1]
    if x.shape[1] == c:
        return x
    if c == 3:
        return x.expand(-1, 3, -1, -1)
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)
