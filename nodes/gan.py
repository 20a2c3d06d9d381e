"""GAN nodes: load a generator, make latents, sample, interpolate, mix styles, project images, image-to-image.

Socket types: ATELIER_GAN (the generator's ModelDescriptor) and GAN_LATENT (`models.gan.sampling.GANLatent`: the
latent tensor, its space, the identity of its model and the class labels). The logic is in models/gan/sampling.py
and models/gan/project.py; these classes only declare inputs and convert.
"""
from __future__ import annotations

from ..models.gan import project as _project
from ..models.gan import sampling as _sampling
from ..models.manager import get_manager
from .common import bchw_to_image, image_to_bchw, model_input, seed_input, tile_input

CATEGORY = "atelier/gan"
GAN = "ATELIER_GAN"
LATENT = "GAN_LATENT"
CLASS_TIP = ("Class of a class-conditional model (0 .. classes-1); -1: a random class per image from the seed. "
             "Must stay -1 for unconditional models.")


def _gan(tooltip: str = "A GAN from Load GAN.") -> tuple:
    return (GAN, {"tooltip": tooltip})


class AtelierLoadGAN:
    DESCRIPTION = ("Loads a GAN from the gans model folder: StyleGAN2/3 (NVIDIA .pkl or .pt/.safetensors), DCGAN, "
                   "MLP GANs, CycleGAN/pix2pix generators. Detected from the weights; nothing in the file is run.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (GAN,)
    RETURN_NAMES = ("gan",)
    OUTPUT_TOOLTIPS = ("The loaded generator, for GAN Latent / GAN Sample / GAN Project or Image-to-Image GAN.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"gan_name": model_input("gans", tooltip="A model file in models/gans.")}}

    def load(self, gan_name: str):
        return (get_manager().load(gan_name, "gans", family="gan"),)


class AtelierGANLatent:
    DESCRIPTION = ("Latent codes for a generator from a seed: image i of the batch uses seed + i, the same on every "
                   "device. In w space (StyleGAN) the codes are mapped without truncation; GAN Sample truncates.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latent codes tied to this generator.",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gan": _gan("The generator the latents are for (they are refused by other models)."),
            "seed": seed_input("Seed of the first image; image i of the batch uses seed + i."),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Number of latents."}),
            "space": (list(_sampling.SPACES), {"default": "auto", "tooltip": "z: the input noise; w: StyleGAN's "
                      "intermediate space (mixing, lerp); auto: w where the model has one, else z."}),
            "class_label": ("INT", {"default": -1, "min": -1, "max": 100000, "tooltip": CLASS_TIP}),
        }}

    def make(self, gan, seed: int, batch_size: int, space: str, class_label: int):
        return (_sampling.make_latent(get_manager(), gan, seed, batch_size, space, class_label),)


class AtelierGANSample:
    DESCRIPTION = ("Generates images from GAN latents: truncation toward the model's mean w (z-only models: z * psi), "
                   "optionally only for the first layers, noise const/random/none, batched within memory.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("One image per latent, at the model's resolution.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gan": _gan(),
            "latent": (LATENT, {"tooltip": "Latents made for this generator (GAN Latent, Interpolate, Style Mix, "
                                "Project)."}),
            "truncation_psi": ("FLOAT", {"default": 0.7, "min": -2.0, "max": 2.0, "step": 0.05, "tooltip":
                               "1: no truncation; below 1: closer to the average image (cleaner, less varied); "
                               "0: the average; negative: the 'opposite'."}),
            "truncation_cutoff": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip":
                                  "Truncate only the first N style layers (coarse features); 0: all layers."}),
            "noise_mode": (list(_sampling.NOISE_MODES), {"default": "const", "tooltip":
                           "StyleGAN2 per-pixel noise: const (the model's stored noise, reproducible), random "
                           "(from noise_seed), none. Other models have no noise inputs."}),
            "noise_seed": seed_input("Seed of the per-pixel noise in 'random' noise mode (the other modes ignore it)."),
        }}

    def sample(self, gan, latent, truncation_psi: float, truncation_cutoff: int, noise_mode: str, noise_seed: int):
        img = _sampling.sample(get_manager(), gan, latent, truncation_psi, truncation_cutoff or None, noise_mode,
                               noise_seed)
        return (bchw_to_image(img, rgb=True, fresh=True),)


