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

import contextlib

import logging
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import host
from ..descriptor import ModelDescriptor
from ..errors import InputError, ModelPathError
from ..manager import ModelManager, get_manager, placement
from ..tiling import auto_tile, match_channels, split_alpha, tiled_apply
from . import kl_bands, taesd

log = logging.getLogger(__name__)

CPU_WORK_BYTES = 512 << 20  # activation bytes per call on the CPU: larger calls are no faster, only bigger
NNPACK_BYTES_PER_FEATURE = 18.0  # NNPACK's Winograd workspace per pixel and channel (models/upscale measured it)
MAX_SIDE = 16384
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
    def architecture(self) -> str:
        return self._any.architecture

    @property
    def latent_channels(self) -> int:
        return int(self._any.model.latent_channels)

    @property
    def downscale(self) -> int:
        return int(self._any.model.downscale)

    @property
    def image_channels(self) -> int:
        return int(self._any.model.image_channels)

    @property
    def packed_channels(self) -> int | None:
        """FLUX.2's packed layout (4x the channels at half the size), which TAEF2 also decodes."""
        return self._any.config.get("packed_latent_channels")

    @property
    def fixed_size(self) -> int | None:
        """The one image side a fully connected VAE takes (MNIST: 28), else None."""
        return self._any.config.get("image_size") if self._any.tiling == "none" else None

    def describe(self) -> str:
        return f"{self.name!r} ({self.architecture}, {self.latent_channels} latent channels, 1/{self.downscale})"


# ------------------------------------------------------------------------------------------------------ loading
def load_vae(name: str, folder: str = "vae", *, manager: ModelManager | None = None) -> VAE:
    """Load a VAE file; a TAESD `*_encoder`/`*_decoder` file brings its companion from the same folder."""
    manager = manager or get_manager()
    desc = manager.load(name, folder, family="vae")
    enc = desc if getattr(desc.model, "has_encoder", False) else None
    dec = desc if getattr(desc.model, "has_decoder", False) else None
    if desc.architecture == "TAESD" and (enc is None or dec is None):
        other = _companion(manager, folder, name)
        if other is not None:
            half = manager.load(other, folder, family="vae")
            if half.architecture == "TAESD" and half.model.latent_channels == desc.model.latent_channels:
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
def _bpp(desc: ModelDescriptor, kind: str, device: torch.device, dtype: torch.dtype) -> float:
    """Activation bytes of one call per input pixel (latent pixel for decode) at `dtype`."""
    key = "decode_bytes_per_latent_pixel" if kind == "decode" else "encode_bytes_per_pixel"
    bpp = float(desc.config.get(key) or desc.bytes_per_pixel or 64 * 4 * 4)
    if device.type == "cpu" and dtype == torch.float32 and _nnpack(desc):
        per_px = 64 * (desc.model.downscale ** 2 if kind == "decode" else 1)
        bpp += NNPACK_BYTES_PER_FEATURE * per_px
    return bpp * torch.empty((), dtype=dtype).element_size() / 4


def _nnpack(desc: ModelDescriptor) -> bool:
    """NNPACK's Winograd convolutions pay on the CPU for TAESD's 64-channel layers (about 2.8x measured)."""
    if desc.architecture != "TAESD":
        return False
    from ..cpu_conv import nnpack_usable

    return nnpack_usable()


def work_budget(manager: ModelManager, desc: ModelDescriptor, device: torch.device) -> int:
    """Activation bytes one call may use on the compute device."""
    budget = manager.activation_budget(desc)
    return min(budget, CPU_WORK_BYTES) if device.type == "cpu" else budget


def _need(desc: ModelDescriptor, kind: str, pixels: int) -> int:
    """Device memory to ask the host for: the weights and one call's activations (calls are capped at 1 GiB)."""
    return desc.weight_bytes + int(min(_bpp(desc, kind, torch.device("cuda"), torch.float32) * pixels, 1 << 30))


