"""Upscaling with a super-resolution or restoration model: to its own scale, a factor, or an exact size.

    out = upscale(desc, image)                       # [B,C,H,W] -> [B,C,H*s,W*s]
    out = upscale(desc, image, factor=1.5)           # one x4 pass, then an antialiased downscale
    out = upscale(desc, image, width=3840)           # height from the aspect ratio; repeated passes as needed

Every model pass goes through the shared tiling engine with the model's receptive field as context (tiles of
"local" models equal the untiled result; "global" models run whole unless memory forces tiles) under the manager
(placement, fp16/bf16 on GPU where allowed with a float32 recompute on NaN/Inf). On the CPU in float32 the 3x3
convolutions run through NNPACK's Winograd kernels (models/cpu_conv.py, set up once at load by the spandrel
adapter) and tiles are sized to stay in cache; Compact models instead run a large image whole, in row strips that
exchange one halo row per layer (models/compact_cpu.py), so no tile context is recomputed: one call up to the CPU call
budget (budget.CPU_CALL_BYTES), tiles only beyond it. Threads: the process's setting (ComfyUI's or the CLI's); nothing
here changes it.
Alpha is split off and resized (or run through the model as a grey image); a greyscale model runs on each colour
channel of an RGB image; an RGB model runs on a grey image replicated to RGB and its output is turned back to grey.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .. import host
from ..budget import REQUEST_SHARE, call_budget, scaled_bpp
from ..compact_cpu import call_bytes_per_pixel
from ..descriptor import ModelDescriptor
from ..errors import InputError, MemoryBudgetError
from ..manager import ModelManager, get_manager, placement
from ..image import MAX_SIDE, match_channels, resize, split_alpha
from ..spandrel_arch import SpandrelFacts
from ..cpu_conv import nnpack_usable, nnpack_width_cost, nnpack_workspace_bytes
from ..tiling import even_tile, plan_tiles, tiled_apply

log = logging.getLogger(__name__)

MAX_PASSES = 4  # model passes one call may chain (x4 model: up to x256)
ALPHA_MODES = ("resize", "model")
# Input pixels per call on the CPU for a 64-feature local model (scaled by 64/features; not Compact, whose CPU path
# runs strips, see above): NNPACK's throughput per call falls beyond about 362^2 (353 GFLOP/s at 256^2, 197 at 512^2
# on one 64->64 layer, 2 threads: activations over glibc's 32 MiB threshold come as fresh pages; CPU_REUSE_PIXELS
# below) and its workspace grows with the call, while each tile pays its context (2*18+4 px per axis for an 18-layer
# network), so tiles of up to ~310^2 pixels, shaped by `tiling.plan_tiles` for the row widths NNPACK runs fastest
# (`cpu_conv.nnpack_width_cost`). A constant measured once (README, "Why the upscale figures moved"), not a function
# of the machine's load.
CPU_TILE_PIXELS = 96 * 1024
# Larger CPU calls, for images whose output outweighs the memory they add: the most input pixels whose 64-channel
# activations stay under glibc's 32 MiB mmap threshold, so that their memory is reused, not fresh pages every layer
# (README, "Why the upscale figures moved", 7 and 10). Compact x4 at 1024^2, interleaved medians: ten 237x544 tiles
# 5.40 s against eighteen 204x368 5.72 s (237x532: 5.51 against 5.82; 368x368, 34.7 MB activations: 6.43).
CPU_REUSE_PIXELS = 127 * 1024


@dataclass(frozen=True)
class TilePlan:
    tile: int | tuple[int, int]  # tile side, or (height, width), in input pixels (>= both sides: one call)
    context: int
    blend: int
    align: int
    max_batch: int


# ---------------------------------------------------------------- sizes


def target_size(
    height: int, width: int, scale: float, *, factor: float | None = None, out_width: int = 0, out_height: int = 0
) -> tuple[int, int]:
    """Output (H, W): the model's scale (nothing given), `factor`, or `out_width`/`out_height` (one of them 0 keeps
    the aspect ratio). Raises InputError naming the input for zero, negative or over-`MAX_SIDE` requests."""
    if out_width or out_height:
        if out_width < 0 or out_height < 0:
            raise InputError("width/height: expected sizes >= 0 (0 keeps the aspect ratio), "
                             f"got {out_width}x{out_height}")
        H = out_height or max(1, round(height * out_width / width))
        W = out_width or max(1, round(width * out_height / height))
        name = "width/height"
    else:
        f = float(scale if factor is None else factor)
        if not math.isfinite(f) or f <= 0:
            raise InputError(f"factor: expected a positive scale factor, got {factor!r}")
        H, W = max(1, round(height * f)), max(1, round(width * f))
        name = "factor"
    if max(H, W) > MAX_SIDE:
        raise InputError(f"{name}: the output would be {W}x{H}; the largest side allowed is {MAX_SIDE} pixels "
                         f"(input {width}x{height})")
    return H, W


def plan_passes(scale: int, height: int, width: int, out_h: int, out_w: int,
                shrink_first: bool = False) -> list[tuple[int, int]]:
    """Input size of each model pass. Passes repeat until the model's output reaches the target; before the last
    pass of a chain the intermediate is shrunk so that pass lands on the target instead of overshooting it.
    `shrink_first`: a single pass that would overshoot the target (a x4 model for x2) runs on the input shrunk so
    that it lands on the target (the memory guard's plan: less detail, a quarter of the intermediate or less)."""
    f = max(out_h / height, out_w / width)
    if shrink_first and scale > 1 and f < scale:
        return [(min(height, max(1, math.ceil(out_h / scale))), min(width, max(1, math.ceil(out_w / scale))))]
    n = 1 if scale <= 1 or f <= scale else math.ceil(math.log(f) / math.log(scale) - 1e-9)
    if n > MAX_PASSES:
        raise InputError(f"factor: {f:.3g}x needs {n} passes of this x{scale} model; at most {MAX_PASSES} are chained")
    sizes = [(height, width)]
    h, w = height, width
    for i in range(1, n):
        h, w = h * scale, w * scale
        if i == n - 1:  # shrink before the last pass (never grows: s^(n-1) >= f/s)
            h, w = min(h, max(1, math.ceil(out_h / scale))), min(w, max(1, math.ceil(out_w / scale)))
        sizes.append((h, w))
    return sizes


# ---------------------------------------------------------------- the public entry point


def upscale(
    desc: ModelDescriptor,
    image: torch.Tensor,  # [B,C,H,W] 0..1, C in 1..4 (2 and 4 carry alpha)
    *,
    factor: float | None = None,
    width: int = 0,
    height: int = 0,
    alpha: str = "resize",
    tile: int | None = None,
    manager: ModelManager | None = None,
) -> torch.Tensor:  # [B,C,H',W'] float32 on image.device, 0..1; an inference tensor, as in ComfyUI
    """Upscale (or restore) a batch of images with `desc`; see the module docstring."""
    _check_image(image)
    if alpha not in ALPHA_MODES:
        raise InputError(f"alpha: expected one of {ALPHA_MODES}, got {alpha!r}")
    if tile is not None and tile < 0:
        raise InputError(f"tile: expected 0 (automatic) or a tile side in pixels, got {tile}")
    manager = manager or get_manager()
    B, C, h, w = image.shape
    out_h, out_w = target_size(h, w, desc.scale, factor=factor, out_width=width, out_height=height)
    split = desc.in_channels != 4 and C in (2, 4)
    passes = memory_plan(desc, B, C, h, w, out_h, out_w, image.device, alpha_model=split and alpha == "model",
                         manager=manager)
    with torch.inference_mode():
        x = image.float()
        colour, a = split_alpha(x) if split else (x, None)
        out = _chain(desc, colour, passes, out_h, out_w, tile or None, manager)
        if a is not None:
            a = resize(a, out_h, out_w) if alpha == "resize" else _chain(desc, a, passes, out_h, out_w, tile or None,
                                                                         manager)
            out = torch.cat([out, a], dim=1)
        return out


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or not 1 <= image.shape[1] <= 4:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"image: expected a [B,C,H,W] tensor with 1-4 channels, got {got}")
    if image.numel() == 0:
        raise InputError(f"image: the batch is empty (shape {tuple(image.shape)})")
    if not torch.isfinite(image).all():
        raise InputError("image: the image has NaN or Inf pixels; fix the node that produced it")