class AtelierGANInterpolate:
    DESCRIPTION = ("A latent walk as a batch: from latent_a to latent_b in N steps (lerp in w, slerp in z), or with "
                   "latent_b unconnected through latent_a's batch as keyframes. Feed GAN Sample to get the frames.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The in-between latents, frames of one item after another.",)
    FUNCTION = "interpolate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent_a": (LATENT, {"tooltip": "Start latents (or, without latent_b, the keyframes of a walk)."}),
                "steps": ("INT", {"default": 16, "min": 1, "max": 4096, "tooltip":
                          "With latent_b: frames from a to b, both included (at least 2). Without: frames per "
                          "keyframe segment."}),
                "method": (list(_sampling.INTERPOLATIONS), {"default": "auto", "tooltip":
                           "auto: slerp for z (keeps Gaussian noise on its shell), lerp for w."}),
                "loop": ("BOOLEAN", {"default": True, "tooltip":
                         "Walk only: return to the first keyframe, so the frames repeat seamlessly."}),
            },
            "optional": {"latent_b": (LATENT, {"tooltip": "End latents (same model and space as latent_a)."})},
        }

    def interpolate(self, latent_a, steps: int, method: str, loop: bool, latent_b=None):
        if latent_b is None:
            return (_sampling.walk(latent_a, steps, method, loop),)
        return (_sampling.interpolate(latent_a, latent_b, steps, method),)


class AtelierGANStyleMix:
    DESCRIPTION = ("StyleGAN style mixing: takes the coarse (pose, shape), middle (features) and/or fine (colour, "
                   "texture) layers of the w latent from a second latent.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The mixed latent, in w space.",)
    FUNCTION = "mix"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "gan": _gan("The StyleGAN both latents belong to."),
                "latent": (LATENT, {"tooltip": "The base latents."}),
                "style_latent": (LATENT, {"tooltip": "Where the chosen layers come from (batch of 1, or as latent)."}),
                "coarse": ("BOOLEAN", {"default": False, "tooltip": "Take the coarse layers (about 4-8 px: pose, "
                           "face shape) from style_latent."}),
                "middle": ("BOOLEAN", {"default": False, "tooltip": "Take the middle layers (16-32 px: features, "
                           "hair style) from style_latent."}),
                "fine": ("BOOLEAN", {"default": True, "tooltip": "Take the fine layers (64 px and up: colours, "
                         "micro-texture) from style_latent."}),
            },
            "optional": {
                "layers": ("STRING", {"default": "", "tooltip": "Explicit layer indices instead, e.g. '0-3, 8'; "
                           "empty: use the checkboxes."}),
            },
        }

    def mix(self, gan, latent, style_latent, coarse: bool, middle: bool, fine: bool, layers: str = ""):
        rows = _sampling.style_layers(gan, coarse, middle, fine, layers)
        return (_sampling.mix_styles(get_manager(), gan, latent, style_latent, rows),)


class AtelierGANProject:
    DESCRIPTION = ("Finds the latent of an image (GAN inversion) by optimisation: Adam on w, w+ or z with a pixel "
                   "plus multi-scale structural loss (nothing downloaded). Images are centre-cropped and resized to "
                   "the model's size, with a note.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT, "IMAGE", "STRING")
    RETURN_NAMES = ("latent", "reconstruction", "report")
    OUTPUT_TOOLTIPS = ("The latent found (w for w/w+, z for z).", "What the latent generates (noise const).",
                       "Notes on resizing and the PSNR reached per image.")
    FUNCTION = "project"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gan": _gan(),
            "image": ("IMAGE", {"tooltip": "The target image(s); each is projected on its own."}),
            "space": (list(_project.PROJECT_SPACES), {"default": "auto", "tooltip":
                      "w: one style vector (stays on the model's manifold); w+: one per layer (closer fit, less "
                      "editable); z: the input noise (DCGAN/MLP have only z); auto: w where there is one, else z."}),
            "steps": ("INT", {"default": 300, "min": 1, "max": 10000, "tooltip": "Optimisation steps."}),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.005, "tooltip":
                              "Adam's peak learning rate (ramped up, then down); 0: automatic (0.1 in w, 0.2 in z)."}),
            "class_label": ("INT", {"default": -1, "min": -1, "max": 100000, "tooltip":
                            "Conditional models: the target's class; -1: picked by the start search."}),
            "seed": seed_input("Seed of the random starting points tried before optimising."),
        }}

    def project(self, gan, image, space: str, steps: int, learning_rate: float, class_label: int, seed: int):
        res = _project.project(get_manager(), gan, image_to_bchw(image, "image"), space=space, steps=steps,
                               lr=learning_rate, class_label=class_label, seed=seed)
        return {"ui": {"text": [res.note]}, "result": (res.latent, bchw_to_image(res.image, rgb=True), res.note)}


