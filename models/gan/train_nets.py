"""Trainable DCGAN networks: a generator in exactly the layout `dcgan.py` loads, and its mirrored discriminator.

Radford, Metz & Chintala 2016 (DCGAN), sized from the resolution (4 * 2**k pixels, k >= 1):

- G: `main` = one nn.Sequential: ConvTranspose2d(z [+ embed], w0, 4, 1, 0) -> 4x4, BatchNorm2d, ReLU, then k
  ConvTranspose2d(4, 2, 1) stages that double the side (BatchNorm2d + ReLU after all but the last), Tanh at the end.
  Class-conditional: `label_emb` = nn.Embedding(num_classes, embed_dim), its row concatenated AFTER z (the loader's
  default order). Widths: base_width at the last hidden stage, doubling toward the 4x4 start, capped at 8 * base_width.
- D: the mirror: Conv2d(4, 2, 1) + LeakyReLU(0.2) stages down to 4x4, then Conv2d(w, 1, 4) -> one logit per image.
  No BatchNorm in D: it couples the samples of a batch, which breaks the per-sample gradient penalty of WGAN-GP
  (Gulrajani et al. 2017 drop it for that reason). `d_norm` is "none" or "spectral" (Miyato et al. 2018, on every
  convolution and the projection): both are per sample, so one D serves all three losses of `losses.py`. Spectral is
  the default: on MNIST 32x32 (conditional, base_width 32, non-saturating, Adam 2e-4 (0.5, 0.999), batch 64) D without
  it collapsed G to two digits by step ~900 while the spectral D had G follow the label for 56% of its samples.
  Class-conditional D: projection (Miyato & Koyama 2018): logit = conv(h) + <embed(y), sum_hw h> on the 4x4 features.
- Init: DCGAN's N(0, 0.02) for convolutions and D's projection, N(1, 0.02) for BatchNorm scales, zero biases; G's label
  embedding N(0, 1) like the z it is concatenated to.

`save_dcgan` writes G as `.safetensors` with its config (z_dim, c_dim, resolution, class_names, ...) as JSON metadata;
the manager loads it back through `dcgan.load` like any other DCGAN generator.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..loading import write_safetensors
from .dcgan import _plan

log = logging.getLogger(__name__)

RESOLUTIONS = tuple(4 * 2**k for k in range(1, 7))  # 8 .. 256
CHANNELS = (1, 3)
_MAX_WIDTH_MULT = 8  # widest layer: 8 * base_width (the DCGAN paper's 64x64 layout)


def check_resolution(resolution: int) -> int:
    """The number of doubling stages k for a side of 4 * 2**k; an InputError for any other side."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution not in RESOLUTIONS:
        raise InputError(f"resolution: a DCGAN side must be 4 * 2**k, one of {list(RESOLUTIONS)}; got {resolution!r} "
                         f"(train smaller images at the next valid side: the dataset resizes them)")
    return resolution.bit_length() - 3


def widths(resolution: int, base_width: int) -> list[int]:
    """Channel widths of the hidden stages from the 4x4 start to the last hidden side (resolution / 2)."""
    k = check_resolution(resolution)
    return [base_width * min(2 ** (k - 1 - i), _MAX_WIDTH_MULT) for i in range(k)]


