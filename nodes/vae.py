"""VAE nodes: Load VAE, VAE Encode, VAE Decode, VAE Sample (draws from the prior), Latent Interpolate.

Load VAE outputs ATELIER_VAE (a `models.vae.codec.VAE`: the encoder's and decoder's descriptors; core's VAE type is
a comfy.sd.VAE that only ComfyUI can build). Latents are core's LATENT ({"samples": unscaled latents [B,c,h,w]}), so
core's VAEDecode/VAEEncode with the same file, the samplers and these nodes chain either way. An encode of an image
whose sides are not multiples of 8 pads it and records the size under "atelier_image_size"; our decode crops back
to it (core's nodes ignore the key). The logic is in models/vae/codec.py.
"""
from __future__ import annotations

from ..models.errors import InputError
from ..models.manager import get_manager
from ..models.vae import codec
from .common import (bchw_to_image, image_to_bchw, latent_in, latent_out, model_input, seed_input, split_choice,
                     tile_input)

CATEGORY = "atelier/vae"
VAE_TYPE = "ATELIER_VAE"
FOLDERS = ("vae", "vae_approx")
SIZE_KEY = "atelier_image_size"
TILE_TIP = ("Tile side in image pixels; 0 picks it from free memory (one call when the image fits). Tiled equals "
            "untiled: TAESD tiles overlap by the receptive field, KL autoencoders run in bands with whole-image "
            "GroupNorm statistics.")


def _vae(vae: object) -> codec.VAE:
    if not isinstance(vae, codec.VAE):
        raise InputError(f"vae: expected an ATELIER_VAE from Atelier Load VAE, got {type(vae).__name__} "
                         "(core's VAE type goes to core's VAE Encode/Decode)")
    return vae


class AtelierLoadVAE:
    DESCRIPTION = ("Loads a VAE from models/vae or models/vae_approx: KL autoencoders (SD1/SD2/SDXL, SD3/Flux "
                   "16-channel; CompVis or diffusers keys, bare or inside a checkpoint), the TAESD family (taesd, "
                   "taesdxl, taesd3, taef1, taef2), fully connected VAEs (MNIST) and the pack's convolutional VAEs "
                   "(ConvVAE, as the VAE trainer saves them). A TAESD *_encoder or *_decoder file brings its "
                   "companion from the same folder, so either name gives the whole autoencoder. Files are read "
                   "safely (no code in them runs).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (VAE_TYPE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The autoencoder, for the Atelier VAE nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": model_input(*FOLDERS, prefixed=True, tooltip="A VAE file, as folder/name "
                                                     "(models/vae or models/vae_approx).")}}

    def load(self, vae_name: str):
        folder, name = split_choice(vae_name, FOLDERS, "vae_name")
        return (codec.load_vae(name, folder, manager=get_manager()),)


class AtelierVAEEncode:
    DESCRIPTION = ("Encodes images to a LATENT (unscaled latents, core's convention): the posterior mean, or a draw "
                   "from the posterior with a seed (KL, fully connected and convolutional VAEs; TAESD is "
                   "deterministic). Sides that are not multiples of 8 are padded and cropped back by Atelier VAE "
                   "Decode. Large images are tiled automatically; alpha is dropped.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The latents, for Atelier VAE Decode, core's VAE Decode (same file) or a sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE_TYPE, {"tooltip": "From Atelier Load VAE."}),
            "image": ("IMAGE", {"tooltip": "Images to encode (RGB; grey is expanded, alpha dropped)."}),
            "mode": (["mean", "sample"], {"default": "mean", "tooltip": "mean: the posterior mean (what core's VAE "
                                          "Encode gives); sample: a seeded draw from the posterior."}),
            "seed": seed_input("Seed of the draw in 'sample' mode; image i of the batch uses seed + i.", control=False),
        }, "optional": {"tile_size": tile_input(TILE_TIP)}}

    def encode(self, vae, image, mode: str = "mean", seed: int = 0, tile_size: int = 0):
        vae = _vae(vae)
        if mode not in ("mean", "sample"):
            raise InputError(f"mode: expected 'mean' or 'sample', got {mode!r}")
        x = image_to_bchw(image, "image")  # [B,C,H,W]
        z = codec.encode(vae, x, sample=mode == "sample", seed=seed, tile=tile_size or None, manager=get_manager())
        return (latent_out(z, **{SIZE_KEY: _padded_size(vae, *x.shape[-2:])}),)


