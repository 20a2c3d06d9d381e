"""The W-space half of StyleGAN2/3: fully connected layer, mapping network, truncation, style mixing.

Key names match NVIDIA's (`mapping.fc0.weight`, `mapping.embed.bias`, `mapping.w_avg`), so NVIDIA state dicts load
with `strict=True`. `StyleGenerator` is the generator contract the GAN nodes use:

    z_dim, c_dim, w_dim, num_ws, img_resolution, img_channels, output_range, buffer mapping.w_avg (also `w_avg`)
    mapping(z [B,z_dim], c [B,c_dim] | None, truncation_psi=1, truncation_cutoff=None) -> ws [B,num_ws,w_dim]
    synthesis(ws, noise_mode="const") -> img [B,C,H,W] in output_range (roughly; GAN outputs are not clamped)
    forward(z, c=None, truncation_psi=1, truncation_cutoff=None, noise_mode="const") -> img
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..budget import CPU_CACHE_BYTES
from ..errors import InputError
from ..image import to_unit
from . import ops
from .contract import NOISE_MODES, Generator, check_z_c


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) along `dim` (pixel norm)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def truncate(ws: torch.Tensor, w_avg: torch.Tensor, psi: float, cutoff: int | None = None) -> torch.Tensor:
    """The truncation trick as NVIDIA does it: ws[:, :cutoff] <- lerp(w_avg, ws, psi); cutoff None = every row.

    ws [B,num_ws,w_dim] (or [B,w_dim]); returns a new tensor, rows at and past `cutoff` unchanged.
    """
    if psi == 1:
        return ws
    w_avg = w_avg.to(ws.dtype)
    if cutoff is None or ws.dim() == 2:
        return w_avg.lerp(ws, psi)
    out = ws.clone()
    out[:, :cutoff] = w_avg.lerp(ws[:, :cutoff], psi)
    return out


def style_mix(ws_a: torch.Tensor, ws_b: torch.Tensor, layers: range | Sequence[int]) -> torch.Tensor:
    """ws_a [B,num_ws,w_dim] with the rows in `layers` taken from ws_b (same shape, or [1,...] broadcast)."""
    if ws_a.dim() != 3:
        raise InputError(f"ws_a: expected [B,num_ws,w_dim], got {list(ws_a.shape)}")
    if ws_b.dim() != 3 or ws_b.shape[1:] != ws_a.shape[1:] or ws_b.shape[0] not in (1, ws_a.shape[0]):
        raise InputError(f"ws_b: expected [{ws_a.shape[0]},{ws_a.shape[1]},{ws_a.shape[2]}] like ws_a, got {list(ws_b.shape)}")
    idx = list(layers)
    bad = [i for i in idx if not -ws_a.shape[1] <= i < ws_a.shape[1]]
    if bad:
        raise InputError(f"layers: expected indices in 0..{ws_a.shape[1] - 1}, got {bad}")
    out = ws_a.clone()
    if idx:
        out[:, idx] = ws_b.to(out.dtype).expand(ws_a.shape[0], -1, -1)[:, idx]
    return out


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate (weight * lr/sqrt(in), bias * lr), then an activation."""

    def __init__(
        self,
        in_features: int,  # input width
        out_features: int,  # output width
        bias: bool = True,  # additive bias before the activation
        activation: str = "linear",  # "linear", "lrelu", ... (ops.bias_act names)
        lr_multiplier: float = 1.0,  # learning-rate multiplier the weights were trained with
        bias_init: float | Sequence[float] = 0.0,  # initial bias (only matters for a fresh, untrained layer)
        weight_init: float = 1.0,  # initial weight std
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) * (weight_init / lr_multiplier))
        init = np.broadcast_to(np.asarray(bias_init, dtype=np.float32), [out_features]) / lr_multiplier
        self.bias = nn.Parameter(torch.from_numpy(init.copy())) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,in] -> [B,out], computed in float32
        x = x.float()
        w = self.weight.float() * self.weight_gain
        b = None
        if self.bias is not None:
            b = self.bias.float()
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return ops.bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class MappingNetwork(nn.Module):
    """z (+ embedded label) -> w, broadcast to num_ws rows, with truncation toward w_avg. Runs in float32."""

    def __init__(
        self,
        z_dim: int,  # input latent size (0 = no latent)
        c_dim: int,  # label size (0 = unconditional)
        w_dim: int,  # intermediate latent size
        num_ws: int,  # rows to broadcast w to
        num_layers: int = 8,  # mapping layers (StyleGAN2: 8, StyleGAN3: 2)
        embed_features: int | None = None,  # label embedding width, None = w_dim
        layer_features: int | None = None,  # hidden width, None = w_dim
        activation: str = "lrelu",  # activation of the mapping layers
        lr_multiplier: float = 0.01,  # learning-rate multiplier the mapping was trained with
    ) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, c_dim, w_dim, num_ws, num_layers
        embed_features = w_dim if embed_features is None else embed_features
        if c_dim == 0:
            embed_features = 0
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation, lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def check_z_c(self, z: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate z [B,z_dim] and c [B,c_dim] (c may be [1,c_dim]; an empty c is fine when c_dim == 0)."""
        return check_z_c(z, c, self.z_dim, self.c_dim, self.w_avg.device, torch.float32)

    def forward(
        self,
        z: torch.Tensor,  # [B,z_dim]
        c: torch.Tensor | None = None,  # [B,c_dim] or None
        truncation_psi: float = 1.0,  # 1 = no truncation
        truncation_cutoff: int | None = None,  # truncate rows [0, cutoff) only; None = all rows
    ) -> torch.Tensor:  # [B,num_ws,w_dim] float32
        z, c = self.check_z_c(z, c)
        if truncation_cutoff is not None and not 0 <= int(truncation_cutoff) <= self.num_ws:
            raise InputError(f"truncation_cutoff: expected None or 0..{self.num_ws}, got {truncation_cutoff}")
        x = None
        if self.z_dim > 0:
            x = normalize_2nd_moment(z)
        if self.c_dim > 0:
            y = normalize_2nd_moment(self.embed(c))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        return truncate(x, self.w_avg.float(), float(truncation_psi), truncation_cutoff)

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"


class SynthesisBase(nn.Module):
    """Input checks and CPU batch chunking shared by the StyleGAN2 and StyleGAN3 synthesis networks.

    On a CPU a batch runs in chunks whose largest activation stays near `budget.CPU_CACHE_BYTES` (see there);
    other devices run whole.
    """

    num_ws: int
    w_dim: int
    cpu_chunk_bytes = CPU_CACHE_BYTES

    def sample_bytes(self) -> int:
        """Bytes of the largest activation of one sample (float32)."""
        raise NotImplementedError

    def check_inputs(self, ws: torch.Tensor, noise_mode: str) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise InputError(f"noise_mode: expected one of {NOISE_MODES}, got {noise_mode!r}")
        if not isinstance(ws, torch.Tensor) or ws.dim() != 3 or tuple(ws.shape[1:]) != (self.num_ws, self.w_dim):
            got = list(ws.shape) if isinstance(ws, torch.Tensor) else type(ws).__name__
            raise InputError(f"ws: expected [B,{self.num_ws},{self.w_dim}], got {got}")
        ref = next(self.buffers(), None)
        return ws.to(device=ref.device if ref is not None else ws.device, dtype=torch.float32)

    def forward(
        self,
        ws: torch.Tensor,  # [B,num_ws,w_dim]
        noise_mode: str = "const",  # "const" | "random" | "none"
        generator: torch.Generator | None = None,  # for noise_mode="random"
    ) -> torch.Tensor:  # [B,C,res,res] float32
        ws = self.check_inputs(ws, noise_mode)
        b = ws.shape[0]
        chunk = b if ws.device.type != "cpu" else max(1, self.cpu_chunk_bytes // max(1, self.sample_bytes()))
        if chunk >= b:
            return self.run(ws, noise_mode, generator)
        return torch.cat([self.run(part, noise_mode, generator) for part in ws.split(chunk)])

    def run(self, ws: torch.Tensor, noise_mode: str, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


class StyleGenerator(Generator):
    """Mapping + synthesis, under the GAN family's one generator contract (models/gan/contract.py)."""

    output_range = (-1.0, 1.0)
    mapping: MappingNetwork
    synthesis: SynthesisBase

    def _init_common(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int) -> None:
        self.z_dim, self.c_dim, self.w_dim = int(z_dim), int(c_dim), int(w_dim)
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)

    @property
    def w_avg(self) -> torch.Tensor:  # [w_dim]
        return self.mapping.w_avg

    def forward(
        self,
        z: torch.Tensor,  # [B,z_dim]
        c: torch.Tensor | None = None,  # [B,c_dim] or None
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "const",  # "const" (stored noise), "random", "none"
        generator: torch.Generator | None = None,  # for noise_mode="random"
    ) -> torch.Tensor:  # [B,img_channels,img_resolution,img_resolution] float32
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, generator=generator)

    def generate(self, x: torch.Tensor, labels: torch.Tensor | None, *, space: str = "z", psi: float = 1.0,
                 cutoff: int | None = None, noise_mode: str = "const", generator: torch.Generator | None = None,
                 ) -> torch.Tensor:  # [B,C,H,W] in [0,1]
        dev = self.w_avg.device
        if space == "w":
            ws = truncate(x.to(dev), self.w_avg.float(), psi, cutoff)  # [b,num_ws,w_dim]
            img = self.synthesis(ws, noise_mode=noise_mode, generator=generator)
        else:
            c = labels.to(dev) if labels is not None else None
            img = self(x.to(dev), c, truncation_psi=psi, truncation_cutoff=cutoff, noise_mode=noise_mode,
                       generator=generator)
        if img.dtype != torch.float32 and not torch.isfinite(img).all():
            return img  # as it is, so that the manager sees the overflow (clamping would hide an Inf) and redoes fp32
        return to_unit(img, self.output_range, inplace=True)  # the synthesis' fresh output


def mean_w(mapping: MappingNetwork, samples: int = 10000, seed: int = 0) -> torch.Tensor:
    """Estimate w_avg as the mean mapped w of `samples` random z (for files that carry no w_avg)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, mapping.z_dim, generator=g).to(mapping.w_avg.device)
    c = None
    if mapping.c_dim > 0:  # average over the classes, one-hot
        idx = torch.arange(samples) % mapping.c_dim
        c = torch.nn.functional.one_hot(idx, mapping.c_dim).float().to(z.device)
    with torch.no_grad():
        return mapping(z, c)[:, 0].mean(dim=0)
