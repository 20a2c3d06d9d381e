"""TAESD family: tiny autoencoders for SD1/SD2 (taesd), SDXL (taesdxl), SD3 (taesd3), FLUX.1 (taef1), FLUX.2 (taef2,
with GroupNorm "pool" layers in its middle blocks) and Sana (taesana, 32x; encoder only published).

Own code after madebyollin/taesd (MIT): the networks are plain nn.Sequential stacks built by factory functions, so
the published state dicts (`0.weight`, `1.conv.0.weight`, ...) load as they are. Accepted files:
- an encoder file (`taef2_encoder.pth`) or a decoder file (`taef2_decoder.pth`), bare Sequential keys;
- a combined file: `encoder.`/`decoder.` prefixes, ComfyUI's `taesd_encoder.`/`taesd_decoder.` (optionally with
  `vae_scale`/`vae_shift`), or diffusers' AutoencoderTiny (`encoder.layers.N`, `decoder.layers.N-1`).
`merge_state_dicts(encoder_sd, decoder_sd)` joins an encoder and a decoder file into one combined state dict.

Latent convention (ComfyUI's TAESD VAE): TAESD latents are already in the diffusion model's scaled space, while a
ComfyUI LATENT holds unscaled VAE latents; so `encode` returns `encoder(x) / scale + shift` and `decode` feeds
`(z - shift) * scale` to the decoder, with the scale/shift of the variant (taesd 0.18215; taesdxl 0.13025; taesd3
1.5305/0.0609; taef1 0.3611/0.1159; taef2 and taesana 1/0). Images are [B,3,H,W] in [0,1] both ways.
TAEF2: newer ComfyUI packs FLUX.2 latents 2x2 into [B,128,H/16,W/16]; set `model.pack_latents = True` for that
layout on encode. `decode` takes either layout.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
from typing import Any

import torch
import torch.nn as nn

from ..budget import fit_side
from ..cpu_conv import use_nnpack
from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import InputError, ModelLoadError
from ..tiling import conv_receptive_radius, even_tile, tiled_apply
from .facts import VAEFacts, Work
from .kl import GroupNorm  # nn.GroupNorm with the same keys (fixable statistics, unused here)

log = logging.getLogger(__name__)

# variant -> (vae_scale, vae_shift), as ComfyUI's VAELoader sets them for its TAESD VAEs
VARIANTS: dict[str, tuple[float, float]] = {
    "taesd": (0.18215, 0.0),
    "taesdxl": (0.13025, 0.0),
    "taesd3": (1.5305, 0.0609),
    "taef1": (0.3611, 0.1159),
    "taef2": (1.0, 0.0),
    "taesana": (1.0, 0.0),
}
# variant when nothing names it: by (latent channels, GroupNorm pool layers, 32x)
_DEFAULT_VARIANT = {(4, False, False): "taesd", (16, False, False): "taef1", (32, True, False): "taef2",
                    (32, False, True): "taesana"}
_COMBINED_PREFIXES = (  # (encoder prefix, decoder prefix, decoder index offset)
    ("encoder.layers.", "decoder.layers.", 1),  # diffusers AutoencoderTiny: its decoder has no Clamp layer
    ("taesd_encoder.", "taesd_decoder.", 0),  # ComfyUI
    ("encoder.", "decoder.", 0),
)


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------
def conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual conv block; with `pool`, a 1x1 GroupNorm branch added before it (taef2's middle blocks)."""

    def __init__(self, n_in: int, n_out: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        if pool:
            wide = n_in * 4
            self.pool = nn.Sequential(nn.Conv2d(n_in, wide, 1, bias=False), GroupNorm(4, wide, eps=1e-5), nn.ReLU(),
                                      nn.Conv2d(wide, n_in, 1, bias=False))
        else:
            self.pool = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W]
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _blocks(n: int, pool: bool = False) -> list[nn.Module]:
    return [Block(64, 64, pool) for _ in range(n)]


