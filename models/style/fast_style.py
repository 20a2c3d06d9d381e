"""Johnson et al. fast neural style ("Perceptual Losses for Real-Time Style Transfer", ECCV 2016): one network per
style, in the PyTorch examples' `TransformerNet` layout (the candy/mosaic/udnie/rain-princess files).

Their saved files carry InstanceNorm `running_mean`/`running_var` keys from an old PyTorch; the norms never use them
(track_running_stats is off), so they are dropped on load as upstream's `stylize()` does. The network takes and gives
0..255 values.

Any size: all fifteen norms see whole-image statistics. Those at full and half resolution (in1, in2, in4, in5) come
from streaming passes over tiles that sum exactly over each tile's own part; the 1/4-resolution trunk (conv3 and the
five residual blocks) keeps its 128-channel map whole; the final pass runs in tiles with every statistic fixed.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..descriptor import ModelDescriptor, SizeRequirements
from ..tiling import tiled_apply
from .ops import ConvLayer, Stats, balanced_tile, instance_norm, mean_std, tiled_mean_std

log = logging.getLogger(__name__)

ALIGN = 4
RUNNING = re.compile(r"in\d+\.running_(mean|var)$")  # upstream's own filter in neural_style.stylize()
FULL_BPP = 32 * 4 * 4.0  # 32-channel full-resolution maps, a few alive
LOW_BPP = 16 * 128 * 4 * 4.0  # per 1/4-resolution pixel in the tail (64 ch at 1/2, 32 at full)


class Norm(nn.Module):
    """InstanceNorm2d(affine=True) whose statistics may be given (whole-image ones while tiling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, stats: Stats | None = None) -> torch.Tensor:
        if stats is None:  # the image's own statistics, as nn.InstanceNorm2d
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=1e-5)
        return instance_norm(x, stats, self.weight, self.bias)


class Residual(nn.Module):
    def __init__(self, channels: int = 128):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, attr="conv2d")
        self.in1 = Norm(channels)
        self.conv2 = ConvLayer(channels, channels, 3, attr="conv2d")
        self.in2 = Norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.in2(self.conv2(F.relu(self.in1(self.conv1(x)))))


class TransformerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.in1 = ConvLayer(3, 32, 9, attr="conv2d"), Norm(32)
        self.conv2, self.in2 = ConvLayer(32, 64, 3, 2, attr="conv2d"), Norm(64)
        self.conv3, self.in3 = ConvLayer(64, 128, 3, 2, attr="conv2d"), Norm(128)
        for i in range(1, 6):
            self.add_module(f"res{i}", Residual(128))
        self.deconv1, self.in4 = ConvLayer(128, 64, 3, attr="conv2d"), Norm(64)
        self.deconv2, self.in5 = ConvLayer(64, 32, 3, attr="conv2d"), Norm(32)
        self.deconv3 = ConvLayer(32, 3, 9, attr="conv2d")

    def res_blocks(self) -> list[Residual]:
        return [getattr(self, f"res{i}") for i in range(1, 6)]

    def up1(self, y: torch.Tensor) -> torch.Tensor:
        return self.deconv1(F.interpolate(y, scale_factor=2, mode="nearest"))

    def up2(self, y: torch.Tensor) -> torch.Tensor:
        return self.deconv2(F.interpolate(y, scale_factor=2, mode="nearest"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] in 0..255 -> raw, 0..255 range
        y = F.relu(self.in1(self.conv1(x)))
        y = F.relu(self.in2(self.conv2(y)))
        y = F.relu(self.in3(self.conv3(y)))
        for block in self.res_blocks():
            y = block(y)
        y = F.relu(self.in4(self.up1(y)))
        y = F.relu(self.in5(self.up2(y)))
        return self.deconv3(y)


# ---------------------------------------------------------------- any size


def stylise(model: TransformerNet, x: torch.Tensor, *, tile: int | None, budget: int, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:  # [1,3,H,W] 0..255, sides multiples of 4 -> raw [1,3,H,W]
    """Whole-image statistics for every norm (see the module docstring), then the tiles."""
    H, W = x.shape[-2:]
    t = tile or balanced_tile(H, W, FULL_BPP * 4, budget, 12, ALIGN)
    kw = dict(device=device, dtype=dtype)
    st1 = tiled_mean_std(model.conv1, x, scale=1, context=4, align=ALIGN, tile=t, unbiased=False, **kw)
    stem1 = lambda v: F.relu(model.in1(model.conv1(v), st1))  # noqa: E731
    st2 = tiled_mean_std(lambda v: model.conv2(stem1(v)), x, scale=0.5, context=8, align=ALIGN, tile=t,
                         unbiased=False, **kw)
    front = lambda v: model.conv3(F.relu(model.in2(model.conv2(stem1(v)), st2)))  # noqa: E731
    y = tiled_apply(front, x, scale=1 / ALIGN, out_channels=128, tile=t, context=12, blend=0, align=ALIGN,
                    max_batch=1, progress="encode", **kw)  # [1,128,H/4,W/4]
    y = F.relu(_whole_norm(y, model.in3))
    h, w = y.shape[-2:]
    tl = max(16, (tile // ALIGN) if tile else balanced_tile(h, w, LOW_BPP, budget, 6))
    for block in model.res_blocks():
        y = _residual(block, y, tl, **kw)
    st4 = tiled_mean_std(model.up1, y, scale=2, context=2, align=1, tile=tl, unbiased=False, **kw)
    mid = lambda v: F.relu(model.in4(model.up1(v), st4))  # noqa: E731
    st5 = tiled_mean_std(lambda v: model.up2(mid(v)), y, scale=4, context=3, align=1, tile=tl, unbiased=False, **kw)
    tail = lambda v: model.deconv3(F.relu(model.in5(model.up2(mid(v)), st5)))  # noqa: E731
    return tiled_apply(tail, y, scale=ALIGN, out_channels=3, tile=tl, context=6, blend=0, max_batch=1,
                       progress="decode", **kw)


def _residual(block: Residual, y: torch.Tensor, tile: int, **kw) -> torch.Tensor:
    """One residual block on the whole 1/4 map, each conv in tiles, each norm with whole-map statistics."""
    h = tiled_apply(block.conv1, y, tile=tile, context=2, blend=0, max_batch=1, progress=None, **kw)
    h = F.relu(_whole_norm(h, block.in1))
    h = tiled_apply(block.conv2, h, tile=tile, context=2, blend=0, max_batch=1, progress=None, **kw)
    return y + _whole_norm(h, block.in2)


def _whole_norm(h: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Instance norm of a whole held map (on the CPU) with the layer's affine parameters."""
    return instance_norm(h, mean_std(h, unbiased=False), norm.weight.float().cpu(), norm.bias.float().cpu())


# ---------------------------------------------------------------- files


def _keys() -> set[str]:
    with torch.device("meta"):
        return set(TransformerNet().state_dict())


def _clean(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not RUNNING.search(k)}


def detect(state_dict: dict, meta: dict) -> bool:
    return set(_clean(state_dict)) == _keys()


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    sd = _clean(state_dict)
    dropped = len(state_dict) - len(sd)
    if dropped:
        log.info("TransformerNet: ignored %d InstanceNorm running-stat keys (unused by the network)", dropped)
    with torch.device("meta"):
        model = TransformerNet()
    model.load_state_dict({k: v.float().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return ModelDescriptor(
        family="style", architecture="TransformerNet", model=model, purpose="Per-style transfer (Johnson)",
        supports_half=False, supports_bfloat16=False,  # 0..255 values through 15 norms
        size_requirements=SizeRequirements(minimum=ALIGN, multiple_of=ALIGN), tiling="internal",
        receptive_field=12, bytes_per_pixel=FULL_BPP * 4,
        config={"arbitrary": False, "strength": "pixel", "align": ALIGN, "value_range": 255},
    )
