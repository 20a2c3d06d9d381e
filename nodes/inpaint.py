"""Inpainting nodes: Load Inpaint Model, Inpaint (LaMa/MAT at full resolution), mask tools, crop and stitch around
any inpainter (core's diffusion included), pre-fill, colour match.

Socket types: INPAINT_MODEL (our descriptor; a spandrel MaskedImageModelDescriptor from another pack's loader is
accepted too) and ATELIER_STITCH (what Inpaint Crop hands to Inpaint Stitch). The logic is in models/inpaint/ and
models/masks.py; these classes only declare inputs and convert.
"""
from __future__ import annotations

import torch

from ..models import masks as M
from ..models.errors import InputError
from ..models.inpaint import inpaint as _ip
from ..models.inpaint import prefill as _pf
from ..models.inpaint import stitch as _st
from ..models.manager import get_manager
from .common import bchw_to_image, image_to_bchw, model_choices

CATEGORY = "atelier/inpaint"
MODEL = "INPAINT_MODEL"
STITCH = "ATELIER_STITCH"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
STRATEGY_TIP = ("original: the whole image at its size, padded to the model's multiple: sharpest, but memory grows "
                "with the image and a model trained at 256-512 px sees a small hole in a huge image as it never did. "
                "crop: each masked region with 'context' pixels around it, at native pixel size, pasted back: "
                "sharp, memory bounded by the largest region at any image size; the model sees only the context. "
                "resize: the whole image with its longest side limited to max_side, the fill upscaled and only the "
                "masked pixels taken: global context, softer fill.")


def _mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """ComfyUI MASK [B,H,W] (or [H,W]) -> [B,H,W] float, checked."""
    return M.as_mask(mask, name)


def _mask_in(tip: str = "Mask: 1 (white) where pixels are to be filled.") -> tuple:
    return ("MASK", {"tooltip": tip})


def _image_in(tip: str = "Images to inpaint (RGB, grey or RGBA: alpha is kept aside and restored).") -> tuple:
    return ("IMAGE", {"tooltip": tip})