def Encoder(latent_channels: int = 4, pool: bool = False) -> nn.Sequential:
    """[B,3,H,W] in [0,1] -> [B,latent,H/8,W/8]."""
    return nn.Sequential(
        conv(3, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), *_blocks(3),
        conv(64, 64, stride=2, bias=False), *_blocks(3),
        conv(64, 64, stride=2, bias=False), *_blocks(3, pool),
        conv(64, latent_channels),
    )


def Decoder(latent_channels: int = 4, pool: bool = False) -> nn.Sequential:
    """[B,latent,h,w] -> [B,3,8h,8w] in about [0,1]."""
    up = (lambda: [nn.Upsample(scale_factor=2), conv(64, 64, bias=False)])
    return nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(),
        *_blocks(3, pool), *up(),
        *_blocks(3), *up(),
        *_blocks(3), *up(),
        Block(64, 64), conv(64, 3),
    )


def F32Encoder(latent_channels: int = 32) -> nn.Sequential:
    """32x variant (taesana): [B,3,H,W] -> [B,latent,H/32,W/32]."""
    return nn.Sequential(
        conv(3, 32, stride=2), nn.ReLU(), conv(32, 64, stride=2), nn.ReLU(), Block(64, 64),
        conv(64, 64, stride=2, bias=False), *_blocks(3),
        conv(64, 64, stride=2, bias=False), *_blocks(3),
        conv(64, 64, stride=2, bias=False), *_blocks(3),
        conv(64, latent_channels),
    )


def F32Decoder(latent_channels: int = 32) -> nn.Sequential:
    """32x variant (taesana): [B,latent,h,w] -> [B,3,32h,32w]."""
    layers: list[nn.Module] = [Clamp(), conv(latent_channels, 256), nn.ReLU()]
    for c_in, c_out in ((256, 128), (128, 64), (64, 64), (64, 64), (64, 64)):
        layers += [Block(c_in, c_in), Block(c_in, c_in), Block(c_in, c_in), nn.Upsample(scale_factor=2),
                   conv(c_in, c_out, bias=False)]
    return nn.Sequential(*layers, Block(64, 64), conv(64, 3))


