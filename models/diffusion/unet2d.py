"""diffusers `UNet2DModel` (the unconditional / class-conditional pixel UNet of DDPM, DDIM, the diffusers training
example and score-SDE) re-implemented in plain PyTorch with the same state-dict keys.

Own code after diffusers (Apache-2.0) `models/unets/unet_2d.py`; diffusers is a test reference only. Supported:
down blocks DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D; up blocks UpBlock2D, AttnUpBlock2D,
ResnetUpsampleBlock2D (the `UNetRes` prefix is accepted as diffusers does); mid block UNetMidBlock2D with or without
attention, or none; downsample_type/upsample_type conv|resnet; class embeddings (`num_class_embeds`, or
class_embed_type "timestep"); resnet_time_scale_shift default|scale_shift; time_embedding_type positional|fourier
(fourier: t is the noise level sigma, and the output is divided by it, as diffusers does); flip_sin_to_cos,
freq_shift, time_embedding_dim, norm_num_groups, attn_norm_num_groups, norm_eps, attention_head_dim, add_attention,
downsample_padding, mid_block_scale_factor, center_input_sample, act_fn silu. Anything else is an error naming it.
Pre-0.14 attention keys (`query`/`key`/`value`/`proj_attn`) are renamed on load.

Forward (the contract of `facts.py`): `model(x [B,C,H,W], t [B] float, class_labels [B] long | None) -> [B,out,H,W]`.
The file formats and config inference are in `unet2d_io.py`.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelLoadError
from ..loading import owned_float32
from .layers import SinusoidalEmbedding, attention, cpu_layout, group_norm, norm_silu, silu

log = logging.getLogger(__name__)

DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
MID_TYPES = ("UNetMidBlock2D", None)

# UNet2DModel's constructor arguments and their diffusers defaults (the JSON config uses these names).
DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with diffusers' defaults filled in and every value checked; raises ModelLoadError naming a bad one."""
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ModelLoadError(f"diffusers config: _class_name {cls!r} is not supported; expected 'UNet2DModel'")
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        log.info("UNet2DModel config: ignoring unknown keys %s", unknown)
    for k in ("down_block_types", "up_block_types", "block_out_channels"):
        cfg[k] = list(cfg[k])
    cfg["down_block_types"] = [_strip(t) for t in cfg["down_block_types"]]
    cfg["up_block_types"] = [_strip(t) for t in cfg["up_block_types"]]
    for t in cfg["down_block_types"]:
        if t not in DOWN_TYPES:
            raise ModelLoadError(f"UNet2DModel: down block type {t!r} is not supported; supported: {', '.join(DOWN_TYPES)}")
    for t in cfg["up_block_types"]:
        if t not in UP_TYPES:
            raise ModelLoadError(f"UNet2DModel: up block type {t!r} is not supported; supported: {', '.join(UP_TYPES)}")
    if cfg["mid_block_type"] not in MID_TYPES:
        raise ModelLoadError(f"UNet2DModel: mid block type {cfg['mid_block_type']!r} is not supported; "
                             "supported: UNetMidBlock2D or None")
    n = len(cfg["block_out_channels"])
    if not (len(cfg["down_block_types"]) == len(cfg["up_block_types"]) == n):
        raise ModelLoadError(f"UNet2DModel: {len(cfg['down_block_types'])} down blocks, {len(cfg['up_block_types'])} "
                             f"up blocks and {n} block_out_channels; expected the same number")
    checks = {"act_fn": ("silu", "swish"), "time_embedding_type": ("positional", "fourier"),
              "resnet_time_scale_shift": ("default", "scale_shift"), "downsample_type": ("conv", "resnet"),
              "upsample_type": ("conv", "resnet"), "class_embed_type": (None, "timestep")}
    for k, allowed in checks.items():
        if cfg[k] not in allowed:
            raise ModelLoadError(f"UNet2DModel: {k}={cfg[k]!r} is not supported; supported: {allowed}")
    return cfg


def _strip(t: str) -> str:
    return t[7:] if isinstance(t, str) and t.startswith("UNetRes") else t