class AtelierLoadInpaintModel:
    DESCRIPTION = ("Loads an inpainting model from models/inpaint: LaMa (big-lama.pt, a TorchScript archive, is read "
                   "without running its code; .pth/.safetensors state dicts too), MAT and every masked-image "
                   "architecture spandrel (and spandrel_extra_arches, when installed) detects.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("inpaint_model",)
    OUTPUT_TOOLTIPS = ("The model, for Atelier Inpaint.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (model_choices("inpaint"), {"tooltip": "A model file in models/inpaint."})}}

    def load(self, model_name: str):
        return (get_manager().load(model_name, "inpaint", family="inpaint"),)


class AtelierInpaint:
    DESCRIPTION = ("Fills the masked pixels with an inpainting model at full resolution (no squashing to 256 px). "
                   "Unmasked pixels come back bit for bit; soft masks blend. One mask for the whole batch or one per "
                   "image; an empty mask returns the image untouched.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "note")
    OUTPUT_TOOLTIPS = ("The inpainted images.", "What was done beyond the obvious (empty or full masks, a resized "
                       "mask, crops run scaled down to fit memory).")
    FUNCTION = "inpaint"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "inpaint_model": (MODEL, {"tooltip": "From Atelier Load Inpaint Model."}),
            "image": _image_in(),
            "mask": _mask_in("1 (white) where pixels are filled; one mask for all images or one per image."),
            "strategy": (list(_ip.STRATEGIES), {"default": "crop", "tooltip": STRATEGY_TIP}),
            "context": ("INT", {"default": 128, "min": 0, "max": 4096, "step": 8, "tooltip": "crop: pixels of "
                                "context around each masked region (regions closer than twice this merge)."}),
            "max_side": ("INT", {"default": 1024, "min": 16, "max": _ip.MAX_SIDE, "step": 8,
                                 "tooltip": "resize: longest side the model sees."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "MAT's latent (image i: seed + i); LaMa is deterministic and ignores it."}),
        }, "optional": {
            "resize_mask": ("BOOLEAN", {"default": False, "tooltip": "A mask of another size than the image: "
                                        "resize it (said in the note) instead of stopping with an error."}),
        }}

    def inpaint(self, inpaint_model, image, mask, strategy: str = "crop", context: int = 128,
                max_side: int = 1024, seed: int = 0, resize_mask: bool = False):
        desc = get_manager().adopt(_ip.descriptor_of(inpaint_model))
        x = image_to_bchw(image, "image")
        with torch.inference_mode():
            out, note = _ip.inpaint(desc, x, _mask(mask), strategy=strategy, context=context, max_side=max_side,
                                    seed=seed, resize_mask=resize_mask, manager=get_manager())
        return (bchw_to_image(out), note)


# ---------------------------------------------------------------- mask tools


class _MaskNode:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("The mask.",)
    FUNCTION = "run"


class AtelierMaskGrow(_MaskNode):
    DESCRIPTION = ("Grows (positive pixels) or shrinks (negative) a mask by a round disk, then feathers its edge. "
                   "Works on soft masks (grey dilation/erosion).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": _mask_in("The mask to grow or shrink."),
            "pixels": ("INT", {"default": 8, "min": -M.MAX_RADIUS, "max": M.MAX_RADIUS, "tooltip":
                               "Radius in pixels: positive grows, negative shrinks, 0 leaves the shape."}),
            "feather": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "Width in pixels of a soft edge "
                                "centred on the mask's edge (a Gaussian blur, sigma = width / 4); 0: hard edge."}),
        }}

    def run(self, mask, pixels: int = 8, feather: int = 0):
        m = M.grow(_mask(mask), pixels)
        return (M.feather(m, feather) if feather else m,)


class AtelierMaskFillHoles(_MaskNode):
    DESCRIPTION = "Fills the holes of a mask: unmasked areas enclosed by the mask (not touching the border) become 1."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": _mask_in("The mask whose enclosed holes are filled.")}}

    def run(self, mask):
        return (M.fill_holes(_mask(mask)),)


class AtelierMaskThreshold(_MaskNode):
    DESCRIPTION = ("Cleans mask values: 'threshold' makes it hard (1 above the value, else 0); 'stabilise' snaps "
                   "values within the value of 0 or 1 to exactly 0 or 1 (a 0.9999 that looks opaque becomes 1, a "
                   "0.0001 that looks empty becomes 0) and keeps the rest.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": _mask_in("The mask to clean."),
            "mode": (["threshold", "stabilise"], {"default": "stabilise", "tooltip": "threshold: hard mask; "
                     "stabilise: only near-0 and near-1 values snapped."}),
            "value": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                "threshold: the cut-off; stabilise: epsilon (below 0.5)."}),
        }}

    def run(self, mask, mode: str = "stabilise", value: float = 0.01):
        m = _mask(mask)
        if mode == "threshold":
            return (M.threshold(m, value),)
        if mode == "stabilise":
            return (M.stabilise(m, value),)
        raise InputError(f"mode: expected 'threshold' or 'stabilise', got {mode!r}")


class AtelierMaskInvert(_MaskNode):
    DESCRIPTION = "Inverts a mask (1 - mask)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": _mask_in("The mask to invert.")}}

    def run(self, mask):
        return (M.invert(_mask(mask)),)


class AtelierMaskFromAlpha(_MaskNode):
    DESCRIPTION = ("A mask from an image's alpha channel, as core's Load Image makes it: transparent pixels are the "
                   "ones to fill (mask = 1 - alpha). An image without alpha gives an empty mask of its size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "An RGBA (or grey + alpha) image."}),
            "invert": ("BOOLEAN", {"default": False, "tooltip": "Mask the opaque pixels instead."}),
        }}

    def run(self, image, invert: bool = False):
        x = image_to_bchw(image, "image")
        alpha = x[:, -1] if x.shape[1] in (2, 4) else torch.ones_like(x[:, 0])
        m = M.from_alpha(alpha)
        return (M.invert(m) if invert else m,)


