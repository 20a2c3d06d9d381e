"""The CPU convolution path: 3x3 convolutions through NNPACK's Winograd kernels (float32), shared by every family.

PyTorch's CPU convolution (oneDNN) does 9 multiply-adds per weight and pixel. NNPACK's Winograd F(6x6, 3x3)
kernels do about a quarter of that, with results equal to float rounding (about 1e-6 relative; on the Compact x4
model 0.008/255 at most on a whole image). PyTorch picks NNPACK itself only on mobile builds; here a layer uses it
when it is a 3x3, stride-1, dilation-1, one-group, zero-padded convolution running in float32 on the CPU without
gradients, on calls of at most MAX_PIXELS. Everything else runs PyTorch's ordinary convolution.

How a model gets it, explicitly and once:
- `conv3x3(x, weight, bias)` is the function a model's own forward may call (the upscaler's Compact path does);
- `use_nnpack(model)` converts a model's eligible `nn.Conv2d` layers to `NNPACKConv2d` (a subclass with the same
  parameters and state-dict keys whose forward calls `conv3x3`). Loaders call it once, when they build the model
  (the spandrel adapter for upscale models, the VAE codec for TAESD); nothing is patched per call.

NNPACK is a private PyTorch operator (`torch._nnpack_spatial_convolution`): it is used only after a self-check
against `F.conv2d` succeeds (once per process, `nnpack_usable`), and a failing call falls back to `F.conv2d`.

Threads: nothing here changes the process's thread count. NNPACK runs in its own pool, which PyTorch creates at
the first NNPACK call with `torch.get_num_threads()` threads (and keeps); the other operators use the OpenMP pool.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# NNPACK transforms a call's whole input and output at once: a workspace of about 18 bytes per pixel and channel
# (1.1 KB per pixel at 64 channels). Larger calls use the ordinary convolution; the tiling engine keeps calls small.
MAX_PIXELS = 512 * 512
WORKSPACE_BYTES_PER_FEATURE = 18  # NNPACK's workspace per input pixel and channel


@functools.lru_cache(maxsize=1)
def nnpack_usable() -> bool:
    """NNPACK is compiled in, initialises (`_nnpack_available` does that) and agrees with F.conv2d."""
    op = getattr(torch, "_nnpack_spatial_convolution", None)
    available = getattr(torch, "_nnpack_available", None)
    if op is None or available is None:
        return False
    try:
        if not available():
            return False
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 8, 19, 23, generator=gen)  # [1,8,19,23]: odd sizes on purpose
        w = torch.randn(16, 8, 3, 3, generator=gen)
        b = torch.randn(16, generator=gen)
        with torch.inference_mode():
            ok = torch.allclose(op(x, w, b, [1, 1]), F.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)
    except Exception as e:  # noqa: BLE001 (any failure means: do not use it)
        log.debug("NNPACK unusable: %s", e)
        return False
    if not ok:
        log.debug("NNPACK disagrees with F.conv2d; not used")
    return bool(ok)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            padding: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """A 3x3 stride-1 convolution with zero padding: [N,Cin,H,W] -> [N,Cout,H',W'] (H' = H for padding 1);
    NNPACK where it applies, else F.conv2d."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and weight.dtype == torch.float32
            and x.shape[0] * x.shape[-2] * x.shape[-1] <= MAX_PIXELS and not torch.is_grad_enabled()
            and nnpack_usable()):
        try:
            return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, list(padding))
        except RuntimeError:  # e.g. a size NNPACK refuses: the ordinary convolution
            pass
    return F.conv2d(x, weight, bias, padding=padding)


class NNPACKConv2d(torch.nn.Conv2d):
    """An eligible `nn.Conv2d` (see `eligible`) whose forward runs `conv3x3`; identical parameters and keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,Cin,H,W] -> [N,Cout,H,W]
        return conv3x3(x, self.weight, self.bias, self.padding)


def eligible(m: torch.nn.Module) -> bool:
    """A plain Conv2d that NNPACK computes exactly (its dtype and device are checked per call)."""
    return (
        type(m) is torch.nn.Conv2d
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and isinstance(m.padding, tuple)
    )


def use_nnpack(model: torch.nn.Module) -> int:
    """Convert the model's eligible 3x3 convolutions to `NNPACKConv2d`, in place, once (at load). Returns how many
    layers are NNPACK layers afterwards (0 where NNPACK is unusable: nothing is converted)."""
    if not nnpack_usable():
        return 0
    n = 0
    for m in model.modules():
        if eligible(m):
            m.__class__ = NNPACKConv2d
        n += type(m) is NNPACKConv2d
    return n
