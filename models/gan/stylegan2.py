"""StyleGAN2 / StyleGAN2-ADA generator in pure PyTorch (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN"; "Training Generative Adversarial Networks with Limited Data").

Module and key names follow NVIDIA's `training/networks_stylegan2.py` (NVlabs/stylegan3, stylegan2-ada-pytorch), so
their state dicts load with `strict=True`: `mapping.fc{i}`, `mapping.embed`, `mapping.w_avg`,
`synthesis.b{res}.{const,conv0,conv1,torgb,skip,resample_filter}`. The orig/skip/resnet architectures, conditional
mapping and conv_clamp are supported. rosinality's stylegan2-pytorch checkpoints (`style.1.weight`,
`convs.0.conv.weight`, `to_rgbs.*`, `latent_avg` beside `g_ema`) are renamed to these keys on load
(`models/gan/rosinality.py`).

Hyper-parameters come from the shapes (resolutions, channels, mapping widths and depth, architecture, kernel size,
resample filter) and from the constructor kwargs a file carries (meta `init_kwargs`, from an NVIDIA pickle or our
safetensors export): conv_clamp and the mapping learning-rate multiplier, which shapes cannot show.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

import torch
from torch import nn

from ..descriptor import ModelDescriptor
from . import ops
from .latent import FullyConnectedLayer, MappingNetwork, StyleGenerator, SynthesisBase, mean_w, style_mix, truncate

log = logging.getLogger(__name__)

__all__ = ["Generator", "detect", "load", "style_mix", "truncate"]

CLASS_NAME = "training.networks_stylegan2.Generator"
# Constructor kwargs that only steer speed or training; accepted and ignored.
_IGNORED_KWARGS = {"num_fp16_res", "fp16_channels_last", "fused_modconv_default", "channels_last", "use_fp16",
                   "w_avg_beta", "conv_clamp_fp16"}
# Constructor kwargs taken from a file's init_kwargs (the structural ones are then checked against the shapes).
_KNOWN_KWARGS = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "architecture", "resample_filter",
                 "conv_clamp", "kernel_size", "use_noise", "activation", "channels"}


def _sep(f: torch.Tensor) -> bool:
    return ops.separable_factors(f.detach().float().cpu()) is not None


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally 2x upsampling), noise, bias, leaky ReLU, clamp."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        w_dim: int,  # intermediate latent size
        resolution: int,  # output side
        kernel_size: int = 3,  # convolution kernel size
        up: int = 1,  # upsampling factor (1 or 2)
        use_noise: bool = True,  # per-pixel noise input
        activation: str = "lrelu",  # activation
        resample_filter: Sequence[float] = (1, 3, 3, 1),  # low-pass filter for upsampling
        conv_clamp: float | None = None,  # clamp the output to +-X, None = off
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation, self.conv_clamp = activation, conv_clamp
        self.padding = kernel_size // 2
        self.act_gain = ops.activation_gain(activation)
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.separable = _sep(self.resample_filter)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self,
        x: torch.Tensor,  # [B,I,res/up,res/up]
        w: torch.Tensor,  # [B,w_dim]
        noise_mode: str = "const",
        gain: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # [B,O,res,res]
        styles = self.affine(w)  # [B,I]
        noise = None
        if self.use_noise and noise_mode == "random":
            n = torch.randn([x.shape[0], 1, self.resolution, self.resolution], generator=generator,
                            device=generator.device if generator is not None else x.device)
            noise = n.to(x.device, x.dtype) * self.noise_strength.to(x.dtype)
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const.to(x.dtype) * self.noise_strength.to(x.dtype)  # [res,res]
        x = ops.modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                                 resample_filter=self.resample_filter, separable=self.separable)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=clamp, inplace=True)

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, resolution={self.resolution}, up={self.up}"


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution without demodulation, bias, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [B,I,H,W], [B,w_dim] -> [B,C,H,W]
        styles = self.affine(w) * self.weight_gain
        x = ops.modulated_conv2d(x, self.weight, styles, demodulate=False, padding=self.padding)
        return ops.bias_act(x, self.bias, clamp=self.conv_clamp, inplace=True)


class Conv2dLayer(nn.Module):
    """The resnet skip path: 1x1 convolution with 2x FIR upsampling, no bias, linear."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, up: int = 2,
                 resample_filter: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.up = up
        self.padding = kernel_size // 2
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.separable = _sep(self.resample_filter)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = ops.conv2d_up(x, w, self.resample_filter, self.up, self.padding, separable=self.separable)
        return x * gain if gain != 1 else x


