"""Diffusion nodes: Load Diffusion Model, Diffusion Sample, Diffusion Img2Img, RePaint.

Socket type ATELIER_DIFFUSION: the denoiser network's ModelDescriptor (facts in `desc.extra`, a DiffusionFacts).
Pixel models give IMAGE; latent models give LATENT (core's {"samples": [B,C,h,w]}) and, on the IMAGE output, a
rough look at their first three channels. The LATENT output of a pixel model holds its pixels in -1..1, so it can go
back into Img2Img. The logic is in models/diffusion/run.py and repaint.py; these classes only declare and convert.
"""
from __future__ import annotations

import os

import torch

from ..models.diffusion import repaint as _repaint
from ..models.diffusion import run as _run
from ..models.diffusion.samplers import SAMPLERS
from ..models.diffusion.schedules import SPACINGS
from ..models.errors import InputError
from ..models.manager import get_manager
from .common import bchw_to_image, image_to_bchw

CATEGORY = "atelier/diffusion"
DIFFUSION = "ATELIER_DIFFUSION"
FOLDERS = ("diffusion_models", "diffusers")
SEED_MAX = 0xFFFFFFFFFFFFFFFF
CLIP_CHOICES = ("auto", "on", "off")
UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

TIPS = {
    "model": "A diffusion model from Atelier Load Diffusion Model.",
    "seed": "Seed of the first image; image i of the batch uses seed + i (the same on every device).",
    "steps": "Denoising steps (network calls; Heun makes about twice as many).",
    "sampler": "ddpm: the original ancestral sampler (uses a learned variance when the model has one); ddim: "
               "deterministic at eta 0; euler, heun: ODE solvers; euler_ancestral, dpmpp_2m_sde: stochastic; "
               "dpmpp_2m: good results in few steps.",
    "spacing": "Which training timesteps the steps visit: leading (DDPM/DDIM pipelines' default), trailing (reaches "
               "the noisiest step), linspace (evenly from first to last), karras (denser at low noise).",
    "eta": "Fresh noise per step for ddim (0: deterministic, 1: like DDPM), euler_ancestral and dpmpp_2m_sde (1: "
           "their usual amount). Other samplers ignore it.",
    "class_label": "Class of a class-conditional model (0 .. classes-1); -1: a random class per image from its "
                   "seed. Must stay -1 for unconditional models.",
    "guidance": "Classifier-free guidance scale for class-conditional models trained with a null class; 1: off.",
    "clip": "Clamp the predicted clean image to -1..1 at every step, as DDPM/DDIM pipelines do. auto: on for pixel "
            "models, off for latent ones.",
}


def diffusion_choices() -> list[str]:
    """'folder/name': files in models/diffusion_models, and the UNet weights inside models/diffusers folders (walked
    here: ComfyUI lists that folder's entries as whole folders, not files)."""
    m = get_manager()
    names = [f"diffusion_models/{n}" for n in m.list_models("diffusion_models")]
    found: set[str] = set()
    for d in m.folder_dirs("diffusers"):
        for base, _dirs, files in os.walk(d, followlinks=True):
            found.update(os.path.normpath(os.path.relpath(os.path.join(base, f), d)).replace(os.sep, "/")
                         for f in files if f in UNET_FILES)
    return names + [f"diffusers/{n}" for n in sorted(found)] or ["(no models found)"]


def _settings(steps: int, sampler: str, spacing: str, eta: float, guidance: float, clip: str) -> _run.SampleSettings:
    if clip not in CLIP_CHOICES:
        raise InputError(f"clip: expected one of {', '.join(CLIP_CHOICES)}, got {clip!r}")
    s = _run.SampleSettings(steps=int(steps), sampler=sampler, spacing=spacing, eta=float(eta),
                            guidance=float(guidance), clip=None if clip == "auto" else clip == "on")
    s.check()
    return s


def _to_model(image: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """IMAGE [B,H,W,C] in 0..1 -> model pixels [B,channels,H,W] in -1..1 (alpha dropped, grey <-> RGB)."""
    x = image_to_bchw(image, name)
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    if channels == 1 and x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    elif channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x * 2 - 1


def _outputs(x: torch.Tensor, latent: bool) -> tuple[torch.Tensor, dict]:
    """Model-space result -> (IMAGE, LATENT)."""
    if latent:
        img = torch.stack([_run.to_preview(x[i:i + 1], True) for i in range(x.shape[0])])  # [B,H,W,3]
        return img.contiguous(), {"samples": x}
    pix = (x + 1) / 2
    if pix.shape[1] == 1:
        pix = pix.expand(-1, 3, -1, -1)
    return bchw_to_image(pix), {"samples": x}


def _model(model: object) -> object:
    _run.facts_of(model, "model")  # WrongFamilyError naming the input
    return model


def _sampling_inputs() -> dict:
    return {
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": TIPS["steps"]}),
        "sampler": (list(SAMPLERS), {"default": "ddim", "tooltip": TIPS["sampler"]}),
        "spacing": (list(SPACINGS), {"default": "leading", "tooltip": TIPS["spacing"]}),
        "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": TIPS["eta"]}),
        "class_label": ("INT", {"default": -1, "min": -1, "max": 100000, "tooltip": TIPS["class_label"]}),
        "guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": TIPS["guidance"]}),
        "clip": (list(CLIP_CHOICES), {"default": "auto", "tooltip": TIPS["clip"]}),
    }


