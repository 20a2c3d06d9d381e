"""Exact tiled encoding and decoding for KL autoencoders (the modules of models/vae/kl.py, used by their names):
every GroupNorm sees the whole image, convolutions run in bands.

A KL autoencoder normalises with GroupNorm (statistics over the whole image) and attends over all latent positions in
its middle block, so independent tiles change the result: core ComfyUI's tiled decode shows it as seams and colour
shifts that averaging three tilings only softens, and statistics estimated from a downscaled pass stay visibly off
on decoders that amplify them (measured on random-weight decoders: 30-40/255 at worst). Here the network runs
layer-synchronously instead:

- the middle block (attention included) runs on the whole latent: it is at latent resolution, 1/64 of the pixels;
- every step between two GroupNorms (one or two 3x3 convolutions, an up- or downsampling) runs band by band over
  full-width strips with the rows of context it needs, writing into a whole-image map kept on the storage device;
- each GroupNorm's statistics are summed over that whole map before the next step normalises with them.

So the result equals the untiled one at about the untiled cost, while the compute device holds one band at a time.
What stays whole is at most two maps of one level (`storage_bytes`), kept in float16 (redone in float32 when a value
would overflow it): the rounding costs 0.06/255 on average and 0.7/255 at most on a full-size SD decoder, and the
maps take about a sixth of the untiled peak, in system memory (on a GPU only the bands go to the device).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import host
from ..budget import fit_side
from ..progress import Progress
from ..tiling import tiled_apply
from .facts import Work

log = logging.getLogger(__name__)

FP16_LIMIT = 60000.0  # float16 tops out at 65504
BandFn = Callable[[torch.Tensor], torch.Tensor]


class _Runner:
    """Where bands are computed (device, dtype), where whole maps are kept (store), how big a band may be."""

    def __init__(self, device: torch.device, dtype: torch.dtype, store: torch.device, band_bytes: int,
                 progress: Progress | None, store_dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype, self.store, self.store_dtype = device, dtype, store, store_dtype
        self.band_bytes = max(int(band_bytes), 1 << 20)
        self.progress = progress

    def rows(self, x: torch.Tensor, out_channels: int, scale: float = 1) -> int:
        """Band height (input rows) whose working set fits `band_bytes`; at least 2. Measured on a resnet band: the
        input twice (a float32 copy, its normalised copy) and about six outputs' worth (convolutions, shortcut, sum,
        the band held back one step, the overflow check), float32."""
        width = x.shape[-1]
        per_row = width * 4 * (2 * x.shape[1] + 6 * out_channels * scale * scale)
        return max(2, int(self.band_bytes // max(per_row, 1.0)))

    def band(self, fn: BandFn, src: torch.Tensor, a: int, b: int, margin: int, scale: int = 1,
             pad_bottom: int = 0) -> torch.Tensor:
        """fn on rows [a-margin, b+margin) of src (clipped at the image), cropped to the output rows of [a, b)."""
        host.throw_if_interrupted()  # bands of a whole level can take a while: Cancel stops between them
        lo, hi = max(0, a - margin), min(src.shape[-2], b + margin + pad_bottom)
        out = fn(src[:, :, lo:hi].to(self.device, self.dtype))
        if scale >= 1:
            return out[:, :, (a - lo) * scale : (b - lo) * scale]
        k = round(1 / scale)
        return out[:, :, (a - lo) // k : (b - lo) // k]

    def empty(self, *shape: int) -> torch.Tensor:
        """A whole-image map on the storage device, in the storage dtype."""
        return torch.empty(*shape, device=self.store, dtype=self.store_dtype)

    def put(self, dst: torch.Tensor, a: int, b: int, value: torch.Tensor, add: bool = False) -> None:
        """dst[:, :, a:b] = value (or += value); a float16 map raises _Overflow rather than store an Inf."""
        if add:
            value = dst[:, :, a:b].to(value.device, torch.float32) + value
        if dst.dtype == torch.float16 and value.abs().amax().item() > FP16_LIMIT:
            raise _Overflow
        dst[:, :, a:b] = value.to(dst.device, dst.dtype)

    def tick(self) -> None:
        if self.progress is not None:
            self.progress.update()


class _Overflow(Exception):
    """A value too large for a float16 map: the pass is redone with float32 maps."""


def _bands(length: int, rows: int, align: int = 1) -> list[tuple[int, int]]:
    rows = max(align, rows // align * align)
    return [(a, min(length, a + rows)) for a in range(0, length, rows)]


def _stats(run: _Runner, gn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and variance ([1,G] each) of a whole map, summed in float64 band by band."""
    g, c = gn.num_groups, x.shape[1]
    n = 0
    mean = torch.zeros(c, dtype=torch.float64)
    m2 = torch.zeros(c, dtype=torch.float64)  # sum of squared deviations, per channel
    for a, b in _bands(x.shape[-2], max(1, run.rows(x, 0) // 3)):  # a float32 copy and the kernel's temporaries
        band = x[0, :, a:b].to(run.device, torch.float32)
        var_b, mean_b = torch.var_mean(band, dim=(1, 2), correction=0)  # [C] each, numerically stable
        del band
        k = (b - a) * x.shape[-1]
        mean_b, var_b = mean_b.double().cpu(), var_b.double().cpu()
        delta = mean_b - mean
        total = n + k
        mean += delta * (k / total)  # Chan et al.'s pairwise update
        m2 += var_b * k + delta * delta * (n * k / total)
        n = total
    var_c = m2 / n
    mean_g = mean.view(g, -1).mean(1)  # channels of a group have equal counts
    var_g = (var_c.view(g, -1) + (mean.view(g, -1) - mean_g[:, None]) ** 2).mean(1)
    return mean_g[None].float(), var_g[None].float()


@contextmanager
def _fixed(gn: nn.Module, stats: tuple[torch.Tensor, torch.Tensor]) -> Iterator[None]:
    gn.fixed_stats = stats
    try:
        yield
    finally:
        gn.fixed_stats = None


def _norm_act(gn: nn.Module) -> BandFn:
    return lambda t: F.silu(gn(t), inplace=True)


def _mid(mid: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The middle block on the whole latent [1,C,h,w] (its attention uses the memory-efficient kernel)."""
    return mid(x)


def _resblock(run: _Runner, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`blk(x)` on a whole map [1,Cin,H,W] (store) -> [1,Cout,H,W] (store); x is reused or released."""
    c_out = blk.conv1.out_channels
    H, W = x.shape[-2:]
    bands = _bands(H, run.rows(x, c_out))
    with _fixed(blk.norm1, _stats(run, blk.norm1, x)):
        h = run.empty(1, c_out, H, W)
        act1 = _norm_act(blk.norm1)
        for a, b in bands:
            run.put(h, a, b, run.band(lambda t: blk.conv1(act1(t)), x, a, b, 1))
    with _fixed(blk.norm2, _stats(run, blk.norm2, h)):
        act2 = _norm_act(blk.norm2)
        branch = lambda t: blk.conv2(act2(t))  # noqa: E731
        if isinstance(blk.nin_shortcut, nn.Identity):
            for a, b in bands:  # residual added in place: band k reads h, and only rows [a,b) of x
                run.put(x, a, b, run.band(branch, h, a, b, 1), add=True)
            run.tick()
            return x
        pending: tuple[int, int, torch.Tensor] | None = None
        for a, b in bands:  # written into h one band late: the next band still reads this band's last row of h
            y = run.band(branch, h, a, b, 1) + blk.nin_shortcut(x[:, :, a:b].to(run.device, run.dtype))
            if pending is not None:
                run.put(h, *pending)
            pending = (a, b, y)
        if pending is not None:
            run.put(h, *pending)
    run.tick()
    return h


def _upsample(run: _Runner, up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x then a 3x3 convolution, band by band: [1,C,H,W] -> [1,C,2H,2W]."""
    C, H, W = x.shape[1:]
    out = run.empty(1, C, 2 * H, 2 * W)
    fn = lambda t: up.conv(F.interpolate(t, scale_factor=2.0, mode="nearest"))  # noqa: E731
    for a, b in _bands(H, run.rows(x, C, 2)):
        run.put(out, 2 * a, 2 * b, run.band(fn, x, a, b, 1, scale=2))
    return out


def _downsample(run: _Runner, down: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Zero-pad right/bottom by one, 3x3 convolution with stride 2, band by band: [1,C,H,W] -> [1,C,H/2,W/2]."""
    C, H, W = x.shape[1:]
    out = run.empty(1, C, H // 2, W // 2)

    def fn(t: torch.Tensor, bottom: bool) -> torch.Tensor:
        return down.conv(F.pad(t, (0, 1, 0, 1 if bottom else 0)))

    for a, b in _bands(H, run.rows(x, C, 0.5), align=2):  # input rows; output rows a/2 .. b/2
        bottom = b >= H
        res = run.band(lambda t: fn(t, bottom), x, a, b, 0, scale=0.5, pad_bottom=0 if bottom else 1)
        run.put(out, a // 2, b // 2, res)
    return out


def _plain(run: _Runner, fn: BandFn, x: torch.Tensor, out_channels: int, margin: int) -> torch.Tensor:
    """A convolution stack without GroupNorm ([1,C,H,W] -> [1,C',H,W]) band by band."""
    H, W = x.shape[-2:]
    out = torch.empty(1, out_channels, H, W, device=run.store, dtype=torch.float32)
    for a, b in _bands(H, run.rows(x, out_channels)):
        out[:, :, a:b] = run.band(fn, x, a, b, margin)
    return out


def _with_fallback(fn: Callable[[torch.dtype], torch.Tensor | tuple], what: str) -> torch.Tensor | tuple:
    """fn(float16 maps); redone with float32 maps if a value overflows float16."""
    try:
        return fn(torch.float16)
    except _Overflow:
        log.info("%s: activations exceed float16; keeping whole-image maps in float32 instead", what)
        return fn(torch.float32)


@torch.no_grad()
def decode(model: nn.Module, z: torch.Tensor, *, device: torch.device, dtype: torch.dtype,
           band_bytes: int, progress: str | None = "decode") -> torch.Tensor:
    """Latent [B,c,h,w] -> image [B,C,h*f,w*f] in [0,1], float32 on z's device: `model.decode(z)` up to the float16
    rounding of the stored maps (measured on a full-size SD decoder: 0.06/255 mean, 0.7/255 at most)."""
    D = model.decoder
    steps = sum(len(level.block) + 1 for level in D.up) + 1

    def one(zi: torch.Tensor, store_dtype: torch.dtype, bar: Progress) -> torch.Tensor:
        run = _Runner(device, dtype, z.device, band_bytes, bar, store_dtype)
        h = zi.to(device, dtype)
        if model.post_quant_conv is not None:
            h = model.post_quant_conv(h)
        mid = _mid(D.mid, D.conv_in(h))  # [1,Cm,h,w]: attention over the whole latent
        x = run.empty(*mid.shape)
        run.put(x, 0, x.shape[-2], mid)
        del h, mid
        for level in reversed(D.up):
            for blk in level.block:
                x = _resblock(run, blk, x)
            up = getattr(level, "upsample", None)
            if up is not None:
                x = _upsample(run, up, x)
            run.tick()
        with _fixed(D.norm_out, _stats(run, D.norm_out, x)):
            act = _norm_act(D.norm_out)
            y = _plain(run, lambda t: D.conv_out(act(t)), x, D.conv_out.out_channels, 1)
        run.tick()
        return y.add_(1).div_(2).clamp_(0, 1)

    outs = []
    with Progress(steps * z.shape[0], progress or "", enabled=progress is not None) as bar:
        for i in range(z.shape[0]):
            outs.append(_with_fallback(lambda sd: one(z[i : i + 1], sd, bar), "KL decode"))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


@torch.no_grad()
def moments(model: nn.Module, x: torch.Tensor, *, device: torch.device, dtype: torch.dtype,
            band_bytes: int, progress: str | None = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """Image [B,C,H,W] in [0,1] (H, W multiples of the downscale) -> posterior (mean, logvar), each [B,c,H/f,W/f],
    float32 on x's device: `model.moments(x)` up to the float16 rounding of the stored maps."""
    E = model.encoder
    steps = sum(len(level.block) + 1 for level in E.down) + 1

    def one(img: torch.Tensor, store_dtype: torch.dtype, bar: Progress) -> torch.Tensor:
        run = _Runner(device, dtype, x.device, band_bytes, bar, store_dtype)
        h = run.empty(1, E.conv_in.out_channels, *img.shape[-2:])
        for a, b in _bands(img.shape[-2], run.rows(img, E.conv_in.out_channels)):
            run.put(h, a, b, run.band(lambda t: E.conv_in(t.mul(2).sub_(1)), img, a, b, 1))  # [0,1] -> [-1,1]
        for level in E.down:
            for blk in level.block:
                h = _resblock(run, blk, h)
            down = getattr(level, "downsample", None)
            if down is not None:
                h = _downsample(run, down, h)
            run.tick()
        t = _mid(E.mid, h.to(device, dtype))  # [1,Cm,h,w]: attention over the whole latent
        t = E.conv_out(F.silu(E.norm_out(t), inplace=True))
        if model.quant_conv is not None:
            t = model.quant_conv(t)
        run.tick()
        return t.to(x.device, torch.float32)

    outs = []
    with Progress(steps * x.shape[0], progress or "", enabled=progress is not None) as bar:
        for i in range(x.shape[0]):
            outs.append(_with_fallback(lambda sd: one(x[i : i + 1].float(), sd, bar), "KL encode"))
    mean, logvar = torch.cat(outs).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def storage_bytes(model: nn.Module, height: int, width: int, part: str, itemsize: int = 2) -> int:
    """Bytes of the whole maps `decode` (part="decode"; latent height/width) or `moments` (part="encode"; image
    height/width) keeps at once: the largest input + output pair of one level's first block (float16 maps by
    default), plus the float32 result."""
    levels = model.decoder.up if part == "decode" else model.encoder.down
    n = len(levels)
    worst = 0
    for i, level in enumerate(levels):
        blk = level.block[0]
        # decoder level i runs at 2^(n-1-i) x the latent resolution, encoder level i at 1/2^i of the image's
        px = height * width * 4 ** (n - 1 - i) if part == "decode" else height * width / 4**i
        worst = max(worst, int((blk.conv1.in_channels + blk.conv1.out_channels) * px * itemsize))
    result = height * width * model.downscale**2 * 3 if part == "decode" else height * width * 3
    return worst + int(result * 4)


def fits(model: nn.Module, height: int, width: int, part: str, budget: int) -> bool:
    """Whether the whole maps of an exact banded pass fit `budget` bytes."""
    return storage_bytes(model, height, width, part) <= budget


# ---------------------------------------------------------------- the KL autoencoder's strategy (models/vae/facts.py)


def planned_moments(model: nn.Module, x: torch.Tensor, work: Work) -> torch.Tensor:
    """Image [B,C,H,W] -> [B,2c,h,w] (mean, logvar) CPU: exact bands when their whole maps fit the storage budget;
    else independent tiles (GroupNorm per tile: colours may drift slightly), with a warning."""
    H, W = x.shape[-2:]
    band = int(work.bytes_per_pixel * work.tile * work.tile) if work.tile else work.call_bytes
    if fits(model, H, W, "encode", work.storage_bytes):
        return torch.cat(moments(model, x, device=work.device, dtype=work.dtype, band_bytes=band), dim=1)
    log.warning("%s: %dx%d is too large for exact banded encoding in the memory free; encoding in independent tiles "
                "(GroupNorm per tile: colours may drift slightly)", os.path.basename(work.name), H, W)
    f = model.downscale
    side = work.tile or fit_side(H, W, work.bytes_per_pixel, work.call_bytes, f)
    return tiled_apply(lambda t: torch.cat(model.moments(t), dim=1), x, scale=1 / f, tile=side, context=8 * f,
                       blend=8 * f, align=f, max_batch=1, device=work.device, dtype=work.dtype, progress="encode")


def planned_decode(model: nn.Module, z: torch.Tensor, work: Work) -> torch.Tensor:
    """Latent [B,c,h,w] -> image [B,C,h*f,w*f] CPU: exact bands when their whole maps fit the storage budget; else
    independent tiles (GroupNorm per tile: colours may drift between tiles), with a warning."""
    h, w = z.shape[-2:]
    band = int(work.bytes_per_pixel * work.tile * work.tile) if work.tile else work.call_bytes
    if fits(model, h, w, "decode", work.storage_bytes):
        return decode(model, z, device=work.device, dtype=work.dtype, band_bytes=band)
    f = model.downscale
    log.warning("%s: %dx%d is too large for exact banded decoding in the memory free; decoding in independent tiles "
                "(GroupNorm per tile: colours may drift between tiles)", os.path.basename(work.name), h * f, w * f)
    side = work.tile or fit_side(h, w, work.bytes_per_pixel, work.call_bytes)
    return tiled_apply(model.decode, z, scale=f, out_channels=model.image_channels, tile=side, context=8, blend=8,
                       max_batch=1, device=work.device, dtype=work.dtype, progress="decode")
