"""Gathers NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS from the family modules."""
from __future__ import annotations

import importlib

_FAMILIES = ("info", "upscale", "vae", "gan", "inpaint")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in _FAMILIES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_name}":  # a real missing dependency inside the module: surface it
            raise
        continue
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
