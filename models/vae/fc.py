"""The fully connected MNIST VAE (Kingma & Welling 2013, as in the PyTorch examples): fc1 784->400, fc21/fc22
400->20 (mean, log variance), fc3 20->400, fc4 400->784, ReLU, sigmoid output.

Images are [B,1,28,28] in [0,1]; latents are [B,20,1,1] (the whole image maps to one latent "pixel", so
`downscale` is 28). Sizes are read from the weights, so other square sizes and widths load too.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import InputError, ModelLoadError
from .facts import VAEFacts, Work
from .kl import draw

log = logging.getLogger(__name__)

_KEYS = {f"{n}.{p}" for n in ("fc1", "fc21", "fc22", "fc3", "fc4") for p in ("weight", "bias")}


class FCVAE(nn.Module):
    """Encoder fc1 -> (fc21 mean, fc22 log variance); decoder fc3 -> fc4 -> sigmoid."""

    has_encoder = True
    has_decoder = True

    def __init__(self, pixels: int = 784, hidden: int = 400, latent: int = 20) -> None:
        super().__init__()
        side = math.isqrt(pixels)
        if side * side != pixels:
            raise ModelLoadError(f"FC VAE: {pixels} input features is not a square image")
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, pixels)
        self.image_size = side
        self.image_channels = 1
        self.latent_channels = latent
        self.downscale = side

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [B,1,S,S] in [0,1] -> (mean, log variance), each [B,latent,1,1]."""
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise InputError(f"image: expected [B,1,{s},{s}] in [0,1], got {list(x.shape)}")
        p = self.fc1.weight
        h = F.relu(self.fc1(x.to(p.device, p.dtype).flatten(1)))  # [B,hidden]
        return self.fc21(h)[:, :, None, None], self.fc22(h)[:, :, None, None]

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image [B,1,S,S] in [0,1] -> latent [B,latent,1,1]: the posterior mean, or a draw when `sample`."""
        mean, logvar = self.moments(x)
        return draw(mean, logvar, generator) if sample else mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B,latent,1,1] (or [B,latent]) -> image [B,1,S,S] in [0,1]."""
        c = self.latent_channels
        if not ((z.ndim == 4 and tuple(z.shape[1:]) == (c, 1, 1)) or (z.ndim == 2 and z.shape[1] == c)):
            raise InputError(f"latent: expected [B,{c},1,1], got {list(z.shape)}")
        p = self.fc3.weight
        h = F.relu(self.fc3(z.to(p.device, p.dtype).flatten(1)))  # [B,hidden]
        s = self.image_size
        return torch.sigmoid(self.fc4(h)).reshape(-1, 1, s, s)

    # One size, one call: nothing to split (models/vae/facts.py).

    def encode_planned(self, x: torch.Tensor, work: Work) -> torch.Tensor:  # [B,1,S,S] -> [B,2c,1,1] CPU
        return torch.cat(self.moments(x), dim=1).float().cpu()

    def decode_planned(self, z: torch.Tensor, work: Work) -> torch.Tensor:  # [B,c,1,1] -> [B,1,S,S] CPU
        return self.decode(z).float().cpu()


def detect(state_dict: dict, meta: dict) -> bool:
    if set(state_dict) != _KEYS:
        return False
    w = {k: state_dict[k].shape for k in _KEYS}
    pixels, hidden = w["fc1.weight"][1], w["fc1.weight"][0]
    latent = w["fc21.weight"][0]
    return (w["fc21.weight"] == w["fc22.weight"] and tuple(w["fc21.weight"]) == (latent, hidden)
            and tuple(w["fc3.weight"]) == (hidden, latent) and tuple(w["fc4.weight"]) == (pixels, hidden))


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    pixels, hidden = state_dict["fc1.weight"].shape[1], state_dict["fc1.weight"].shape[0]
    latent = state_dict["fc21.weight"].shape[0]
    with torch.device("meta"):  # no random init: the weights come from the file
        model = FCVAE(pixels, hidden, latent)
    model.load_state_dict({k: v.float().contiguous() for k, v in state_dict.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    s = model.image_size
    return ModelDescriptor(
        family="vae",
        architecture="FC-VAE",
        model=model,
        purpose="Autoencoder",
        scale=s,
        in_channels=1,
        out_channels=1,
        supports_half=True,
        supports_bfloat16=True,
        size_requirements=SizeRequirements(minimum=s, square=True),  # exactly s x s: resize, do not pad
        tiling="none",
        config={"image_size": s, "hidden": hidden, "latent_channels": latent, "downscale": s,
                "latent_shape": [latent, 1, 1], "image_channels": 1, "input_size_exact": [s, s]},
        extra=VAEFacts(latent_channels=latent, downscale=s, image_channels=1, gaussian=True, fixed_size=s),
    )
