"""Helpers every node module shares: IMAGE/MASK conversion and checks, model combos. No maths here."""
from __future__ import annotations

import torch

from ..models.errors import InputError
from ..models.manager import get_manager


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


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> ComfyUI IMAGE [B,H,W,C] float32 in 0..1 on the CPU."""
    return x.clamp(0, 1).movedim(1, -1).to("cpu", torch.float32).contiguous()


def model_choices(*folders: str) -> list[str]:
    """Names for a loader combo box (a placeholder entry when the folder is empty, so the node still validates)."""
    names: list[str] = []
    for folder in folders:
        names += get_manager().list_models(folder)
    return names or ["(no models found)"]
