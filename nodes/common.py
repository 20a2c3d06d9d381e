"""What every node module shares: input specs (seed, tile size, model combos) and conversions of ComfyUI's IMAGE,
MASK and LATENT to the engine's tensors and back. No maths here.

The same concept has the same input name and spec on every node: `seed` / `noise_seed` (INT 0..2^64-1 with an
explicit "control after generate"), `tile_size` (INT, 0 = automatic), model combos listing only files the manager
will open.
"""
from __future__ import annotations

import torch

from ..models.errors import InputError
from ..models.latents import SEED_MAX
from ..models.manager import get_manager

NO_MODELS = "(no models found)"  # the combo entry of an empty folder, so the node still validates
TILE_MAX = 8192


# ---------------------------------------------------------------- input specs


def seed_input(tooltip: str, control: bool = True) -> tuple:
    """A seed widget. control=True: the frontend's "control after generate" defaults to randomize (a new image per
    Run); False: it stays fixed (the seed only matters in some modes)."""
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": control, "tooltip": tooltip})


def tile_input(tooltip: str) -> tuple:
    """The `tile_size` widget: a tile side in the node's input pixels, 0 = automatic from free memory."""
    return ("INT", {"default": 0, "min": 0, "max": TILE_MAX, "step": 8, "tooltip": tooltip})


def model_choices(*folders: str, prefixed: bool = False) -> list[str]:
    """Names for a loader combo box (`folder/name` when `prefixed`), or NO_MODELS when the folders are empty."""
    names: list[str] = []
    for folder in folders:
        names += [f"{folder}/{n}" if prefixed else n for n in get_manager().list_models(folder)]
    return names or [NO_MODELS]


def model_input(*folders: str, tooltip: str, prefixed: bool = False) -> tuple:
    """A loader combo over model folders."""
    return (model_choices(*folders, prefixed=prefixed), {"tooltip": tooltip})


def split_choice(value: str, folders: tuple[str, ...], name: str) -> tuple[str, str]:
    """'folder/file' from a prefixed combo -> (folder, file), checked."""
    folder, _, file = str(value).partition("/")
    if folder not in folders or not file:
        raise InputError(f"{name}: expected {' or '.join(repr(f + '/<file>') for f in folders)}, got {value!r}")
    return folder, file


# ---------------------------------------------------------------- IMAGE


def image_to_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] -> [B,C,H,W] float32, checked: non-empty, 1-4 channels, finite."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"{name}: expected an IMAGE tensor [B,H,W,C], got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{name}: expected an IMAGE [B,H,W,C] with 1-4 channels, got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise InputError(f"{name}: the image batch is empty (shape {tuple(image.shape)})")
    if not torch.isfinite(image).all():
        raise InputError(f"{name}: the image has NaN or Inf pixels; fix the node that produced it")
    return image.movedim(-1, 1).float()


def bchw_to_image(x: torch.Tensor, *, rgb: bool = False, fresh: bool = False) -> torch.Tensor:
    """[B,C,H,W] -> ComfyUI IMAGE [B,H,W,C] float32 in 0..1 on the CPU. rgb: one channel becomes three (IMAGE is
    RGB for every core node); fresh: x is the engine's own new tensor, clamped in place (one copy, not two)."""
    in_place = fresh and x.dtype == torch.float32 and (torch.is_inference_mode_enabled() or not x.is_inference())
    x = x.clamp_(0, 1) if in_place else x.clamp(0, 1)
    if rgb and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.movedim(1, -1).to("cpu", torch.float32).contiguous()


# ---------------------------------------------------------------- MASK


def mask_to_bhw(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """ComfyUI MASK [B,H,W] (or [H,W]) -> [B,H,W] float32 in 0..1, checked."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{name}: expected a MASK tensor [B,H,W], got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[-1] == 1:  # [B,H,W,1], as some nodes give it
        mask = mask[..., 0]
    if mask.ndim != 3 or 0 in mask.shape:
        raise InputError(f"{name}: expected a MASK [B,H,W], got shape {tuple(mask.shape)}")
    if not torch.isfinite(mask).all():
        raise InputError(f"{name}: the mask has NaN or Inf values")
    return mask.float().clamp(0, 1)


def bhw_to_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B,H,W] or [B,1,H,W] -> ComfyUI MASK [B,H,W] float32 in 0..1 on the CPU."""
    if mask.ndim == 4:
        mask = mask[:, 0]
    return mask.clamp(0, 1).to("cpu", torch.float32).contiguous()


# ---------------------------------------------------------------- LATENT


def latent_in(latent: object, name: str = "samples") -> dict:
    """A ComfyUI LATENT (a dict with 'samples'), checked."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise InputError(f"{name}: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    return latent


def latent_out(samples: torch.Tensor, **extra) -> dict:
    """A LATENT dict from samples [B,C,h,w] (plus any keys to carry, e.g. the pack's original image size), contiguous
    NCHW as core's nodes expect (the tiling engine accumulates channels last)."""
    return {"samples": samples.contiguous(), **{k: v for k, v in extra.items() if v is not None}}
