"""Real-ESRGAN Compact (SRVGGNetCompact) on the CPU in float32: NNPACK convolutions without pool switches.

The network is 18 3x3 convolutions with a PReLU after each but the last, a pixel shuffle and the nearest-upsampled
input added back. Its convolutions go through NNPACK (models/cpu_conv.py), which runs in its own thread pool; every
other operator of a large tensor runs in PyTorch's OpenMP pool. On a machine with few cores the two pools fight:
after each PReLU the OpenMP workers spin-wait for more work on the cores NNPACK's workers need next, 17 times per
call. Here each PReLU runs in place as a per-channel leaky ReLU on pieces under PyTorch's parallel grain size
(32768 elements), so it stays on the calling thread and the OpenMP pool sleeps through the convolutions. The
result equals spandrel's forward up to NNPACK's rounding (tests/models/test_spandrel_arch.py).

`compact_call(model)` returns the call spandrel's descriptor makes (`call_fn(model, image)`); the spandrel adapter
installs it once, at load, on the UPSCALE_MODEL objects it builds (models/upscale/spandrel_arch.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..cpu_conv import conv3x3, nnpack_usable

GRAIN = 32768  # at::internal::GRAIN_SIZE: element-wise operators on fewer elements run on the calling thread


def is_compact(model: torch.nn.Module) -> bool:
    """spandrel's SRVGGNetCompact with PReLU activations (the Real-ESRGAN Compact / animevideo models)."""
    return (type(model).__name__ == "SRVGGNetCompact" and hasattr(model, "body") and hasattr(model, "upscale")
            and all(isinstance(m, (torch.nn.Conv2d, torch.nn.PReLU)) for m in model.body)
            and isinstance(model.body[0], torch.nn.Conv2d))


def prelu_(x: torch.Tensor, slopes: list[float]) -> torch.Tensor:  # [1,C,H,W] in place
    """PReLU with per-channel `slopes`, in place, in pieces small enough to stay on the calling thread."""
    C, H, W = x.shape[1:]
    rows = max(1, GRAIN // max(1, W) - 1)
    for c in range(C):
        a = slopes[c if len(slopes) > 1 else 0]
        xc = x[0, c]  # [H,W]
        for r in range(0, H, rows):
            F.leaky_relu_(xc[r : r + rows], a)
    return x


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:  # [1,Cin,H,W] -> [1,Cout,H*s,W*s]
    """SRVGGNetCompact's forward with NNPACK convolutions and calling-thread PReLUs (float32 CPU, no grad)."""
    out = x
    for layer in model.body:
        if isinstance(layer, torch.nn.Conv2d):
            out = conv3x3(out, layer.weight, layer.bias, layer.padding)
        else:
            out = prelu_(out, layer.weight.tolist())
    out = model.upsampler(out)  # [1,Cout,H*s,W*s]
    out += F.interpolate(x, scale_factor=model.upscale, mode="nearest")
    return out


def compact_call(default: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
    """A spandrel `call_fn`: `forward` for single float32 CPU images without gradients, else `default`."""

    def call(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        if (image.device.type == "cpu" and image.dtype == torch.float32 and image.shape[0] == 1
                and not torch.is_grad_enabled() and is_compact(model) and nnpack_usable()
                and model.body[0].weight.dtype == torch.float32):
            return forward(model, image)
        return default(model, image)

    return call