# ---------------------------------------------------------------------------------------------------------------
# Layers (module names = diffusers' state-dict keys)
# ---------------------------------------------------------------------------------------------------------------
class ResnetBlock2D(nn.Module):
    """GN, SiLU, (resample), conv, + time embedding (add, or GN then scale/shift), GN, SiLU, conv; + skip."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float, scale_shift: bool,
                 output_scale_factor: float = 1.0, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout * (2 if scale_shift else 1)) if temb else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.scale_shift, self.up, self.down = scale_shift, up, down
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor | None) -> torch.Tensor:  # [B,C,H,W], silu(temb) [B,T]
        h = norm_silu(x, self.norm1)
        if self.up:
            x, h = F.interpolate(x, scale_factor=2.0, mode="nearest"), F.interpolate(h, scale_factor=2.0, mode="nearest")
        elif self.down:
            x, h = F.avg_pool2d(x, 2, 2), F.avg_pool2d(h, 2, 2)
        h = self.conv1(h)
        e = self.time_emb_proj(temb_act)[:, :, None, None] if self.time_emb_proj is not None else None
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, group_norm(h, self.norm2), 1 + scale)
            h = silu(h)
        else:
            if e is not None:
                h = h + e
            h = norm_silu(h, self.norm2)
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = h.add_(x) if not h.requires_grad else h + x
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Attention(nn.Module):
    """diffusers' spatial self-attention block (`_from_deprecated_attn_block`): x + to_out(attn(GN(x)))."""

    def __init__(self, channels: int, head_dim: int, groups: int | None, eps: float, rescale: float = 1.0) -> None:
        super().__init__()
        if channels % head_dim:
            raise ModelLoadError(f"UNet2DModel: attention_head_dim {head_dim} does not divide {channels} channels")
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.rescale = rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W]
        b, c, hh, ww = x.shape
        h = group_norm(x, self.group_norm) if self.group_norm is not None else x
        h = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)  # [B,HW,C] (a free view in channels-last)
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # one matmul for q, k and v
        bias = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        qkv = F.linear(h, w, bias).view(b, hh * ww, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(qkv[0], qkv[1], qkv[2])  # [B,heads,HW,d]
        a = self.to_out[0](a.transpose(1, 2).reshape(b, hh * ww, c))  # [B,HW,C]
        out = a.view(b, hh, ww, c).permute(0, 3, 1, 2) + x  # [B,C,H,W], channels-last strides
        return out if self.rescale == 1 else out / self.rescale


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(silu(self.linear_1(x)))


class FourierProjection(nn.Module):
    """Gaussian Fourier features of log(sigma): cat(sin(2 pi w log s), cos(...)); `weight` is not trained."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size), requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B,2*size]
        proj = torch.log(t.float())[:, None] * self.weight.float()[None, :] * 2 * torch.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class Block(nn.Module):
    """A down, mid or up block: resnets, optional attentions after each resnet, optional resampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None,
                 sampler: nn.Module | None, kind: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if sampler is not None:
            setattr(self, "downsamplers" if kind == "down" else "upsamplers", nn.ModuleList([sampler]))
        self.kind = kind
        self.__dict__["sampler"] = sampler  # a plain reference: registered once, under diffusers' name
        self.sampler_takes_temb = isinstance(sampler, ResnetBlock2D)

    def _resample(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        return self.sampler(h, temb_act) if self.sampler_takes_temb else self.sampler(h)

    def down(self, h: torch.Tensor, temb_act: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        attns = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb_act)
            if attns is not None:
                h = attns[i](h)
            skips.append(h)
        if self.sampler is not None:
            h = self._resample(h, temb_act)
            skips.append(h)
        return h

    def mid(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb_act)
        attns = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets[1:]):
            if attns is not None:
                h = attns[i](h)
            h = resnet(h, temb_act)
        return h

    def up(self, h: torch.Tensor, temb_act: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        attns = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb_act)
            if attns is not None:
                h = attns[i](h)
        if self.sampler is not None:
            h = self._resample(h, temb_act)
        return h


class _Factory:
    """Builds UNet2DModel's blocks as diffusers' get_down_block / UNetMidBlock2D / get_up_block do."""

    def __init__(self, cfg: dict[str, Any], temb: int) -> None:
        self.cfg, self.temb = cfg, temb
        self.ch, self.lpb = cfg["block_out_channels"], cfg["layers_per_block"]
        self.ss = cfg["resnet_time_scale_shift"] == "scale_shift"

    def res(self, cin: int, cout: int, **kw: Any) -> ResnetBlock2D:
        return ResnetBlock2D(cin, cout, self.temb, self.cfg["norm_num_groups"], self.cfg["norm_eps"], self.ss, **kw)

    def attn(self, c: int, groups: int | None | str = "default", rescale: float = 1.0) -> Attention:
        groups = self.cfg["norm_num_groups"] if groups == "default" else groups
        return Attention(c, self.cfg["attention_head_dim"] or c, groups, self.cfg["norm_eps"], rescale)

    def down_blocks(self) -> list[Block]:
        out, cout, n = [], self.ch[0], len(self.ch)
        for i, kind in enumerate(self.cfg["down_block_types"]):
            cin, cout = cout, self.ch[i]
            resnets = [self.res(cin if j == 0 else cout, cout) for j in range(self.lpb)]
            attns = [self.attn(cout) for _ in range(self.lpb)] if kind == "AttnDownBlock2D" else None
            resnet_sampler = kind == "ResnetDownsampleBlock2D" or (attns and self.cfg["downsample_type"] == "resnet")
            sampler = None if i == n - 1 else (self.res(cout, cout, down=True) if resnet_sampler
                                                else Downsample2D(cout, self.cfg["downsample_padding"]))
            out.append(Block(resnets, attns, sampler, "down"))
        return out

    def mid_block(self) -> Block:
        c, osf = self.ch[-1], self.cfg["mid_block_scale_factor"]
        groups = self.cfg["attn_norm_num_groups"] or (None if self.ss else self.cfg["norm_num_groups"])
        resnets = [self.res(c, c, output_scale_factor=osf) for _ in range(2)]
        attns = [self.attn(c, groups, osf)] if self.cfg["add_attention"] else None
        return Block(resnets, attns, None, "mid")

    def up_blocks(self) -> list[Block]:
        rev, n, lpb = list(reversed(self.ch)), len(self.ch), self.lpb
        out, cout = [], rev[0]
        for i, kind in enumerate(self.cfg["up_block_types"]):
            prev, cout, cskip = cout, rev[i], rev[min(i + 1, n - 1)]
            resnets = [self.res((prev if j == 0 else cout) + (cskip if j == lpb else cout), cout) for j in range(lpb + 1)]
            attns = [self.attn(cout) for _ in range(lpb + 1)] if kind == "AttnUpBlock2D" else None
            resnet_sampler = kind == "ResnetUpsampleBlock2D" or (attns and self.cfg["upsample_type"] == "resnet")
            sampler = None if i == n - 1 else (self.res(cout, cout, up=True) if resnet_sampler else Upsample2D(cout))
            out.append(Block(resnets, attns, sampler, "up"))
        return out


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class UNet2DModel(nn.Module):
    """diffusers' UNet2DModel; `config` uses diffusers' names (see DEFAULTS), validated by `full_config`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = self.config = full_config(config)
        ch = cfg["block_out_channels"]
        temb = cfg["time_embedding_dim"] or ch[0] * 4
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        if cfg["time_embedding_type"] == "fourier":
            self.time_proj: nn.Module = FourierProjection(ch[0])
            t_in = 2 * ch[0]
        else:
            self.time_proj = SinusoidalEmbedding(ch[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
            t_in = ch[0]
        self.time_embedding = TimestepEmbedding(t_in, temb)
        self.class_embedding: nn.Module | None = None
        if cfg["class_embed_type"] == "timestep":
            self.class_embedding = TimestepEmbedding(t_in, temb)
        elif cfg["num_class_embeds"]:
            self.class_embedding = nn.Embedding(cfg["num_class_embeds"], temb)

        make = _Factory(cfg, temb)
        self.down_blocks = nn.ModuleList(make.down_blocks())
        self.mid_block: Block | None = make.mid_block() if cfg["mid_block_type"] is not None else None
        self.up_blocks = nn.ModuleList(make.up_blocks())
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], ch[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)
        self.num_classes = int(cfg["num_class_embeds"] or 0) if cfg["class_embed_type"] is None else 0
        self.in_channels, self.out_channels = cfg["in_channels"], cfg["out_channels"]
        self.size_multiple = 2 ** sum(1 for b in self.down_blocks if b.sampler is not None)
        self.channels_last = False  # `use_channels_last()`: NHWC activations (faster convolutions on CPU and GPU)

    def use_channels_last(self, on: bool = True) -> "UNet2DModel":
        """Keep 4-D weights and activations channels-last (results equal to float rounding)."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def reset_buffers(self) -> None:
        """Rebuild non-persistent buffers (after construction on the meta device and `load_state_dict(assign=True)`)."""
        if isinstance(self.time_proj, SinusoidalEmbedding):
            self.time_proj.reset_buffers(self.conv_in.weight.device)

    def embed(self, t: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """silu(time embedding (+ class embedding)) [B,T]: what every resnet's time projection reads."""
        t = t.reshape(-1).to(self.conv_in.weight.device)
        if t.shape[0] not in (1, batch):
            raise InputError(f"t: expected one timestep or {batch} (one per sample), got {t.shape[0]}")
        t = t.expand(batch)
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise InputError("class_labels: this UNet2DModel is class-conditional; give one label per sample")
            if self.config["class_embed_type"] == "timestep":
                c = self.class_embedding(self.time_proj(class_labels).to(dtype))
            else:
                if class_labels.min() < 0 or class_labels.max() >= self.num_classes:
                    raise InputError(f"class_labels: expected labels in [0,{self.num_classes}), "
                                     f"got {class_labels.tolist()}")
                c = self.class_embedding(class_labels.to(emb.device).long())
            emb = emb + c.to(dtype)
        elif class_labels is not None:
            raise InputError("class_labels: this UNet2DModel is unconditional; give None")
        return silu(emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,in,H,W], t [B] (or scalar) training timesteps (fourier: sigmas) -> [B,out,H,W]."""
        if not torch.is_tensor(t):
            t = torch.tensor([float(t)], device=x.device)
        if self.config["center_input_sample"]:
            x = 2 * x - 1.0
        temb_act = self.embed(t, class_labels, x.shape[0])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block.down(h, temb_act, skips)
        if self.mid_block is not None:
            h = self.mid_block.mid(h, temb_act)
        for block in self.up_blocks:
            h = block.up(h, temb_act, skips)
        h = self.conv_out(norm_silu(h, self.conv_norm_out))
        if self.config["time_embedding_type"] == "fourier":
            h = h / t.to(h.device, h.dtype).reshape(-1, 1, 1, 1)
        return h.contiguous()


def rename_legacy_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers < 0.14 attention names (`query`, `key`, `value`, `proj_attn`) -> `to_q`, `to_k`, `to_v`, `to_out.0`."""
    ren = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in sd.items():
        if ".attentions." in k:
            for old, new in ren.items():
                if old in k:
                    k = k.replace(old, new)
                    break
        out[k] = v
    return out


def build(config: dict[str, Any], sd: dict[str, torch.Tensor]) -> UNet2DModel:
    """A UNet2DModel from a config and its weights (no random init); a mismatch is a ModelLoadError listing it."""
    with torch.device("meta"):
        model = UNet2DModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_weights(expected, sd, "UNet2DModel config")
    model.load_state_dict(owned_float32(sd, channels_last=True), strict=True, assign=True)
    model.reset_buffers()
    return cpu_layout(model.eval().requires_grad_(False))


def check_weights(expected: dict[str, tuple], sd: dict[str, torch.Tensor], what: str) -> None:
    """Same keys and shapes, or a ModelLoadError saying which differ (the first few of each kind)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {list(sd[k].shape)} (config: {list(s)})" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != s]
    if missing or unexpected or wrong:
        parts = []
        for name, items in (("missing from the weights", missing), ("not in the config", unexpected),
                            ("shape differs", wrong)):
            if items:
                parts.append(f"{len(items)} {name}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise ModelLoadError(f"{what} does not match the weights: " + "; ".join(parts))