class AtelierLoadDiffusionModel:
    DESCRIPTION = ("Loads a pixel- or latent-space diffusion UNet: diffusers UNet2DModel (pick "
                   "diffusion_pytorch_model.safetensors/.bin inside a diffusers folder; its config.json and "
                   "scheduler config are read beside it), a single .safetensors with its config, a bare state dict, "
                   "or an OpenAI guided-diffusion/ADM .pt (RePaint's checkpoints). Nothing in the file is run.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DIFFUSION,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The denoiser with its training schedule, for Diffusion Sample, Img2Img and RePaint.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (diffusion_choices(), {"tooltip": "A model, as folder/name: "
                             "models/diffusion_models, or a UNet weights file inside models/diffusers."})}}

    def load(self, model_name: str):
        folder, _, name = model_name.partition("/")
        if folder not in FOLDERS or not name:
            raise InputError(f"model_name: expected 'diffusion_models/<file>' or 'diffusers/<folder>/<file>', "
                             f"got {model_name!r}")
        return (get_manager().load(name, folder, family="diffusion"),)


class AtelierDiffusionSample:
    DESCRIPTION = ("Generates images (pixel models) or latents (latent models) from noise with the chosen sampler "
                   "and step spacing. Class-conditional models take a class label and optional guidance. Batches "
                   "are split to fit memory; a preview shows every few steps.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = ("The images (latent models: a rough look at the latents' first three channels).",
                       "The result in model space: latents for a VAE decoder, or a pixel model's -1..1 pixels.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFUSION, {"tooltip": TIPS["model"]}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": TIPS["seed"]}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Number of images."}),
            "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "Width in the model's "
                      "units (pixels, or latent cells for a latent model); 0: the model's training size."}),
            "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "Height, like width."}),
            **_sampling_inputs(),
        }}

    def sample(self, model, seed: int, batch_size: int, width: int, height: int, steps: int, sampler: str,
               spacing: str, eta: float, class_label: int, guidance: float, clip: str):
        facts = _run.facts_of(_model(model), "model")
        settings = _settings(steps, sampler, spacing, eta, guidance, clip)
        size = facts.sample_size or 0
        w, h = int(width) or size, int(height) or size
        if not w or not h:
            raise InputError("width/height: this model does not state its training size; give both")
        x = _run.sample(get_manager(), model, settings, seed=int(seed), batch=int(batch_size), height=h, width=w,
                        class_label=int(class_label))
        return _outputs(x, facts.latent)


class AtelierDiffusionImg2Img:
    DESCRIPTION = ("Redraws an image (or LATENT) with a diffusion model: noises it to the step that strength picks, "
                   "then denoises from there. Low strength keeps the composition, 1 starts from pure noise.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = AtelierDiffusionSample.OUTPUT_TOOLTIPS
    FUNCTION = "img2img"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIFFUSION, {"tooltip": TIPS["model"]}),
                "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                             "How much to change: the share of the steps that are run (0: the input back, 1: a "
                             "new image from noise)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                                 "tooltip": TIPS["seed"]}),
                **_sampling_inputs(),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image to redraw (pixel models)."}),
                "latent": ("LATENT", {"tooltip": "Or latents to redraw (latent models; wins over image)."}),
            },
        }

    def img2img(self, model, strength: float, seed: int, steps: int, sampler: str, spacing: str, eta: float,
                class_label: int, guidance: float, clip: str, image=None, latent=None):
        facts = _run.facts_of(_model(model), "model")
        settings = _settings(steps, sampler, spacing, eta, guidance, clip)
        if latent is not None:
            init, name = _latent_samples(latent, facts.in_channels), "latent"
        elif image is not None:
            if facts.latent:
                raise InputError("image: this is a latent model; encode the image with a VAE and connect latent")
            init, name = _to_model(image, facts.in_channels, "image"), "image"
        else:
            raise InputError("image/latent: connect the image (pixel model) or latent (latent model) to redraw")
        x = _run.img2img(get_manager(), model, init, settings, strength=float(strength), seed=int(seed),
                         class_label=int(class_label), name=name)
        return _outputs(x, facts.latent)


