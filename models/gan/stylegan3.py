"""StyleGAN3 (alias-free) generator, configs T and R, in pure PyTorch (Karras et al. 2021, "Alias-Free Generative
Adversarial Networks").

Module and key names follow NVIDIA's `training/networks_stylegan3.py`, so its state dicts load with `strict=True`:
`synthesis.input.{weight,affine,transform,freqs,phases}`, `synthesis.L{i}_{size}_{channels}.{weight,bias,affine,
magnitude_ema,up_filter,down_filter}`, `mapping.*`. The per-layer sampling rates, cutoffs, sizes and paddings are
recomputed from the constructor arguments exactly as NVIDIA does; the filters are designed the same way (Kaiser
windowed sinc, or jinc for R) but are loaded from the state dict anyway.

`synthesis.input.transform` is the user's inverse transform of the Fourier-feature input (translate/rotate the
image), as in NVIDIA's gen_images.py; `noise_mode` is accepted and ignored (StyleGAN3 has no noise inputs).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from ..descriptor import ModelDescriptor
from . import ops
from .latent import FullyConnectedLayer, MappingNetwork, StyleGenerator, SynthesisBase, mean_w

log = logging.getLogger(__name__)

CLASS_NAME = "training.networks_stylegan3.Generator"
_IGNORED_KWARGS = {"num_fp16_res", "magnitude_ema_beta", "w_avg_beta", "use_fp16", "conv_clamp_fp16"}
_KNOWN_KWARGS = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "channel_base", "channel_max",
                 "num_layers", "num_critical", "first_cutoff", "first_stopband", "last_stopband_rel", "margin_size",
                 "output_scale", "conv_kernel", "filter_size", "lrelu_upsampling", "use_radial_filters", "conv_clamp",
                 "channels"}


class SynthesisInput(nn.Module):
    """Fourier features at random frequencies within a disc, rotated/translated by an affine of w."""

    def __init__(self, w_dim: int, channels: int, size: int, sampling_rate: float, bandwidth: float) -> None:
        super().__init__()
        self.w_dim, self.channels = w_dim, channels
        self.size = (int(size), int(size))  # (width, height)
        self.sampling_rate, self.bandwidth = float(sampling_rate), float(bandwidth)
        freqs = torch.randn([channels, 2])
        radii = freqs.square().sum(dim=1, keepdim=True).sqrt()
        freqs = freqs / (radii * radii.square().exp().pow(0.25)) * bandwidth
        self.weight = nn.Parameter(torch.randn([channels, channels]))
        self.affine = FullyConnectedLayer(w_dim, 4, weight_init=0, bias_init=[1, 0, 0, 0])
        self.register_buffer("transform", torch.eye(3, 3))  # user inverse transform of the output image
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", torch.rand([channels]) - 0.5)

    def forward(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # [B,w_dim] -> [B,C,H,W]
        b = w.shape[0]
        t = self.affine(w)  # [B,4] = (r_c, r_s, t_x, t_y)
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        eye = torch.eye(3, device=w.device)
        m_r = eye.repeat(b, 1, 1)  # inverse rotation
        m_r[:, 0, 0], m_r[:, 0, 1], m_r[:, 1, 0], m_r[:, 1, 1] = t[:, 0], -t[:, 1], t[:, 1], t[:, 0]
        m_t = eye.repeat(b, 1, 1)  # inverse translation
        m_t[:, 0, 2], m_t[:, 1, 2] = -t[:, 2], -t[:, 3]
        transforms = m_r @ m_t @ self.transform.float().unsqueeze(0)  # [B,3,3]
        freqs = self.freqs.float().unsqueeze(0)  # [1,C,2]
        phases = self.phases.float().unsqueeze(0) + (freqs @ transforms[:, :2, 2:]).squeeze(2)  # [B,C]
        freqs = freqs @ transforms[:, :2, :2]  # [B,C,2]
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)).clamp(0, 1)
        sw, sh = self.size
        gx = (torch.arange(sw, device=w.device, dtype=torch.float32) * 2 + 1 - sw) / (2 * self.sampling_rate)  # [W]
        gy = (torch.arange(sh, device=w.device, dtype=torch.float32) * 2 + 1 - sh) / (2 * self.sampling_rate)  # [H]
        x = gx[None, None, :, None] * freqs[:, None, None, :, 0] + gy[None, :, None, None] * freqs[:, None, None, :, 1]
        x = torch.sin((x + phases[:, None, None, :]) * (np.pi * 2)) * amplitudes[:, None, None, :]  # [B,H,W,C]
        x = x @ (self.weight.float() / math.sqrt(self.channels)).t()
        return x.permute(0, 3, 1, 2).to(dtype)  # [B,C,H,W]


class SynthesisLayer(nn.Module):
    """Modulated conv, then bias + upsample + leaky ReLU + clamp + downsample (filtered_lrelu)."""

    def __init__(
        self,
        w_dim: int,
        is_torgb: bool,  # the final ToRGB layer
        is_critically_sampled: bool,
        in_channels: int,
        out_channels: int,
        in_size: int,
        out_size: int,
        in_sampling_rate: float,
        out_sampling_rate: float,
        in_cutoff: float,
        out_cutoff: float,
        in_half_width: float,
        out_half_width: float,
        conv_kernel: int = 3,  # ignored for ToRGB (1)
        filter_size: int = 6,  # low-pass taps relative to the lower rate
        lrelu_upsampling: int = 2,  # relative sampling rate of the nonlinearity
        use_radial_filters: bool = False,  # radial (jinc) down filter, non-critical layers only
        conv_clamp: float | None = 256,
    ) -> None:
        super().__init__()
        self.w_dim, self.is_torgb = w_dim, is_torgb
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_size, self.out_size = int(in_size), int(out_size)
        self.conv_kernel = 1 if is_torgb else conv_kernel
        self.conv_clamp = conv_clamp
        tmp_rate = max(in_sampling_rate, out_sampling_rate) * (1 if is_torgb else lrelu_upsampling)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, self.conv_kernel, self.conv_kernel]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("magnitude_ema", torch.ones([]))
        self.up_factor = int(np.rint(tmp_rate / in_sampling_rate))
        self.down_factor = int(np.rint(tmp_rate / out_sampling_rate))
        up_taps = filter_size * self.up_factor if self.up_factor > 1 and not is_torgb else 1
        down_taps = filter_size * self.down_factor if self.down_factor > 1 and not is_torgb else 1
        self.down_radial = use_radial_filters and not is_critically_sampled
        self.register_buffer("up_filter", ops.design_lowpass_filter(up_taps, in_cutoff, in_half_width * 2, tmp_rate))
        self.register_buffer("down_filter", ops.design_lowpass_filter(
            down_taps, out_cutoff, out_half_width * 2, tmp_rate, radial=self.down_radial))
        # Padding so that the output has out_size samples, centred (NVIDIA's Appendix C.3 convention).
        pad_total = (self.out_size - 1) * self.down_factor + 1
        pad_total -= (self.in_size + self.conv_kernel - 1) * self.up_factor
        pad_total += up_taps + down_taps - 2
        pad_lo = (pad_total + self.up_factor) // 2
        pad_hi = pad_total - pad_lo
        self.padding = [pad_lo, pad_hi, pad_lo, pad_hi]

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [B,I,in,in], [B,w_dim] -> [B,O,out,out]
        styles = self.affine(w)  # [B,I]
        if self.is_torgb:
            styles = styles * (1 / math.sqrt(self.in_channels * self.conv_kernel**2))
        x = ops.modulated_conv2d_sg3(x, self.weight, styles, demodulate=not self.is_torgb, padding=self.conv_kernel - 1,
                                     input_gain=self.magnitude_ema.float().rsqrt(), bias=self.bias)
        if self.is_torgb:
            return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp is not None else x
        return ops.filtered_lrelu(x, self.up_filter, self.down_filter, up=self.up_factor, down=self.down_factor,
                                  padding=self.padding, gain=math.sqrt(2), slope=0.2, clamp=self.conv_clamp)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}x{self.in_size}, out={self.out_channels}x{self.out_size}, up={self.up_factor}, "
                f"down={self.down_factor}, padding={self.padding}, radial={self.down_radial}")


def layer_plan(img_resolution: int, img_channels: int, channel_base: int = 32768, channel_max: int = 512,
               num_layers: int = 14, num_critical: int = 2, first_cutoff: float = 2, first_stopband: float = 2**2.1,
               last_stopband_rel: float = 2**0.3, margin_size: int = 10) -> dict[str, np.ndarray]:
    """Per-layer cutoffs, stopbands, sampling rates, half widths, sizes and channels (NVIDIA's progression)."""
    last_cutoff = img_resolution / 2
    last_stopband = last_cutoff * last_stopband_rel
    exponents = np.minimum(np.arange(num_layers + 1) / (num_layers - num_critical), 1)
    cutoffs = first_cutoff * (last_cutoff / first_cutoff) ** exponents
    stopbands = first_stopband * (last_stopband / first_stopband) ** exponents
    rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, img_resolution))))
    half_widths = np.maximum(stopbands, rates / 2) - cutoffs
    sizes = rates + margin_size * 2
    sizes[-2:] = img_resolution
    channels = np.rint(np.minimum((channel_base / 2) / cutoffs, channel_max))
    channels[-1] = img_channels
    return {"cutoffs": cutoffs, "rates": rates, "half_widths": half_widths, "sizes": sizes, "channels": channels}


