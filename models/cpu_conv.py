"""The CPU convolution path: 3x3 convolutions through NNPACK's Winograd kernels (float32), shared by every family.

PyTorch's CPU convolution (oneDNN) does 9 multiply-adds per weight and pixel. NNPACK's Winograd F(6x6, 3x3)
kernels do about a quarter of that, with results equal to float rounding (about 1e-6 relative; on the Compact x4
model 0.008/255 at most on a whole image). PyTorch picks NNPACK itself only on mobile builds; here a layer uses it
when it is a 3x3, stride-1, dilation-1, one-group, zero-padded convolution running in float32 on the CPU without
gradients, on calls of at most MAX_PIXELS and at least MIN_SIDE pixels a side and MIN_CALL_PIXELS per call (smaller
calls pay more for NNPACK's transforms and pool than they save). Everything else runs PyTorch's ordinary convolution.

How a model gets it, explicitly and once:
- `conv3x3(x, weight, bias)` is the function a model's own forward may call (the upscaler's Compact path does);
- `use_nnpack(model)` converts a model's eligible `nn.Conv2d` layers to `NNPACKConv2d` (a subclass with the same
  parameters and state-dict keys whose forward calls `conv3x3`). Loaders call it once, when they build the model
  (the spandrel adapter for upscale models, the VAE codec for TAESD); nothing is patched per call;
- `use_nnpack_alone(model, device)` does the same for models whose convolutions alternate with PyTorch's own
  multi-threaded operators (the diffusion UNets: group norms, activations, attention), only where both pools are the
  calling thread (see there).

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
# The small end, measured against oneDNN on one thread (3x3, 128-256 channels, bench/unet_forward.py's shapes): a
# [1,128,32,32] call takes 1.47 ms in NNPACK against 2.66 ms; [1,256,16,16] 2.77 against 2.65; [16,256,8,8] 12.1
# against 9.4; [1,256,8,8] 2.39 against 0.79. So NNPACK from 16 px a side and 1024 px per call.
MIN_SIDE = 16
MIN_CALL_PIXELS = 1024


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
    H, W = x.shape[-2:]
    N = x.shape[0] if x.ndim == 4 else 0  # NNPACK takes batches only
    if (x.dtype == torch.float32 and x.device.type == "cpu" and weight.dtype == torch.float32
            and MIN_CALL_PIXELS <= N * H * W <= MAX_PIXELS and min(H, W) >= MIN_SIDE
            and not torch.is_grad_enabled() and nnpack_usable()):
        try:
            # NCHW in (a channels-last model's input and weight are converted here; the output is NCHW)
            return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias, list(padding))
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


def use_nnpack_alone(model: torch.nn.Module, device: torch.device) -> bool:
    """`use_nnpack` for a model whose convolutions alternate with PyTorch's multi-threaded operators, only when it
    computes on the CPU with one PyTorch thread; says whether it converted.

    With more threads the two pools fight: after each group norm or activation the OpenMP workers spin on the cores
    NNPACK's workers need, and the other way round. The CIFAR-10 DDPM UNet on 2 threads with NNPACK layers took
    0.97-0.99x its oneDNN time (1.02-1.17x with its activations kept NCHW), although its 32x32 convolutions alone
    run 1.4x faster in NNPACK at batch 16; on one thread, where both pools are the calling thread, 0.93x at batch 1
    and 0.79-0.83x at batch 16 (bench/unet_forward.py). The upscaler's Compact path avoids the fight another way
    (models/compact_cpu.py)."""
    if device.type != "cpu" or torch.get_num_threads() != 1:
        return False
    return use_nnpack(model) > 0
