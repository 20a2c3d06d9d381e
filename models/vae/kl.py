"""Stable Diffusion KL autoencoders (kl-f8: SD1/SD2/SDXL with 4 latent channels, SD3/Flux with 16 and no quant convs).

One module class in the original (CompVis "single-file") layout, `encoder.down.0.block.0.conv1...`; files in the
diffusers layout (`encoder.down_blocks.0.resnets.0.conv1...`) are converted to it. Hyper-parameters come from tensor
shapes. The VAE does NOT apply the latent scale/shift factors: a ComfyUI LATENT holds unscaled latents. The known
factors are recorded in `descriptor.config["known_latent_formats"]` for reference only.

Images are [B,3,H,W] in [0,1] on both sides (the model maps to and from [-1,1] inside, as ComfyUI's VAE does).

Tiled encoding and decoding is `kl_bands` (layer-synchronous bands with whole-image GroupNorm statistics, exact);
this module's `GroupNorm` only accepts the statistics it supplies.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import InputError, ModelLoadError
from . import kl_bands
from .facts import VAEFacts, Work

log = logging.getLogger(__name__)

# For reference only: the scale (and shift) a diffusion model applies to these latents. Not applied here.
KNOWN_LATENT_FORMATS: dict[int, dict[str, dict[str, float]]] = {
    4: {"sd1": {"scale": 0.18215, "shift": 0.0}, "sd2": {"scale": 0.18215, "shift": 0.0},
        "sdxl": {"scale": 0.13025, "shift": 0.0}},
    16: {"sd3": {"scale": 1.5305, "shift": 0.0609}, "flux": {"scale": 0.3611, "shift": 0.1159}},
}
_PREFIXES = ("", "first_stage_model.", "vae.")  # bare VAE files, full SD checkpoints, some merged files


# ---------------------------------------------------------------------------------------------------------------
# Posterior draw; GroupNorm with fixable statistics
# ---------------------------------------------------------------------------------------------------------------
def draw(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from the diagonal Gaussian posterior N(mean, exp(logvar)) (the reparameterisation of Kingma & Welling)."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state-dict keys) that can normalise with supplied statistics.

    Normally it is F.group_norm. While `fixed_stats` holds a per-group (mean, variance) pair ([B,G] or [1,G]), it
    normalises with those instead of its input's own: `kl_bands` sets them to whole-image statistics so that each band
    is normalised exactly as the whole map would be.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.fixed_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var) [B,G] or [1,G]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W]
        if self.fixed_stats is None:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self._normalise_with(x, *self.fixed_stats)

    def _normalise_with(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if mean.shape[0] not in (1, b):
            raise InputError(
                f"fixed GroupNorm statistics: expected a batch of 1 or {mean.shape[0]}, got a batch of {b}"
            )
        per = c // self.num_groups
        rstd = torch.rsqrt(var.to(x.device, torch.float32) + self.eps).repeat_interleave(per, dim=1)  # [B,C]
        mean_c = mean.to(x.device, torch.float32).repeat_interleave(per, dim=1)  # [B,C]
        scale = rstd * self.weight.float() if self.affine else rstd
        shift = (self.bias.float() if self.affine else 0.0) - mean_c * scale
        return torch.addcmul(shift[:, :, None, None].to(x.dtype), x, scale[:, :, None, None].to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The model (CompVis layout)
# ---------------------------------------------------------------------------------------------------------------
def _norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,Cin,H,W] -> [B,Cout,H,W]
        inplace = not torch.is_grad_enabled()  # inference: one activation less alive per step
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(self.nin_shortcut(x)) if inplace else h + self.nin_shortcut(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (1x1 conv projections, as in the files)."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W]
        b, c, h, w = x.shape
        hn = self.norm(x)
        # contiguous q/k/v reach the memory-efficient kernel (strided ones fall back to one that materialises the
        # (HW)^2 weights)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for t in (self.q(hn), self.k(hn), self.v(hn)))
        del hn
        a = F.scaled_dot_product_attention(q, k, v)  # [B,1,HW,C]
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,H/2,W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,2H,2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (resnets) and an optional `downsample`/`upsample`."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(name, resample)
        self._resample = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return getattr(self, self._resample)(x) if self._resample else x


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, in_channels: int, out_channels: int,
                 groups: int = 32, mid_attention: bool = True) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, c = [], ch
        for i, m in enumerate(ch_mult):
            blocks = [ResnetBlock(c if j == 0 else ch * m, ch * m, groups) for j in range(num_res_blocks)]
            c = ch * m
            levels.append(_Level(blocks, Downsample(c) if i < len(ch_mult) - 1 else None, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c, groups, mid_attention)
        self.norm_out = _norm(c, groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] in [-1,1] -> [B,2z,H/f,W/f]
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=not torch.is_grad_enabled()))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, out_channels: int,
                 groups: int = 32, mid_attention: bool = True) -> None:
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _Mid(c, groups, mid_attention)
        levels: list[nn.Module] = [nn.Identity()] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):  # up[0] is the full-resolution level, run last
            blocks = [ResnetBlock(c if j == 0 else ch * ch_mult[i], ch * ch_mult[i], groups)
                      for j in range(num_res_blocks + 1)]
            c = ch * ch_mult[i]
            levels[i] = _Level(blocks, Upsample(c) if i > 0 else None, "upsample")
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B,z,h,w] -> [B,3,h*f,w*f] in about [-1,1]
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class AutoencoderKL(nn.Module):
    """KL autoencoder. `encode(x01)` -> posterior mean (or a sample), `decode(z)` -> image in [0,1]."""

    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, latent_channels: int,
                 image_channels: int = 3, groups: int = 32, mid_attention: bool = True, quant_conv: bool = True,
                 has_encoder: bool = True, has_decoder: bool = True) -> None:
        super().__init__()
        kw = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, groups=groups, mid_attention=mid_attention)
        self.encoder = Encoder(in_channels=image_channels, out_channels=2 * z_channels, **kw) if has_encoder else None
        self.decoder = Decoder(z_channels=z_channels, out_channels=image_channels, **kw) if has_decoder else None
        q = quant_conv
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * latent_channels, 1) if q and has_encoder else None
        self.post_quant_conv = nn.Conv2d(latent_channels, z_channels, 1) if q and has_decoder else None
        self.latent_channels = latent_channels
        self.image_channels = image_channels
        self.downscale = 2 ** (len(ch_mult) - 1)
        self.has_encoder, self.has_decoder = has_encoder, has_decoder

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each [B,latent,H/f,W/f], of an image [B,C,H,W] in [0,1]."""
        if self.encoder is None:
            raise InputError("VAE encode: this file holds only a decoder")
        _check_image(x, self.image_channels, self.downscale)
        p = self._param()
        h = self.encoder(x.to(p.device, p.dtype).mul(2).sub_(1))  # [0,1] -> [-1,1]
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image [B,C,H,W] in [0,1] -> latent [B,latent,H/f,W/f] (posterior mean, or a draw when `sample`)."""
        mean, logvar = self.moments(x)
        return draw(mean, logvar, generator) if sample else mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B,latent,h,w] -> image [B,C,h*f,w*f] in [0,1]."""
        if self.decoder is None:
            raise InputError("VAE decode: this file holds only an encoder")
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise InputError(f"latent: expected [B,{self.latent_channels},h,w], got {list(z.shape)}")
        p = self._param()
        z = z.to(p.device, p.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).add_(1).div_(2).clamp_(0, 1)  # [-1,1] -> [0,1]

    # The strategy for large images (models/vae/facts.py): GroupNorm and the middle attention see the whole image,
    # so tiles cannot be independent; kl_bands runs the network layer-synchronously in bands with whole-image
    # GroupNorm statistics and whole-latent attention (within 1/255 of untiled).

    def encode_planned(self, x: torch.Tensor, work: Work) -> torch.Tensor:  # [B,C,H,W] -> [B,2c,h,w] CPU
        return kl_bands.planned_moments(self, x, work)

    def decode_planned(self, z: torch.Tensor, work: Work) -> torch.Tensor:  # [B,c,h,w] -> [B,C,H,W] CPU
        return kl_bands.planned_decode(self, z, work)