def _chain(desc: ModelDescriptor, x: torch.Tensor, passes: list[tuple[int, int]], out_h: int, out_w: int,
           tile: int | None, manager: ModelManager) -> torch.Tensor:
    """The model passes (input size of each, from `plan_passes`), then the final resize to exactly (out_h, out_w)."""
    for ph, pw in passes:
        x = model_pass(desc, resize(x, ph, pw), tile=tile, manager=manager)
    return resize(x, out_h, out_w)


# ---------------------------------------------------------------- the memory guard


def request_bytes(desc: ModelDescriptor, batch: int, channels: int, passes: list[tuple[int, int]], out_h: int,
                  out_w: int, *, alpha_model: bool = False, activations: int = 0) -> int:
    """Peak bytes of new float32 tensors on the image's device for one request: each pass's input and output (the
    tiling engine's accumulator) beside `activations`, the final resize, the alpha channel and the IMAGE copy the
    node hands back."""
    s, f4 = int(desc.scale), 4 * batch
    colour = channels - 1 if channels in (2, 4) and desc.in_channels != 4 else channels
    final = f4 * colour * out_h * out_w
    peak = 0
    for ph, pw in passes:
        peak = max(peak, f4 * colour * ph * pw * (1 + s * s) + activations)
    lh, lw = passes[-1][0] * s, passes[-1][1] * s
    if (lh, lw) != (out_h, out_w):
        peak = max(peak, f4 * colour * lh * lw + final)
    whole = f4 * channels * out_h * out_w
    if alpha_model:  # the alpha chain runs beside the colour result
        peak = max(peak, final + request_bytes(desc, batch, 1, passes, out_h, out_w, activations=activations))
    if whole != final:
        peak = max(peak, final + whole)  # the concatenation
    return int(max(peak, 2 * whole))  # the result and the node's IMAGE copy


