"""Atelier: GAN samplers, VAEs, upscalers and inpainters for ComfyUI, on one shared model manager.

Thin on purpose: node mappings gathered from nodes/, model folders registered when ComfyUI is there, and the example
workflows' input image (workflows/input/) copied into ComfyUI's input folder when it is not there yet (logged; never
replaces a file; ATELIER_NO_EXAMPLE_INPUTS=1 turns it off). Nothing heavy happens at import (no device probing, no
model loading).
"""
import os as _os

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .models import host as _host
from .models.loading import MODEL_EXTENSIONS

_host.register_folders(MODEL_EXTENSIONS)
_host.provide_example_inputs(_os.path.join(_os.path.dirname(__file__), "workflows", "input"))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