# ---------------------------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------------------------
class TAESD(nn.Module):
    """Encoder and/or decoder with the ComfyUI latent convention. See the module docstring."""

    image_channels = 3

    def __init__(self, encoder: nn.Module | None, decoder: nn.Module | None, *, latent_channels: int,
                 downscale: int = 8, variant: str = "taesd", scale: float | None = None,
                 shift: float | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_channels = latent_channels
        self.downscale = downscale
        self.variant = variant
        default_scale, default_shift = VARIANTS.get(variant, (1.0, 0.0))
        self.vae_scale = float(default_scale if scale is None else scale)
        self.vae_shift = float(default_shift if shift is None else shift)
        self.pack_latents = False  # taef2: encode to ComfyUI's packed FLUX.2 layout [B,4*latent,H/16,W/16]

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image [B,3,H,W] in [0,1] -> latent [B,latent,H/f,W/f] (deterministic: `sample` changes nothing)."""
        if self.encoder is None:
            raise InputError(f"{self.variant} encode: this file holds only a decoder; load the *_encoder file too")
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"image: expected [B,3,H,W] in [0,1], got {list(x.shape)}")
        m = self.downscale * (2 if self.pack_latents else 1)
        if x.shape[2] % m or x.shape[3] % m:
            raise InputError(f"image: height and width must be multiples of {m}, got {x.shape[2]}x{x.shape[3]}")
        p = self._param()
        z = self.encoder(x.to(p.device, p.dtype)) / self.vae_scale + self.vae_shift  # [B,latent,H/f,W/f]
        return pack_latents(z) if self.pack_latents else z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B,latent,h,w] (or packed [B,4*latent,h/2,w/2]) -> image [B,3,h*f,w*f] in [0,1]."""
        if self.decoder is None:
            raise InputError(f"{self.variant} decode: this file holds only an encoder; load the *_decoder file too")
        c = self.latent_channels
        if z.ndim != 4 or z.shape[1] not in (c, 4 * c):
            raise InputError(f"latent: expected [B,{c},h,w] (or packed [B,{4 * c},h,w]), got {list(z.shape)}")
        if z.shape[1] == 4 * c:
            z = unpack_latents(z)
        p = self._param()
        x = self.decoder((z.to(p.device, p.dtype) - self.vae_shift) * self.vae_scale)
        return x.clamp(0, 1)

    # The strategy for large images (models/vae/facts.py): what is at latent resolution (the decoder's first blocks,
    # the encoder's last, where TAEF2's GroupNorm "pool" layers sit) runs whole; the rest, pure convolutions, runs
    # through the tiling engine with its receptive field as context, so tiled equals untiled up to float rounding.

    def encode_planned(self, x: torch.Tensor, work: Work) -> torch.Tensor:  # [B,3,H,W] -> [B,c,H/f,W/f] CPU
        seq: nn.Sequential = self.encoder
        cut = max(i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d) and m.stride[0] > 1) + 1
        trunk, rest = seq[:cut], seq[cut:]
        f = self.downscale
        H, W = x.shape[-2:]
        context = math.ceil(conv_receptive_radius(trunk))  # exact: no blending needed
        side = even_tile((H, W), work.tile or fit_side(H, W, work.bytes_per_pixel, work.call_bytes, f),
                         2 * context, f)
        feats = tiled_apply(trunk, x, scale=1 / f, tile=side, context=context, blend=0, align=f, max_batch=1,
                            device=work.device, dtype=work.dtype, progress="encode")  # [B,64,H/f,W/f]
        outs = [rest(feats[i : i + 1].to(work.device, work.dtype)).float().cpu() for i in range(feats.shape[0])]
        z = torch.cat(outs) / self.vae_scale + self.vae_shift
        return pack_latents(z) if self.pack_latents else z

    def decode_planned(self, z: torch.Tensor, work: Work) -> torch.Tensor:  # [B,c,h,w] -> [B,3,h*f,w*f] CPU
        seq: nn.Sequential = self.decoder
        cut = next(i for i, m in enumerate(seq) if isinstance(m, nn.Upsample))
        head, rest = seq[:cut], seq[cut:]
        h, w = z.shape[-2:]
        feats = torch.cat([head(((z[i : i + 1] - self.vae_shift) * self.vae_scale).to(work.device, work.dtype))
                           .float().cpu() for i in range(z.shape[0])])  # [B,64,h,w]
        context = math.ceil(conv_receptive_radius(rest))  # exact: no blending needed
        side = even_tile((h, w), work.tile or fit_side(h, w, work.bytes_per_pixel, work.call_bytes), 2 * context)
        out = tiled_apply(rest, feats, scale=self.downscale, out_channels=3, tile=side, context=context, blend=0,
                          max_batch=1, device=work.device, dtype=work.dtype, progress="decode")
        return out.clamp_(0, 1)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,4C,H/2,W/2], channel order c*4 + dy*2 + dx (ComfyUI/FLUX.2)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpack_latents(z: torch.Tensor) -> torch.Tensor:
    """[B,4C,h,w] -> [B,C,2h,2w], the inverse of `pack_latents`."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


# ---------------------------------------------------------------------------------------------------------------
# Key layouts, detection, loading
# ---------------------------------------------------------------------------------------------------------------
def merge_state_dicts(encoder_sd: dict | None, decoder_sd: dict | None) -> dict[str, torch.Tensor]:
    """An encoder file's and a decoder file's state dicts -> one combined (`encoder.`/`decoder.`) state dict."""
    out: dict[str, torch.Tensor] = {}
    for prefix, sd in (("encoder.", encoder_sd), ("decoder.", decoder_sd)):
        out.update({prefix + k: v for k, v in (sd or {}).items()})
    return out


@functools.lru_cache(maxsize=1)
def _kind_keys() -> dict[str, frozenset[str]]:
    """Expected state-dict keys of every network kind (built once, on the meta device: no memory; every detect of
    any file asks, so the six networks are not rebuilt each time)."""
    with torch.device("meta"):
        nets = {"encoder": Encoder(), "encoder_pool": Encoder(pool=True), "encoder_f32": F32Encoder(),
                "decoder": Decoder(), "decoder_pool": Decoder(pool=True), "decoder_f32": F32Decoder()}
    return {k: frozenset(n.state_dict()) for k, n in nets.items()}


def _split(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]] | None:
    """(encoder keys, decoder keys, extras) in bare Sequential names, or None if the layout is not TAESD's."""
    extras = {k: float(sd[k]) for k in ("vae_scale", "vae_shift") if k in sd and sd[k].numel() == 1}
    keys = [k for k in sd if k not in extras]
    if keys and all(re.match(r"\d+\.", k) for k in keys):
        return ({}, {k: sd[k] for k in keys}, extras) if "0.weight" not in sd else ({k: sd[k] for k in keys}, {}, extras)
    for enc_p, dec_p, offset in _COMBINED_PREFIXES:
        enc = {k[len(enc_p):]: sd[k] for k in keys if k.startswith(enc_p)}
        dec = {k[len(dec_p):]: sd[k] for k in keys if k.startswith(dec_p)}
        if not (enc or dec) or len(enc) + len(dec) != len(keys):
            continue
        if not all(re.match(r"\d+\.", k) for k in [*enc, *dec]):
            return None
        if offset:
            dec = {f"{int(k.split('.', 1)[0]) + offset}.{k.split('.', 1)[1]}": v for k, v in dec.items()}
        return enc, dec, extras
    return None