def memory_plan(desc: ModelDescriptor, batch: int, channels: int, height: int, width: int, out_h: int, out_w: int,
                device: torch.device, *, alpha_model: bool = False,
                manager: ModelManager | None = None) -> list[tuple[int, int]]:
    """The passes of `plan_passes` when the request fits the free memory of `device` (where images and
    intermediates live); else the plan that shrinks before a single overshooting pass when that fits; else
    MemoryBudgetError saying how much is needed and how much is free. Nothing is allocated here."""
    s = int(desc.scale)
    manager = manager or get_manager()
    free = host.free_bytes(device)
    best: list[tuple[int, int]] = []
    needs = []
    for shrink in (False, True):
        passes = plan_passes(s, height, width, out_h, out_w, shrink_first=shrink)
        if passes == best:
            continue
        act = _activation_bytes(desc, device, manager, batch * max(ph * pw for ph, pw in passes))
        need = request_bytes(desc, batch, channels, passes, out_h, out_w, alpha_model=alpha_model, activations=act)
        needs.append(need)
        if need <= free * REQUEST_SHARE:
            if shrink:
                log.warning("upscale: %dx%d -> %dx%d with a x%d model would need %.1f GiB (%.1f GiB free); shrinking "
                            "the input to %dx%d first (%.1f GiB)", width, height, out_w, out_h, s, needs[0] / 2**30,
                            free / 2**30, passes[0][1], passes[0][0], need / 2**30)
            return passes
        best = passes
    raise MemoryBudgetError(
        f"upscale: {batch} image(s) of {width}x{height} -> {out_w}x{out_h} with this x{s} "
        f"{desc.architecture} model need about {min(needs) / 2**30:.2f} GiB "
        f"({' / '.join(f'{n / 2**30:.2f}' for n in needs)} GiB by plan) but {free / 2**30:.2f} GiB is free "
        f"(at most {REQUEST_SHARE:.0%} of it is used); choose a smaller factor or size, fewer images, or free memory")


