"""CPU execution helpers: faster 3x3 convolutions (NNPACK, float32) and no oversubscription of a busy CPU.

PyTorch's CPU convolution (oneDNN, direct or im2col) does 9 multiply-adds per weight and pixel. NNPACK's Winograd
F(6x6, 3x3) kernels do about a quarter of that, with results equal to float rounding (about 1e-6 relative; measured
on the Compact x4 model: 0.008/255 at most on a whole image). PyTorch only picks NNPACK itself on mobile builds, so
`fast_cpu_convs(model)` routes the eligible layers of a model to it for the duration of a block: Conv2d, 3x3, stride
1, dilation 1, one group, zero padding, float32 on the CPU, calls up to MAX_PIXELS. Everything else runs as before.

NNPACK is a private PyTorch operator (`torch._nnpack_spatial_convolution`): it is used only after a self-check
against `F.conv2d` succeeds once per process, and any failure falls back to the ordinary convolution.

`cpu_threads()` runs a block with fewer intra-op threads when other processes already keep the CPUs busy (the idea
of OpenMP's OMP_DYNAMIC): with more runnable threads than cores, every parallel region waits for a descheduled
partner. Measured on 2 shared cores with 4-6 other runnable threads, Compact x4 on 256x256: 1.21 s with one
thread, 1.75 s with two. On an idle machine nothing changes.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import types
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# NNPACK transforms a call's whole input and output at once: a workspace of about 18 bytes per pixel and channel
# (1.1 KB per pixel at 64 channels). Larger calls use the ordinary convolution. (Splitting a call into bands of rows
# bounds the workspace but, on a busy machine, each extra switch between OpenMP ops and NNPACK's thread pool costs
# a scheduler slice: measured 5x slower under load. The tiling engine keeps calls small instead.)
MAX_PIXELS = 512 * 512


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
    if (x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled()
            or x.shape[0] * x.shape[-2] * x.shape[-1] > MAX_PIXELS):
        return self._conv_forward(x, self.weight, self.bias)
    try:
        return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, list(self.padding))
    except RuntimeError:
        return self._conv_forward(x, self.weight, self.bias)


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


def _runnable_elsewhere() -> int | None:
    """Threads of other processes ready to run right now (Linux /proc/loadavg), least of three samples."""
    samples = []
    for i in range(3):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        samples.append(running - 1)  # this thread is one of them
        if i < 2:
            time.sleep(0.005)
    return max(0, min(samples))


@contextmanager
def cpu_threads(enabled: bool = True) -> Iterator[int]:
    """Use only the cores other processes leave free (at least one) inside the block; yields the thread count."""
    n = torch.get_num_threads()
    if not enabled or n <= 1:
        yield n
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or n
    busy = _runnable_elsewhere()
    want = n if busy is None else max(1, min(n, cores - busy))
    if want == n:
        yield n
        return
    log.debug("CPU busy (%d runnable elsewhere on %d cores): %d intra-op thread(s) instead of %d", busy, cores, want, n)
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(n)
