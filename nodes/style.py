"""Style nodes: Load Style Model, Style Transfer, Colour Transfer.

Socket type ATELIER_STYLE carries the style model's ModelDescriptor. The logic is in models/style/transfer.py and
models/colour.py; these classes only declare inputs and convert.
"""
from __future__ import annotations

import logging

import torch

from ..models import colour
from ..models.descriptor import ModelDescriptor
from ..models.errors import InputError
from ..models.manager import get_manager
from ..models.style import transfer
from ..models.image import split_alpha
from .common import bchw_to_image, image_to_bchw, model_choices

log = logging.getLogger(__name__)

CATEGORY = "atelier/style"
STYLE = "ATELIER_STYLE"
FOLDER = transfer.FOLDER


def _style_model(obj: object) -> ModelDescriptor:
    if not isinstance(obj, ModelDescriptor) or obj.family != "style":
        got = f"a {obj.family} model" if isinstance(obj, ModelDescriptor) else type(obj).__name__
        raise InputError(f"style_model: expected an ATELIER_STYLE from Atelier Load Style Model, got {got}")
    return obj


def _mask(mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise InputError(f"{name}: expected a MASK [B,H,W], got {getattr(mask, 'shape', type(mask).__name__)}")
    return mask.float()


class AtelierLoadStyleModel:
    DESCRIPTION = ("Loads a style-transfer network from models/style: MicroAST (arbitrary styles, 0.47 M parameters; "
                   "any one of its four upstream files brings the other three from the same folder, or a packed "
                   ".safetensors), AdaIN (vgg_normalised.pth and decoder.pth side by side; either name) or a Johnson "
                   "fast-neural-style TransformerNet (one style per file: candy, mosaic, udnie...). Detected from the "
                   "weights; nothing in the file is run.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (STYLE,)
    RETURN_NAMES = ("style_model",)
    OUTPUT_TOOLTIPS = ("The style network, for Atelier Style Transfer.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"style_name": (model_choices(FOLDER), {"tooltip": "A model file in models/style."})}}

    def load(self, style_name: str):
        return (transfer.load_style_model(style_name, FOLDER, manager=get_manager()),)


class AtelierStyleTransfer:
    DESCRIPTION = ("Paints the content image in a style. Arbitrary models (MicroAST, AdaIN) take the style from the "
                   "style image (one for the whole batch, or one per content image); per-style models (Johnson) have "
                   "it built in and ignore a style image, with a note. Any size without seams: the networks' "
                   "whole-image statistics are computed first and held fixed while tiles run. Alpha is kept.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "notes")
    OUTPUT_TOOLTIPS = ("The stylised images, same size as the content.", "Notes: inputs ignored or adjusted.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "style_model": (STYLE, {"tooltip": "From Atelier Load Style Model."}),
            "content": ("IMAGE", {"tooltip": "The photo(s) to stylise, any size."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                         "1: full style; 0: the content. AdaIN blends its features (its own alpha); MicroAST and "
                         "Johnson blend pixels (MicroAST's feature blend leaves the image range in between)."}),
            "style_size": ("INT", {"default": 512, "min": 0, "max": 4096, "step": 8, "tooltip":
                           "The style image's shorter side is resized to this before its statistics are taken "
                           "(larger: finer brush strokes relative to the content); 0: as it is."}),
            "preserve_colours": ("BOOLEAN", {"default": False, "tooltip":
                                 "Keep the content's colours: only the stylised lightness is used (Lab)."}),
        }, "optional": {
            "style": ("IMAGE", {"tooltip": "The style image(s) for MicroAST/AdaIN: 1, or as many as content images."}),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip":
                          "Tile side in pixels; 0: from free memory. Tiled equals untiled (whole-image statistics)."}),
        }}

    def apply(self, style_model, content, strength: float, style_size: int, preserve_colours: bool, style=None,
              tile_size: int = 0):
        desc = _style_model(style_model)
        x = image_to_bchw(content, "content")
        s = image_to_bchw(style, "style") if style is not None else None
        out, notes = transfer.stylise(desc, x, s, strength=strength, style_size=style_size,
                                      preserve_colours=preserve_colours, tile=tile_size or None, manager=get_manager())
        for n in notes:
            log.warning("Style Transfer: %s", n)
        text = "\n".join(notes)
        return {"ui": {"text": [text]}, "result": (bchw_to_image(out), text)}


class AtelierColourTransfer:
    DESCRIPTION = ("Gives an image the colours of a reference: Reinhard (mean and spread of each Lab channel) or "
                   "histogram matching (each RGB channel). Optionally only inside a mask (statistics of the image "
                   "from the masked part) and with the reference's statistics from its own mask, e.g. an inpainted "
                   "region matched to its surroundings. Alpha is kept.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The recoloured images.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image(s) to recolour."}),
            "reference": ("IMAGE", {"tooltip": "Colours to take: 1 image for all, or one per image; any size."}),
            "method": (list(colour.METHODS), {"default": "reinhard", "tooltip":
                       "reinhard: match mean and standard deviation in Lab (smooth, keeps contrast shape); "
                       "histogram: match each RGB channel's full distribution (closer, can posterise)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                         "1: full transfer; 0: the image unchanged."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Where to change the image (soft values blend); its statistics come from "
                              "here too. Empty: the whole image."}),
            "ref_mask": ("MASK", {"tooltip": "Where the reference's statistics come from (e.g. the inverted "
                                        "inpainting mask on the same picture). Empty: the whole reference."}),
        }}

    def apply(self, image, reference, method: str, strength: float, mask=None, ref_mask=None):
        x, alpha = split_alpha(image_to_bchw(image, "image"))
        ref, _ = split_alpha(image_to_bchw(reference, "reference"))
        x, ref = (t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t for t in (x, ref))
        with torch.inference_mode():
            out = colour.colour_transfer(x, ref, method, mask=_mask(mask, "mask"),
                                         ref_mask=_mask(ref_mask, "ref_mask"), strength=strength)
        if alpha is not None:
            out = torch.cat([out, alpha], 1)
        return (bchw_to_image(out),)


NODE_CLASS_MAPPINGS = {
    "AtelierLoadStyleModel": AtelierLoadStyleModel,
    "AtelierStyleTransfer": AtelierStyleTransfer,
    "AtelierColourTransfer": AtelierColourTransfer,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierLoadStyleModel": "Atelier Load Style Model",
    "AtelierStyleTransfer": "Atelier Style Transfer",
    "AtelierColourTransfer": "Atelier Colour Transfer",
}
