"""CycleGAN / pix2pix image-to-image generators (junyanz/pytorch-CycleGAN-and-pix2pix layouts).

- `ResnetGenerator` (Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial
  Networks"; after Johnson et al. 2016): 7x7 conv, stride-2 downsamplings, residual blocks, transposed-conv
  upsamplings, 7x7 conv, Tanh. Keys `model.<i>...`, blocks `model.<i>.conv_block.<j>` (junyanz) or
  `model.<i>.block.<j>` (vintagify and other re-implementations).
- `UnetGenerator` (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks"): nested
  skip blocks, keys `model.model.0`, `model.model.1.model.1`, ...

Read from keys and shapes: channels, number of blocks/downsamplings, the norm (BatchNorm has running stats; affine
InstanceNorm has weight/bias only; plain InstanceNorm has no keys and the convolutions carry biases; no norm: neither),
dropout and zero padding inside blocks (they shift the block's indices). Reflection padding is assumed where a padding
layer sits (meta `config` `{"padding": "replicate"}` overrides). Detection builds the network on the meta device and
requires every key and shape to match, so nothing else is claimed.

Input and output are [B,C,H,W] in [-1,1]. Batch-norm models are tiled exactly with context >= `receptive_field`;
instance norm uses whole-image statistics, so tiles differ slightly from the whole image (`config["tiling_exact"]`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import InputError
from .contract import config_from_meta

log = logging.getLogger(__name__)

RANGE = (-1.0, 1.0)
_STATS = ("running_mean", "running_var", "num_batches_tracked")


class InstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d without running statistics, computed as a GroupNorm of one channel per group: the same
    normalisation (within 2e-6) through a fused kernel, about 7x faster on CPU. Same parameters, same file keys."""

    def __init__(self, num_features: int, affine: bool) -> None:
        super().__init__(num_features, affine=affine, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> same
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "instance":
        return lambda c: InstanceNorm2d(c, affine=False)
    if norm == "instance_affine":
        return lambda c: InstanceNorm2d(c, affine=True)
    if norm == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"norm {norm!r}: expected batch, instance, instance_affine or none")


def _pad(padding: str, size: int) -> list[nn.Module]:
    if padding == "reflect":
        return [nn.ReflectionPad2d(size)]
    if padding == "replicate":
        return [nn.ReplicationPad2d(size)]
    return []


def _check_input(x: torch.Tensor, channels: int, multiple: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"x: expected [B,{channels},H,W] in [-1,1], got {got}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise InputError(
            f"x: height and width must be multiples of {multiple} for this generator, got {x.shape[2]}x{x.shape[3]} "
            "(pad it, e.g. with SizeRequirements.padded_size)"
        )


# ----------------------------------------------------------------------------------------------------------------
# ResnetGenerator


@dataclass(frozen=True)
class ResnetConfig:
    in_channels: int = 3
    out_channels: int = 3
    ngf: int = 64  # channels of the first conv
    n_blocks: int = 9
    n_down: int = 2  # stride-2 downsamplings (and as many upsamplings)
    norm: str = "instance"  # batch | instance | instance_affine | none
    bias: bool = True  # convolutions other than the last carry a bias (junyanz: only with instance norm)
    padding: str = "reflect"  # padding inside residual blocks: reflect | replicate | zero
    dropout: bool = False  # Dropout(0.5) between a block's convolutions (identity in eval)
    block_attr: str = "conv_block"  # attribute holding a block's Sequential ("conv_block" or "block")


class ResnetBlock(nn.Module):
    """x + (pad, conv3, norm, ReLU, [dropout], pad, conv3, norm)(x)."""

    def __init__(self, dim: int, cfg: ResnetConfig) -> None:
        super().__init__()
        norm = _norm_factory(cfg.norm)
        p = 1 if cfg.padding == "zero" else 0
        layers: list[nn.Module] = _pad(cfg.padding, 1) + [nn.Conv2d(dim, dim, 3, padding=p, bias=cfg.bias), norm(dim),
                                                         nn.ReLU(True)]
        if cfg.dropout:
            layers.append(nn.Dropout(0.5))
        layers += _pad(cfg.padding, 1) + [nn.Conv2d(dim, dim, 3, padding=p, bias=cfg.bias), norm(dim)]
        self._attr = cfg.block_attr
        setattr(self, cfg.block_attr, nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,dim,h,w] -> same
        return x + getattr(self, self._attr)(x)


