"""Pre-fill of the hole before a model or a sampler, and colour match of a fill to its surroundings.

    prefill(image, mask, "telea", radius=5)      # neutral | telea | navier-stokes | blur
    colour_match(result, original, mask, "reinhard", ring=32)

Pre-fill replaces only the masked pixels (soft masks blend); unmasked pixels are returned bit-exact. "telea" and
"navier-stokes" are OpenCV's `cv2.inpaint` (Telea 2004; Bertalmio et al. 2001) on 8-bit images; "blur" is a
normalised masked Gaussian (push-pull): each hole pixel takes the Gaussian-weighted mean of the known pixels, with
the blur widened until every hole pixel has known neighbours; "neutral" is 0.5 grey.

OpenCV is imported only when "telea" or "navier-stokes" is asked for; any of the four opencv-python wheels works.
"""
from __future__ import annotations

import logging

import torch

from .. import masks as M
from ..colour import METHODS as COLOUR_METHODS
from ..colour import colour_transfer
from ..errors import InputError
from .inpaint import composite

log = logging.getLogger(__name__)

PREFILL_METHODS = ("neutral", "telea", "navier-stokes", "blur")


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise InputError("method: 'telea' and 'navier-stokes' need OpenCV; install opencv-python-headless (or keep "
                         "the opencv-python wheel you have)") from e
    return cv2


def _check(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> [B,H,W]
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] not in (1, 2, 3, 4) or 0 in image.shape:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"image: expected [B,C,H,W] with 1-4 channels, got {got}")
    B, _, H, W = image.shape
    m = M.as_mask(mask).clamp(0, 1)
    if m.shape[0] not in (1, B) or tuple(m.shape[1:]) != (H, W):
        raise InputError(f"mask: expected {W}x{H} with a batch of 1 or {B}, got a batch of {m.shape[0]} at "
                         f"{m.shape[2]}x{m.shape[1]}")
    return m.expand(B, H, W).to(image.device, image.dtype)


def opencv_inpaint(image: torch.Tensor, hole: torch.Tensor, radius: float, method: str) -> torch.Tensor:
    """cv2.inpaint of one [C,H,W] image (C 1 or 3) on 8 bits; hole [H,W] bool -> [C,H,W] float."""
    cv2 = _cv2()
    import numpy as np

    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    u8 = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    u8 = np.ascontiguousarray(u8[..., 0] if u8.shape[-1] == 1 else u8)
    hm = hole.cpu().numpy().astype(np.uint8) * 255
    out = cv2.inpaint(u8, hm, float(radius), flag)
    t = torch.from_numpy(out.reshape(*out.shape[:2], -1)).permute(2, 0, 1).to(image.device, image.dtype) / 255
    return t


def blur_fill(image: torch.Tensor, known: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """[C,H,W], known [H,W] float -> [C,H,W]: normalised masked Gaussian, sigma doubling until every pixel is
    reached (push-pull)."""
    C = image.shape[0]
    acc = torch.zeros_like(image)
    got = torch.zeros_like(known)
    s = float(sigma)
    for _ in range(16):
        num = M.blur((image * known).view(C, *known.shape), s)  # channels as a batch of masks
        den = M.blur(known[None], s)[0]
        take = (got == 0) & (den > 1e-6)
        acc = torch.where(take, num / den.clamp_min(1e-12), acc)
        got = torch.where(take, torch.ones_like(got), got)
        if bool(got.all()) or s > 2 * max(known.shape):
            break
        s *= 2
    return acc.clamp(0, 1)


def prefill(image: torch.Tensor, mask: torch.Tensor, method: str = "telea", radius: float = 5.0
            ) -> torch.Tensor:  # [B,C,H,W]
    """Fill the masked pixels by `method` (see the module docstring); alpha is kept."""
    if method not in PREFILL_METHODS:
        raise InputError(f"method: expected one of {PREFILL_METHODS}, got {method!r}")
    if radius <= 0:
        raise InputError(f"radius: expected > 0 pixels, got {radius}")
    m = _check(image, mask)
    C = image.shape[1]
    cc = C - 1 if C in (2, 4) else C
    out = image.clone()
    for b in range(image.shape[0]):
        hole = m[b] > 0
        if not hole.any():
            continue
        x = image[b, :cc]
        if method == "neutral":
            fill = torch.full_like(x, 0.5)
        elif method == "blur":
            fill = blur_fill(x, (~hole).to(x.dtype), sigma=radius)
        else:
            fill = opencv_inpaint(x, hole, radius, method)
        out[b, :cc] = composite(x[None], fill[None], m[b])[0]
    return out


def colour_match(result: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, method: str = "reinhard",
                 ring: int = 32, strength: float = 1.0) -> torch.Tensor:  # [B,C,H,W]
    """The filled region of `result` takes the colour statistics of the original's surroundings (a ring of `ring`
    pixels around the mask; 0: the whole unmasked image), then is composited over `original` with the mask:
    unmasked pixels are the original's, bit-exact."""
    if method not in COLOUR_METHODS:
        raise InputError(f"method: expected one of {COLOUR_METHODS}, got {method!r}")
    if tuple(result.shape[-2:]) != tuple(original.shape[-2:]) or result.shape[0] not in (1, original.shape[0]):
        raise InputError(f"image: expected the inpainted image at the original's size {original.shape[-1]}x"
                         f"{original.shape[-2]}, got {result.shape[-1]}x{result.shape[-2]}")
    m = _check(original, mask)
    C = original.shape[1]
    cc = C - 1 if C in (2, 4) else C
    res = result[:, :cc].to(original.dtype).expand(original.shape[0], -1, -1, -1)
    if res.shape[1] != cc:
        raise InputError(f"image: expected {cc} colour channels like the original, got {res.shape[1]}")
    hole = (m > 0).to(m.dtype)
    around = (M.grow(hole, ring) - hole).clamp(0, 1) if ring > 0 else 1 - hole
    empty = around.flatten(1).sum(1) == 0
    around[empty] = 1 - hole[empty]  # a ring outside the image: the whole unmasked image
    out = original.clone()
    for b in range(original.shape[0]):
        if not bool(hole[b].any()) or not bool(around[b].any()):
            out[b, :cc] = composite(original[b : b + 1, :cc], res[b : b + 1], m[b])[0]
            continue
        rgb = res[b : b + 1] if cc == 3 else res[b : b + 1].expand(-1, 3, -1, -1)
        ref = original[b : b + 1, :cc] if cc == 3 else original[b : b + 1, :cc].expand(-1, 3, -1, -1)
        moved = colour_transfer(rgb, ref, method, mask=hole[b : b + 1], ref_mask=around[b : b + 1],
                                strength=strength)
        moved = moved if cc == 3 else moved.mean(1, keepdim=True)
        out[b, :cc] = composite(original[b : b + 1, :cc], moved, m[b])[0]
    return out
