"""Gathers NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS from the family modules."""
from __future__ import annotations

import importlib

_FAMILIES = ("info", "upscale", "vae", "gan", "style", "diffusion", "inpaint", "metrics", "train")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in _FAMILIES:
    _mod = importlib.import_module(f".{_name}", __name__)  # a missing or broken family module fails loudly
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
