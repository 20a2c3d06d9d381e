"""Diffusion test helpers: a tiny diffusers UNet2DModel (the reference network, a test dependency only) wrapped to
the pack's diffusion contract (models/diffusion/facts.py), and a noise stream both sides can draw from in order.

Until the pack's own UNet2DModel/ADM loaders exist on this branch, sampler tests run on diffusers' network through
this adapter; the node tests load real files through the manager when they do.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from atelier.models.descriptor import ModelDescriptor, SizeRequirements
from atelier.models.diffusion.facts import DiffusionFacts, TrainingSchedule


def tiny_unet(seed: int = 0, *, num_class_embeds: int | None = None, learned_variance: bool = False,
              sample_size: int = 16, channels: int = 3):
    """A small random diffusers UNet2DModel (two levels, attention at the second)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=sample_size, in_channels=channels,
                      out_channels=channels * (2 if learned_variance else 1), layers_per_block=1,
                      block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                      attention_head_dim=8, num_class_embeds=num_class_embeds)
    return TameUNet(net).eval().requires_grad_(False)


class TameUNet(nn.Module):
    """A random UNet2DModel made to behave like a trained denoiser of a unit Gaussian: prediction = x + 0.1 * unet,
    so x0 stays O(1) along a whole trajectory (a random network alone drives samples to the hundreds, where float32
    rounding alone exceeds 1e-4). Called like diffusers' UNet2DModel (`.sample`), `.config` passes through."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.config = unet.config

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None):
        out = self.inner(x, t, class_labels=class_labels).sample * 0.1
        c = x.shape[1]
        return SimpleNamespace(sample=torch.cat([out[:, :c] + x, out[:, c:]], dim=1))


class DiffusersAdapter(nn.Module):
    """diffusers UNet2DModel -> the contract `model(x, t, class_labels) -> [B,out,H,W]`."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=class_labels).sample


def facts_for(unet: nn.Module, schedule: TrainingSchedule | None = None, *, null_class: int | None = None,
              latent: bool = False) -> DiffusionFacts:
    cfg = unet.config
    facts = DiffusionFacts(kind="UNet2DModel", in_channels=cfg.in_channels, sample_size=cfg.sample_size,
                           size_multiple=2 ** (len(cfg.block_out_channels) - 1),
                           num_classes=int(cfg.num_class_embeds or 0),
                           learned_variance=cfg.out_channels == 2 * cfg.in_channels, latent=latent,
                           schedule=schedule or TrainingSchedule())
    if null_class is not None:
        object.__setattr__(facts, "null_class", null_class)  # until facts.py carries it
    return facts


def descriptor_for(unet: nn.Module, schedule: TrainingSchedule | None = None, **kw) -> ModelDescriptor:
    """A ModelDescriptor as the diffusion detectors return it, over the adapted diffusers network."""
    facts = facts_for(unet, schedule, **kw)
    return ModelDescriptor(family="diffusion", architecture="UNet2DModel", model=DiffusersAdapter(unet),
                           purpose="Denoiser", in_channels=facts.in_channels, out_channels=unet.config.out_channels,
                           size_requirements=SizeRequirements(multiple_of=facts.size_multiple), tiling="none",
                           bytes_per_pixel=4096.0, config=dict(unet.config), extra=facts)


class NoiseStream:
    """Standard normal tensors of one shape drawn in order from one seeded CPU generator."""

    def __init__(self, shape: tuple[int, ...], seed: int = 123) -> None:
        self.shape = tuple(shape)
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0

    def __call__(self, *_: object, **__: object) -> torch.Tensor:
        self.count += 1
        return torch.randn(self.shape, generator=self.gen)


def patch_randn(monkeypatch, module, stream: NoiseStream) -> None:
    """Make a diffusers module's randn_tensor draw from `stream` (its own shape, whatever was asked)."""

    def fake(shape, generator=None, device=None, dtype=None, layout=None):  # noqa: ARG001
        assert tuple(shape) == stream.shape, (shape, stream.shape)
        return stream().to(device=device or "cpu", dtype=dtype or torch.float32)

    monkeypatch.setattr(module, "randn_tensor", fake)


def unet_fn(unet: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, t: unet(x, t).sample


def write_tiny_folder(diffusers_root) -> None:
    """models/diffusers/tiny/{unet,scheduler}: the tiny random UNet2DModel the example workflows load
    (workflows/diffusion_*.json name diffusers/tiny/unet/diffusion_pytorch_model.safetensors)."""
    import pathlib

    from diffusers import DDIMScheduler

    folder = pathlib.Path(diffusers_root) / "tiny"
    if (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        return
    tiny_unet().inner.save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler(clip_sample=True).save_pretrained(folder / "scheduler")