def storage_budget(manager: ModelManager, desc: ModelDescriptor, device: torch.device) -> int:
    """System memory for the whole-image maps of an exact banded pass (on the CPU, what one call does not use)."""
    if device.type == "cpu":
        return max(0, manager.activation_budget(desc) - work_budget(manager, desc, device))
    return int(host.free_bytes(torch.device("cpu")) * 0.5)


def _fast_convs(desc: ModelDescriptor, model: nn.Module, device: torch.device, dtype: torch.dtype):
    """TAESD's 3x3 convolutions are NNPACK layers (models/cpu_conv.py; converted once, the first time here: a
    no-op afterwards); they use NNPACK only on the CPU in float32 without gradients, as before."""
    if _nnpack(desc) and device.type == "cpu" and dtype == torch.float32:
        from ..cpu_conv import use_nnpack

        use_nnpack(model)
    return contextlib.nullcontext()


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    ph, pw = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


# ------------------------------------------------------------------------------------------------------ encode
def encode(vae: VAE, image: torch.Tensor, *, sample: bool = False, seed: int = 0, tile: int | None = None,
           manager: ModelManager | None = None) -> torch.Tensor:
    """Image [B,C,H,W] in [0,1] -> latent [B,c,ceil(H/f),ceil(W/f)] float32 on the CPU (the posterior mean, or a
    seeded draw from it when `sample`: image i from seed + i). Sides not multiples of f are padded by reflection."""
    manager = manager or get_manager()
    desc = vae.encoder
    if desc is None:
        raise InputError(f"vae: {vae.describe()} has no encoder (a decoder-only file"
                         f"{'; put its *_encoder file beside it' if vae.architecture == 'TAESD' else ''})")
    x = _image_for(vae, image)
    f = vae.downscale
    if vae.fixed_size is None:
        if max(x.shape[-2:]) > MAX_SIDE:
            raise InputError(f"image: {x.shape[-2]}x{x.shape[-1]} is larger than {MAX_SIDE} pixels a side")
        x = _pad(x, f)
    gaussian = desc.architecture != "TAESD"  # TAESD encoders are deterministic: no posterior to sample

    def work(model: nn.Module) -> torch.Tensor:
        device, dtype = placement(model)
        with torch.no_grad(), _fast_convs(desc, model, device, dtype):
            if desc.architecture == "TAESD":
                return _taesd_encode(desc, model, x, tile, manager, device, dtype)
            if desc.architecture.startswith("KL"):
                return torch.cat(_kl_moments(desc, model, x, tile, manager, device, dtype), dim=1)
            return torch.cat(model.moments(x.to(device, dtype)), dim=1).float().cpu()

    out = manager.run(desc, work, memory_required=_need(desc, "encode", x.shape[-2] * x.shape[-1]))
    if not gaussian:
        if sample:
            log.info("%s: a TAESD encoder is deterministic; 'sample' gives the same latent as 'mean'", vae.name)
        return out
    mean, logvar = out.chunk(2, dim=1)
    if not sample:
        return mean.contiguous()
    noise = _normal(mean.shape, seed)
    return mean + torch.exp(0.5 * logvar) * noise  # [B,c,h,w]


