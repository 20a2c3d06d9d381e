"""Inpainting with a masked-image model (LaMa, MAT and every inpainter spandrel loads) at full resolution.

    out, note = inpaint(desc, image, mask, strategy="crop")     # image [B,C,H,W], mask [B,H,W] or [1,H,W]

Strategies:
- "original": the whole image at its size, padded to the model's size requirements. Sharpest, but memory grows with
  the image, and a model trained at 256-512 px sees a small hole in a huge image as it never did in training.
- "crop": each masked region (regions closer than 2 x `context` merge) cut out with `context` pixels around it,
  grown to the model's minimum size from real pixels, run at native pixel size and pasted back. Memory is bounded by
  the largest region, not the image; a region whose crop would not fit the activation budget is run scaled down
  (said in the note).
- "resize": the whole image with its longest side limited to `max_side`, the fill upscaled (bicubic) and only the
  masked pixels taken: global context, softer fill.

Whatever the strategy, the result is `image` where the mask is 0, bit for bit, and `image * (1 - m) + fill * m`
elsewhere (the model itself sees the mask binarised at > 0). Greyscale images run as RGB and come back grey; alpha is
kept aside and restored. MAT's latent and its inference-time dropout come from `seed` (item i: seed + i), so its
fill is reproducible.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import host
from .. import masks as M
from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import InputError, WrongFamilyError
from ..latents import seeded_normal
from ..manager import ModelManager, get_manager, placement
from ..progress import Progress

log = logging.getLogger(__name__)

STRATEGIES = ("original", "crop", "resize")
MAX_SIDE = 16384


@dataclass
class Region:
    box: tuple[int, int, int, int]  # y0, y1, x0, x1 of the crop (end exclusive)
    hole: torch.Tensor  # [H,W] bool: the hole pixels this region fills (in full-image coordinates)


# ---------------------------------------------------------------- inputs


def check_mask(mask: torch.Tensor, batch: int, height: int, width: int, *, resize: bool = False
               ) -> tuple[torch.Tensor, str]:
    """mask [B,H,W] / [1,H,W] / [H,W] -> [batch,H,W] float in 0..1 on the image's side; a size mismatch is an
    InputError naming both sizes, or with `resize=True` a bilinear resize stated in the returned note."""
    m = M.as_mask(mask, "mask").clamp(0, 1)
    note = ""
    if m.shape[0] not in (1, batch):
        raise InputError(f"mask: expected 1 mask for all images or one per image ({batch}), got a batch of "
                         f"{m.shape[0]}")
    if tuple(m.shape[1:]) != (height, width):
        if not resize:
            raise InputError(f"mask: expected {width}x{height} (the image's size), got {m.shape[2]}x{m.shape[1]}; "
                             "resize it (or set resize_mask)")
        note = f"mask resized from {m.shape[2]}x{m.shape[1]} to {width}x{height}"
        m = F.interpolate(m.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return m.expand(batch, height, width), note


def descriptor_of(model: object) -> ModelDescriptor:
    """Our descriptor for an INPAINT_MODEL input: ours, or a spandrel MaskedImageModelDescriptor from another pack's
    loader (described here with what spandrel says: architecture, size requirements, dtypes)."""
    if isinstance(model, ModelDescriptor):
        return model
    cached = getattr(model, "atelier", None)
    if isinstance(cached, ModelDescriptor):
        return cached
    try:
        from spandrel import MaskedImageModelDescriptor
    except ImportError:  # pragma: no cover (spandrel is a dependency)
        MaskedImageModelDescriptor = ()  # type: ignore[assignment]
    if not isinstance(model, MaskedImageModelDescriptor):
        raise InputError(f"inpaint_model: expected an INPAINT_MODEL (Atelier Load Inpaint Model), got "
                         f"{type(model).__name__}")
    req = model.size_requirements
    desc = ModelDescriptor(
        family="inpaint", architecture=str(model.architecture.id), model=model.model, purpose="Inpainting",
        in_channels=model.input_channels, out_channels=model.output_channels,
        supports_half=bool(model.supports_half), supports_bfloat16=bool(model.supports_bfloat16),
        size_requirements=SizeRequirements(req.minimum, req.multiple_of, req.square), tiling="none", extra=model)
    try:
        model.atelier = desc  # adopted once, not per run
    except AttributeError:
        pass
    return desc


def check_model(desc: ModelDescriptor) -> None:
    if not isinstance(desc, ModelDescriptor):
        raise InputError(f"inpaint_model: expected an INPAINT_MODEL, got {type(desc).__name__}")
    if desc.family != "inpaint":
        raise WrongFamilyError(f"inpaint_model: {desc.architecture} is a {desc.family} model ({desc.purpose}); "
                               "the Inpaint node needs an inpainting model (LaMa, MAT, ...)")


# ---------------------------------------------------------------- one model call


def pad_to(x: torch.Tensor, desc: ModelDescriptor) -> torch.Tensor:  # [N,C,h,w] -> [N,C,h',w']
    """Pad right and bottom to the model's size requirements as spandrel does (reflect, then replicate)."""
    h, w = x.shape[-2:]
    H, W = desc.size_requirements.padded_size(h, w)
    if (H, W) == (h, w):
        return x
    rh, rw = min(H - h, h - 1), min(W - w, w - 1)
    x = F.pad(x, (0, rw, 0, rh), mode="reflect") if rh or rw else x
    return F.pad(x, (0, W - w - rw, 0, H - h - rh), mode="replicate") if (H - h - rh) or (W - w - rw) else x