class SynthesisBlock(nn.Module):
    """One resolution: [const | conv0 (up)] + conv1, ToRGB (skip / last), resnet skip."""

    def __init__(
        self,
        in_channels: int,  # 0 = first block (learned constant input)
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        is_last: bool,
        architecture: str = "skip",  # "orig" | "skip" | "resnet"
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = 256,
        **layer_kwargs: Any,  # kernel_size, use_noise, activation
    ) -> None:
        super().__init__()
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"architecture: expected 'orig', 'skip' or 'resnet', got {architecture!r}")
        self.in_channels, self.resolution, self.img_channels = in_channels, resolution, img_channels
        self.is_last, self.architecture = is_last, architecture
        self.register_buffer("resample_filter", ops.setup_filter(resample_filter))
        self.separable = _sep(self.resample_filter)
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, resample_filter=resample_filter,
                                        conv_clamp=conv_clamp, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, up=2, resample_filter=resample_filter)

    def forward(
        self,
        x: torch.Tensor | None,  # [B,I,res/2,res/2] or None for the first block
        img: torch.Tensor | None,  # [B,C,res/2,res/2] running RGB (skip) or None
        ws: torch.Tensor,  # [B,num_conv+num_torgb,w_dim]
        dtype: torch.dtype,
        noise_mode: str = "const",
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_iter = iter(ws.unbind(dim=1))
        kw = {"noise_mode": noise_mode, "generator": generator}
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), **kw)
        elif self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), **kw)
            x = self.conv1(x, next(w_iter), gain=math.sqrt(0.5), **kw)
            x = y.add_(x)
        else:
            x = self.conv0(x, next(w_iter), **kw)
            x = self.conv1(x, next(w_iter), **kw)
        if img is not None:
            img = ops.upsample2d(img, self.resample_filter, separable=self.separable)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter)).float()
            img = img.add_(y) if img is not None else y
        return x, img