def _normal(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal [B,...] on the CPU, sample i drawn from seed + i (a batch's images do not depend on its
    size, and are the same on every device)."""
    return torch.cat([torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed((int(seed) + i) % 2**64))
                      for i in range(shape[0])])


def _taesd_encode(desc, model, x, tile, manager, device, dtype) -> torch.Tensor:
    """Pure-convolution trunk (to 1/f) tiled with its receptive field as context; the rest (TAEF2's GroupNorm
    layers) at 1/f resolution on the whole image."""
    seq: nn.Sequential = model.encoder
    cut = max(i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d) and m.stride[0] > 1) + 1
    trunk, rest = seq[:cut], seq[cut:]
    f = model.downscale
    H, W = x.shape[-2:]
    context = math.ceil(receptive_radius(trunk))  # exact: no blending needed
    side = _balanced(H, W, tile or auto_tile(H, W, _bpp(desc, "encode", device, dtype),
                                             work_budget(manager, desc, device), f), 2 * context, f)
    feats = tiled_apply(trunk, x, scale=1 / f, tile=side, context=context, blend=0, align=f, max_batch=1,
                        device=device, dtype=dtype, progress="encode")  # [B,64,H/f,W/f]
    outs = [rest(feats[i : i + 1].to(device, dtype)).float().cpu() for i in range(feats.shape[0])]
    z = torch.cat(outs) / model.vae_scale + model.vae_shift
    return taesd.pack_latents(z) if model.pack_latents else z


def _kl_moments(desc, model, x, tile, manager, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    H, W = x.shape[-2:]
    budget = work_budget(manager, desc, device)
    if tile is None and _bpp(desc, "encode", device, dtype) * H * W <= budget:
        mean, logvar = model.moments(x.to(device, dtype))
        return mean.float().cpu(), logvar.float().cpu()
    band = int(_bpp(desc, "encode", device, dtype) * tile * tile) if tile else budget
    if kl_bands.fits(model, H, W, "encode", storage_budget(manager, desc, device)):
        return kl_bands.moments(model, x, device=device, dtype=dtype, band_bytes=band)
    log.warning("%s: %dx%d is too large for exact banded encoding in the memory free; encoding in independent tiles "
                "(GroupNorm per tile: colours may drift slightly)", os.path.basename(desc.source), H, W)
    f = model.downscale
    side = tile or auto_tile(H, W, _bpp(desc, "encode", device, dtype), budget, f)
    res = tiled_apply(lambda t: torch.cat(model.moments(t), dim=1), x, scale=1 / f, tile=side, context=8 * f,
                      blend=8 * f, align=f, max_batch=1, device=device, dtype=dtype, progress="encode")
    return res.chunk(2, dim=1)


# ------------------------------------------------------------------------------------------------------ decode
def decode(vae: VAE, latent: torch.Tensor, *, size: tuple[int, int] | None = None, tile: int | None = None,
           manager: ModelManager | None = None, name: str = "latent") -> torch.Tensor:
    """Latent [B,c,h,w] -> image [B,C,h*f,w*f] in [0,1], float32 on the CPU; `size` (H, W) crops a padded encode
    back. `tile`: tile side in image pixels (None: from the memory budget). `name`: the input, for messages."""
    manager = manager or get_manager()
    desc = vae.decoder
    if desc is None:
        raise InputError(f"vae: {vae.describe()} has no decoder (an encoder-only file"
                         f"{'; put its *_decoder file beside it' if vae.architecture == 'TAESD' else ''})")
    z = check_latent(vae, latent, name)
    f = vae.downscale
    tile_latent = max(1, tile // f) if tile and vae.fixed_size is None else None

    def work(model: nn.Module) -> torch.Tensor:
        device, dtype = placement(model)
        with torch.no_grad(), _fast_convs(desc, model, device, dtype):
            if desc.architecture == "TAESD":
                return _taesd_decode(desc, model, z, tile_latent, manager, device, dtype)
            if desc.architecture.startswith("KL"):
                return _kl_decode(desc, model, z, tile_latent, manager, device, dtype)
            return model.decode(z.to(device, dtype)).float().cpu()

    out = manager.run(desc, work, memory_required=_need(desc, "decode", z.shape[-2] * z.shape[-1]))
    if size is not None:
        H, W = int(size[0]), int(size[1])
        if out.shape[-2] - f < H <= out.shape[-2] and out.shape[-1] - f < W <= out.shape[-1]:
            out = out[..., :H, :W]
    return out


def _taesd_decode(desc, model, z, tile, manager, device, dtype) -> torch.Tensor:
    """The blocks at latent resolution (TAEF2's GroupNorm layers among them) on the whole latent; the upsampling
    rest, pure convolutions, tiled with its receptive field as context."""
    seq: nn.Sequential = model.decoder
    cut = next(i for i, m in enumerate(seq) if isinstance(m, nn.Upsample))
    head, rest = seq[:cut], seq[cut:]
    f = model.downscale
    h, w = z.shape[-2:]
    feats = torch.cat([head(((z[i : i + 1] - model.vae_shift) * model.vae_scale).to(device, dtype)).float().cpu()
                       for i in range(z.shape[0])])  # [B,64,h,w]
    context = math.ceil(receptive_radius(rest))  # exact: no blending needed
    side = _balanced(h, w, tile or auto_tile(h, w, _bpp(desc, "decode", device, dtype),
                                             work_budget(manager, desc, device)), 2 * context)
    out = tiled_apply(rest, feats, scale=f, out_channels=3, tile=side, context=context, blend=0, max_batch=1,
                      device=device, dtype=dtype, progress="decode")
    return out.clamp_(0, 1)


def _kl_decode(desc, model, z, tile, manager, device, dtype) -> torch.Tensor:
    h, w = z.shape[-2:]
    bpp = _bpp(desc, "decode", device, dtype)
    budget = work_budget(manager, desc, device)
    if tile is None and bpp * h * w <= budget:
        return torch.cat([model.decode(z[i : i + 1].to(device, dtype)).float().cpu() for i in range(z.shape[0])])
    band = int(bpp * tile * tile) if tile else budget
    if kl_bands.fits(model, h, w, "decode", storage_budget(manager, desc, device)):
        return kl_bands.decode(model, z, device=device, dtype=dtype, band_bytes=band)
    f = model.downscale
    log.warning("%s: %dx%d is too large for exact banded decoding in the memory free; decoding in independent tiles "
                "(GroupNorm per tile: colours may drift between tiles)", os.path.basename(desc.source), h * f, w * f)
    side = tile or auto_tile(h, w, bpp, budget)
    return tiled_apply(model.decode, z, scale=model.downscale, out_channels=model.image_channels, tile=side,
                       context=8, blend=8, max_batch=1, device=device, dtype=dtype, progress="decode")


def _balanced(H: int, W: int, max_side: int, overlap: int, align: int = 1) -> int:
    """The smallest tile side (a multiple of align) that covers both sides with as few tiles as `max_side` allows:
    three tiles of 43 overlapping by 22 cost less than two of 60 that overlap by 56."""
    side = max_side // align * align
    if side >= max(H, W) or side <= overlap:
        return max(side, align)
    n = max(math.ceil((L - overlap) / (side - overlap)) for L in (H, W))
    even = max(math.ceil((L + (n - 1) * overlap) / n) for L in (H, W))
    return min(side, math.ceil(even / align) * align)


def receptive_radius(seq: nn.Module) -> float:
    """How far (in input pixels) an output pixel of a stack of convolutions and upsamplings sees, each side."""
    radius, step = 0.0, 1.0
    for m in seq.modules():
        if isinstance(m, nn.Conv2d):
            radius += (m.kernel_size[0] - 1) / 2 * m.dilation[0] * step
            step *= m.stride[0]
        elif isinstance(m, nn.Upsample):
            step /= float(m.scale_factor)
    return radius


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
    return _normal((batch, vae.latent_channels, h, w), seed) * float(temperature)


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
    a, b = a.float().expand(n, *a.shape[1:]), b.float().expand(n, *b.shape[1:])
    t = torch.linspace(0, 1, steps, dtype=torch.float64)  # [S]
    fa, fb = _weights(a.flatten(1).double(), b.flatten(1).double(), t, mode)  # [N,S] each
    out = fa[:, :, None] * a.flatten(1).double()[:, None] + fb[:, :, None] * b.flatten(1).double()[:, None]
    return out.float().reshape(n * steps, *a.shape[1:])


def _weights(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of a and b, each [N,S], for a, b [N,D] and t [S]."""
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
