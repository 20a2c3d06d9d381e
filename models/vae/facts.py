"""The typed facts of a loaded VAE half, and what one encode/decode call may use.

Every VAE architecture module builds a `VAEFacts` into its descriptor (`desc.extra`) and gives its module two
methods that carry its own strategy for large inputs, so `codec.py` never branches on architecture names:

    model.encode_planned(x, work)  # image [B,C,H,W] in [0,1] -> [B,2c,h,w] (mean, logvar) if gaussian else [B,c,h,w]
    model.decode_planned(z, work)  # latent [B,c,h,w] -> image [B,C,H,W] in [0,1]

both float32 on the CPU, run under the manager on the module's device and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import FALLBACK_BYTES_PER_PIXEL


@dataclass(frozen=True)
class VAEFacts:
    latent_channels: int
    downscale: int  # image pixels per latent pixel, each side
    image_channels: int
    gaussian: bool  # the encoder gives a posterior (mean, log variance); False: a deterministic encoder (TAESD)
    fixed_size: int | None = None  # the one image side a fully connected VAE takes (MNIST: 28), else None
    packed_latent_channels: int | None = None  # FLUX.2's packed layout (4x the channels at half the size), TAEF2
    encode_bytes_per_pixel: float = FALLBACK_BYTES_PER_PIXEL  # fp32 activations of an encode per image pixel
    decode_bytes_per_latent_pixel: float = FALLBACK_BYTES_PER_PIXEL  # fp32 activations of a decode per latent pixel
    nnpack: bool = False  # its 64-channel 3x3 convolutions run through NNPACK on the CPU (about 2.8x measured)


@dataclass(frozen=True)
class Work:
    """One encode or decode call: where it runs and what memory it may use."""

    device: torch.device
    dtype: torch.dtype
    tile: int | None  # tile side in the part's input pixels (image pixels to encode, latent pixels to decode)
    bytes_per_pixel: float  # activation bytes per input pixel at `dtype` (NNPACK's workspace included)
    call_bytes: int  # activation bytes one call may use
    storage_bytes: int  # system memory for whole-image maps (an exact banded pass)
    name: str = "VAE"  # the file, for messages