class AtelierImageToImageGAN:
    DESCRIPTION = ("Applies a CycleGAN/pix2pix generator to images of any size (tiled by the shared engine when "
                   "large; padded to the model's size multiple and cropped back).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The translated images, same size as the input.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gan": _gan("An image-to-image GAN (CycleGAN/pix2pix) from Load GAN."),
            "image": ("IMAGE", {"tooltip": "The images to translate."}),
            "tile_size": tile_input("Tile side in pixels; 0: automatic (the whole image when memory allows)."),
        }}

    def apply(self, gan, image, tile_size: int):
        out = _sampling.translate(get_manager(), gan, image_to_bchw(image, "image"), tile=tile_size or None)
        return (bchw_to_image(out, rgb=True, fresh=True),)


class AtelierGANInpaint:
    DESCRIPTION = ("Semantic inpainting with a GAN prior (Yeh et al. 2017): the projection fits the latent to the "
                   "known pixels only, then the generator's image fills the hole, blended inside its edge. Suits "
                   "images of the model's domain (faces for a face GAN); unmasked pixels come back bit for bit.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", LATENT, "STRING")
    RETURN_NAMES = ("image", "latent", "report")
    OUTPUT_TOOLTIPS = ("The completed images.", "The latent found.", "Notes and the PSNR on the known pixels.")
    FUNCTION = "inpaint"

    @classmethod
    def INPUT_TYPES(cls):
        spec = AtelierGANProject.INPUT_TYPES()["required"]
        return {"required": {
            "gan": _gan(),
            "image": ("IMAGE", {"tooltip": "Images with a hole (a non-square image is filled in its centre square)."}),
            "mask": ("MASK", {"tooltip": "1 (white) on the hole; one mask for all images or one per image."}),
            "blend": ("INT", {"default": 2, "min": 0, "max": 256, "tooltip": "Pixels inside the hole's edge over "
                              "which the generated image fades in."}),
            **{k: spec[k] for k in ("space", "steps", "learning_rate", "seed")},
        }}

    def inpaint(self, gan, image, mask, blend: int, space: str, steps: int, learning_rate: float, seed: int):
        x = image_to_bchw(image, "image")
        m = mask if mask.ndim == 3 else mask.reshape(-1, *mask.shape[-2:])
        out, res = _project.complete(get_manager(), gan, x, m, blend=blend, space=space, steps=steps,
                                     lr=learning_rate, seed=seed)
        return {"ui": {"text": [res.note]}, "result": (bchw_to_image(out), res.latent, res.note)}


NODE_CLASS_MAPPINGS = {
    "AtelierLoadGAN": AtelierLoadGAN,
    "AtelierGANLatent": AtelierGANLatent,
    "AtelierGANSample": AtelierGANSample,
    "AtelierGANInterpolate": AtelierGANInterpolate,
    "AtelierGANStyleMix": AtelierGANStyleMix,
    "AtelierGANProject": AtelierGANProject,
    "AtelierImageToImageGAN": AtelierImageToImageGAN,
    "AtelierGANInpaint": AtelierGANInpaint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierLoadGAN": "Atelier Load GAN",
    "AtelierGANLatent": "Atelier GAN Latent",
    "AtelierGANSample": "Atelier GAN Sample",
    "AtelierGANInterpolate": "Atelier GAN Interpolate",
    "AtelierGANStyleMix": "Atelier GAN Style Mix",
    "AtelierGANProject": "Atelier GAN Project",
    "AtelierImageToImageGAN": "Atelier Image-to-Image GAN",
    "AtelierGANInpaint": "Atelier GAN Inpaint",
}