class ResnetGenerator(nn.Module):
    """CycleGAN generator: [B,in,H,W] in [-1,1] -> [B,out,H,W] in [-1,1]; H, W multiples of 2**n_down."""

    input_range = output_range = RANGE  # the image-to-image contract: what the images in and out span

    def __init__(self, cfg: ResnetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm, bias, ngf = _norm_factory(cfg.norm), cfg.bias, cfg.ngf
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(cfg.in_channels, ngf, 7, bias=bias), norm(ngf),
                                   nn.ReLU(True)]
        for i in range(cfg.n_down):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias), norm(2 * c), nn.ReLU(True)]
        c = ngf * 2**cfg.n_down
        layers += [ResnetBlock(c, cfg) for _ in range(cfg.n_blocks)]
        for i in range(cfg.n_down):
            c = ngf * 2 ** (cfg.n_down - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, cfg.out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,in,H,W] -> [B,out,H,W]
        _check_input(x, self.cfg.in_channels, 2**self.cfg.n_down)
        return self.model(x)

    def receptive_field(self) -> int:
        cfg = self.cfg
        block = [("pad", 1), ("conv", 3, 1, 0)] if cfg.padding != "zero" else [("conv", 3, 1, 1)]
        ops = [("pad", 3), ("conv", 7, 1, 0)] + [("conv", 3, 2, 1)] * cfg.n_down + block * (2 * cfg.n_blocks)
        ops += [("convT", 3, 2, 1)] * cfg.n_down + [("pad", 3), ("conv", 7, 1, 0)]
        return receptive_field(ops, 2**cfg.n_down)


def _norm_kind(params: dict[str, torch.Tensor], bias: bool) -> str:
    if "running_mean" in params and "weight" in params:
        return "batch"
    if "weight" in params:
        return "instance_affine"
    return "instance" if bias else "none"  # no norm keys: junyanz puts biases on convs only with instance norm