def channels_for(img_resolution: int, channel_base: int, channel_max: int) -> dict[int, int]:
    """NVIDIA's channel rule: min(channel_base // res, channel_max) for res = 4 .. img_resolution."""
    return {2**i: min(channel_base // 2**i, channel_max) for i in range(2, int(math.log2(img_resolution)) + 1)}


class SynthesisNetwork(SynthesisBase):
    """ws [B,num_ws,w_dim] -> image [B,C,res,res]."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,  # output side, a power of two >= 4
        img_channels: int,
        channel_base: int = 32768,  # channels at res r: min(channel_base // r, channel_max)
        channel_max: int = 512,
        channels: dict[int, int] | None = None,  # explicit {res: channels}, overrides the rule above
        **block_kwargs: Any,  # architecture, resample_filter, conv_clamp, kernel_size, use_noise, activation
    ) -> None:
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution: expected a power of two >= 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, int(math.log2(img_resolution)) + 1)]
        ch = {int(k): int(v) for k, v in (channels or channels_for(img_resolution, channel_base, channel_max)).items()}
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(ch[res // 2] if res > 4 else 0, ch[res], w_dim, res, img_channels,
                                   is_last=res == img_resolution, **block_kwargs)
            self.num_ws += block.num_conv + (block.num_torgb if res == img_resolution else 0)
            setattr(self, f"b{res}", block)

    def sample_bytes(self) -> int:
        return max(4 * 2 * getattr(self, f"b{r}").conv1.out_channels * (r + 1) ** 2 for r in self.block_resolutions)

    def run(self, ws: torch.Tensor, noise_mode: str, generator: torch.Generator | None) -> torch.Tensor:
        """ws [B,num_ws,w_dim] (checked) -> [B,C,res,res] float32."""
        dtype = self.b4.const.dtype
        if dtype not in (torch.float16, torch.bfloat16, torch.float64):
            dtype = torch.float32
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            cur = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            x, img = block(x, img, cur, dtype, noise_mode=noise_mode, generator=generator)
            w_idx += block.num_conv
        return img.float()


class Generator(StyleGenerator):
    """StyleGAN2 generator: MappingNetwork + SynthesisNetwork, NVIDIA's constructor arguments."""

    def __init__(
        self,
        z_dim: int,  # input latent size
        c_dim: int,  # label size, 0 = unconditional
        w_dim: int,  # intermediate latent size
        img_resolution: int,  # output side
        img_channels: int,  # output channels
        mapping_kwargs: dict | None = None,  # MappingNetwork: num_layers (8), lr_multiplier (0.01), ...
        **synthesis_kwargs: Any,  # SynthesisNetwork / SynthesisBlock / SynthesisLayer arguments
    ) -> None:
        super().__init__()
        self._init_common(z_dim, c_dim, w_dim, img_resolution, img_channels)
        ignored = sorted(set(synthesis_kwargs) & _IGNORED_KWARGS)
        for k in ignored:
            synthesis_kwargs.pop(k)
        mapping_kwargs = {k: v for k, v in (mapping_kwargs or {}).items() if k not in _IGNORED_KWARGS}
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)
        self.register_load_state_dict_post_hook(_refresh_separable)


def _refresh_separable(module: nn.Module, incompatible: Any) -> None:
    """After loading: which resample filters are rank 1 (fast separable path)."""
    for m in module.modules():
        if hasattr(m, "separable") and isinstance(getattr(m, "resample_filter", None), torch.Tensor):
            m.separable = _sep(m.resample_filter)


# ----------------------------------------------------------------------------------------------------------------
# detect / load


def _is_nvidia(sd: dict) -> bool:
    return "synthesis.b4.const" in sd and "mapping.fc0.weight" in sd and "synthesis.b4.conv1.weight" in sd


def detect(state_dict: dict, meta: dict) -> bool:
    """NVIDIA StyleGAN2 keys (synthesis.b4.const, mapping.fc0) or rosinality's (style.1, conv1.conv, to_rgb1)."""
    from . import rosinality

    return _is_nvidia(state_dict) or rosinality.detect(state_dict)


def generator_kwargs(meta: dict) -> tuple[dict[str, Any], str]:
    """Flat constructor kwargs from meta `init_kwargs` (ada's nested synthesis_kwargs flattened) and their origin."""
    kw = meta.get("init_kwargs") if isinstance(meta, dict) else None
    if not isinstance(kw, dict):
        return {}, "none"
    kw = dict(kw)
    origin = "stylegan3"
    if isinstance(kw.get("synthesis_kwargs"), dict):  # stylegan2-ada-pytorch nests them
        kw.update(kw.pop("synthesis_kwargs"))
        origin = "ada"
        kw.setdefault("conv_clamp", None)  # ada's SynthesisBlock default (stylegan3 repo: 256)
    return kw, origin


def architecture_from_shapes(sd: dict) -> dict[str, Any]:
    """Everything structural that the state dict's keys and shapes show."""
    res = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"synthesis\.b(\d+)\.conv1\.weight", k)))
    img_resolution = res[-1]
    channels = {r: int(sd[f"synthesis.b{r}.conv1.weight"].shape[0]) for r in res}
    torgbs = [r for r in res if f"synthesis.b{r}.torgb.weight" in sd]
    if any(f"synthesis.b{r}.skip.weight" in sd for r in res):
        architecture = "resnet"
    elif torgbs == res:
        architecture = "skip"
    else:
        architecture = "orig"
    n_fc = len([k for k in sd if re.fullmatch(r"mapping\.fc\d+\.weight", k)])
    fc0 = sd["mapping.fc0.weight"]
    c_dim = int(sd["mapping.embed.weight"].shape[1]) if "mapping.embed.weight" in sd else 0
    embed = int(sd["mapping.embed.weight"].shape[0]) if c_dim else 0
    w_dim = int(sd[f"mapping.fc{n_fc - 1}.weight"].shape[0])
    mapping = {"num_layers": n_fc}
    if c_dim and embed != w_dim:
        mapping["embed_features"] = embed
    if n_fc > 1 and int(fc0.shape[0]) != w_dim:
        mapping["layer_features"] = int(fc0.shape[0])
    f = sd.get("synthesis.b4.resample_filter")
    out = {
        "z_dim": int(fc0.shape[1]) - embed,
        "c_dim": c_dim,
        "w_dim": w_dim,
        "img_resolution": img_resolution,
        "img_channels": int(sd[f"synthesis.b{img_resolution}.torgb.weight"].shape[0]),
        "mapping_kwargs": mapping,
        "architecture": architecture,
        "channels": channels,
        "kernel_size": int(sd["synthesis.b4.conv1.weight"].shape[-1]),
        "use_noise": "synthesis.b4.conv1.noise_strength" in sd,
    }
    if f is not None and not torch.allclose(f.float(), ops.setup_filter([1, 3, 3, 1]), atol=1e-6):
        out["resample_filter"] = f.float().tolist()  # a 2-D filter as stored (setup_filter keeps 2-D as is)
    return out


