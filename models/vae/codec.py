"""VAE encode, decode, prior samples and latent interpolation on the shared manager and the tiling engine.

Plain functions on a `VAE` (what the ATELIER_VAE socket carries: the encoder's and the decoder's descriptors). Latents
follow ComfyUI's LATENT convention: unscaled VAE latents [B,c,h,w], so our nodes, core's VAEDecode and the samplers
chain either way. Images are [B,C,H,W] float32 in [0,1] on the CPU.

Memory: one call when the image fits the activation budget (`activation_budget`, capped on the CPU at
`CPU_WORK_BYTES`, where bigger calls run no faster); past it, per architecture:
- TAESD family: the part at latent resolution (the decoder's first blocks, the encoder's last, where TAEF2's GroupNorm
  "pool" layers sit) runs whole; the rest, pure convolutions, through `tiled_apply` with its receptive field as
  context, so tiled equals untiled up to float rounding.
- KL autoencoders: GroupNorm and the middle attention see the whole image, so tiles cannot be independent (core's
  tiled decode, measured on random SD weights: 9/255 mean, 150/255 at worst; statistics from a downscaled pass were
  no better on them). `kl_bands` runs the network layer-synchronously in bands with whole-image GroupNorm statistics
  and whole-latent attention, keeping float16 whole-image maps in system memory (within 1/255 of untiled). Only when
  even those maps do not fit does it fall back to independent tiles (with a warning: colours may drift).
Images whose sides are not multiples of the downscale are padded (reflected) and the decoded image cropped back; a
half-precision model whose output overflows is rerun in float32 by `ModelManager.run` (logged).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import budget, host
from ..budget import call_budget, itemsize
from ..cpu_conv import nnpack_usable
from ..descriptor import ModelDescriptor
from ..errors import InputError, ModelPathError
from ..image import MAX_SIDE, match_channels, pad_multiple, split_alpha
from ..latents import seeded_normal, slerp_weights
from ..manager import ModelManager, get_manager, placement
from ..progress import interruptible
from . import taesd
from .facts import VAEFacts, Work

log = logging.getLogger(__name__)
RAM = torch.device("cpu")  # where decoded images and latents are gathered (memory guards)

NNPACK_BYTES_PER_FEATURE = 18.0  # NNPACK's Winograd workspace per pixel and channel (models/upscale measured it)
INTERPOLATIONS = ("slerp", "lerp")


@dataclass
class VAE:
    """One autoencoder: the descriptor that encodes and the one that decodes (the same for a combined file; two for
    a TAESD `x_encoder`/`x_decoder` pair; None for a half that is missing)."""

    name: str
    encoder: ModelDescriptor | None
    decoder: ModelDescriptor | None

    @property
    def _any(self) -> ModelDescriptor:
        desc = self.decoder or self.encoder
        assert desc is not None
        return desc

    @property
    def facts(self) -> VAEFacts:
        return self._any.extra

    @property
    def architecture(self) -> str:
        return self._any.architecture

    @property
    def latent_channels(self) -> int:
        return self.facts.latent_channels

    @property
    def downscale(self) -> int:
        return self.facts.downscale

    @property
    def image_channels(self) -> int:
        return self.facts.image_channels

    @property
    def packed_channels(self) -> int | None:
        """FLUX.2's packed layout (4x the channels at half the size), which TAEF2 also decodes."""
        return self.facts.packed_latent_channels

    @property
    def fixed_size(self) -> int | None:
        """The one image side a fully connected VAE takes (MNIST: 28), else None."""
        return self.facts.fixed_size

    def describe(self) -> str:
        return f"{self.name!r} ({self.architecture}, {self.latent_channels} latent channels, 1/{self.downscale})"


# ------------------------------------------------------------------------------------------------------ loading
def load_vae(name: str, folder: str = "vae", *, manager: ModelManager | None = None) -> VAE:
    """Load a VAE file; a TAESD `*_encoder`/`*_decoder` file brings its companion from the same folder."""
    manager = manager or get_manager()
    desc = manager.load(name, folder, family="vae")
    enc = desc if getattr(desc.model, "has_encoder", False) else None
    dec = desc if getattr(desc.model, "has_decoder", False) else None
    if desc.extra.halves and (enc is None or dec is None):
        other = _companion(manager, folder, name)
        if other is not None:
            half = manager.load(other, folder, family="vae")
            if half.architecture == desc.architecture and half.extra.latent_channels == desc.extra.latent_channels:
                enc = enc or (half if half.model.has_encoder else None)
                dec = dec or (half if half.model.has_decoder else None)
                log.info("%s: paired with %s", name, other)
    return VAE(name, enc, dec)