def run_model(desc: ModelDescriptor, image: torch.Tensor, hole: torch.Tensor, seed: int,
              manager: ModelManager) -> torch.Tensor:  # [1,3,h,w], [1,1,h,w] -> [1,3,h,w] float32
    """One model call at the image's own size: pad, place, call, clamp, crop. MAT's latent from `seed`."""
    h, w = image.shape[-2:]
    need = desc.memory_estimate(pixels=math.prod(desc.size_requirements.padded_size(h, w)))

    def fn(model: torch.nn.Module) -> torch.Tensor:
        dev, dtype = placement(model)
        x = pad_to(image, desc).to(dev, dtype)
        m = pad_to(hole.to(image.dtype), desc).to(dev, dtype)
        if hasattr(model, "z") and isinstance(model.z, torch.Tensor):  # MAT: the latent is an attribute
            model.z = seeded_normal(tuple(model.z.shape), seed).to(dev, model.z.dtype)
        # MAT also drops out at inference (F.dropout(training=True)) from the global generator: seeded, and the
        # caller's random state left as it was
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type=dev.type):
            torch.manual_seed(int(seed) % 2**63)
            out = model(x, m)
        return out[..., :h, :w].clamp(0, 1).to(image.device, torch.float32)

    return manager.run(desc, fn, memory_required=need)


def _fits(desc: ModelDescriptor, h: int, w: int, manager: ModelManager) -> float:
    """1 when a call at h x w fits the activation budget, else the linear scale that makes it fit."""
    H, W = desc.size_requirements.padded_size(h, w)
    need = desc.memory_estimate(pixels=H * W) - desc.weight_bytes
    budget = manager.activation_budget(desc)
    return 1.0 if need <= budget else math.sqrt(budget / max(need, 1))


