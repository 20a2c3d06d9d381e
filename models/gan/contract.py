"""The one generator contract of the GAN family, and helpers its architecture modules share.

Every latent generator (StyleGAN2/3, DCGAN, MLP) is a `Generator`:

    z_dim, c_dim, w_dim (None without a mapping network), num_ws (0 likewise), img_resolution, img_channels,
    output_range (what forward's images span)
    forward(z, c=None, truncation_psi=1, truncation_cutoff=None, noise_mode="const", generator=None) -> [B,C,H,W]
    generate(x, labels, space="z"|"w", psi, cutoff, noise_mode, generator) -> [B,C,H,W] in [0,1]

`generate` is what the sampling code calls, for a z or (StyleGAN) w latent. Inputs are checked by `check_z_c`, the
same for every generator. Without a mapping network, truncation scales z toward its mean (0): z * psi.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..budget import placement
from ..errors import InputError

log = logging.getLogger(__name__)

NOISE_MODES = ("const", "random", "none")  # StyleGAN's per-pixel noise; other generators accept and ignore them
HEADS = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}  # output activation -> output_range
# Latent sizes seen in published z-only generators; used only to split an ambiguous first layer.
_USUAL_Z = (10, 16, 20, 32, 50, 64, 100, 120, 128, 200, 256, 512)
_MAX_GUESSED_CLASSES = 1000


def check_z_c(z: torch.Tensor, c: torch.Tensor | None, z_dim: int, c_dim: int, device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate z [B,z_dim] and c [B|1,c_dim] (one-hot; None or empty when c_dim == 0), on `device` in `dtype`."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != z_dim:
        got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise InputError(f"z: expected [B,{z_dim}], got {got}")
    z = z.to(device=device, dtype=dtype)
    if c_dim == 0:
        if c is not None and c.numel() > 0:
            raise InputError(f"c: this generator is unconditional (c_dim=0), got a label tensor {list(c.shape)}")
        return z, None
    if c is None:
        raise InputError(f"c: this generator is class-conditional; expected one-hot [B,{c_dim}], got None")
    if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != c_dim or c.shape[0] not in (1, z.shape[0]):
        got = list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
        raise InputError(f"c: expected [{z.shape[0]},{c_dim}] (one-hot), got {got}")
    return z, c.to(device=device, dtype=dtype).expand(z.shape[0], -1)


class Generator(nn.Module):
    """The generator contract (see the module docstring)."""

    z_dim: int
    c_dim: int
    w_dim: int | None = None
    num_ws: int = 0
    img_resolution: int
    img_channels: int
    output_range: tuple[float, float] = (-1.0, 1.0)

    def generate(self, x: torch.Tensor, labels: torch.Tensor | None, *, space: str = "z", psi: float = 1.0,
                 cutoff: int | None = None, noise_mode: str = "const", generator: torch.Generator | None = None,
                 ) -> torch.Tensor:  # [B,C,H,W] in [0,1] (a half-precision overflow is returned as it is)
        raise NotImplementedError


class LatentGenerator(Generator):
    """Base of z -> image generators without a mapping network. Subclasses implement `synthesize(z, c)`."""

    w_dim = None  # no intermediate latent space
    num_ws = 0

    def __init__(
        self,
        z_dim: int,  # latent size
        c_dim: int,  # number of classes (0 = unconditional)
        img_resolution: int,  # output side in pixels
        img_channels: int,  # output channels
        output_activation: str = "tanh",  # the head: "tanh" -> [-1,1], "sigmoid" -> [0,1]
    ) -> None:
        super().__init__()
        if output_activation not in HEADS:
            raise ValueError(f"output_activation: expected one of {sorted(HEADS)}, got {output_activation!r}")
        self.z_dim = int(z_dim)
        self.c_dim = int(c_dim)
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.output_activation = output_activation
        self.output_range = HEADS[output_activation]

    def head(self, x: torch.Tensor, unit: bool) -> torch.Tensor:
        """The output activation on the last layer's fresh result, in place (relu_/tanh_/sigmoid_ keep autograd:
        their backward reads the output). unit=True gives [0,1] directly: (tanh x + 1) / 2 = sigmoid(2x)."""
        if self.output_activation == "sigmoid":
            return x.sigmoid_()
        return x.mul_(2).sigmoid_() if unit else x.tanh_()

    def check_inputs(self, z: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate z [B,z_dim] (or [B,z_dim,1,1]) and c [B,c_dim]; cast both to the weights' device and dtype."""
        if isinstance(z, torch.Tensor) and z.dim() == 4 and z.shape[2:] == (1, 1):
            z = z.flatten(1)
        return check_z_c(z, c, self.z_dim, self.c_dim, *placement(self))

    def generate(self, x: torch.Tensor, labels: torch.Tensor | None, *, space: str = "z", psi: float = 1.0,
                 cutoff: int | None = None, noise_mode: str = "const", generator: torch.Generator | None = None,
                 ) -> torch.Tensor:
        return self(x, labels, truncation_psi=psi, noise_mode=noise_mode, unit=True)  # the head maps to [0,1]

    def forward(
        self,
        z: torch.Tensor,  # [B,z_dim]
        c: torch.Tensor | None = None,  # [B,c_dim] one-hot, or None when c_dim == 0
        truncation_psi: float = 1.0,  # scales z toward the mean latent (0) for z-only models
        truncation_cutoff: int | None = None,  # no per-layer latents here: ignored
        noise_mode: str = "const",  # no noise inputs here: accepted for the shared contract, no effect
        generator: torch.Generator | None = None,  # random noise source in StyleGAN's contract: unused here
        unit: bool = False,  # images in [0,1] instead of output_range, mapped by the head (cheaper than after it)
    ) -> torch.Tensor:  # [B,img_channels,img_resolution,img_resolution] in output_range (unit: in [0,1])
        if noise_mode not in NOISE_MODES:
            raise InputError(f"noise_mode: expected one of {NOISE_MODES}, got {noise_mode!r}")
        z, c = self.check_inputs(z, c)
        if truncation_psi != 1:
            z = z * truncation_psi
        return self.synthesize(z, c, unit)

    def synthesize(self, z: torch.Tensor, c: torch.Tensor | None, unit: bool = False) -> torch.Tensor:
        raise NotImplementedError


def attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at dotted `path` under `root`, creating plain containers on the way."""
    parts = path.split(".")
    node = root
    for p in parts[:-1]:
        child = node._modules.get(p)
        if child is None:
            child = nn.Module()
            node.add_module(p, child)
        node = child
    node.add_module(parts[-1], module)


def config_from_meta(meta: dict) -> dict[str, Any]:
    """The `config` dict a file may carry in its metadata (JSON in safetensors), or {}."""
    cfg = meta.get("config") if isinstance(meta, dict) else None
    return cfg if isinstance(cfg, dict) else {}


def split_latent(width: int, cfg: dict[str, Any], what: str) -> tuple[int, int, str]:
    """Split a first layer's input width into (z_dim, c_dim, how it was decided)."""
    if "z_dim" in cfg or "c_dim" in cfg:
        c_dim = int(cfg.get("c_dim", width - int(cfg.get("z_dim", width))))
        z_dim = int(cfg.get("z_dim", width - c_dim))
        if z_dim + c_dim != width or z_dim <= 0 or c_dim < 0:
            raise ValueError(f"{what}: metadata z_dim={z_dim} + c_dim={c_dim} does not match the input width {width}")
        return z_dim, c_dim, "metadata"
    if width in _USUAL_Z:
        return width, 0, "shape"
    below = [z for z in _USUAL_Z if z < width and width - z <= _MAX_GUESSED_CLASSES]
    if below:
        z_dim = max(below)
        log.warning(
            "%s: first layer takes %d channels; read as z_dim=%d + %d one-hot classes (a guess: put "
            '{"z_dim": .., "c_dim": ..} in the file\'s config metadata to override)', what, width, z_dim, width - z_dim
        )
        return z_dim, width - z_dim, "guessed"
    return width, 0, "shape"