def _companion(manager: ModelManager, folder: str, name: str) -> str | None:
    """`x_encoder.pth` <-> `x_decoder.*`: the other half's name in the same folder, if it is there."""
    m = re.match(r"(.*)_(encoder|decoder)(\.[^./\\]+)$", name)
    if not m:
        return None
    other = "decoder" if m.group(2) == "encoder" else "encoder"
    for ext in dict.fromkeys((m.group(3), ".safetensors", ".pth", ".pt", ".sft")):
        cand = f"{m.group(1)}_{other}{ext}"
        try:
            manager.resolve(folder, cand)
        except ModelPathError:
            continue
        return cand
    return None


# ------------------------------------------------------------------------------------------------------ checks
def check_latent(vae: VAE, latent: torch.Tensor, name: str = "latent") -> torch.Tensor:
    """A LATENT's samples [B,c,h,w] checked against the VAE: channels, finite values; TAEF2's packed layout unpacked."""
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise InputError(f"{name}: expected samples [B,C,h,w], got {shape}")
    c = latent.shape[1]
    if c != vae.latent_channels and c != vae.packed_channels:
        packed = f" (or {vae.packed_channels} packed)" if vae.packed_channels else ""
        raise InputError(f"{name}: has {c} channels, but VAE {vae.describe()} takes {vae.latent_channels}{packed}; "
                         "use the VAE the latent was made with")
    if latent.shape[0] == 0 or latent.shape[2] == 0 or latent.shape[3] == 0:
        raise InputError(f"{name}: empty samples {tuple(latent.shape)}")
    if not torch.isfinite(latent).all():
        bad = (~torch.isfinite(latent)).sum().item()
        raise InputError(f"{name}: {bad} of {latent.numel()} values are NaN or Inf; the node that made it failed "
                         "(a sampler diverged, or an fp16 overflow upstream)")
    latent = latent.float()
    if c != vae.latent_channels:
        latent = taesd.unpack_latents(latent)
    if vae.fixed_size is None and max(latent.shape[-2:]) * vae.downscale > MAX_SIDE:
        raise InputError(f"{name}: {latent.shape[-2]}x{latent.shape[-1]} decodes to more than {MAX_SIDE} pixels a side")
    return latent