def _check_image(x: torch.Tensor, channels: int, multiple: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise InputError(f"image: expected [B,{channels},H,W] in [0,1], got {list(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise InputError(f"image: height and width must be multiples of {multiple}, got {x.shape[2]}x{x.shape[3]}")


# ---------------------------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------------------------
_DIFFUSERS_RENAMES = [  # (pattern, replacement) on keys below encoder./decoder., applied in order
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^mid_block\.resnets\.0\.", "mid.block_1."),
    (r"^mid_block\.resnets\.1\.", "mid.block_2."),
    (r"^mid_block\.attentions\.0\.(group_norm)\.", "mid.attn_1.norm."),
    (r"^mid_block\.attentions\.0\.(to_q|query)\.", "mid.attn_1.q."),
    (r"^mid_block\.attentions\.0\.(to_k|key)\.", "mid.attn_1.k."),
    (r"^mid_block\.attentions\.0\.(to_v|value)\.", "mid.attn_1.v."),
    (r"^mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", "mid.attn_1.proj_out."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
]


def convert_diffusers_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> our (CompVis) names; attention linears become 1x1 convs."""
    ups = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(ups) + 1 if ups else 0
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        part, _, rest = key.partition(".")
        if part not in ("encoder", "decoder"):
            out[key] = t
            continue
        for pat, rep in _DIFFUSERS_RENAMES:
            rest = re.sub(pat, rep, rest)
        m = re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", rest)
        if m:
            level = n_up - 1 - int(m.group(1))  # diffusers counts from the lowest resolution, CompVis from the top
            rest = f"up.{level}.{'block' if m.group(2) == 'resnets' else 'upsample'}.{m.group(3)}"
        if ".attn_1." in rest and t.ndim == 2:
            t = t[:, :, None, None]
        out[f"{part}.{rest}"] = t
    return out


def _vae_keys(sd: dict) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(layout, the VAE's own keys without prefix) or None when there is no KL autoencoder in `sd`."""
    for prefix in _PREFIXES:
        if not any(f"{prefix}{part}.conv_in.weight" in sd for part in ("encoder", "decoder")):
            continue
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if any(k.startswith("quantize.") for k in own):
            return None  # a VQ autoencoder
        own = {k: v for k, v in own.items() if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
        diffusers = any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in own)
        compvis = any(".down.0.block." in k or ".up.0.block." in k or ".mid.block_1." in k for k in own)
        if diffusers == compvis:
            return None  # neither (another autoencoder with a conv_in) or a mixture
        return ("diffusers" if diffusers else "compvis"), own
    return None


def detect(state_dict: dict, meta: dict) -> bool:
    found = _vae_keys(state_dict)
    if found is None:
        return False
    own = found[1]
    conv_in = own.get("decoder.conv_in.weight", own.get("encoder.conv_in.weight"))
    video = any("mix_factor" in k or "time_stack" in k or "temporal" in k for k in own)
    return isinstance(conv_in, torch.Tensor) and conv_in.ndim == 4 and not video


def _read_config(sd: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    """Hyper-parameters from shapes (groups from meta `config`, default 32: GroupNorm has no shape for it)."""
    part = "encoder" if "encoder.conv_in.weight" in sd else "decoder"
    if any(re.match(rf"{part}\.(down|up)\.\d+\.attn\.", k) for k in sd):
        raise ModelLoadError("KL autoencoder with attention inside resolution levels is not supported")
    n_levels = len({m.group(1) for k in sd if (m := re.match(rf"{part}\.(?:down|up)\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"{part}\.(?:down|up)\.0\.block\.(\d+)\.", k))}
    num_res_blocks = len(blocks) - (1 if part == "decoder" else 0)
    widths = [sd[f"{part}.{'down' if part == 'encoder' else 'up'}.{i}.block.0.conv2.weight"].shape[0]
              for i in range(n_levels)]
    # base width: the encoder's conv_in; a lone decoder's first level (ch_mult[0] is 1 in every SD VAE)
    ch = sd["encoder.conv_in.weight"].shape[0] if part == "encoder" else widths[0]
    if any(w % ch for w in widths):
        raise ModelLoadError(f"KL autoencoder: level widths {widths} are not multiples of the base width {ch}")
    ch_mult = [w // ch for w in widths]
    if "decoder.conv_in.weight" in sd:
        z = sd["decoder.conv_in.weight"].shape[1]
        image_channels = sd["decoder.conv_out.weight"].shape[0]
    else:
        z = sd["encoder.conv_out.weight"].shape[0] // 2
        image_channels = sd["encoder.conv_in.weight"].shape[1]
    quant = "quant_conv.weight" in sd or "post_quant_conv.weight" in sd
    latent = sd["post_quant_conv.weight"].shape[1] if "post_quant_conv.weight" in sd else (
        sd["quant_conv.weight"].shape[0] // 2 if "quant_conv.weight" in sd else z)
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    groups = int(cfg.get("norm_num_groups", cfg.get("num_groups", 32)))
    return {
        "ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks, "z_channels": z, "latent_channels": latent,
        "image_channels": image_channels, "groups": groups, "quant_conv": quant,
        "mid_attention": f"{part}.mid.attn_1.q.weight" in sd,
        "has_encoder": "encoder.conv_in.weight" in sd, "has_decoder": "decoder.conv_in.weight" in sd,
    }


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    found = _vae_keys(state_dict)
    if found is None:
        raise ModelLoadError("not a KL autoencoder state dict (no encoder/decoder conv_in)")
    layout, sd = found
    if layout == "diffusers":
        sd = convert_diffusers_keys(sd)
    cfg = _read_config(sd, meta)
    with torch.device("meta"):  # no random init: the weights come from the file
        model = AutoencoderKL(**cfg)
    model.load_state_dict({k: v.float().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    f = model.downscale
    base = cfg["ch"] * cfg["ch_mult"][0]
    config: dict[str, Any] = {
        **cfg, "layout": layout, "downscale": f,
        "known_latent_formats": KNOWN_LATENT_FORMATS.get(cfg["latent_channels"], {}),
        "latent_scaling_applied": False,  # ComfyUI LATENT convention: unscaled latents
        # activation bytes per latent pixel when decoding (fp32), per image pixel when encoding: measured peaks of the
        # SD VAE on the CPU (decode: 8 maps of 128 channels at full resolution; encode: 6.5), scaled by the widths of
        # the two full-resolution-most levels.
        "decode_bytes_per_latent_pixel": f * f * 8 * 4 * cfg["ch"] * max(cfg["ch_mult"][:2]) / 2,
        "encode_bytes_per_pixel": 6.5 * 4 * base,
    }
    decoder = cfg["has_decoder"]
    facts = VAEFacts(latent_channels=cfg["latent_channels"], downscale=f, image_channels=cfg["image_channels"],
                     gaussian=True, encode_bytes_per_pixel=config["encode_bytes_per_pixel"],
                     decode_bytes_per_latent_pixel=config["decode_bytes_per_latent_pixel"])
    return ModelDescriptor(
        family="vae",
        architecture="KL-f%d" % f,
        model=model,
        purpose="Autoencoder" if cfg["has_encoder"] and decoder else ("Decoder" if decoder else "Encoder"),
        scale=f if decoder else 1 / f,
        in_channels=cfg["image_channels"] if cfg["has_encoder"] else cfg["latent_channels"],
        out_channels=cfg["image_channels"] if decoder else cfg["latent_channels"],
        supports_half=False,  # the SD/SDXL VAEs overflow in fp16 (NaN); bf16 is fine
        supports_bfloat16=True,
        size_requirements=SizeRequirements(multiple_of=f),
        tiling="supported",  # exact through kl_bands: bands with whole-image GroupNorm statistics, mid block whole
        receptive_field=None,
        bytes_per_pixel=facts.decode_bytes_per_latent_pixel if decoder else facts.encode_bytes_per_pixel,
        config=config,
        extra=facts,
    )