def build_kwargs(sd: dict, meta: dict) -> tuple[dict[str, Any], str]:
    """Constructor kwargs: structure from shapes, the rest (conv_clamp, lr_multiplier, activation) from meta."""
    kw, origin = generator_kwargs(meta)
    shapes = architecture_from_shapes(sd)
    out: dict[str, Any] = {"conv_clamp": 256}  # stylegan3-repo default; ada's train.py also passes 256
    for k, v in kw.items():
        if k in _KNOWN_KWARGS:
            out[k] = v
        elif k not in _IGNORED_KWARGS and k not in ("channel_base", "channel_max", "mapping_kwargs"):
            log.warning("StyleGAN2: ignoring unknown constructor argument %s=%r", k, v)
    for k, v in shapes.items():
        if k in kw and k not in ("mapping_kwargs", "channels") and kw[k] != v:
            log.warning("StyleGAN2: init_kwargs say %s=%r but the weights have %r; using the weights", k, kw[k], v)
        out[k] = v
    mk = {k: v for k, v in dict(kw.get("mapping_kwargs") or {}).items() if k not in _IGNORED_KWARGS}
    mk.update(shapes["mapping_kwargs"])
    out["mapping_kwargs"] = mk
    return out, origin


def build(kwargs: dict[str, Any]) -> Generator:
    kw = dict(kwargs)
    if "channels" in kw:
        kw["channels"] = {int(k): int(v) for k, v in kw["channels"].items()}
    return Generator(**kw)


def json_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs with int dict keys made strings (JSON)."""
    out = dict(kwargs)
    if "channels" in out:
        out["channels"] = {str(k): v for k, v in out["channels"].items()}
    return out


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    from . import rosinality

    source_format = "nvidia"
    sd = state_dict
    if not _is_nvidia(sd):
        sd, meta = rosinality.to_nvidia(sd, meta)
        source_format = "rosinality"
    kwargs, origin = build_kwargs(sd, meta)
    if source_format == "rosinality":
        kwargs.update(rosinality.fixed_kwargs())
    model = build(kwargs)
    sd = dict(sd)
    w_avg_source = "file"
    if "mapping.w_avg" not in sd:
        sd["mapping.w_avg"] = model.mapping.w_avg  # filled below
        w_avg_source = "estimated"
    model.load_state_dict(sd, strict=True)
    if w_avg_source == "estimated":
        model.mapping.w_avg.copy_(mean_w(model.mapping))
        log.info("StyleGAN2: the file has no w_avg; estimated it from 10000 mapped z (truncation uses it)")
    model.eval().requires_grad_(False)
    return describe(model, kwargs, origin=origin, source_format=source_format, w_avg_source=w_avg_source)


def describe(model: Generator, kwargs: dict[str, Any], **facts: Any) -> ModelDescriptor:
    syn = model.synthesis
    res = model.img_resolution
    chans = {r: getattr(syn, f"b{r}").conv1.weight.shape[0] for r in syn.block_resolutions}
    act = sum(4 * c * r * r for r, c in chans.items()) * 4.0 / (res * res)  # ~4 live maps per block, fp32
    return ModelDescriptor(
        family="gan",
        architecture="StyleGAN2",
        model=model,
        purpose="Generator",
        scale=1,
        in_channels=0,
        out_channels=model.img_channels,
        supports_half=kwargs.get("conv_clamp") is not None,  # NVIDIA runs fp16 only with the clamp on
        supports_bfloat16=True,
        tiling="none",
        bytes_per_pixel=act,
        config={
            "class_name": CLASS_NAME,
            "init_kwargs": json_kwargs(kwargs),
            "z_dim": model.z_dim,
            "c_dim": model.c_dim,
            "w_dim": model.w_dim,
            "num_ws": model.num_ws,
            "img_resolution": res,
            "img_channels": model.img_channels,
            "architecture": kwargs.get("architecture", "skip"),
            "output_range": list(model.output_range),
            **facts,
        },
    )