class AtelierMaskBox(_MaskNode):
    DESCRIPTION = "The bounding box of each mask (grown by padding pixels) as a mask; an empty mask stays empty."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": _mask_in("The mask whose bounding box is taken."),
            "padding": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Pixels added on each side."}),
        }}

    def run(self, mask, padding: int = 0):
        return (M.bbox_mask(_mask(mask), padding),)


# ---------------------------------------------------------------- crop, stitch, pre-fill, colour match


class AtelierInpaintCrop:
    DESCRIPTION = ("Cuts the region around the mask (one box for the batch) with context, resized for an inpainter: "
                   "e.g. to 512 px for an SD 1.5 inpaint through VAE Encode -> Set Latent Noise Mask -> KSampler, or "
                   "native pixels for LaMa. Inpaint Stitch pastes the result back.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", STITCH)
    RETURN_NAMES = ("image", "mask", "stitch")
    OUTPUT_TOOLTIPS = ("The crop, resized.", "The mask of the crop, resized.", "For Inpaint Stitch.")
    FUNCTION = "crop"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": _image_in("Images to crop (one box for the whole batch)."),
            "mask": _mask_in("1 where pixels are to be filled; the crop goes around it."),
            "context": ("FLOAT", {"default": 1.5, "min": 1.0, "max": 16.0, "step": 0.1, "tooltip": "The mask's "
                                  "bounding box is scaled by this around its centre."}),
            "padding": ("INT", {"default": 32, "min": 0, "max": 4096, "tooltip": "Pixels added on each side."}),
            "mode": (list(_st.CROP_MODES), {"default": "size", "tooltip": "size: longest side to 'size' (up or "
                     "down); native: no resize; min size: upscaled only when smaller than 'size'."}),
            "size": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Target longest side."}),
            "multiple": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Both sides a multiple of this "
                                 "(8 for SD VAEs)."}),
        }}

    def crop(self, image, mask, context: float = 1.5, padding: int = 32, mode: str = "size", size: int = 512,
             multiple: int = 8):
        info = _st.crop_for_inpaint(image_to_bchw(image, "image"), _mask(mask), context=context, padding=padding,
                                    mode=mode, size=size, multiple=multiple)
        return (bchw_to_image(info.image), info.crop_mask.cpu().float(), info)


class AtelierInpaintStitch:
    DESCRIPTION = ("Pastes an inpainted crop back into the original image, only where the mask is, with a blend of "
                   "N pixels inside the mask's edge. Unmasked pixels come back bit for bit, whatever the inpainter "
                   "(a VAE round trip, a sampler) did to them.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The original images with the inpainted region.",)
    FUNCTION = "stitch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "stitch": (STITCH, {"tooltip": "From Atelier Inpaint Crop."}),
            "image": ("IMAGE", {"tooltip": "The inpainted crop (any size: it is resized back)."}),
            "blend": ("INT", {"default": 16, "min": 0, "max": 1024, "tooltip": "Pixels inside the mask's edge over "
                              "which the result fades in; 0: the mask as it is."}),
        }}

    def stitch(self, stitch, image, blend: int = 16):
        if not isinstance(stitch, _st.CropInfo):
            raise InputError(f"stitch: expected the output of Atelier Inpaint Crop, got {type(stitch).__name__}")
        return (bchw_to_image(_st.stitch(stitch, image_to_bchw(image, "image"), blend)),)


