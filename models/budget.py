"""The one memory and dtype policy: what a pass needs, what budget it has, what tile or chunk fits.

Every family asks here; none keeps its own defaults. The figures are activation bytes per pixel at float32 for one
sample (`ModelDescriptor.bytes_per_pixel`, calibrated per architecture, or `FALLBACK_BYTES_PER_PIXEL`), scaled by the
dtype's item size.

Budgets: on a GPU, a share of the memory free on the device (inside ComfyUI: its own `get_free_memory`, so what
ComfyUI keeps for other models counts); on the CPU, a share of the RAM available, and one call never plans more than
`CPU_CALL_BYTES` of activations (bigger CPU calls are no faster, only bigger: they leave the caches and touch fresh
pages; measured on the VAE decoders and StyleGAN synthesis).

`desc` arguments are ModelDescriptors (typed Any: descriptor.py asks this module, not the other way round).
"""
from __future__ import annotations

import ctypes
import functools
import math
import sys
import weakref
from typing import Any

import torch

from . import host
from .errors import MemoryBudgetError

# Activation bytes per pixel of one sample at float32 when an architecture states none: 64 channels, 4 live maps.
FALLBACK_BYTES_PER_PIXEL = 64 * 4 * 4.0
CPU_CALL_BYTES = 512 << 20  # activation bytes one call plans for on the CPU
SMALL_CALL_BYTES = 256 << 20  # below this a call runs without asking the device for its free memory
# A working set that stays near the CPU's last-level cache: large CPU intermediates cost more than their arithmetic
# (fresh pages for every big temporary, caches missed). Measured on a 64px StyleGAN3-T at batch 32: one chunk of
# 32 took 2.4x as long as chunks whose largest activation is about this size.
CPU_CACHE_BYTES = 16 << 20
SHARE = {"cpu": 0.5}  # share of the free memory activations may take, per device type (others: GPU_SHARE)
GPU_SHARE = 0.8
REQUEST_SHARE = 0.85  # of the free memory one request's images and intermediates may plan to take (upscale planner)
MIN_BUDGET = 64 << 20
TRIVIAL_BYTES = 256 << 10  # a request this small is never refused (no free-memory query for it)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype."""
    return dtype.itemsize


def scaled_bpp(bpp: float | None, dtype: torch.dtype = torch.float32) -> float:
    """Activation bytes per pixel at `dtype` from a float32 figure (None: the fallback)."""
    return (FALLBACK_BYTES_PER_PIXEL if bpp is None else float(bpp)) * itemsize(dtype) / 4


# ---------------------------------------------------------------- where a module lives

# module -> (sub-module, parameter name) of its first floating parameter: a lookup instead of a walk per call.
# The parameter is read back from its owner each time, so moves, casts and swapped parameters are seen.
_PROBES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.nn.Module, str]]" = weakref.WeakKeyDictionary()


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, floating dtype) of a module's weights: move inputs there before calling it."""
    probe = _PROBES.get(model)
    if probe is not None:
        p = probe[0]._parameters.get(probe[1])
        if p is not None and p.is_floating_point():
            return p.device, p.dtype
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.is_floating_point():
                _PROBES[model] = (mod, name)
                return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def dtype_for(desc: Any, device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 or fp16 on GPU where the architecture supports it (fp16 on MPS)."""
    if device.type == "cuda":
        if desc.supports_bfloat16 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if desc.supports_half:
            return torch.float16
    elif device.type == "mps" and desc.supports_half:
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------- budgets


def activation_budget(desc: Any, device: torch.device, cap_bytes: int | None = None) -> int:
    """Bytes free for activations on `device` after the weights (`cap_bytes`: a budget for weights plus
    activations set by the caller, e.g. the manager's)."""
    budget = int(host.free_bytes(device) * SHARE.get(device.type, GPU_SHARE))
    if cap_bytes is not None:
        budget = min(budget, max(0, cap_bytes - desc.weight_bytes))
    return max(budget, MIN_BUDGET)


def call_budget(budget: int, device: torch.device) -> int:
    """What one call plans for out of an activation budget: capped on the CPU at CPU_CALL_BYTES."""
    return min(budget, CPU_CALL_BYTES) if device.type == "cpu" else budget


def pass_bytes(desc: Any, pixels: int, batch: int = 1, dtype: torch.dtype = torch.float32,
               bpp: float | None = None) -> int:
    """Activation bytes of one pass over `batch` samples of `pixels` pixels (`bpp` overrides the descriptor's)."""
    return int(scaled_bpp(bpp if bpp is not None else desc.bytes_per_pixel, dtype) * pixels * batch)


def memory_estimate(desc: Any, pixels: int = 512 * 512, dtype: torch.dtype = torch.float32,
                    batch: int = 1) -> int:
    """Bytes to run on `pixels` input pixels: weights plus activations (a rough upper bound)."""
    return int(desc.weight_bytes + pass_bytes(desc, pixels, batch, dtype))


def fit_batch(per_item_bytes: float, batch: int, budget: int, max_chunk: int | None = None) -> int:
    """Items per call so a call's activations stay within `budget` (at least 1, at most `max_chunk`)."""
    n = max(1, min(batch, int(budget // max(per_item_bytes, 1.0))))
    return min(n, max_chunk) if max_chunk else n


def fit_side(H: int, W: int, bytes_per_pixel: float | None, budget_bytes: int | None, align: int = 1,
             dtype: torch.dtype = torch.float32) -> int:
    """The largest tile side whose activations fit the budget (the whole image when it fits; 512 when nothing is
    known and the image is over a megapixel)."""
    if bytes_per_pixel is None or budget_bytes is None:
        return max(H, W) if H * W <= 1024 * 1024 else 512
    side = int(math.sqrt(max(budget_bytes / max(1e-9, scaled_bpp(bytes_per_pixel, dtype)), 1)))
    return max(H, W) if side >= max(H, W) else max(align, side // align * align)


def require(need_bytes: int, what: str, device: torch.device, available: int | None = None) -> None:
    """Refuse a request that cannot fit before anything is allocated: MemoryBudgetError naming the request,
    what it needs and what there is. Requests under TRIVIAL_BYTES pass without reading the free memory (a /proc or
    driver query per call would cost more than a small model's whole pass)."""
    if available is None and need_bytes <= TRIVIAL_BYTES:
        return
    have = host.free_bytes(device) if available is None else int(available)
    if need_bytes > have:
        raise MemoryBudgetError(
            f"{what}: needs about {_gib(need_bytes)} of {'RAM' if device.type == 'cpu' else str(device) + ' memory'}"
            f" but {_gib(have)} is free; ask for less (a smaller size or batch) or free memory first")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def tensor_bytes(*shape: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a dense tensor of `shape` and `dtype` (for `require` estimates of results sized by the user)."""
    return math.prod(int(s) for s in shape) * itemsize(dtype)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, Windows, musl: their allocators return memory themselves)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_cpu_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim(0)`; a no-op elsewhere); it changes no
    allocator setting. The manager calls it once a released model is collected (a 307 MB ESRGAN left RSS 312 MB up
    until it). Not the tiling engine: freed CPU tensors under glibc's mmap threshold (up to 32 MB) stay resident in
    the heap for the next call to reuse, and trimming them costs that call the page faults. Measured with Compact x4
    at 512^2 (four 276^2 tiles): a trim between tiles cost 3-5 % of the time (each takes 3-8 ms, and the next tile
    faults the pages in again) without steadying the peak (175-226 MB above the loaded process against 199-251);
    one trim after each pass still cost repeated runs 2.9 % (1.388 against 1.349 s), for ~95 MB handed back between
    runs."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