def _image_for(vae: VAE, image: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> the VAE's channel count (alpha dropped, grey <-> RGB), checked."""
    if image.ndim != 4 or image.shape[0] == 0:
        raise InputError(f"image: expected [B,C,H,W], got {tuple(image.shape)}")
    x, _alpha = split_alpha(image.float())
    x = match_channels(x, vae.image_channels)
    side = vae.fixed_size
    if side is not None and tuple(x.shape[-2:]) != (side, side):
        raise InputError(f"image: VAE {vae.describe()} takes exactly {side}x{side} images, got "
                         f"{x.shape[-2]}x{x.shape[-1]}; scale the image first (e.g. core's ImageScale)")
    return x


# ------------------------------------------------------------------------------------------------------ budgets
def _work(desc: ModelDescriptor, part: str, device: torch.device, dtype: torch.dtype, tile: int | None,
          manager: ModelManager) -> Work:
    """What one encode (part="encode") or decode call may use: one call when the image fits the activation budget
    (models/budget.py: capped on the CPU, where bigger calls run no faster); past it the architecture's own
    strategy splits the work (`encode_planned` / `decode_planned`)."""
    facts: VAEFacts = desc.extra
    bpp = facts.decode_bytes_per_latent_pixel if part == "decode" else facts.encode_bytes_per_pixel
    if _nnpack(facts, device, dtype):
        bpp += NNPACK_BYTES_PER_FEATURE * 64 * (facts.downscale**2 if part == "decode" else 1)
    budget = manager.activation_budget(desc)
    call = call_budget(budget, device)
    storage = max(0, budget - call) if device.type == "cpu" else int(host.free_bytes(torch.device("cpu")) * 0.5)
    return Work(device, dtype, tile, bpp * itemsize(dtype) / 4, call, storage, desc.source or "VAE")


def _need(desc: ModelDescriptor, part: str, pixels: int) -> int:
    """Device memory to ask the host for: the weights and one call's activations (calls are capped at 1 GiB)."""
    facts: VAEFacts = desc.extra
    bpp = facts.decode_bytes_per_latent_pixel if part == "decode" else facts.encode_bytes_per_pixel
    return desc.weight_bytes + int(min(bpp * pixels, 1 << 30))


def _nnpack(facts: VAEFacts, device: torch.device, dtype: torch.dtype) -> bool:
    """NNPACK's Winograd convolutions pay on the CPU for 64-channel layers (TAESD: about 2.8x measured)."""
    if not (facts.nnpack and device.type == "cpu" and dtype == torch.float32):
        return False
    return nnpack_usable()



# ------------------------------------------------------------------------------------------------------ encode
def encode(vae: VAE, image: torch.Tensor, *, sample: bool = False, seed: int = 0, tile: int | None = None,
           manager: ModelManager | None = None) -> torch.Tensor:
    """Image [B,C,H,W] in [0,1] -> latent [B,c,ceil(H/f),ceil(W/f)] float32 on the CPU (the posterior mean, or a
    seeded draw from it when `sample`: image i from seed + i). Sides not multiples of f are padded by reflection."""
    manager = manager or get_manager()
    desc = vae.encoder
    if desc is None:
        raise InputError(f"vae: {vae.describe()} has no encoder (a decoder-only file"
                         f"{'; put its *_encoder file beside it' if vae.facts.halves else ''})")
    x = _image_for(vae, image)
    if vae.fixed_size is None:
        if max(x.shape[-2:]) > MAX_SIDE:
            raise InputError(f"image: {x.shape[-2]}x{x.shape[-1]} is larger than {MAX_SIDE} pixels a side")
        x = pad_multiple(x, vae.downscale)

    def work(model: nn.Module) -> torch.Tensor:
        device, dtype = placement(model)
        plan = _work(desc, "encode", device, dtype, tile, manager)
        with torch.no_grad(), interruptible(model):  # Cancel between layers
            if tile is None and plan.bytes_per_pixel * x.shape[-2] * x.shape[-1] <= plan.call_bytes:
                if vae.facts.gaussian:
                    return torch.cat([t.float().cpu() for t in model.moments(x.to(device, dtype))], dim=1)
                return model.encode(x).float().cpu()
            return model.encode_planned(x, plan)

    out = manager.run(desc, work, memory_required=_need(desc, "encode", x.shape[-2] * x.shape[-1]))
    if not vae.facts.gaussian:
        if sample:
            log.info("%s: a %s encoder is deterministic; 'sample' gives the same latent as 'mean'", vae.name,
                     vae.architecture)
        return out
    mean, logvar = out.chunk(2, dim=1)
    if not sample:
        return mean.contiguous()
    return mean + torch.exp(0.5 * logvar) * seeded_normal(mean.shape, seed)  # [B,c,h,w]


# ------------------------------------------------------------------------------------------------------ decode
def decode(vae: VAE, latent: torch.Tensor, *, size: tuple[int, int] | None = None, tile: int | None = None,
           manager: ModelManager | None = None, name: str = "latent") -> torch.Tensor:
    """Latent [B,c,h,w] -> image [B,C,h*f,w*f] in [0,1], float32 on the CPU; `size` (H, W) crops a padded encode
    back. `tile`: tile side in image pixels (None: from the memory budget). `name`: the input, for messages."""
    manager = manager or get_manager()
    desc = vae.decoder
    if desc is None:
        raise InputError(f"vae: {vae.describe()} has no decoder (an encoder-only file"
                         f"{'; put its *_decoder file beside it' if vae.facts.halves else ''})")
    z = check_latent(vae, latent, name)
    f = vae.downscale
    _require_images(vae, z.shape[0], z.shape[-2] * f, z.shape[-1] * f, f"VAE Decode: {name}")
    tile_latent = max(1, tile // f) if tile and vae.fixed_size is None else None

    def work(model: nn.Module) -> torch.Tensor:
        device, dtype = placement(model)
        plan = _work(desc, "decode", device, dtype, tile_latent, manager)
        with torch.no_grad(), interruptible(model):  # Cancel between layers
            one = plan.bytes_per_pixel * z.shape[-2] * z.shape[-1]
            if tile_latent is None and one * z.shape[0] <= plan.call_bytes:
                return model.decode(z.to(device, dtype)).float().cpu()
            if tile_latent is None and one <= plan.call_bytes:
                return torch.cat([model.decode(z[i : i + 1].to(device, dtype)).float().cpu()
                                  for i in range(z.shape[0])])
            return model.decode_planned(z, plan)

    out = manager.run(desc, work, memory_required=_need(desc, "decode", z.shape[-2] * z.shape[-1]))
    if size is not None:
        H, W = int(size[0]), int(size[1])
        if out.shape[-2] - f < H <= out.shape[-2] and out.shape[-1] - f < W <= out.shape[-1]:
            out = out[..., :H, :W]
    return out


# ------------------------------------------------------------------------------------------------------ prior
def sample_prior(vae: VAE, batch: int, height: int, width: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """Seeded draws z ~ N(0, temperature^2 I) in the VAE's latent space: [batch,c,ceil(H/f),ceil(W/f)] float32 CPU
    (a fully connected VAE has one latent size: its own); sample i from seed + i, the same on any device."""
    if batch < 1:
        raise InputError(f"batch_size: expected at least 1, got {batch}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature: expected a finite value >= 0, got {temperature}")
    if vae.fixed_size is not None:
        h = w = 1
    else:
        if min(height, width) < 1 or max(height, width) > MAX_SIDE:
            raise InputError(f"width/height: expected 1..{MAX_SIDE}, got {width}x{height}")
        h, w = math.ceil(height / vae.downscale), math.ceil(width / vae.downscale)
    budget.require(budget.tensor_bytes(batch, vae.latent_channels, h, w) * 2,
                   f"VAE Sample: {batch} latents for {width}x{height} images", RAM)
    return seeded_normal((batch, vae.latent_channels, h, w), seed) * float(temperature)


def _require_images(vae: VAE, batch: int, height: int, width: int, what: str) -> None:
    """The decoded batch in RAM twice (the result, the IMAGE the node hands on), float32: refused when it cannot fit."""
    side = vae.fixed_size
    H, W = (side, side) if side else (height, width)
    budget.require(budget.tensor_bytes(batch, max(3, vae.image_channels), H, W) * 2,
                   f"{what}: {batch} image(s) of {W}x{H}", RAM)


# ------------------------------------------------------------------------------------------------------ interpolation
def interpolate(a: torch.Tensor, b: torch.Tensor, steps: int, mode: str = "slerp") -> torch.Tensor:
    """`steps` latents from a to b inclusive, as one batch: [Ba*steps,c,h,w] ordered pair by pair (a batch of one on
    either side pairs with every sample of the other). slerp: along the great circle, per sample over all values
    (lerp where a and b are nearly parallel); lerp: straight line."""
    if mode not in INTERPOLATIONS:
        raise InputError(f"mode: expected one of {INTERPOLATIONS}, got {mode!r}")
    if steps < 2:
        raise InputError(f"steps: expected at least 2 (the two ends), got {steps}")
    for name, t in (("latent_a", a), ("latent_b", b)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[0] == 0:
            raise InputError(f"{name}: expected samples [B,C,h,w], got {getattr(t, 'shape', type(t).__name__)}")
        if not torch.isfinite(t).all():
            raise InputError(f"{name}: has NaN or Inf values")
    if a.shape[1:] != b.shape[1:]:
        raise InputError(f"latent_b: expected the shape of latent_a {list(a.shape[1:])} (channels, height, width), "
                         f"got {list(b.shape[1:])}")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise InputError(f"latent_b: batch {b.shape[0]} cannot pair with latent_a's batch {a.shape[0]} (equal, or 1)")
    n = max(a.shape[0], b.shape[0])
    budget.require(budget.tensor_bytes(n, steps, *a.shape[1:], dtype=torch.float64) * 2,
                   f"Latent Interpolate: {n} x {steps} latents of {list(a.shape[1:])}", RAM)
    a, b = a.float().expand(n, *a.shape[1:]), b.float().expand(n, *b.shape[1:])
    t = torch.linspace(0, 1, steps, dtype=torch.float64)  # [S]
    fa, fb = slerp_weights(a.flatten(1).double(), b.flatten(1).double(), t, mode)  # [N,S] each
    out = fa[:, :, None] * a.flatten(1).double()[:, None] + fb[:, :, None] * b.flatten(1).double()[:, None]
    return out.float().reshape(n * steps, *a.shape[1:])
