"""Upscaler nodes: Load Upscaler (any single-image model spandrel knows) and Upscale Image.

Load Upscaler outputs core's UPSCALE_MODEL type: a spandrel ImageModelDescriptor that core's "Upscale Image (using
Model)" accepts, carrying our descriptor. Upscale Image accepts core's own UPSCALE_MODEL too (adopted into the
shared manager), so existing graphs can switch one node at a time. The logic is in models/upscale/upscale.py.
"""
from __future__ import annotations

from ..models.descriptor import ModelDescriptor
from ..models.errors import InputError
from ..models.manager import get_manager
from ..models.upscale import upscale as _up
from .common import bchw_to_image, image_to_bchw, model_input, tile_input

CATEGORY = "atelier/upscale"
MODES = ("model scale", "factor", "size")


def descriptor_of(upscale_model: object) -> ModelDescriptor:
    """Our descriptor for an UPSCALE_MODEL input (ours, or core's spandrel descriptor, adopted by the manager)."""
    from ..models import spandrel_arch

    if isinstance(upscale_model, ModelDescriptor):
        desc = upscale_model
    elif spandrel_arch.is_spandrel_image_model(upscale_model):
        desc = spandrel_arch.from_spandrel(upscale_model, source=getattr(upscale_model, "source", ""))
    else:
        raise InputError(f"upscale_model: expected an UPSCALE_MODEL (Load Upscaler or core's Load Upscale Model), "
                         f"got {type(upscale_model).__name__}")
    if desc.family != "upscale":
        raise InputError(f"upscale_model: {desc.architecture} is a {desc.family} model ({desc.purpose}); "
                         "Upscale Image needs a super-resolution or restoration model")
    return get_manager().adopt(desc)


class AtelierLoadUpscaler:
    DESCRIPTION = ("Loads a super-resolution or restoration model from models/upscale_models: ESRGAN/Real-ESRGAN, "
                   "Compact, SwinIR, HAT, DAT, OmniSR, SPAN, CRAFT, DCTLSA, DnCNN and every other single-image "
                   "architecture spandrel detects (spandrel_extra_arches too, when installed). The file is read "
                   "safely (no code in it runs). The output also plugs into core's Upscale Image (using Model).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("UPSCALE_MODEL",)
    RETURN_NAMES = ("upscale_model",)
    OUTPUT_TOOLTIPS = ("The model, for Atelier Upscale Image or core's Upscale Image (using Model).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": model_input("upscale_models", tooltip="A model file in models/upscale_models.")}}

    def load(self, model_name: str):
        desc = get_manager().load(model_name, "upscale_models", family="upscale")
        return (desc.extra.spandrel,)


class AtelierUpscaleImage:
    DESCRIPTION = ("Upscales (or restores) a batch of images with an upscale model: to the model's own scale, by any "
                   "factor (1.5, 8: repeated passes plus an antialiased resize) or to an exact size. Tiles overlap by "
                   "the model's receptive field, so tiled equals untiled; alpha is upscaled separately; greyscale "
                   "models work on colour images and the other way round. Shows progress per tile (per layer when "
                   "a Compact model runs a large image as one CPU call, in strips); Cancel stops within a layer. A request that would not fit in memory is shrunk before an overshooting pass "
                   "or refused with how much it needs.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The upscaled images (alpha kept when the input had it).",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "upscale_model": ("UPSCALE_MODEL", {"tooltip": "From Atelier Load Upscaler or core's Load Upscale Model."}),
            "image": ("IMAGE", {"tooltip": "Images to upscale; a 4th (alpha) channel is upscaled separately."}),
            "mode": (list(MODES), {"default": "model scale", "tooltip": "model scale: the model's own factor once; "
                                   "factor: the factor below; size: the width/height below."}),
            "factor": ("FLOAT", {"default": 2.0, "min": 0.01, "max": 64.0, "step": 0.05,
                                 "tooltip": "Scale factor in 'factor' mode (e.g. 1.5 or 8)."}),
            "width": ("INT", {"default": 0, "min": 0, "max": _up.MAX_SIDE, "step": 1,
                              "tooltip": "Output width in 'size' mode; 0 keeps the aspect ratio from the height."}),
            "height": ("INT", {"default": 0, "min": 0, "max": _up.MAX_SIDE, "step": 1,
                               "tooltip": "Output height in 'size' mode; 0 keeps the aspect ratio from the width."}),
        }, "optional": {
            "alpha": (list(_up.ALPHA_MODES), {"default": "resize", "tooltip": "How alpha is upscaled: an "
                      "antialiased resize, or the model itself (as a grey image)."}),
            "tile_size": tile_input("Tile side in input pixels; 0 picks it from free memory (one call when the image "
                                    "fits). (Called `tile` before 0.2; API files with the old name run in `atelier "
                                    "run`, ComfyUI ignores the old name.)"),
        }}

    def upscale(self, upscale_model, image, mode: str = "model scale", factor: float = 2.0, width: int = 0,
                height: int = 0, alpha: str = "resize", tile_size: int = 0):
        desc = descriptor_of(upscale_model)
        x = image_to_bchw(image, "image")  # [B,C,H,W]
        if mode not in MODES:
            raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
        if mode == "size" and not (width or height):
            raise InputError("width/height: 'size' mode needs a width or a height above 0, got 0x0")
        out = _up.upscale(desc, x, factor=factor if mode == "factor" else None, width=width if mode == "size" else 0,
                          height=height if mode == "size" else 0, alpha=alpha, tile=tile_size or None,
                          manager=get_manager())
        return (bchw_to_image(out, fresh=True),)


NODE_CLASS_MAPPINGS = {"AtelierLoadUpscaler": AtelierLoadUpscaler, "AtelierUpscaleImage": AtelierUpscaleImage}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierLoadUpscaler": "Atelier Load Upscaler",
                              "AtelierUpscaleImage": "Atelier Upscale Image"}