def _latent_samples(latent: object, channels: int) -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise InputError(f"latent: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    x = latent["samples"]
    if x.ndim != 4 or x.shape[1] != channels:
        raise InputError(f"latent: expected {channels} channels for this model ([B,{channels},h,w]), got shape "
                         f"{tuple(x.shape)}; it comes from a different VAE or model")
    return x.float()


class AtelierRePaint:
    DESCRIPTION = ("Fills the masked part of an image with an unconditional pixel diffusion model (RePaint, Lugmair "
                   "et al. 2022): the unmasked part is pinned to the original at every step, and the sampler "
                   "repeatedly steps back up and down again so the filled part blends with the rest. The defaults "
                   "are the paper's (2,410 model calls); jump_n_sample 2 costs 490 and, measured against exact "
                   "inpainting, stays close to the paper's quality (no resampling at all is clearly worse).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The image with the masked area filled; the rest equals the input.",)
    FUNCTION = "inpaint"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFUSION, {"tooltip": TIPS["model"] + " A pixel model (e.g. RePaint's ADM checkpoints)."}),
            "image": ("IMAGE", {"tooltip": "The image to fill, at a size the model accepts."}),
            "mask": ("MASK", {"tooltip": "White (1): the area to fill; black (0): keep. Same size as the image."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": TIPS["seed"]}),
            "steps": ("INT", {"default": 250, "min": 1, "max": 1000, "tooltip": "Steps from noise to the image, "
                      "not counting the repeats (the paper: 250)."}),
            "jump_length": ("INT", {"default": 10, "min": 1, "max": 100, "tooltip": "How many steps it goes down "
                            "before jumping back up to re-blend (the paper: 10)."}),
            "jump_n_sample": ("INT", {"default": 10, "min": 1, "max": 50, "tooltip": "How many times each stretch "
                              "is walked: more blends better and costs more; 1 turns resampling off (paper: 10)."}),
            "resample_from": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                              "Resample only in the noisier part of the run: 0 everywhere (the paper), 0.5 only in "
                              "the noisy half; the clean end is then walked once. Measured: fewer repeats everywhere "
                              "(jump_n_sample 2) blends better than the same calls spent on the noisy half."}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Fresh noise in the "
                    "filled area per step: 0 (diffusers' default) or 1 (the original DDPM sampler)."}),
            "clip": (list(CLIP_CHOICES), {"default": "auto", "tooltip": TIPS["clip"]}),
        }, "optional": {
            "class_label": ("INT", {"default": -1, "min": -2, "max": 1_000_000, "tooltip": "For a class-conditional "
                            "model: the class to complete toward; -1: none (the model's null class, i.e. its "
                            "unconditional score, when it was trained with one; else a random class per seed); -2: "
                            "auto, the class the kept part most likely shows, judged by the model itself (12 extra "
                            "calls per class, then 36 for each of the 3 likeliest; on half-hidden digits right about "
                            "93 % of the time, where drawing a completion, as -1 does, gets the digit right about 75 "
                            "% of the time)."}),
        }}

    def inpaint(self, model, image, mask, seed: int, steps: int, jump_length: int, jump_n_sample: int,
                resample_from: float, eta: float, clip: str, class_label: int = -1):
        facts = _run.facts_of(_model(model), "model")
        x = _to_model(image, facts.in_channels, "image")
        keep = 1.0 - _mask(mask, x)
        sched = _repaint.RePaintSchedule(steps=int(steps), jump_length=int(jump_length),
                                         jump_n_sample=int(jump_n_sample), resample_from=float(resample_from),
                                         eta=float(eta))
        out = _run.inpaint(get_manager(), model, x, keep, sched, seed=int(seed),
                           clip=None if clip == "auto" else clip == "on", class_label=int(class_label))
        return (_outputs(out, False)[0],)


def _mask(mask: object, x: torch.Tensor) -> torch.Tensor:  # [B|1,1,H,W] float in 0..1
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask: expected a MASK tensor [B,H,W], got {type(mask).__name__}")
    m = mask[None] if mask.ndim == 2 else mask
    if m.ndim != 3:
        raise InputError(f"mask: expected a MASK [B,H,W], got shape {tuple(mask.shape)}")
    if tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
        raise InputError(f"mask: expected the image's size {x.shape[-1]}x{x.shape[-2]}, got "
                         f"{m.shape[-1]}x{m.shape[-2]}; resize the mask (or the image) first")
    if m.shape[0] not in (1, x.shape[0]):
        raise InputError(f"mask: expected 1 or {x.shape[0]} masks (one per image), got {m.shape[0]}")
    return m.float().clamp(0, 1)[:, None]


