"""What a detector returns: the model plus everything nodes need to know about it.

Nodes pass descriptors around, never bare modules (the spandrel idea): the manager, the tiling engine and the
nodes read scale, channels, dtypes, size requirements and the memory estimate from here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

FAMILIES = ("gan", "vae", "diffusion", "upscale", "inpaint", "style", "features")


@dataclass(frozen=True)
class SizeRequirements:
    """Input size constraints (input pixels): the image is padded to satisfy them and cropped back."""

    minimum: int = 0  # smallest side the model accepts
    multiple_of: int = 1  # both sides must be a multiple of this
    square: bool = False  # the input must be square

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The smallest (H, W) >= (height, width) that meets the requirements."""
        h = max(height, self.minimum)
        w = max(width, self.minimum)
        m = max(1, self.multiple_of)
        h, w = math.ceil(h / m) * m, math.ceil(w / m) * m
        if self.square:
            h = w = max(h, w)
        return h, w


@dataclass
class ModelDescriptor:
    """A loaded model and its facts. `model` is a torch.nn.Module in eval mode with no gradients."""

    family: str  # one of FAMILIES
    architecture: str  # e.g. "ESRGAN", "StyleGAN2", "TAESD", "KL-f8"
    model: torch.nn.Module
    purpose: str = ""  # free text: "SR", "Restoration", "Inpainting", "Generator", "Autoencoder", ...
    scale: float = 1  # output pixels per input pixel (an encoder: 1/8; a decoder: 8; a generator: 1)
    in_channels: int = 3
    out_channels: int = 3
    supports_half: bool = False  # fp16 safe on GPU
    supports_bfloat16: bool = False  # bf16 safe on GPU
    size_requirements: SizeRequirements = field(default_factory=SizeRequirements)
    tiling: str = "supported"  # "supported" | "discouraged" | "internal" | "none"
    receptive_field: int | None = None  # input pixels of context a tile needs on each side for exact results
    bytes_per_pixel: float | None = None  # activation memory per input pixel at fp32 for a batch of 1
    config: dict[str, Any] = field(default_factory=dict)  # architecture hyper-parameters (JSON-serialisable)
    source: str = ""  # the file it came from
    extra: Any = None  # the family's typed facts (VAEFacts, SpandrelFacts, DiffusionFacts, ...), see each family

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights and buffers take at their current dtype."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return total + sum(b.numel() * b.element_size() for b in self.model.buffers())

    def memory_estimate(self, pixels: int = 512 * 512, dtype: torch.dtype = torch.float32, batch: int = 1) -> int:
        """Bytes needed to run on `pixels` input pixels: weights plus activations (a rough upper bound)."""
        from .budget import memory_estimate  # the one memory policy

        return memory_estimate(self, pixels, dtype, batch)

    def dtypes(self) -> list[str]:
        out = ["float32"]
        if self.supports_half:
            out.append("float16")
        if self.supports_bfloat16:
            out.append("bfloat16")
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything but the module, for `atelier models inspect` and the Model Info node."""
        return {
            "family": self.family,
            "architecture": self.architecture,
            "purpose": self.purpose,
            "scale": self.scale,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "dtypes": self.dtypes(),
            "size_requirements": dataclasses.asdict(self.size_requirements),
            "tiling": self.tiling,
            "receptive_field": self.receptive_field,
            "parameters": self.parameters,
            "weight_bytes": self.weight_bytes,
            "memory_estimate_512px_fp32": self.memory_estimate(),
            "config": self.config,
            "facts": _facts_json(self.extra),
            "source": self.source,
        }


def _facts_json(facts: Any) -> dict[str, Any] | None:
    """The JSON-able fields of a family's facts dataclass (objects such as a spandrel descriptor left out)."""
    if not dataclasses.is_dataclass(facts) or isinstance(facts, type):
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(facts):
        v = getattr(facts, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, (str, int, float, bool, type(None), list, tuple, dict)):
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# A detector: (state_dict, path) -> ModelDescriptor, or None when the file is not of its kind.
Detector = Callable[[dict, str], "ModelDescriptor | None"]