class AtelierInpaintPrefill:
    DESCRIPTION = ("Pre-fills the masked pixels before a model or a sampler: neutral grey, OpenCV Telea or "
                   "Navier-Stokes, or a masked blur. Helps diffusion at high denoise not to reproduce what was under "
                   "the mask.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The images with the hole pre-filled.",)
    FUNCTION = "prefill"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": _image_in("Images to pre-fill."),
            "mask": _mask_in(),
            "method": (list(_pf.PREFILL_METHODS), {"default": "telea", "tooltip": "neutral: 0.5 grey; telea / "
                       "navier-stokes: OpenCV's inpaint (8-bit); blur: Gaussian-weighted mean of the known pixels."}),
            "radius": ("FLOAT", {"default": 5.0, "min": 0.5, "max": 256.0, "step": 0.5, "tooltip": "OpenCV: the "
                                 "neighbourhood radius; blur: the starting sigma (doubled until the hole is covered)."}),
        }}

    def prefill(self, image, mask, method: str = "telea", radius: float = 5.0):
        return (bchw_to_image(_pf.prefill(image_to_bchw(image, "image"), _mask(mask), method, radius)),)


class AtelierColourMatch:
    DESCRIPTION = ("Matches the colours of the filled region to its surroundings in the original (masked mean/std "
                   "in Lab, or histograms), then composites it over the original with the mask: removes the colour "
                   "shift an inpainter or a VAE round trip leaves.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The original with the colour-matched fill.",)
    FUNCTION = "match"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The inpainted images (same size as the original)."}),
            "original": ("IMAGE", {"tooltip": "The images before inpainting."}),
            "mask": _mask_in("1 where the fill is."),
            "method": (list(_pf.COLOUR_METHODS), {"default": "reinhard", "tooltip": "reinhard: mean and std per "
                       "channel in Lab; histogram: each channel's histogram."}),
            "ring": ("INT", {"default": 32, "min": 0, "max": 4096, "tooltip": "Statistics from a ring this many "
                             "pixels wide around the mask; 0: the whole unmasked image."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "0: no change; 1: full match."}),
        }}

    def match(self, image, original, mask, method: str = "reinhard", ring: int = 32, strength: float = 1.0):
        out = _pf.colour_match(image_to_bchw(image, "image"), image_to_bchw(original, "original"), _mask(mask),
                               method, ring, strength)
        return (bchw_to_image(out),)


NODE_CLASS_MAPPINGS = {
    "AtelierLoadInpaintModel": AtelierLoadInpaintModel,
    "AtelierInpaint": AtelierInpaint,
    "AtelierMaskGrow": AtelierMaskGrow,
    "AtelierMaskFillHoles": AtelierMaskFillHoles,
    "AtelierMaskThreshold": AtelierMaskThreshold,
    "AtelierMaskInvert": AtelierMaskInvert,
    "AtelierMaskFromAlpha": AtelierMaskFromAlpha,
    "AtelierMaskBox": AtelierMaskBox,
    "AtelierInpaintCrop": AtelierInpaintCrop,
    "AtelierInpaintStitch": AtelierInpaintStitch,
    "AtelierInpaintPrefill": AtelierInpaintPrefill,
    "AtelierColourMatch": AtelierColourMatch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierLoadInpaintModel": "Atelier Load Inpaint Model",
    "AtelierInpaint": "Atelier Inpaint",
    "AtelierMaskGrow": "Atelier Mask Grow / Shrink",
    "AtelierMaskFillHoles": "Atelier Mask Fill Holes",
    "AtelierMaskThreshold": "Atelier Mask Threshold / Stabilise",
    "AtelierMaskInvert": "Atelier Mask Invert",
    "AtelierMaskFromAlpha": "Atelier Mask From Alpha",
    "AtelierMaskBox": "Atelier Mask Bounding Box",
    "AtelierInpaintCrop": "Atelier Inpaint Crop",
    "AtelierInpaintStitch": "Atelier Inpaint Stitch",
    "AtelierInpaintPrefill": "Atelier Inpaint Pre-fill",
    "AtelierColourMatch": "Atelier Colour Match",
}
