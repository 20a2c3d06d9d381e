"""A small convolutional VAE (own design) for small images such as MNIST digits, trained with the ELBO.

Encoder: a 3x3 stem to `channels[0]`; per level `res_blocks` residual blocks (GroupNorm, SiLU, 3x3 conv, twice),
then GroupNorm, SiLU and a stride-2 3x3 conv to the next level's width (`len(channels) - 1` halvings); last,
GroupNorm, SiLU and
- a flat latent (`latent_dim`): a linear layer from the last feature map to (mean, log variance), each [B,d,1,1];
- or a spatial latent (`latent_channels`): a 3x3 conv to (mean, log variance), each [B,c,H/f,W/f], f = 2**(L-1).
The decoder mirrors it (per level: blocks, then GroupNorm, SiLU, nearest x2 and a 3x3 conv) and ends in GroupNorm,
SiLU and a 3x3 conv giving per-pixel LOGITS: `decode_logits` is what a trainer puts into a Bernoulli likelihood (BCE
with logits); `decode` returns sigmoid(logits), images in [0,1]. No BatchNorm: training and evaluation compute the
same function.

Pixel range: images are [B,C,R,R] in [0,1] everywhere (encode, encode_stats, decode), C = `in_channels` (1 or 3).

A flat-latent model takes exactly R x R images (like the fully connected VAE, its latent is one "pixel", so the
codec's `downscale` is R); a spatial-latent model is fully convolutional and takes any size that is a multiple of f
(the codec pads others), `resolution` being the size it was trained at.

Files: `.safetensors` written by `save_conv_vae`, its `config` (JSON) and `architecture: "ConvVAE"` in the metadata.
Without metadata the config is read from the tensor shapes (`_config_from_shapes`): GroupNorm's group count, which
has no shape, is then taken as 8, and a spatial model's training resolution as 4 latent pixels a side.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import InputError, ModelLoadError
from ..loading import write_safetensors
from .facts import VAEFacts, Work
from .kl import draw

log = logging.getLogger(__name__)

ARCHITECTURE = "ConvVAE"
# The defaults are the MNIST model (795 k parameters; on 8,000 digits, 2 shared CPU cores: 6.8 epochs gave 20.8 dB on
# 2,000 held-out digits, prior samples at LeNet confidence 0.84). Residual blocks at 28x28 cost 3x the time.
DEFAULTS: dict[str, Any] = {
    "in_channels": 1,  # 1 (grey) or 3 (RGB)
    "resolution": 28,  # training image side; a multiple of 2**(len(channels) - 1)
    "channels": [32, 64, 128],  # width per level; each level after the first halves the side
    "res_blocks": 0,  # residual blocks per level: one count for all, or a list (one per level, e.g. [0, 1, 1])
    "latent_dim": 32,  # flat latent size, or None for a spatial latent
    "latent_channels": None,  # spatial latent channels (with latent_dim None)
    "groups": 8,  # GroupNorm groups; every width must be a multiple
}
_KEYS = ("enc.stem.weight", "enc.to_moments.weight", "dec.from_latent.weight", "dec.to_image.weight")


def full_config(config: Mapping[str, Any] | None = None, *, what: str = "config") -> dict[str, Any]:
    """`config` over DEFAULTS, checked: a clear InputError naming the key that is wrong."""
    cfg = {**DEFAULTS, **dict(config or {})}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise InputError(f"{what}: unknown key(s) {unknown}; expected some of {sorted(DEFAULTS)}")
    if cfg["in_channels"] not in (1, 3):
        raise InputError(f"{what}: in_channels expected 1 or 3, got {cfg['in_channels']!r}")
    ch = cfg["channels"]
    if not (isinstance(ch, (list, tuple)) and ch and all(isinstance(c, int) and c > 0 for c in ch)):
        raise InputError(f"{what}: channels expected a non-empty list of positive widths, got {ch!r}")
    cfg["channels"] = [int(c) for c in ch]
    g = cfg["groups"]
    if not (isinstance(g, int) and g > 0 and all(c % g == 0 for c in ch)):
        raise InputError(f"{what}: groups={g!r} must divide every width in channels {list(ch)}")
    rb = cfg["res_blocks"]
    if isinstance(rb, (list, tuple)):
        if len(rb) != len(ch) or not all(isinstance(n, int) and n >= 0 for n in rb):
            raise InputError(f"{what}: res_blocks expected an integer >= 0 or {len(ch)} of them (one per level in "
                             f"channels {list(ch)}), got {rb!r}")
        cfg["res_blocks"] = [int(n) for n in rb]
    elif not (isinstance(rb, int) and rb >= 0):
        raise InputError(f"{what}: res_blocks expected an integer >= 0 or {len(ch)} of them (one per level in "
                         f"channels {list(ch)}), got {rb!r}")
    f = 2 ** (len(ch) - 1)
    r = cfg["resolution"]
    if not (isinstance(r, int) and r > 0 and r % f == 0):
        raise InputError(f"{what}: resolution expected a positive multiple of {f} (2**{len(ch) - 1} for "
                         f"{len(ch)} levels in channels {list(ch)}), got {r!r}")
    flat, spatial = cfg["latent_dim"], cfg["latent_channels"]
    if (flat is None) == (spatial is None):
        raise InputError(f"{what}: give exactly one of latent_dim (flat latent) and latent_channels (spatial latent), "
                         f"got latent_dim={flat!r}, latent_channels={spatial!r}")
    size = flat if flat is not None else spatial
    if not (isinstance(size, int) and size > 0):
        raise InputError(f"{what}: {'latent_dim' if flat is not None else 'latent_channels'} expected a positive "
                         f"integer, got {size!r}")
    return cfg


def blocks_per_level(cfg: Mapping[str, Any]) -> list[int]:
    """Residual blocks at each level, shallowest first (the decoder runs them deepest first)."""
    rb = cfg["res_blocks"]
    return list(rb) if isinstance(rb, (list, tuple)) else [int(rb)] * len(cfg["channels"])


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), width kept."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,c,h,w] -> [B,c,h,w]
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Level(nn.Module):
    """`n` residual blocks, then GroupNorm, SiLU and `resample` (a stride-2 conv down, nearest x2 + conv up) to the
    next width, or nothing (the last level). The activation keeps a level without blocks from being linear."""

    def __init__(self, c: int, n: int, groups: int, out: int | None, up: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(c, groups) for _ in range(n)))
        self.up = up
        self.norm = None if out is None else nn.GroupNorm(groups, c)
        self.resample = None if out is None else nn.Conv2d(c, out, 3, stride=1 if up else 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,c,h,w] -> [B,out,h/2,w/2] (down) or [B,out,2h,2w] (up)
        x = self.blocks(x)
        if self.resample is None or self.norm is None:
            return x
        x = F.silu(self.norm(x))
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        ch, g, n = cfg["channels"], cfg["groups"], blocks_per_level(cfg)
        self.stem = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.levels = nn.ModuleList(Level(c, n[i], g, ch[i + 1] if i + 1 < len(ch) else None, up=False)
                                    for i, c in enumerate(ch))
        self.norm = nn.GroupNorm(g, ch[-1])
        side = cfg["resolution"] // 2 ** (len(ch) - 1)
        if cfg["latent_dim"] is not None:
            self.to_moments: nn.Module = nn.Linear(ch[-1] * side * side, 2 * cfg["latent_dim"])
        else:
            self.to_moments = nn.Conv2d(ch[-1], 2 * cfg["latent_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,2d] (flat) or [B,2c,h,w] (spatial)
        h = self.stem(x)
        for level in self.levels:
            h = level(h)
        h = F.silu(self.norm(h))
        return self.to_moments(h.flatten(1)) if isinstance(self.to_moments, nn.Linear) else self.to_moments(h)


class Decoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        ch, g, n = cfg["channels"], cfg["groups"], blocks_per_level(cfg)[::-1]
        self.side = cfg["resolution"] // 2 ** (len(ch) - 1)
        self.width = ch[-1]
        if cfg["latent_dim"] is not None:
            self.from_latent: nn.Module = nn.Linear(cfg["latent_dim"], ch[-1] * self.side * self.side)
        else:
            self.from_latent = nn.Conv2d(cfg["latent_channels"], ch[-1], 3, padding=1)
        rev = ch[::-1]  # deepest first
        self.levels = nn.ModuleList(Level(c, n[i], g, rev[i + 1] if i + 1 < len(rev) else None, up=True)
                                    for i, c in enumerate(rev))
        self.norm = nn.GroupNorm(g, ch[0])
        self.to_image = nn.Conv2d(ch[0], cfg["in_channels"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B,d] or [B,c,h,w] -> logits [B,C,H,W]
        if isinstance(self.from_latent, nn.Linear):
            h = self.from_latent(z.flatten(1)).reshape(-1, self.width, self.side, self.side)
        else:
            h = self.from_latent(z)
        for level in self.levels:
            h = level(h)
        return self.to_image(F.silu(self.norm(h)))


class ConvVAE(nn.Module):
    """Convolutional VAE; images in [0,1]. Flat latents are [B,d,1,1] at the codec's edge ([B,d] also accepted)."""

    has_encoder = True
    has_decoder = True

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = full_config(config)
        cfg = self.config
        self.enc = Encoder(cfg)
        self.dec = Decoder(cfg)
        self.flat = cfg["latent_dim"] is not None
        self.image_channels = cfg["in_channels"]
        self.resolution = cfg["resolution"]
        self.factor = 2 ** (len(cfg["channels"]) - 1)  # image pixels per spatial latent pixel
        self.latent_channels = cfg["latent_dim"] if self.flat else cfg["latent_channels"]
        self.downscale = self.resolution if self.flat else self.factor  # the codec's view

    # ---------------------------------------------------------------- checks
    def _check_image(self, x: torch.Tensor) -> torch.Tensor:
        C, R, f = self.image_channels, self.resolution, self.factor
        ok = x.ndim == 4 and x.shape[1] == C
        if self.flat:
            ok = ok and tuple(x.shape[-2:]) == (R, R)
            want = f"[B,{C},{R},{R}]"
        else:
            ok = ok and x.shape[-2] % f == 0 and x.shape[-1] % f == 0 and min(x.shape[-2:]) > 0
            want = f"[B,{C},H,W] with H and W multiples of {f}"
        if not ok:
            raise InputError(f"image: expected {want} in [0,1], got {list(x.shape)}")
        p = self.enc.stem.weight
        return x.to(p.device, p.dtype)

    def _check_latent(self, z: torch.Tensor) -> torch.Tensor:
        c = self.latent_channels
        if self.flat:
            ok = (z.ndim == 4 and tuple(z.shape[1:]) == (c, 1, 1)) or (z.ndim == 2 and z.shape[1] == c)
            want = f"[B,{c},1,1] or [B,{c}]"
        else:
            ok = z.ndim == 4 and z.shape[1] == c
            want = f"[B,{c},h,w]"
        if not ok:
            raise InputError(f"latent: expected {want}, got {list(z.shape)}")
        p = self.dec.to_image.weight
        return z.to(p.device, p.dtype)

    # ---------------------------------------------------------------- the trainer's interface
    def encode_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [B,C,H,W] in [0,1] -> (mean, log variance): [B,d] each (flat) or [B,c,H/f,W/f] (spatial)."""
        m = self.enc(self._check_image(x))
        return m.chunk(2, dim=1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B,d] / [B,d,1,1] (flat) or [B,c,h,w] (spatial) -> per-pixel logits [B,C,H,W] (sigmoid: image)."""
        return self.dec(self._check_latent(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One reparameterised pass for training: (logits [B,C,H,W], mean, log variance)."""
        mean, logvar = self.encode_stats(x)
        return self.decode_logits(draw(mean, logvar, generator)), mean, logvar

    # ---------------------------------------------------------------- the codec's interface (models/vae/codec.py)
    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [B,C,H,W] in [0,1] -> (mean, log variance), each [B,c,h,w] ([B,d,1,1] for a flat latent)."""
        mean, logvar = self.encode_stats(x)
        if self.flat:
            return mean[:, :, None, None], logvar[:, :, None, None]
        return mean, logvar

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image -> latent [B,c,h,w]: the posterior mean, or a draw when `sample`."""
        mean, logvar = self.moments(x)
        return draw(mean, logvar, generator) if sample else mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image [B,C,H,W] in [0,1]."""
        return torch.sigmoid(self.decode_logits(z))

    # GroupNorm sees the whole image: no tiles. Past the call budget, images go one at a time.
    def encode_planned(self, x: torch.Tensor, work: Work) -> torch.Tensor:  # [B,C,H,W] -> [B,2c,h,w] CPU
        return torch.cat([torch.cat(self.moments(x[i : i + 1].to(work.device, work.dtype)), dim=1).float().cpu()
                          for i in range(x.shape[0])])

    def decode_planned(self, z: torch.Tensor, work: Work) -> torch.Tensor:  # [B,c,h,w] -> [B,C,H,W] CPU
        return torch.cat([self.decode(z[i : i + 1].to(work.device, work.dtype)).float().cpu()
                          for i in range(z.shape[0])])


# -------------------------------------------------------------------------------------------------- files
def save_conv_vae(path: str | os.PathLike, model: ConvVAE, config: Mapping[str, Any] | None = None,
                  extra_meta: Mapping[str, Any] | None = None) -> str:
    """Write `model` as one `.safetensors` with `architecture` and `config` (JSON) in its metadata, through a temporary
    name then a rename. `config` defaults to the model's own and must match it; `extra_meta` values (e.g. training
    facts) are stored as strings (JSON for non-strings)."""
    path = os.fspath(path)
    cfg = full_config(config if config is not None else model.config, what="save_conv_vae: config")
    if cfg != model.config:
        raise InputError(f"save_conv_vae: config {cfg} does not describe the model ({model.config})")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in dict(extra_meta or {}).items()}
    meta.update({"architecture": ARCHITECTURE, "config": json.dumps(cfg)})
    write_safetensors(path, {k: v.float() for k, v in model.state_dict().items()}, meta)
    return path


def detect(state_dict: dict, meta: dict) -> bool:
    if meta.get("architecture") == ARCHITECTURE:
        return True
    return all(isinstance(state_dict.get(k), torch.Tensor) for k in _KEYS) and all(
        k.startswith(("enc.", "dec.")) for k in state_dict)


def _config_from_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The config a file without metadata implies: widths, blocks and latent from shapes; groups 8 (GroupNorm has no
    shape for it); a spatial model's resolution 4 latent pixels a side (it takes any multiple of its factor)."""
    n_levels = len({m.group(1) for k in sd if (m := re.match(r"enc\.levels\.(\d+)\.", k))})
    if n_levels == 0:
        raise ModelLoadError("ConvVAE: no enc.levels.* tensors")
    widths = [int(sd["enc.stem.weight"].shape[0])]
    for i in range(n_levels - 1):
        widths.append(int(sd[f"enc.levels.{i}.resample.weight"].shape[0]))
    blocks = [len({m.group(1) for k in sd if (m := re.match(rf"enc\.levels\.{i}\.blocks\.(\d+)\.", k))})
              for i in range(n_levels)]
    cfg: dict[str, Any] = {"in_channels": int(sd["enc.stem.weight"].shape[1]), "channels": widths,
                           "res_blocks": blocks[0] if len(set(blocks)) == 1 else blocks}
    moments = sd["enc.to_moments.weight"]
    f = 2 ** (n_levels - 1)
    if moments.ndim == 2:  # flat: Linear(width * side^2 -> 2d)
        side = round((moments.shape[1] / widths[-1]) ** 0.5)
        if side * side * widths[-1] != moments.shape[1]:
            raise ModelLoadError(f"ConvVAE: enc.to_moments takes {moments.shape[1]} features, not {widths[-1]} "
                                 "channels of a square map")
        cfg.update(latent_dim=int(moments.shape[0]) // 2, latent_channels=None, resolution=side * f)
    else:
        cfg.update(latent_dim=None, latent_channels=int(moments.shape[0]) // 2, resolution=4 * f)
    return cfg


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    given = meta.get("config")
    if isinstance(given, str):
        given = json.loads(given)
    raw = given if isinstance(given, dict) else _config_from_shapes(state_dict)
    try:
        cfg = full_config(raw, what="ConvVAE file config")
    except InputError as e:
        raise ModelLoadError(str(e)) from e
    with torch.device("meta"):  # no random init: the weights come from the file
        model = ConvVAE(cfg)
    model.load_state_dict({k: v.float().contiguous() for k, v in state_dict.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return _descriptor(model)


def _descriptor(model: ConvVAE) -> ModelDescriptor:
    cfg = model.config
    C, R, f = model.image_channels, model.resolution, model.factor
    bpp = 4.0 * 4 * sum(cfg["channels"])  # a few fp32 maps per level, per image pixel (a rough upper bound)
    fixed = R if model.flat else None
    latent_shape = [model.latent_channels, 1, 1] if model.flat else [model.latent_channels, R // f, R // f]
    return ModelDescriptor(
        family="vae",
        architecture=ARCHITECTURE,
        model=model,
        purpose="Autoencoder",
        scale=model.downscale,
        in_channels=C,
        out_channels=C,
        supports_half=True,
        supports_bfloat16=True,
        size_requirements=SizeRequirements(minimum=R, square=True) if model.flat else SizeRequirements(multiple_of=f),
        tiling="none",  # GroupNorm sees the whole image
        bytes_per_pixel=bpp,
        config={**cfg, "downscale": model.downscale, "latent_shape": latent_shape, "image_channels": C},
        extra=VAEFacts(latent_channels=model.latent_channels, downscale=model.downscale, image_channels=C,
                       gaussian=True, fixed_size=fixed, encode_bytes_per_pixel=bpp,
                       decode_bytes_per_latent_pixel=bpp * model.downscale**2),
    )