class SynthesisNetwork(SynthesisBase):
    """ws [B,num_ws,w_dim] -> image [B,C,res,res] (num_ws = num_layers + 2)."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,  # channels = min(channel_base / 2 / cutoff, channel_max)
        channel_max: int = 512,
        num_layers: int = 14,  # layers excluding Fourier features and ToRGB
        num_critical: int = 2,  # critically sampled layers at the end
        first_cutoff: float = 2,
        first_stopband: float = 2**2.1,
        last_stopband_rel: float = 2**0.3,
        margin_size: int = 10,  # extra pixels around the image
        output_scale: float = 0.25,  # scale of the output image
        channels: list[int] | None = None,  # explicit per-layer channels (num_layers + 1 entries), from the weights
        **layer_kwargs: Any,  # conv_kernel, filter_size, lrelu_upsampling, use_radial_filters, conv_clamp
    ) -> None:
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.num_ws = num_layers + 2
        self.num_layers, self.output_scale = num_layers, output_scale
        p = layer_plan(img_resolution, img_channels, channel_base, channel_max, num_layers, num_critical, first_cutoff,
                       first_stopband, last_stopband_rel, margin_size)
        ch = [int(c) for c in (channels if channels is not None else p["channels"])]
        cut, rate, hw, size = p["cutoffs"], p["rates"], p["half_widths"], p["sizes"]
        self.input = SynthesisInput(w_dim, ch[0], int(size[0]), rate[0], cut[0])
        self.layer_names: list[str] = []
        for idx in range(num_layers + 1):
            prev = max(idx - 1, 0)
            layer = SynthesisLayer(
                w_dim, is_torgb=idx == num_layers, is_critically_sampled=idx >= num_layers - num_critical,
                in_channels=ch[prev], out_channels=ch[idx], in_size=int(size[prev]), out_size=int(size[idx]),
                in_sampling_rate=int(rate[prev]), out_sampling_rate=int(rate[idx]), in_cutoff=cut[prev],
                out_cutoff=cut[idx], in_half_width=hw[prev], out_half_width=hw[idx], **layer_kwargs)
            name = f"L{idx}_{layer.out_size}_{layer.out_channels}"
            setattr(self, name, layer)
            self.layer_names.append(name)

    def sample_bytes(self) -> int:
        layers = [getattr(self, n) for n in self.layer_names]
        return max(4 * m.out_channels * (m.out_size * m.down_factor + 8) ** 2 for m in layers)

    def run(self, ws: torch.Tensor, noise_mode: str, generator: torch.Generator | None) -> torch.Tensor:
        """ws [B,num_ws,w_dim] (checked) -> [B,C,res,res] float32; noise_mode is moot (no noise in StyleGAN3)."""
        ws = ws.unbind(dim=1)
        dtype = self.input.weight.dtype
        if dtype not in (torch.float16, torch.bfloat16, torch.float64):
            dtype = torch.float32
        x = self.input(ws[0], dtype)
        for name, w in zip(self.layer_names, ws[1:]):
            x = getattr(self, name)(x, w)
        x = x.float()
        return x * self.output_scale if self.output_scale != 1 else x


class Generator(StyleGenerator):
    """StyleGAN3 generator: MappingNetwork (2 layers by default) + SynthesisNetwork, NVIDIA's constructor arguments."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        mapping_kwargs: dict | None = None,  # num_layers (2), lr_multiplier (0.01)
        **synthesis_kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_common(z_dim, c_dim, w_dim, img_resolution, img_channels)
        for k in set(synthesis_kwargs) & _IGNORED_KWARGS:
            synthesis_kwargs.pop(k)
        mk = {"num_layers": 2, **{k: v for k, v in (mapping_kwargs or {}).items() if k not in _IGNORED_KWARGS}}
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mk)


