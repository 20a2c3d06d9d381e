"""Faster 3x3 convolutions on the CPU, in float32, with the NNPACK kernels that ship inside PyTorch.

PyTorch's CPU convolution (oneDNN, direct or im2col) does 9 multiply-adds per weight and pixel. NNPACK's Winograd
F(6x6, 3x3) kernels do about a quarter of that, with results equal to float rounding (about 1e-6 relative; measured
on the Compact x4 model: 0.008/255 at most on a whole image). PyTorch only picks NNPACK itself on mobile builds, so
`fast_cpu_convs(model)` routes the eligible layers of a model to it for the duration of a block: Conv2d, 3x3, stride
1, dilation 1, one group, zero padding, float32 on the CPU. Everything else runs as before.

NNPACK is a private PyTorch operator (`torch._nnpack_spatial_convolution`): it is used only after a self-check
against `F.conv2d` succeeds once per process, and any failure falls back to the ordinary convolution.
"""
from __future__ import annotations

import functools
import logging
import types
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BAND_PIXELS = 8192  # pixels per NNPACK call (see _banded): workspace ~9 MB at 64 channels, cache-resident
MIN_BAND_ROWS = 16  # rows per band at least (very wide images)


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


def _eligible(m: torch.nn.Module) -> bool:
    return (
        type(m) is torch.nn.Conv2d
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and isinstance(m.padding, tuple)
        and m.weight.dtype == torch.float32
        and m.weight.device.type == "cpu"
    )


def _nnpack_forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:  # [N,Cin,H,W] -> [N,Cout,H',W']
    if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
        return self._conv_forward(x, self.weight, self.bias)
    try:
        if self.padding == (1, 1):
            return _banded(x, self.weight, self.bias)
        return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, list(self.padding))
    except RuntimeError:
        return self._conv_forward(x, self.weight, self.bias)


def _banded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A same-size 3x3 convolution in bands of rows (each with its one-row halo), one NNPACK call per band.

    NNPACK transforms the whole input and output of a call at once: about 1.1 KB of workspace per pixel for 64
    channels, and slower once that leaves the caches. Bands of BAND_PIXELS keep it small and cached; the result
    is the same convolution (rows near a band edge read the neighbouring band's rows, not zeros)."""
    op = torch._nnpack_spatial_convolution
    N, _, H, W = x.shape
    rows = max(MIN_BAND_ROWS, BAND_PIXELS // max(W, 1))
    if N == 1 and H <= rows + rows // 2:
        return op(x.contiguous(), weight, bias, [1, 1])
    out = x.new_empty(N, weight.shape[0], H, W)  # [N,Cout,H,W]
    for n in range(N):
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            a, b = max(0, r0 - 1), min(H, r1 + 1)
            if a == r0 or b == r1:  # an image edge: zero-pad vertically too, drop the row padded at the inner side
                y = op(x[n : n + 1, :, a:b].contiguous(), weight, bias, [1, 1])  # rows a..b-1
                out[n : n + 1, :, r0:r1] = y[:, :, r0 - a : r1 - a]
            else:  # inside: the halo rows are real, pad only the sides
                out[n : n + 1, :, r0:r1] = op(x[n : n + 1, :, a:b].contiguous(), weight, bias, [0, 1])
    return out


@contextmanager
def fast_cpu_convs(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Route the model's eligible 3x3 convolutions to NNPACK inside the block; yields how many were routed."""
    patched: list[torch.nn.Module] = []
    if enabled and nnpack_usable():
        for m in model.modules():
            if _eligible(m) and "forward" not in m.__dict__:
                m.forward = types.MethodType(_nnpack_forward, m)
                patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
