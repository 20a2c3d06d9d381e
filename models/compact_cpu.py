"""Real-ESRGAN Compact (SRVGGNetCompact) on the CPU in float32: NNPACK convolutions without pool switches.

The network is 18 3x3 convolutions with a PReLU after each but the last, a pixel shuffle and the nearest-upsampled
input added back. Its convolutions go through NNPACK (models/cpu_conv.py), which runs in its own thread pool; every
other operator of a large tensor runs in PyTorch's OpenMP pool. On a machine with few cores the two pools fight:
after each PReLU the OpenMP workers spin-wait for more work on the cores NNPACK's workers need next, 17 times per
call. Here each PReLU runs in place as a per-channel leaky ReLU on pieces under PyTorch's parallel grain size
(32768 elements), so it stays on the calling thread and the OpenMP pool sleeps through the convolutions, and the
input is added to the last convolution's output before the pixel shuffle, in place (no upsampled copy of the input,
one large temporary fewer per call). The result equals spandrel's forward up to NNPACK's rounding
(tests/models/test_spandrel_arch.py).

`use_compact_path(model)` gives a Compact module this forward for single float32 CPU images without gradients (a
subclass of its class with the same name, parameters and hooks; anything else runs spandrel's forward). The spandrel
adapter calls it once, at load (models/upscale/spandrel_arch.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import host
from .cpu_conv import conv3x3, nnpack_usable

GRAIN = 32768  # at::internal::GRAIN_SIZE: element-wise operators on fewer elements run on the calling thread


def is_compact(model: torch.nn.Module) -> bool:
    """spandrel's SRVGGNetCompact with PReLU activations (the Real-ESRGAN Compact / animevideo models)."""
    body = getattr(model, "body", None)
    return (type(model).__name__ == "SRVGGNetCompact" and isinstance(body, torch.nn.ModuleList) and len(body) > 0
            and isinstance(getattr(model, "upsampler", None), torch.nn.PixelShuffle)
            and model.upsampler.upscale_factor == getattr(model, "upscale", None)
            and all(isinstance(m, (torch.nn.Conv2d, torch.nn.PReLU)) for m in body)
            and isinstance(body[0], torch.nn.Conv2d))


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


def cpu_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:  # [1,Cin,H,W] -> [1,Cout,H*s,W*s]
    """SRVGGNetCompact's forward with NNPACK convolutions and calling-thread PReLUs (float32 CPU, no grad)."""
    out = x
    for layer in model.body:
        if isinstance(layer, torch.nn.Conv2d):
            host.throw_if_interrupted()  # Cancel within one layer (the module hooks are not called here)
            out = conv3x3(out, layer.weight, layer.bias, layer.padding)
        else:
            out = prelu_(out, layer.weight.tolist())
    # the nearest-upsampled input, added before the shuffle: each of a pixel's s*s sub-pixel channels gets its value
    # (the same sums as spandrel's add after the shuffle, without an upsampled copy of the input)
    N, c, H, W, s = x.shape[0], x.shape[1], out.shape[2], out.shape[3], int(model.upscale)
    out.unflatten(1, (c, -1)).add_(x.unsqueeze(2))  # [1,Cout,s*s,H,W]
    # the pixel shuffle, written channels last: the [1,H*s,W*s,Cout] IMAGE a node makes of it is a view, not a copy
    y = torch.empty(N, H * s, W * s, c, dtype=out.dtype)
    y.view(N, H, s, W, s, c).copy_(out.unflatten(1, (c, s, s)).permute(0, 4, 2, 5, 3, 1))
    return y.permute(0, 3, 1, 2)  # [1,Cout,H*s,W*s]


def use_compact_path(model: torch.nn.Module) -> bool:
    """Give a Compact module the CPU forward above, in place, once (at load); False for other modules or when
    NNPACK is unusable (nothing changes then)."""
    if getattr(type(model), "_atelier_cpu_path", False):
        return True
    if not is_compact(model) or not nnpack_usable():
        return False
    model.__class__ = _cpu_class(type(model))
    return True


@functools.lru_cache(maxsize=4)
def _cpu_class(base: type) -> type:
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,Cin,H,W] -> [N,Cout,H*s,W*s]
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1 and not torch.is_grad_enabled()
                and self.body[0].weight.dtype == torch.float32):
            return cpu_forward(self, x)
        return base.forward(self, x)

    return type(base.__name__, (base,), {"forward": forward, "_atelier_cpu_path": True, "__module__": __name__,
                                         "__doc__": f"{base.__name__} with the CPU path of {__name__}."})