# ----------------------------------------------------------------------------------------------------------------
# detect / load

_LAYER = re.compile(r"synthesis\.L(\d+)_(\d+)_(\d+)\.weight")


def detect(state_dict: dict, meta: dict) -> bool:
    """NVIDIA StyleGAN3 keys: the Fourier input (synthesis.input.freqs) and L{i}_{size}_{channels} layers."""
    return ("synthesis.input.freqs" in state_dict and "mapping.fc0.weight" in state_dict
            and any(k.startswith("synthesis.L0_") for k in state_dict))


def build_kwargs(sd: dict, meta: dict) -> dict[str, Any]:
    """Constructor kwargs: meta init_kwargs (ada-style nesting flattened) checked against, and completed by, shapes."""
    raw = meta.get("init_kwargs") if isinstance(meta, dict) else None
    kw = dict(raw) if isinstance(raw, dict) else {}
    if isinstance(kw.get("synthesis_kwargs"), dict):
        kw.update(kw.pop("synthesis_kwargs"))
    layers = sorted((int(m.group(1)), int(m.group(2)), int(m.group(3)), k)
                    for k in sd if (m := _LAYER.fullmatch(k)))
    if not layers:
        raise KeyError("StyleGAN3: no synthesis.L{i}_{size}_{channels}.weight keys")
    n_fc = len([k for k in sd if re.fullmatch(r"mapping\.fc\d+\.weight", k)])
    c_dim = int(sd["mapping.embed.weight"].shape[1]) if "mapping.embed.weight" in sd else 0
    w_dim = int(sd["mapping.w_avg"].shape[0]) if "mapping.w_avg" in sd else int(sd["mapping.fc0.weight"].shape[0])
    shapes = {
        "z_dim": int(sd["mapping.fc0.weight"].shape[1]) - (w_dim if c_dim else 0),
        "c_dim": c_dim,
        "w_dim": w_dim,
        "img_resolution": layers[-1][1],
        "img_channels": layers[-1][2],
        "num_layers": layers[-1][0],
        "conv_kernel": int(sd[layers[0][3]].shape[-1]),
        "use_radial_filters": any(v.dim() == 2 for k, v in sd.items() if k.endswith(".down_filter")),
        "channels": [c for _, _, c, _ in layers],
    }
    out: dict[str, Any] = {}
    for k, v in kw.items():
        if k in _KNOWN_KWARGS:
            out[k] = v
        elif k not in _IGNORED_KWARGS and k != "mapping_kwargs":
            log.warning("StyleGAN3: ignoring unknown constructor argument %s=%r", k, v)
    for k, v in shapes.items():
        if k in kw and kw[k] != v:
            log.warning("StyleGAN3: init_kwargs say %s=%r but the weights have %r; using the weights", k, kw[k], v)
        out[k] = v
    mk = {k: v for k, v in dict(kw.get("mapping_kwargs") or {}).items() if k not in _IGNORED_KWARGS}
    mk["num_layers"] = n_fc
    out["mapping_kwargs"] = mk
    return out


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    kwargs = build_kwargs(state_dict, meta)
    model = Generator(**kwargs)
    names = {k.split(".")[1] for k in state_dict if k.startswith("synthesis.L")}
    if names != set(model.synthesis.layer_names):
        raise ValueError(f"StyleGAN3: the layer sizes computed from the hyper-parameters ({model.synthesis.layer_names}) "
                         f"do not match the file's ({sorted(names)}); its init_kwargs are needed")
    sd = dict(state_dict)
    w_avg_source = "file"
    if "mapping.w_avg" not in sd:
        sd["mapping.w_avg"] = model.mapping.w_avg
        w_avg_source = "estimated"
    model.load_state_dict(sd, strict=True)
    if w_avg_source == "estimated":
        model.mapping.w_avg.copy_(mean_w(model.mapping))
    model.eval().requires_grad_(False)
    radial = bool(kwargs.get("use_radial_filters"))
    syn = model.synthesis
    act = sum(2 * getattr(syn, n).out_channels * getattr(syn, n).out_size ** 2 * getattr(syn, n).up_factor ** 2
              for n in syn.layer_names) * 4.0 / model.img_resolution**2
    return ModelDescriptor(
        family="gan",
        architecture="StyleGAN3-R" if radial else "StyleGAN3-T",
        model=model,
        purpose="Generator",
        scale=1,
        in_channels=0,
        out_channels=model.img_channels,
        supports_half=kwargs.get("conv_clamp", 256) is not None,
        supports_bfloat16=True,
        tiling="none",
        bytes_per_pixel=act,
        config={
            "class_name": CLASS_NAME,
            "init_kwargs": kwargs,
            "z_dim": model.z_dim,
            "c_dim": model.c_dim,
            "w_dim": model.w_dim,
            "num_ws": model.num_ws,
            "img_resolution": model.img_resolution,
            "img_channels": model.img_channels,
            "config": "R" if radial else "T",
            "output_range": list(model.output_range),
            "w_avg_source": w_avg_source,
        },
    )
