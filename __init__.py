"""Atelier: GAN samplers, VAEs, upscalers and inpainters for ComfyUI, on one shared model manager.

Thin on purpose: node mappings gathered from nodes/, model folders registered when ComfyUI is there.
Nothing heavy happens at import (no device probing, no model loading).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .models import host as _host

_host.register_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