def _activation_bytes(desc: ModelDescriptor, device: torch.device, manager: ModelManager, pixels: int) -> int:
    """Activations of one model call beside the images when the model runs on `device` (0 when it runs elsewhere,
    e.g. on a GPU): what `tile_plan` allows (CPU tiles of local models; else up to the activation budget)."""
    if manager.compute_device.type != device.type:
        return 0
    cap = manager.activation_budget(desc)
    strips = _strip_bytes_per_pixel(desc, device, torch.float32)
    if strips:  # what tile_plan allows: one call within the CPU call budget
        return int(min(strips * pixels, call_budget(cap, device)))
    if device.type == "cpu" and desc.extra.scope == "local":
        tile_px = CPU_REUSE_PIXELS * 64 / max(1, desc.extra.features)  # the larger calls, where tile_plan takes them
        cap = min(cap, tile_px * scaled_bpp(desc.bytes_per_pixel))
    return int(min(scaled_bpp(desc.bytes_per_pixel) * pixels, cap))


def _strip_bytes_per_pixel(desc: ModelDescriptor, device: torch.device, dtype: torch.dtype) -> float | None:
    """Bytes per input pixel of one call of a model whose float32 CPU forward runs in strips (Compact's:
    models/compact_cpu.py), None for other models, devices and dtypes."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return call_bytes_per_pixel(desc.model)


# ---------------------------------------------------------------- one model pass


def model_pass(desc: ModelDescriptor, x: torch.Tensor, *, tile: int | None = None,
               manager: ModelManager | None = None) -> torch.Tensor:
    """One pass of the model on [B,C,H,W] (C = 1 or 3, or 4 for RGBA models), channels adapted both ways."""
    B, C, H, W = x.shape
    cin = desc.in_channels
    if C == cin:
        y = run_model(desc, x, tile=tile, manager=manager)
    elif cin == 4 and C == 3:  # an RGBA model on RGB: opaque alpha in, alpha out dropped
        y = run_model(desc, torch.cat([x, x.new_ones(B, 1, H, W)], 1), tile=tile, manager=manager)[:, :3]
    elif cin == 1 and C == 3:  # a greyscale model on colour: each channel on its own, as a batch
        y = run_model(desc, x.reshape(B * C, 1, H, W), tile=tile, manager=manager)
        y = y.reshape(B, C * y.shape[1], *y.shape[-2:])
    elif cin == 3 and C == 1:  # an RGB model on grey: replicate in, luma out
        y = run_model(desc, x.expand(-1, 3, -1, -1), tile=tile, manager=manager)
    else:
        raise InputError(f"image: a {desc.in_channels}-channel {desc.architecture} model cannot take "
                         f"{C}-channel images")
    if y.shape[1] != C:
        y = match_channels(y, C) if y.shape[1] in (1, 3) else y[:, :C]
    return y


def run_model(desc: ModelDescriptor, x: torch.Tensor, *, tile: int | None = None,
              manager: ModelManager | None = None, progress: str | None = "upscale") -> torch.Tensor:
    """The model on [B,cin,H,W] through the tiling engine, on the manager's device and dtype; float32 result."""
    manager = manager or get_manager()
    if not isinstance(desc.extra, SpandrelFacts) or desc.family != "upscale":
        raise InputError(f"upscale_model: {desc.architecture} ({desc.family} {desc.purpose}) is not a single-image "
                         "upscale or restoration model")
    call = _per_sample_fallback(desc.extra.spandrel)  # spandrel's call: size requirements, call_fn, clamp 0..1

    def work(model: torch.nn.Module) -> torch.Tensor:
        device, dtype = placement(model)
        plan = tile_plan(desc, x.shape[-2], x.shape[-1], x.shape[0], device, dtype, tile, manager)
        with torch.inference_mode():
            return tiled_apply(call, x, scale=int(desc.scale), out_channels=desc.out_channels, tile=plan.tile,
                               context=plan.context, blend=plan.blend, align=plan.align, max_batch=plan.max_batch,
                               device=device, dtype=dtype, progress=progress)

    need = desc.memory_estimate(min(x.shape[-2] * x.shape[-1], 1024 * 1024), dtype=torch.float32)
    return manager.run(desc, work, memory_required=need)