class AtelierDiffusionToModel:
    DESCRIPTION = ("Hands a loaded diffusion model to ComfyUI's own samplers as a core MODEL: KSampler, "
                   "SamplerCustomAdvanced, every core scheduler, SetLatentNoiseMask inpainting and Differential "
                   "Diffusion then drive it. Use Atelier Empty Pixel Latent for the starting latent, Atelier Empty "
                   "Conditioning for positive and negative with cfg 1, and Atelier Pixel Latent To Image at the end. "
                   "Core samplers never clip the predicted image (Diffusion Sample can). Inside ComfyUI only.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A core MODEL over this network with its exact training noise schedule.",)
    FUNCTION = "bridge"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFUSION, {"tooltip": TIPS["model"]}),
            "class_label": ("INT", {"default": -1, "min": -1, "max": 100000, "tooltip": "The class every image "
                            "gets (class-conditional models); -1: none (unconditional models)."}),
        }}

    def bridge(self, model, class_label: int):
        from ..models import host
        from ..models.diffusion.schedules import training_sigmas

        facts = _run.facts_of(_model(model), "model")
        if not host.available():
            raise InputError("model: the bridge to core samplers runs inside ComfyUI only; outside it use Atelier "
                             "Diffusion Sample")
        _run.class_labels(facts, int(class_label), 0, 1)  # out of range, or given to an unconditional model
        if facts.num_classes > 0 and class_label < 0:
            raise InputError(f"class_label: this model has {facts.num_classes} classes; give one (0.."
                             f"{facts.num_classes - 1})")
        label = int(class_label) if class_label >= 0 else None
        return (host.bridge_diffusion_model(model, training_sigmas(facts.schedule), label),)


class AtelierEmptyPixelLatent:
    DESCRIPTION = ("A LATENT of zeros in a diffusion model's own space (pixels for a pixel model), the starting "
                   "point for core KSampler on a bridged model (Atelier Diffusion To MODEL).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros [B,channels,H,W] for the model.",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIFFUSION, {"tooltip": TIPS["model"]}),
            "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "Width in the model's "
                      "units; 0: its training size."}),
            "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "Height, like width."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Number of images."}),
        }}

    def make(self, model, width: int, height: int, batch_size: int):
        facts = _run.facts_of(_model(model), "model")
        w, h = int(width) or (facts.sample_size or 0), int(height) or (facts.sample_size or 0)
        _run.check_size(facts, h, w, "width/height")
        return ({"samples": torch.zeros(int(batch_size), facts.in_channels, h, w)},)


class AtelierEmptyConditioning:
    DESCRIPTION = ("The conditioning an unconditional model needs for core samplers: one entry with no text "
                   "embedding. Connect it to positive and negative and keep cfg at 1.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("[[None, {}]]: no text (an empty list would make core's samplers return zeros).",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return ([[None, {}]],)


class AtelierPixelLatentToImage:
    DESCRIPTION = ("Turns a pixel model's LATENT (its -1..1 pixels, e.g. from core KSampler on a bridged model) into "
                   "an IMAGE.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The pixels mapped from -1..1 to 0..1 and clamped.",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT", {"tooltip": "Pixels in -1..1 as a LATENT ([B,1 or 3,H,W])."})}}

    def convert(self, latent):
        if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
            raise InputError(f"latent: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
        x = latent["samples"]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InputError(f"latent: expected pixels [B,1 or 3,H,W], got shape {tuple(x.shape)}; latents of a "
                             "VAE go to a VAE decoder")
        return (_outputs(x.float(), False)[0],)


NODE_CLASS_MAPPINGS = {
    "AtelierLoadDiffusionModel": AtelierLoadDiffusionModel,
    "AtelierDiffusionSample": AtelierDiffusionSample,
    "AtelierDiffusionImg2Img": AtelierDiffusionImg2Img,
    "AtelierRePaint": AtelierRePaint,
    "AtelierDiffusionToModel": AtelierDiffusionToModel,
    "AtelierEmptyPixelLatent": AtelierEmptyPixelLatent,
    "AtelierEmptyConditioning": AtelierEmptyConditioning,
    "AtelierPixelLatentToImage": AtelierPixelLatentToImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierLoadDiffusionModel": "Atelier Load Diffusion Model",
    "AtelierDiffusionSample": "Atelier Diffusion Sample",
    "AtelierDiffusionImg2Img": "Atelier Diffusion Img2Img",
    "AtelierRePaint": "Atelier RePaint",
    "AtelierDiffusionToModel": "Atelier Diffusion To MODEL",
    "AtelierEmptyPixelLatent": "Atelier Empty Pixel Latent",
    "AtelierEmptyConditioning": "Atelier Empty Conditioning",
    "AtelierPixelLatentToImage": "Atelier Pixel Latent To Image",
}
