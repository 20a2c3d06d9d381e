"""Latent helpers every family shares: seeded noise that is the same on every device, lerp, slerp.

Seeds: item i of a batch is drawn from its own CPU generator seeded with `seed + i`, so one image of a batch equals
the same seed run alone, and a seed gives the same noise on CPU, CUDA and MPS (the draw happens on the CPU; move the
tensor afterwards).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widgets go to 2**64 - 1


def generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one item's seed (wrapped into 64 bits); `stream` > 0 gives independent streams from the
    same seed (e.g. class labels beside the noise)."""
    s = int(seed) % 2**64
    for _ in range(int(stream)):
        s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
    return torch.Generator().manual_seed(s)


def seeded_normal(shape: torch.Size | tuple[int, ...], seed: int, stream: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [B,...] on the CPU
    """Standard normal noise of `shape`, item i drawn from seed + i."""
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"seeded_normal: expected a shape with a batch of at least 1, got {tuple(shape)}")
    return torch.stack([torch.randn(*shape[1:], generator=generator(int(seed) + i, stream), dtype=dtype)
                        for i in range(shape[0])])


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a + t (b - a); a, b [B,...], t [T] -> [B,T,...]."""
    t = t.view(1, -1, *([1] * (a.dim() - 1))).to(a.dtype)
    return a.unsqueeze(1) + t * (b - a).unsqueeze(1)


def slerp_weights(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, mode: str = "slerp"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (of a, of b), each [N,T], for flat vectors a, b [N,D] and t [T] (Shoemake 1985; White 2016,
    "Sampling Generative Networks"): along the great circle; lerp's where a and b are (anti)parallel or zero, or
    when `mode` is "lerp"."""
    t = t.to(a.dtype)
    lin = (1 - t)[None].expand(a.shape[0], -1), t[None].expand(a.shape[0], -1)
    if mode == "lerp":
        return lin
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-12).clamp(-1, 1)  # [N]
    theta = torch.acos(cos)[:, None]  # [N,1]
    sin = torch.sin(theta)
    near = (sin.abs() < 1e-6) | (a.norm(dim=1, keepdim=True) == 0) | (b.norm(dim=1, keepdim=True) == 0)
    safe = torch.where(near, torch.ones_like(sin), sin)
    fa = torch.where(near, lin[0], torch.sin((1 - t)[None] * theta) / safe)
    fb = torch.where(near, lin[1], torch.sin(t[None] * theta) / safe)
    return fa, fb


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of a, b [B,...] (each item flattened to one vector) at t [T] -> [B,T,...]."""
    fa, fb = slerp_weights(a.flatten(1).double(), b.flatten(1).double(), t.double())  # [B,T]
    shape = (a.shape[0], t.numel()) + (1,) * (a.dim() - 1)
    out = fa.view(shape) * a.double().unsqueeze(1) + fb.view(shape) * b.double().unsqueeze(1)
    return out.to(a.dtype)