def _run_scaled(desc: ModelDescriptor, image: torch.Tensor, hole: torch.Tensor, scale: float, seed: int,
                manager: ModelManager) -> torch.Tensor:  # [1,3,h,w] -> [1,3,h,w]
    """The model at `scale` of the image's size (antialiased down, bicubic back up); scale 1: native."""
    if scale >= 1:
        return run_model(desc, image, hole, seed, manager)
    h, w = image.shape[-2:]
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(image, size=(sh, sw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    small_hole = (F.adaptive_max_pool2d(hole.float(), (sh, sw)) > 0).float()
    fill = run_model(desc, small, small_hole, seed, manager)
    return F.interpolate(fill, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------- regions


def regions(hole: torch.Tensor, context: int, desc: ModelDescriptor) -> list[Region]:  # hole [H,W] bool
    """Masked regions whose context boxes are apart, each with its crop box (hole bbox + context, grown to the
    model's minimum size from real pixels, clipped to the image)."""
    H, W = hole.shape
    f = max(1, math.ceil(max(H, W) / 1024))  # label on a coarse grid: cheap at any size
    coarse = F.max_pool2d(hole[None, None].float(), f, f, ceil_mode=True)[0, 0] if f > 1 else hole.float()
    grown = M.grow(coarse, math.ceil(context / f))[0] > 0
    labels = _label(grown)
    if f > 1:
        labels = labels.repeat_interleave(f, 0).repeat_interleave(f, 1)[:H, :W]
    out = []
    for k in labels[hole].unique().tolist():
        part = hole & (labels == k)
        box = M.bbox(part[None].float(), context)[0]
        if box is not None:
            out.append(Region(_grow_box(box, H, W, desc), part))
    return out


def _label(binary: torch.Tensor) -> torch.Tensor:  # [h,w] bool -> [h,w] int64, 0 = background
    """Connected components (8-connectivity) with OpenCV; without it, everything is one region."""
    try:
        import cv2
        import numpy as np
    except ImportError:
        return binary.long()
    n, lab = cv2.connectedComponents(binary.cpu().numpy().astype(np.uint8), connectivity=8)
    return torch.from_numpy(lab.astype(np.int64)).to(binary.device)


def _grow_box(box: tuple[int, int, int, int], H: int, W: int, desc: ModelDescriptor) -> tuple[int, int, int, int]:
    """Grow a box to the model's minimum size and multiple (and square if required) using real pixels."""
    y0, y1, x0, x1 = box
    th, tw = desc.size_requirements.padded_size(y1 - y0, x1 - x0)
    return (*_widen(y0, y1, th, H), *_widen(x0, x1, tw, W))


def _widen(a: int, b: int, size: int, limit: int) -> tuple[int, int]:
    size = min(size, limit)
    extra = size - (b - a)
    if extra <= 0:
        return a, b
    a = max(0, a - extra // 2)
    b = min(limit, a + size)
    return max(0, b - size), b


# ---------------------------------------------------------------- the entry point


def inpaint(
    desc: ModelDescriptor,
    image: torch.Tensor,  # [B,C,H,W] 0..1, C in 1..4
    mask: torch.Tensor,  # [B,H,W] or [1,H,W], 1 = fill
    *,
    strategy: str = "crop",
    context: int = 128,
    max_side: int = 1024,
    seed: int = 0,
    resize_mask: bool = False,
    manager: ModelManager | None = None,
) -> tuple[torch.Tensor, str]:  # ([B,C,H,W] float32, note)
    """Fill the masked pixels of each image; see the module docstring. Returns the images and a note (what was
    done beyond the obvious: empty masks, full masks, resized masks, scaled-down crops)."""
    check_model(desc)
    if strategy not in STRATEGIES:
        raise InputError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] not in (1, 2, 3, 4) \
            or 0 in image.shape:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"image: expected [B,C,H,W] with 1-4 channels, got {got}")
    if context < 0 or max_side < 16:
        raise InputError(f"context/max_side: expected context >= 0 and max_side >= 16, got {context}, {max_side}")
    manager = manager or get_manager()
    B, C, H, W = image.shape
    m, note = check_mask(mask, B, H, W, resize=resize_mask)
    notes = [note] if note else []
    rgb, alpha = (image[:, :-1], image[:, -1:]) if C in (2, 4) else (image, None)
    x = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb  # [B,3,H,W]
    out = image.clone()
    with Progress(B, "inpaint") as prog:
        for b in range(B):
            mb = m[b].to(image.device, image.dtype)
            hole = mb > 0
            if not hole.any():
                notes.append(f"image {b}: empty mask, returned untouched")
                prog.update()
                continue
            if hole.all():
                notes.append(f"image {b}: the mask covers the whole image: this is the model's own fill")
            fill, n = _fill(desc, x[b : b + 1], hole, strategy, context, max_side, seed + b, manager)
            if n:
                notes.append(f"image {b}: {n}")
            if rgb.shape[1] == 1:  # back to grey
                w = torch.tensor([0.299, 0.587, 0.114], dtype=fill.dtype, device=fill.device).view(1, 3, 1, 1)
                fill = (fill * w).sum(1, keepdim=True)
            out[b, : rgb.shape[1]] = composite(rgb[b : b + 1], fill, mb)[0]
            prog.update()
    if alpha is not None:
        out[:, -1:] = alpha
    return out, "; ".join(notes)


def composite(image: torch.Tensor, fill: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [N,C,H,W]
    """image where mask == 0 (bit-exact), image * (1 - m) + fill * m elsewhere; mask [H,W] or [N,1,H,W]."""
    m = mask if mask.ndim == 4 else mask.view(1, 1, *mask.shape[-2:])
    m = m.to(image.dtype)
    mixed = image * (1 - m) + fill.to(image.dtype) * m
    return torch.where(m > 0, mixed, image)


def _fill(desc: ModelDescriptor, x: torch.Tensor, hole: torch.Tensor, strategy: str, context: int, max_side: int,
          seed: int, manager: ModelManager) -> tuple[torch.Tensor, str]:  # x [1,3,H,W], hole [H,W]
    H, W = hole.shape
    h4 = hole[None, None]
    if strategy == "original":
        scale = _fits(desc, H, W, manager)
        if scale < 1:
            log.warning("inpaint: a %dx%d call may not fit the activation budget; 'crop' bounds memory", W, H)
        return run_model(desc, x, h4, seed, manager), ""
    if strategy == "resize":
        scale = min(1.0, max_side / max(H, W), _fits(desc, H, W, manager))
        return _run_scaled(desc, x, h4, scale, seed, manager), (f"run at {scale:.3g}x" if scale < 1 else "")
    fill = x.clone()
    scaled = []
    for reg in regions(hole, context, desc):
        host.throw_if_interrupted()  # Cancel between regions (each is one model call)
        y0, y1, x0, x1 = reg.box
        crop, ch = x[..., y0:y1, x0:x1], reg.hole[y0:y1, x0:x1]
        scale = _fits(desc, y1 - y0, x1 - x0, manager)
        if scale < 1:
            scaled.append(f"{x1 - x0}x{y1 - y0} crop at {scale:.2g}x")
        # the model sees every hole inside the crop (never the pixels under another region's mask) ...
        part = _run_scaled(desc, crop, hole[None, None, y0:y1, x0:x1], scale, seed, manager)
        # ... and only this region's pixels are taken
        fill[..., y0:y1, x0:x1] = torch.where(ch, part, fill[..., y0:y1, x0:x1])
    return fill, ("memory: " + ", ".join(scaled)) if scaled else ""