def _group(state_dict: dict, prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """{index: {rest of key: tensor}} for keys `<prefix><index>.<rest>`."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if not k.startswith(prefix):
            continue
        head, _, rest = k[len(prefix):].partition(".")
        if head.isdigit() and rest:
            out.setdefault(int(head), {})[rest] = v
    return out


def _resnet_config(sd: dict, meta: dict) -> ResnetConfig | None:
    top = _group(sd, "model.")
    if len(top) < 3 or 1 not in top:
        return None
    blocks = sorted(i for i, ps in top.items() if any(k.startswith(("conv_block.", "block.")) for k in ps))
    if not blocks or blocks != list(range(blocks[0], blocks[0] + len(blocks))) or (blocks[0] - 4) % 3:
        return None
    first = top[1].get("weight")
    if first is None or first.dim() != 4 or tuple(first.shape[2:]) != (7, 7):
        return None
    attr = "conv_block" if any(k.startswith("conv_block.") for k in top[blocks[0]]) else "block"
    inner = _group(sd, f"model.{blocks[0]}.{attr}.")
    convs = sorted(j for j, ps in inner.items() if ps.get("weight") is not None and ps["weight"].dim() == 4)
    if len(convs) != 2 or convs[0] not in (0, 1):
        return None
    padded = convs[0] == 1
    gap = convs[1] - convs[0]  # conv, norm, relu, [dropout], [pad], conv
    dropout = gap == (5 if padded else 4)
    if not dropout and gap != (4 if padded else 3):
        return None
    bias = "bias" in top[1]
    n_down, n_blocks = (blocks[0] - 4) // 3, len(blocks)
    last = top.get(blocks[0] + n_blocks + 3 * n_down + 1, {}).get("weight")
    if last is None or last.dim() != 4:
        return None
    cfg_meta = config_from_meta(meta)
    padding = str(cfg_meta.get("padding", "reflect")) if padded else "zero"
    return ResnetConfig(
        in_channels=int(first.shape[1]),
        out_channels=int(last.shape[0]),
        ngf=int(first.shape[0]),
        n_blocks=n_blocks,
        n_down=n_down,
        norm=_norm_kind(top.get(2, {}), bias),
        bias=bias,
        padding=padding,
        dropout=dropout,
        block_attr=attr,
    )


# ----------------------------------------------------------------------------------------------------------------
# UnetGenerator


@dataclass(frozen=True)
class UnetConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = field(default=(64, 128, 256, 512, 512, 512, 512, 512))  # inner channels, outer first
    norm: str = "batch"  # batch | instance | instance_affine | none
    bias: bool = False  # inner convolutions carry a bias (junyanz: only with instance norm)

    @property
    def num_downs(self) -> int:
        return len(self.channels)


class UnetSkipConnectionBlock(nn.Module):
    """One U-Net level: down (LeakyReLU, conv4/2, norm) -> submodule -> up (ReLU, convT4/2, norm), concat skip."""

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int, submodule: nn.Module | None, *,
                 outermost: bool, norm: str, bias: bool) -> None:
        super().__init__()
        self.outermost = outermost
        make_norm = _norm_factory(norm)
        downconv = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=bias)
        if outermost:
            assert submodule is not None
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            layers = [downconv, submodule, nn.ReLU(True), upconv, nn.Tanh()]
        elif submodule is None:  # innermost
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), downconv, nn.ReLU(True), upconv, make_norm(outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), downconv, make_norm(inner_nc), submodule, nn.ReLU(True), upconv,
                      make_norm(outer_nc)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,outer,h,w] -> [B,2*outer,h,w] (outermost: [B,out,h,w])
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix generator: [B,in,H,W] in [-1,1] -> [B,out,H,W] in [-1,1]; H, W multiples of 2**num_downs."""

    input_range = output_range = RANGE

    def __init__(self, cfg: UnetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        block: nn.Module | None = None
        for level in range(len(ch) - 1, 0, -1):  # innermost first
            block = UnetSkipConnectionBlock(ch[level - 1], ch[level], ch[level - 1], block, outermost=False,
                                            norm=cfg.norm, bias=cfg.bias)
        self.model = UnetSkipConnectionBlock(cfg.out_channels, ch[0], cfg.in_channels, block, outermost=True,
                                             norm=cfg.norm, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,in,H,W] -> [B,out,H,W]
        _check_input(x, self.cfg.in_channels, 2**self.cfg.num_downs)
        return self.model(x)

    def receptive_field(self) -> int:
        d = self.cfg.num_downs
        return receptive_field([("conv", 4, 2, 1)] * d + [("convT", 4, 2, 1)] * d, 2**d)


def _unet_config(sd: dict, meta: dict) -> UnetConfig | None:
    outer = sd.get("model.model.0.weight")
    up = sd.get("model.model.3.weight")
    if outer is None or up is None or outer.dim() != 4 or up.dim() != 4 or "model.model.1.model.1.weight" not in sd:
        return None
    channels = [int(outer.shape[0])]
    prefix = "model.model.1.model."
    norm_params: dict[str, torch.Tensor] | None = None
    bias = False
    while True:
        down = sd.get(prefix + "1.weight")
        if down is None or down.dim() != 4:
            return None
        channels.append(int(down.shape[0]))
        sub = prefix + "3.model."
        if sub + "1.weight" not in sd:  # innermost: downconv .1, upconv .3, upnorm .4
            if norm_params is None:
                bias = prefix + "1.bias" in sd
                norm_params = _group(sd, prefix).get(4, {})
            break
        if norm_params is None:  # first middle block: downconv .1, downnorm .2
            bias = prefix + "1.bias" in sd
            norm_params = _group(sd, prefix).get(2, {})
        prefix = sub
        if len(channels) > 16:
            return None
    return UnetConfig(int(outer.shape[1]), int(up.shape[1]), tuple(channels), _norm_kind(norm_params, bias), bias)


# ----------------------------------------------------------------------------------------------------------------
# receptive field, detection, loading


def receptive_field(ops: list[tuple], period: int) -> int:
    """Largest distance, in input pixels, from an output pixel to an input pixel it depends on (scale-1 chains).

    ops: ("pad", P) | ("conv", k, stride, padding) | ("convT", k, stride, padding), input to output. Exact interval
    arithmetic over every output phase of the chain's period.
    """
    worst = 0
    for o in range(period, 2 * period):
        lo, hi = o, o
        for op in reversed(ops):
            if op[0] == "pad":
                lo, hi = lo - op[1], hi - op[1]
            elif op[0] == "conv":
                _, k, s, p = op
                lo, hi = lo * s - p, hi * s - p + k - 1
            else:  # transposed: output o = i*s - p + t, t in [0, k)
                _, k, s, p = op
                lo, hi = -((-(lo + p - k + 1)) // s), (hi + p) // s
        worst = max(worst, o - lo, hi - o)
    return worst


def _strip_legacy_stats(sd: dict) -> dict:
    """Old InstanceNorm checkpoints carry running stats but no affine weights (junyanz patches them out too)."""
    drop = {k for k in sd if k.rsplit(".", 1)[-1] in _STATS and k.rsplit(".", 1)[0] + ".weight" not in sd}
    return {k: v for k, v in sd.items() if k not in drop} if drop else sd


def _build(sd: dict, meta: dict) -> tuple[nn.Module, dict] | None:
    """Build the matching generator on the meta device; None unless every key and shape matches exactly."""
    if not sd or not all(isinstance(k, str) and k.startswith("model.") for k in sd):
        return None
    sd = _strip_legacy_stats(sd)
    cfg: ResnetConfig | UnetConfig | None = _unet_config(sd, meta) if "model.model.0.weight" in sd else None
    if cfg is None:
        cfg = _resnet_config(sd, meta)
    if cfg is None:
        return None
    cls = UnetGenerator if isinstance(cfg, UnetConfig) else ResnetGenerator
    try:
        with torch.device("meta"):
            model = cls(cfg)
    except (ValueError, RuntimeError):
        return None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != {k: tuple(v.shape) for k, v in sd.items()}:
        return None
    return model, sd


def detect(state_dict: dict, meta: dict) -> bool:
    """A junyanz-style ResnetGenerator or UnetGenerator whose every key and shape we reproduce."""
    return _build(state_dict, meta) is not None


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    built = _build(state_dict, meta)
    if built is None:
        raise ValueError("not a CycleGAN/pix2pix generator state dict")
    meta_model, sd = built
    model = type(meta_model)(meta_model.cfg)
    model.load_state_dict(sd, strict=True)
    model.eval().requires_grad_(False)
    cfg = model.cfg
    if isinstance(cfg, UnetConfig):
        multiple, arch = 2**cfg.num_downs, "UnetGenerator"
        levels = [(cfg.in_channels + cfg.out_channels, 0)] + [(3 * c, i + 1) for i, c in enumerate(cfg.channels)]
        extra = {"num_downs": cfg.num_downs, "ngf": cfg.channels[0], "channels": list(cfg.channels)}
    else:
        multiple, arch = 2**cfg.n_down, "ResnetGenerator"
        levels = [(4 * cfg.ngf * 2**i, i) for i in range(cfg.n_down + 1)]
        extra = {"n_blocks": cfg.n_blocks, "n_downsampling": cfg.n_down, "ngf": cfg.ngf, "padding": cfg.padding,
                 "dropout": cfg.dropout, "block_attr": cfg.block_attr}
    exact = cfg.norm in ("batch", "none")
    return ModelDescriptor(
        family="gan",
        architecture=arch,
        model=model,
        purpose="ImageToImage",
        scale=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        supports_half=True,
        supports_bfloat16=True,
        # a ResNet generator's bottleneck must be 2 px at least (reflect padding, instance norm): 1-2 px images padded
        size_requirements=SizeRequirements(minimum=multiple * (1 if arch == "UnetGenerator" else 2),
                                           multiple_of=multiple),
        tiling="supported",
        receptive_field=model.receptive_field(),
        bytes_per_pixel=4.0 * sum(ch / 4**lvl for ch, lvl in levels),  # fp32 bytes per input pixel, batch 1
        config={
            **extra,
            "norm": cfg.norm,
            "bias": cfg.bias,
            "input_range": list(RANGE),
            "output_range": list(RANGE),
            "tiling_exact": exact,  # instance norm: statistics per tile, so tiles differ slightly from the whole
        },
    )


__all__ = ["ResnetConfig", "ResnetGenerator", "UnetConfig", "UnetGenerator", "detect", "load", "receptive_field"]