def dcgan_init(module: nn.Module) -> None:
    """DCGAN weight init: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales, zero biases. Embeddings are left to
    their owner (G's label rows sit beside z ~ N(0, 1): at 0.02 the label would be lost in the noise for thousands of
    steps)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _labels(labels: torch.Tensor | None, num_classes: int, batch: int, who: str) -> torch.Tensor | None:
    """Class indices [B] int64 (None when unconditional); an InputError for what does not fit."""
    if num_classes == 0:
        if labels is not None:
            raise InputError(f"labels: this {who} is unconditional (num_classes=0), got a label tensor")
        return None
    if labels is None or labels.dim() != 1 or labels.shape[0] != batch or labels.is_floating_point():
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else labels
        raise InputError(f"labels: this {who} has {num_classes} classes; expected class indices [{batch}], got {got}")
    return labels.long()


class DCGANGeneratorNet(nn.Module):
    """Trainable DCGAN generator: z [B,z_dim] (+ class indices [B]) -> images [B,C,R,R] in [-1,1]."""

    def __init__(
        self,
        resolution: int,  # output side: 4 * 2**k, k >= 1
        channels: int,  # output channels: 1 or 3
        z_dim: int = 100,  # noise size
        base_width: int = 64,  # channels of the last hidden stage; doubled toward the start, capped at 8x
        num_classes: int = 0,  # 0 = unconditional
        embed_dim: int | None = None,  # label embedding size (default: num_classes, at most 128)
    ) -> None:
        super().__init__()
        _check_sizes(channels, z_dim, base_width, num_classes)
        ws = widths(resolution, base_width)
        self.resolution, self.channels, self.z_dim, self.num_classes = resolution, channels, z_dim, num_classes
        self.embed_dim = (embed_dim or min(num_classes, 128)) if num_classes else 0
        if num_classes and not 0 < self.embed_dim:
            raise InputError(f"embed_dim: expected a positive size, got {embed_dim}")
        if num_classes:
            self.label_emb = nn.Embedding(num_classes, self.embed_dim)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim + self.embed_dim, ws[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(ws[0]), nn.ReLU(True)]  # [B,w0,4,4]
        for a, b in zip(ws, ws[1:]):  # each doubles the side
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ws[-1], channels, 4, 2, 1), nn.Tanh()]  # [B,C,R,R]
        self.main = nn.Sequential(*layers)
        dcgan_init(self)
        if num_classes:
            nn.init.normal_(self.label_emb.weight, 0.0, 1.0)  # the scale of z

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # [B,C,R,R] in [-1,1]
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise InputError(f"z: expected [B,{self.z_dim}], got {list(z.shape)}")
        y = _labels(labels, self.num_classes, z.shape[0], "generator")
        x = z if y is None else torch.cat([z, self.label_emb(y)], dim=1)  # [B,z_dim+embed_dim]
        return self.main(x[:, :, None, None])


class DCGANDiscriminatorNet(nn.Module):
    """Trainable DCGAN discriminator (no normalisation, projection conditioning): images [B,C,R,R] -> logits [B]."""

    def __init__(
        self,
        resolution: int,  # input side: 4 * 2**k, k >= 1
        channels: int,  # input channels: 1 or 3
        base_width: int = 64,  # channels of the first stage; doubled per stage, capped at 8x
        num_classes: int = 0,  # 0 = unconditional
        norm: str = "spectral",  # "spectral" (Miyato et al. 2018) or "none": both per sample, fine with every loss
    ) -> None:
        super().__init__()
        _check_sizes(channels, 1, base_width, num_classes)
        ws = widths(resolution, base_width)[::-1]  # [base, 2*base, ...] down to the 4x4 features
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        layers: list[nn.Module] = []
        for a, b in zip([channels] + ws[:-1], ws):  # each halves the side
            layers += [nn.Conv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)  # [B,w,4,4]
        self.head = nn.Conv2d(ws[-1], 1, 4, 1, 0)  # [B,1,1,1]
        if num_classes:
            self.embed = nn.Embedding(num_classes, ws[-1])  # projection vectors
        dcgan_init(self)
        if num_classes:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if norm == "spectral":
            for m in [*self.features, self.head, *([self.embed] if num_classes else [])]:
                if isinstance(m, (nn.Conv2d, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(m)
        elif norm != "none":
            raise InputError(f"norm: expected 'none' or 'spectral', got {norm!r}")

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # [B] logits
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise InputError(f"images: expected [B,{self.channels},{self.resolution},{self.resolution}], "
                             f"got {list(x.shape)}")
        y = _labels(labels, self.num_classes, x.shape[0], "discriminator")
        h = self.features(x)  # [B,w,4,4]
        out = self.head(h).flatten()  # [B]
        if y is not None:
            out = out + (self.embed(y) * h.sum(dim=(2, 3))).sum(dim=1)  # projection <e_y, sum_hw h>
        return out


def _check_sizes(channels: int, z_dim: int, base_width: int, num_classes: int) -> None:
    if channels not in CHANNELS:
        raise InputError(f"channels: expected one of {CHANNELS} (grey or RGB), got {channels!r}")
    for name, v, lo in (("z_dim", z_dim, 1), ("base_width", base_width, 1), ("num_classes", num_classes, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name}: expected an integer >= {lo}, got {v!r}")


def build_dcgan(resolution: int, channels: int, z_dim: int = 100, base_width: int = 64, num_classes: int = 0,
                embed_dim: int | None = None, d_norm: str = "spectral",
                ) -> tuple[DCGANGeneratorNet, DCGANDiscriminatorNet]:
    """(G, D) for `resolution` (4 * 2**k: 8..256) and `channels` (1|3), DCGAN-initialised, in training mode."""
    check_resolution(resolution)
    g = DCGANGeneratorNet(resolution, channels, z_dim, base_width, num_classes, embed_dim)
    d = DCGANDiscriminatorNet(resolution, channels, base_width, num_classes, d_norm)
    return g, d


def save_dcgan(path: str | os.PathLike, G: DCGANGeneratorNet, config: dict[str, Any] | None = None,
               extra_meta: dict[str, str] | None = None) -> str:
    """Write G as `.safetensors` (temporary name, then rename) with its config as JSON metadata: z_dim, c_dim,
    resolution, channels, class_names (one per class; default "0".."n-1") plus whatever `config` adds (loss, steps)."""
    path = os.fspath(path)
    cfg: dict[str, Any] = dict(config or {})
    names = cfg.get("class_names")
    if names is None:
        names = [str(i) for i in range(G.num_classes)]
    ok = isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
    if not ok or len(names) != G.num_classes:
        raise InputError(f"config['class_names']: expected {G.num_classes} names (one per class), got {names!r}")
    cfg.update(z_dim=G.z_dim, c_dim=G.num_classes, resolution=G.resolution, channels=G.channels,
               class_names=list(names), label_first=False)
    sd = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    if _plan(sd) is None:  # what the loader would not recognise is refused before anything is written
        raise InputError("G: not a DCGAN generator layout the loader reads (build it with build_dcgan)")
    write_safetensors(path, sd, {**(extra_meta or {}), "config": json.dumps(cfg), "architecture": "DCGAN"})
    log.info("saved DCGAN generator %s (%dpx, z %d, %d classes)", os.path.basename(path), G.resolution, G.z_dim,
             G.num_classes)
    return path