def _per_sample_fallback(call):
    """Batched tiles; a model whose call only takes one image at a time (e.g. FDnCNN's noise map) gets a loop."""

    def fn(t: torch.Tensor) -> torch.Tensor:  # [N,C,h,w] -> [N,C',h*s,w*s]
        if t.shape[0] == 1:
            return call(t)
        try:
            return call(t)
        except RuntimeError as e:
            if host.is_oom(e):
                raise
            return torch.cat([call(t[i : i + 1]) for i in range(t.shape[0])])

    return fn


def tile_plan(desc: ModelDescriptor, H: int, W: int, batch: int, device: torch.device, dtype: torch.dtype,
              tile: int | None, manager: ModelManager) -> TilePlan:
    """Tile side, context, blend and batch for one pass: one call when the image fits (always for "global" models
    when memory allows); else the fewest tiles of near-equal size whose context is the receptive field."""
    facts: SpandrelFacts = desc.extra
    align = facts.align
    context = int(desc.receptive_field or 0)
    exact = facts.exact
    blend = 4 if exact else max(16, context // 2)
    bpp = scaled_bpp(desc.bytes_per_pixel, dtype)  # activations only: NNPACK's workspace is nnpack_workspace_bytes
    budget = manager.activation_budget(desc)
    strips = _strip_bytes_per_pixel(desc, device, dtype)
    if tile:
        max_pixels = float(tile * tile)
    elif strips:  # Compact's CPU path runs any call in strips: one call as large as the memory policy allows
        max_pixels = max(call_budget(budget, device) / strips, 1.0)
    else:
        max_pixels = max(budget / bpp, 1.0)
        if device.type == "cpu" and facts.scope == "local":
            max_pixels = min(max_pixels, CPU_TILE_PIXELS * 64 / max(1, facts.features))
    if H * W <= max_pixels and (tile is None or max(H, W) <= tile):
        per_call = bpp * H * W
        n = 1 if device.type == "cpu" else max(1, min(batch, int(budget // max(per_call, 1.0))))
        return TilePlan(max(H, W), 0, 0, 1, n)
    overlap = 2 * context + blend
    side = tile or int(math.sqrt(max_pixels))
    side = max(side // align * align, 2 * overlap + align)
    t: int | tuple[int, int] = even_tile((H, W), side, overlap, align)  # an axis that fits: one tile
    n = 1 if device.type == "cpu" else max(1, int(budget // max(bpp * t * t, 1.0)))
    if device.type == "cpu" and facts.scope == "local" and not tile and not strips and nnpack_usable():
        # shaped for the rows NNPACK runs fastest, no larger calls than those squares (the same memory): at 512^2
        # four 276x276; where the output is more than twice what larger calls (CPU_REUSE_PIXELS) would add to the
        # tiles' activations and NNPACK's workspace, those: at 1024^2 ten 237x544 instead of eighteen 204x368
        cap = float(t * t)
        large = min(max_pixels * CPU_REUSE_PIXELS / CPU_TILE_PIXELS, CPU_REUSE_PIXELS * 64 / max(1, facts.features))
        added = (large - cap) * (bpp + nnpack_workspace_bytes(facts.features, facts.features, 1))
        if large > cap and 2 * added <= batch * desc.out_channels * H * W * desc.scale ** 2 * 4:
            cap = large
        t = plan_tiles(H, W, cap, overlap, align, nnpack_width_cost)
    if desc.tiling in ("discouraged", "internal") or not exact:
        log.info("%s: tiling a %s model (%s px tiles, context %d, blend %d); it may show faint seams",
                 desc.architecture, facts.scope, t, context, blend)
    return TilePlan(t, context, blend, align, n)