def _kinds(sd: dict) -> tuple[str | None, str | None, dict[str, torch.Tensor], dict[str, torch.Tensor], dict] | None:
    parts = _split(sd)
    if parts is None:
        return None
    enc, dec, extras = parts
    if not enc and not dec:
        return None
    known = _kind_keys()
    enc_kind = next((k for k in ("encoder", "encoder_pool", "encoder_f32") if set(enc) == known[k]), None)
    dec_kind = next((k for k in ("decoder", "decoder_pool", "decoder_f32") if set(dec) == known[k]), None)
    if (enc and enc_kind is None) or (dec and dec_kind is None):
        return None
    return enc_kind, dec_kind, enc, dec, extras


def detect(state_dict: dict, meta: dict) -> bool:
    return _kinds(state_dict) is not None


def _variant(meta: dict, channels: int, pool: bool, f32: bool, extras: dict[str, float]) -> tuple[str, bool]:
    """(variant name, whether it was guessed). Named by meta["variant"] or a file name in meta, else by shape."""
    named = meta.get("variant") if isinstance(meta.get("variant"), str) else None
    if named is None:
        for key in ("source", "path", "filename", "name"):
            base = os.path.basename(str(meta.get(key, ""))).lower()
            named = next((v for v in sorted(VARIANTS, key=len, reverse=True) if base.startswith(v)), None)
            if named:
                break
    if named is None and "vae_scale" in extras:
        named = next((v for v, (s, _) in VARIANTS.items() if abs(s - extras["vae_scale"]) < 1e-4), None)
    if named is not None:
        if named not in VARIANTS:
            raise ModelLoadError(f"TAESD variant {named!r} unknown; expected one of {sorted(VARIANTS)}")
        return named, False
    return _DEFAULT_VARIANT.get((channels, pool, f32), "taesd"), True


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    found = _kinds(state_dict)
    if found is None:
        raise ModelLoadError("not a TAESD state dict")
    enc_kind, dec_kind, enc_sd, dec_sd, extras = found
    enc_c = enc_sd[max(enc_sd, key=lambda k: int(k.split(".")[0]))].shape[0] if enc_sd else None
    dec_c = dec_sd["1.weight"].shape[1] if dec_sd else None
    if enc_c and dec_c and enc_c != dec_c:
        raise ModelLoadError(f"TAESD encoder has {enc_c} latent channels but the decoder {dec_c}")
    if enc_kind and dec_kind and (enc_kind.split("_")[1:] != dec_kind.split("_")[1:]):
        raise ModelLoadError(f"TAESD encoder ({enc_kind}) and decoder ({dec_kind}) are of different kinds")
    channels = int(enc_c or dec_c)
    kind = (enc_kind or dec_kind).partition("_")[2]  # "", "pool" or "f32"
    f32, pool = kind == "f32", kind == "pool"
    with torch.device("meta"):  # no random init: the weights come from the file
        encoder = (F32Encoder(channels) if f32 else Encoder(channels, pool)) if enc_kind else None
        decoder = (F32Decoder(channels) if f32 else Decoder(channels, pool)) if dec_kind else None
    for net, sd in ((encoder, enc_sd), (decoder, dec_sd)):
        if net is not None:
            net.load_state_dict({k: v.float().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    variant, guessed = _variant(meta, channels, pool, f32, extras)
    if guessed:
        log.info("TAESD variant not named by the file; assuming %s from its shapes", variant)
    model = TAESD(encoder, decoder, latent_channels=channels, downscale=32 if f32 else 8, variant=variant,
                  scale=extras.get("vae_scale"), shift=extras.get("vae_shift"))
    model.eval().requires_grad_(False)
    use_nnpack(model)  # 64-channel 3x3 convolutions: NNPACK's Winograd kernels on the CPU in float32 (~2.8x measured)
    return _descriptor(model, variant, guessed, pool)


def _descriptor(model: TAESD, variant: str, guessed: bool, pool: bool) -> ModelDescriptor:
    f, c = model.downscale, model.latent_channels
    both = model.has_encoder and model.has_decoder
    facts = VAEFacts(
        latent_channels=c, downscale=f, image_channels=3, gaussian=False,
        packed_latent_channels=4 * c if variant == "taef2" else None,
        # activation bytes at fp32 (measured on the CPU: about 4.5 live 64-channel maps at the largest resolution)
        encode_bytes_per_pixel=64 * 4.5 * 4, decode_bytes_per_latent_pixel=64 * f * f * 4.5 * 4,
        nnpack=True,  # 64-channel 3x3 convolutions throughout
        halves=True,
    )
    config: dict[str, Any] = {
        "variant": variant, "variant_guessed": guessed, "latent_channels": c, "downscale": f,
        "vae_scale": model.vae_scale, "vae_shift": model.vae_shift, "midblock_groupnorm": pool,
        "has_encoder": model.has_encoder, "has_decoder": model.has_decoder,
        "packed_latent_channels": facts.packed_latent_channels,
    }
    return ModelDescriptor(
        family="vae",
        architecture="TAESD",
        model=model,
        purpose="Autoencoder" if both else ("Decoder" if model.has_decoder else "Encoder"),
        scale=f if model.has_decoder else 1 / f,
        in_channels=3 if model.has_encoder else c,
        out_channels=3 if model.has_decoder else c,
        supports_half=True,
        supports_bfloat16=True,
        size_requirements=SizeRequirements(multiple_of=f),
        tiling="discouraged" if pool else "supported",  # GroupNorm pool layers: tiles need fixed statistics
        # the decoder's receptive field radius in latent pixels (the exact bound of its convolutions)
        receptive_field=math.ceil(conv_receptive_radius(model.decoder)) if model.has_decoder else None,
        bytes_per_pixel=facts.decode_bytes_per_latent_pixel if model.has_decoder else facts.encode_bytes_per_pixel,
        config=config,
        extra=facts,
    )
