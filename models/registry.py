"""The ordered registry of detectors: the pack's own architectures first, spandrel last.

Each entry names a module under `models/` that defines

    detect(state_dict: dict, meta: dict) -> bool       # cheap: key names and shapes only
    load(state_dict: dict, meta: dict) -> ModelDescriptor

Modules are imported only when a file is detected (nothing heavy at import time of the pack).
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

from .descriptor import ModelDescriptor
from .errors import ModelLoadError, UnknownModelError
from .loading import key_prefixes

log = logging.getLogger(__name__)

# (name, module relative to this package). Order matters: specific before general.
DETECTORS: list[tuple[str, str]] = [
    ("StyleGAN3", ".gan.stylegan3"),
    ("StyleGAN2", ".gan.stylegan2"),
    ("DCGAN", ".gan.dcgan"),
    ("MLP GAN", ".gan.mlp"),
    ("CycleGAN/pix2pix", ".gan.pix2pix"),
    ("TAESD", ".vae.taesd"),
    ("ConvVAE", ".vae.conv"),
    ("KL autoencoder", ".vae.kl"),
    ("MNIST FC VAE", ".vae.fc"),
    ("UNet2DModel (diffusers)", ".diffusion.unet2d_io"),
    ("ADM (guided-diffusion)", ".diffusion.adm"),
    ("MicroAST", ".style.microast"),
    ("AdaIN", ".style.adain"),
    ("TransformerNet", ".style.fast_style"),
    ("LeNet-5 (feature network)", ".features.lenet"),
    ("spandrel", ".spandrel_arch"),
]


def _module(rel: str) -> ModuleType | None:
    """The detector module `rel`; None only when a third-party package it imports is not installed (logged).

    A module of the pack itself that is missing (a mistyped entry) or fails to import raises: a detector must never
    disappear silently.
    """
    try:
        return importlib.import_module(rel, __package__)
    except ModuleNotFoundError as e:
        root = __package__.split(".")[0]  # the pack's top-level package ("atelier", or its folder name in ComfyUI)
        if not e.name or e.name == root or e.name.startswith(root + "."):
            raise ImportError(f"detector {rel!r} in models/registry.py: cannot import the pack's module: {e}") from e
        log.warning("detector %s skipped: the package %r it needs is not installed", rel, e.name)
        return None


def detect(state_dict: dict, meta: dict, source: str = "") -> ModelDescriptor:
    """Run the detectors in order; the first that claims the state dict loads it."""
    tried = []
    for name, rel in DETECTORS:
        mod = _module(rel)
        if mod is None:
            continue
        tried.append(name)
        meta = {**meta, "source": source}  # some variants are told apart by file name only (taesdxl vs taesd)
        if not mod.detect(state_dict, meta):
            continue
        try:
            desc = mod.load(state_dict, meta)
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise ModelLoadError(f"model file {source!r} looks like {name} but failed to load: {e}") from e
        desc.source = source
        desc.model.eval().requires_grad_(False)
        return desc
    raise UnknownModelError(
        f"model file {source!r}: no detector recognised it. Tried: {', '.join(tried)}. "
        f"Key prefixes seen: {', '.join(key_prefixes(state_dict)) or '(no tensors)'}"
    )