class AtelierVAEDecode:
    DESCRIPTION = ("Decodes a LATENT to images. Takes latents from Atelier VAE Encode/Sample, core's VAE Encode or a "
                   "sampler (unscaled, core's convention); TAEF2 also takes FLUX.2's packed 128-channel layout. A "
                   "latent whose channels do not match the VAE, or with NaN values, is an error. Large images are "
                   "decoded in tiles or bands automatically; a half-precision overflow is redone in float32.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE_TYPE, {"tooltip": "From Atelier Load VAE: the VAE the latent was made with."}),
            "samples": ("LATENT", {"tooltip": "Latents to decode."}),
        }, "optional": {"tile_size": tile_input(TILE_TIP)}}

    def decode(self, vae, samples, tile_size: int = 0):
        vae = _vae(vae)
        latent = latent_in(samples, "samples")
        size = latent.get(SIZE_KEY)
        out = codec.decode(vae, latent["samples"], size=tuple(size) if size else None, tile=tile_size or None,
                           manager=get_manager(), name="samples")
        return (bchw_to_image(out, rgb=True, fresh=True),)  # a greyscale VAE (MNIST): IMAGE is RGB


class AtelierVAESample:
    DESCRIPTION = ("Draws latents from the VAE's prior, N(0, temperature^2), with a seed: a VAE used as a generator "
                   "(e.g. the MNIST VAE makes digits). Decode them with Atelier VAE Decode.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latents drawn from the prior.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE_TYPE, {"tooltip": "From Atelier Load VAE."}),
            "width": ("INT", {"default": 512, "min": 8, "max": codec.MAX_SIDE, "step": 8, "tooltip": "Image width the "
                              "latents decode to (a VAE with a flat latent, e.g. MNIST's, has one size: ignored)."}),
            "height": ("INT", {"default": 512, "min": 8, "max": codec.MAX_SIDE, "step": 8, "tooltip": "Image height "
                               "the latents decode to (ignored by a VAE with a flat latent)."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 4096, "tooltip": "Number of latents."}),
            "seed": seed_input("Seed of the first latent; latent i of the batch uses seed + i."),
            "temperature": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "Standard "
                                      "deviation of the draws; below 1 gives more typical, less varied samples."}),
        }}

    def sample(self, vae, width: int, height: int, batch_size: int, seed: int, temperature: float = 1.0):
        vae = _vae(vae)
        z = codec.sample_prior(vae, batch_size, height, width, seed, temperature)
        return (latent_out(z, **{SIZE_KEY: _padded_size(vae, height, width)}),)


class AtelierLatentInterpolate:
    DESCRIPTION = ("Interpolates between two latents in N steps (both ends included), output as one batch: slerp "
                   "(along the great circle, keeps the norm of Gaussian latents) or lerp (straight line). Batches pair "
                   "up sample by sample; a batch of one pairs with every sample of the other.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("steps latents per pair, ordered pair by pair (a, ..., b).",)
    FUNCTION = "interpolate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent_a": ("LATENT", {"tooltip": "Start latent(s)."}),
            "latent_b": ("LATENT", {"tooltip": "End latent(s), same channels and size as latent_a."}),
            "steps": ("INT", {"default": 8, "min": 2, "max": 1024, "tooltip": "Latents per pair, both ends included."}),
            "mode": (list(codec.INTERPOLATIONS), {"default": "slerp", "tooltip": "slerp: spherical (for Gaussian "
                                                   "latents); lerp: linear."}),
        }}

    def interpolate(self, latent_a, latent_b, steps: int, mode: str = "slerp"):
        a, b = latent_in(latent_a, "latent_a"), latent_in(latent_b, "latent_b")
        size = a.get(SIZE_KEY) if a.get(SIZE_KEY) == b.get(SIZE_KEY) else None
        return (latent_out(codec.interpolate(a["samples"], b["samples"], steps, mode), **{SIZE_KEY: size}),)


def _padded_size(vae: codec.VAE, height: int, width: int) -> list[int] | None:
    """The image size to crop back to, when it is not a multiple of the VAE's downscale."""
    if vae.fixed_size is None and (height % vae.downscale or width % vae.downscale):
        return [int(height), int(width)]
    return None


NODE_CLASS_MAPPINGS = {
    "AtelierLoadVAE": AtelierLoadVAE,
    "AtelierVAEEncode": AtelierVAEEncode,
    "AtelierVAEDecode": AtelierVAEDecode,
    "AtelierVAESample": AtelierVAESample,
    "AtelierLatentInterpolate": AtelierLatentInterpolate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierLoadVAE": "Atelier Load VAE",
    "AtelierVAEEncode": "Atelier VAE Encode",
    "AtelierVAEDecode": "Atelier VAE Decode",
    "AtelierVAESample": "Atelier VAE Sample",
    "AtelierLatentInterpolate": "Atelier Latent Interpolate",
}
