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

Images larger than WHOLE_PIXELS run in row strips (`strip_rows`), layer by layer: each strip is its own NNPACK call
with one halo row above and below, refreshed from its neighbours before every convolution, so the result is the
whole image's (no tile context recomputed, unlike tiles: a 3x3 layer needs one row of its neighbour, a tile needs the
network's whole receptive field, 18 px a side). The image's activation is held whole (4 bytes per pixel and
feature, `call_bytes_per_pixel`), one strip at a time is in flight, and NNPACK's calls (and its kept workspace) stay
strip-sized. Compact x4, interleaved against the four 276x276 tiles of the tiled path at 512^2: 0.80-0.85 of its time
(README, "Why the upscale figures moved", 11), 0.80-0.81 at 1024^2 against ten 237x544 tiles.

`use_compact_path(model)` gives a Compact module this forward for single float32 CPU images without gradients (a
subclass of its class with the same name, parameters and hooks; anything else runs spandrel's forward). The spandrel
adapter calls it once, at load (models/upscale/spandrel_arch.py).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import host
from .cpu_conv import conv3x3, nnpack_usable
from .progress import Progress, no_bar_open

GRAIN = 32768  # at::internal::GRAIN_SIZE: element-wise operators on fewer elements run on the calling thread
# Strips, at 64 features (scaled by 64 / features: the same bytes). Up to WHOLE_PIXELS an image is one call per
# layer (256^2 in two or three strips took 1.12-1.21x the whole call's time). Above, strips of about STRIP_PIXELS,
# whose in and out activations (about 8 MiB each) stay near the last-level cache (budget.CPU_CACHE_BYTES), of at
# least about STRIP_MIN_ROWS rows, equal heights. Measured, Compact x4, 2 threads, interleaved: at 512^2, 64-row
# strips 1.11-1.18 s, 128-row 1.04-1.12 s, tiles 1.34-1.44 s, and the process grew 157-190 MB with 64-row strips
# against 192-275 MB with 128-row ones (their larger NNPACK workspace, and glibc keeping more of their freed
# blocks); at 1024^2, 32-row strips took 0.92 of the tiles' time, 64-row 0.80-0.81, 86-120-row 0.77-0.80 (short
# strips: two halo rows each, and NNPACK's 6-row output tiles overhang). Strips of unequal heights cost more than
# their pixels: 512^2 in 68-row strips (the last one 36) took 1.39 s, 544x512 in the same eight strips 1.31 s.
WHOLE_PIXELS = 96 * 1024
STRIP_PIXELS = 32 * 1024
STRIP_MIN_ROWS = 64
# A strip's activation stays under glibc's 32 MiB mmap threshold (at 64 features): freed blocks are reused, not fresh
# pages every layer (README, "Why the upscale figures moved", 7).
STRIP_MAX_PIXELS = 127 * 1024


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


def strip_rows(height: int, width: int, features: int) -> int:
    """Rows per strip for an image of height x width at `features` (`height`: one call per layer)."""
    f = 64 / max(1, features)
    if height * width <= WHOLE_PIXELS * f:
        return height
    rows = math.ceil(height / math.ceil(height * width / (STRIP_PIXELS * f)))
    if rows < STRIP_MIN_ROWS:  # fewer, taller strips, within the reuse threshold
        rows = max(1, min(STRIP_MIN_ROWS, int(STRIP_MAX_PIXELS * f // width)))
    if rows >= height:
        return height
    n = max(2, round(height / rows))  # equal heights, near the target
    if math.ceil(height / n) * width > STRIP_MAX_PIXELS * f:
        n = math.ceil(height / rows)
    return math.ceil(height / n)


def call_bytes_per_pixel(model: torch.nn.Module) -> float | None:
    """Bytes per input pixel one float32 CPU call holds (the whole image's activation and the call's output),
    for a module with this path; None for others."""
    if not getattr(type(model), "_atelier_cpu_path", False):
        return None
    c, s = int(model.num_out_ch), int(model.upscale)
    return 4.0 * (model.body[0].out_channels + c * s * s)


def cpu_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:  # [1,Cin,H,W] -> [1,Cout,H*s,W*s]
    """SRVGGNetCompact's forward with NNPACK convolutions and calling-thread PReLUs (float32 CPU, no grad), in row
    strips for large images."""
    rows = strip_rows(x.shape[2], x.shape[3], model.body[0].out_channels)
    if rows < x.shape[2]:
        return _strip_forward(model, x, rows)
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
    y = torch.empty(N, H * s, W * s, c, dtype=out.dtype)
    _add_and_shuffle(out, x, y, s)
    return y.permute(0, 3, 1, 2)  # [1,Cout,H*s,W*s]


def _add_and_shuffle(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: int) -> None:
    """out [1,c*s*s,h,W] (overwritten) + x [1,c,h,W] nearest-upsampled, pixel-shuffled into y [1,h*s,W*s,c]."""
    N, c, h, W = x.shape
    out.unflatten(1, (c, -1)).add_(x.unsqueeze(2))  # [1,c,s*s,h,W]
    # the pixel shuffle, written channels last: the [1,H*s,W*s,Cout] IMAGE a node makes of it is a view, not a copy
    y.view(N, h, s, W, s, c).copy_(out.unflatten(1, (c, s, s)).permute(0, 4, 2, 5, 3, 1))


def _strip_forward(model: torch.nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """cpu_forward in strips of `rows` image rows. Strip i holds image rows i*rows-1 .. i*rows+rows (one halo row
    each side; zeros beyond the image, so every strip is the same size and glibc reuses each freed block for the
    next); its convolution's halo rows are wrong (NNPACK pads them with zeros) and are refreshed from the
    neighbours' core rows before the next convolution."""
    N, c, H, W = x.shape
    s = int(model.upscale)
    n = math.ceil(H / rows)
    last = H - (n - 1) * rows  # core rows of the last strip
    strips = []
    for i in range(n):
        t = x.new_zeros(N, c, rows + 2, W)
        lo, hi = max(0, i * rows - 1), min(H, i * rows + rows + 1)
        t[:, :, lo - (i * rows - 1) : hi - (i * rows - 1)] = x[:, :, lo:hi]
        strips.append(t)

    def refresh() -> None:  # halos from the neighbours' core rows; the image's outside back to zero
        for i, t in enumerate(strips):
            if i > 0:
                t[:, :, 0].copy_(strips[i - 1][:, :, rows])
            if i + 1 < n:
                t[:, :, rows + 1].copy_(strips[i + 1][:, :, 1])
        strips[0][:, :, 0].zero_()
        strips[-1][:, :, last + 1 :].zero_()

    convs = sum(isinstance(layer, torch.nn.Conv2d) for layer in model.body)
    # one call may now take seconds: a bar per layer, unless a caller's bar (the tiles') is showing
    with Progress(convs, "upscale", enabled=no_bar_open()) as bar:
        for k, layer in enumerate(model.body):
            if isinstance(layer, torch.nn.Conv2d):
                if k:
                    refresh()
                for i in range(n):
                    host.throw_if_interrupted()  # Cancel within one strip (the module hooks are not called here)
                    strips[i] = conv3x3(strips[i], layer.weight, layer.bias, layer.padding)  # frees the input block
                bar.update()
            else:
                slopes = layer.weight.tolist()
                for t in strips:
                    prelu_(t, slopes)
    y = torch.empty(N, H * s, W * s, c, dtype=x.dtype)
    for i, t in enumerate(strips):
        a, b = i * rows, min(H, i * rows + rows)
        _add_and_shuffle(t[:, :, 1 : 1 + b - a], x[:, :, a:b], y[:, a * s : b * s], s)
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
