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
  calling thread (see there);
- `use_winograd(model)` is the multi-threaded alternative for those models: `WinogradConv2d` layers compute
  Winograd F(4x4, 3x3) with PyTorch's own GEMMs, inside PyTorch's thread pool, for the shapes where it measured
  faster on the machine itself (see there); their calls too small for it take oneDNN with weights packed once per
  node run (`scratch_released`, PACK_BUDGET).

NNPACK is a private PyTorch operator (`torch._nnpack_spatial_convolution`): it is used only after a self-check
against `F.conv2d` succeeds (once per process, `nnpack_usable`), and a failing call falls back to `F.conv2d`.

Threads: nothing here changes the process's thread count. NNPACK runs in its own pool, which PyTorch creates at
the first NNPACK call with `torch.get_num_threads()` threads (and keeps); the other operators use the OpenMP pool.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time

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


# NNPACK runs wide rows faster, and rows whose width is a multiple of 16 floats (64 bytes: one AVX-512 vector, one
# cache line) a little faster again. The whole Compact x4 forward at about 80 K pixels per call, 2 threads, ns per
# pixel: widths 128 / 256 / 288 / 368 took 4849 / 4944 / 4863 / 4969, widths 512 / 768 / 1024 took 4555 / 4322 /
# 4382: about (1 + 40 / width). One 64->64 layer, 274 rows: widths 240 / 256 / 272 / 288 took 228 / 224 / 233 / 225,
# widths 242 / 274 / 276 / 290 took 252 / 248 / 245 / 247 ns per pixel; in the whole model unaligned rows cost 0-8 %
# more (258 against 256: 1.7 %, 286x286 against 286x288: 4-8 %). The tiling engine weighs a tile's pixels by
# `nnpack_width_cost` when it plans CPU tiles (models/upscale/upscale.tile_plan). Compact x4 through `tiled_apply`,
# interleaved medians: 1024^2 in 204x368 tiles 5.97 s against 6.39 s in 286x286 (with a busy process beside, 237x368
# 10.67 against 11.18 s); 512^2 in four 158x512 strips 1.55 / 1.42 s against 1.70 / 1.43 s in 276x276 (two runs), but
# those strips are larger calls (81 K pixels, more NNPACK workspace), so the planner keeps the squares' call size
# there; only where the output outweighs the memory they add does it take larger calls (upscale.CPU_REUSE_PIXELS).
NNPACK_ROW_PX = 40
NNPACK_ROW_FLOATS = 16
NNPACK_UNALIGNED_COST = 1.03


def nnpack_width_cost(width: int) -> float:
    """Relative cost per pixel of NNPACK calls on rows `width` pixels wide."""
    return (1 + NNPACK_ROW_PX / width) * (1.0 if width % NNPACK_ROW_FLOATS == 0 else NNPACK_UNALIGNED_COST)


def nnpack_workspace_bytes(channels_in: int, channels_out: int, pixels: float) -> float:
    """NNPACK's work buffers for one F(6x6, 3x3) call on `pixels` (PyTorch keeps the largest it needed): the input
    and output transforms, 64 floats per 6x6 output tile and channel. Measured at 64 channels: +60 MB after a 256^2
    call, +87 MB after 310^2."""
    return (channels_in + channels_out) * pixels * 64 / 36 * 4


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


# ---------------------------------------------------------------------------------------------------------------
# Winograd F(4x4, 3x3) (Lavin & Gray 2016) through PyTorch's own GEMMs, for models whose 3x3 convolutions alternate
# with PyTorch's multi-threaded operators. Each 6x6 input tile d and the 3x3 kernel g give a 4x4 output tile
# A^T [(G g G^T) * (B^T d B)] A: 36 products per tile and channel pair instead of 144, done as 36 matrix products
# [tiles, Cin] @ [Cin, Cout] (torch.bmm: PyTorch's BLAS in PyTorch's own pool, no second pool to fight). Points
# 0, +-1, +-2 and infinity; error about 1e-5 of the output's scale in float32. Measured on 2 threads against oneDNN
# channels-last, with the kernels' transform, interleaved medians of 12, two runs (ms): [16,128,32,32] 16.2 / 23.2
# against 21.4 / 23.1, [16,256,16,16] 13.3 / 17.7 against 21.3 / 20.5, [16,256,32,32] to 128 channels 27.6 / 28.7
# against 42.5 / 43.7, [1,128,32,32] 0.97 / 1.05 against 1.42 / 1.58; [1,256,16,16] (16 tiles) 1.53 / 2.29
# against 1.74 / 2.13, hence WINOGRAD_MIN_TILES (such calls take packed oneDNN weights, below). Of a
# [14,128,32,32] call's 14 ms, the 36 products take 7.3 and the transforms and copies the rest.
_BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                    [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                   dtype=torch.float64)
# The 36 products are ordered by tile column, then row (the order the input transform's two batched products
# leave them in, below): [36, 9] with vec((G g G^T)^T) = _KG vec(g), as kron(G, G) acts on vec(g^T).
_KG = torch.kron(_G, _G).view(36, 3, 3).transpose(1, 2).reshape(36, 9)
# Which calls (measured on 2 threads, bench/unet_forward.py): Winograd on maps of at least WINOGRAD_MIN_SIDE a side,
# with at least WINOGRAD_MIN_TILES 4x4 output tiles per call and WINOGRAD_MIN_CHANNELS on both sides; everything else
# takes PyTorch's convolution. Smaller maps are a UNet's deep levels: one to four tiles per image and wide kernels,
# little to gain. The transformed kernels (4x the weight) are made per call into scratch, never kept: at 64 tiles that
# costs about a fifth of the call, below it the call loses to oneDNN. Keeping them would make batch 1 faster (the
# CIFAR-10 DDPM UNet's forward 0.75 of diffusers' instead of 0.81, interleaved medians) but cost up to 4x the weights:
# with 1.5x kept, an ADM's peak went to 1.43x guided-diffusion's. Calls are cut into groups of images so that each work
# buffer stays under WINOGRAD_SCRATCH floats: the scratch is all the extra memory. Which way a shape runs is measured on
# its first call (`WinogradConv2d._measure`). On this 2-core VM the path's speed comes in phases: for seconds at a time,
# with nothing else of ours running, its transforms (memory-bound, seven parallel regions per call) run slower while
# oneDNN's direct convolution does not (a noisy neighbour on the memory system, we think). Before the transforms'
# outer-axis products became strided bmm (`_winograd_tiles`), the CIFAR-10 UNet at batch 16 then took 0.91-0.95 of
# diffusers' time instead of 0.70-0.72; since, 0.77-0.81 in the same windows (interleaved forwards, one process). With
# the faster transforms, 1 M-float buffers were faster in the good phase (0.65-0.69 against 0.70) and slower in the slow
# one (0.88 against 0.79), so the buffers stay at 4 M floats.
WINOGRAD_MIN_SIDE = 16
WINOGRAD_MIN_TILES = 64
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_SCRATCH = 4 << 20  # floats per work buffer (16 MB)


def winograd_kernels(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[Cout,Cin,3,3] -> the transformed kernels G g G^T as [36, Cin, Cout] float32 (the 36 in _KG's order), into
    `out` (a buffer of at least 36*Cin*Cout floats) where given; returned as a permuted view of a [Cout, 36, Cin]
    buffer, which the products read as it is. One [36, 9] @ [9, Cin] product per output channel: a single torch.mm
    [36, 9] @ [9, Cin*Cout] took 1.5x as long alone and, in the CIFAR-10 UNet at batch 16, cost 4-7 % of the
    forward more (interleaved medians)."""
    K, C = weight.shape[:2]
    u = torch.empty(36 * K * C, dtype=torch.float32, device=weight.device) if out is None else out[:36 * K * C]
    kg = _KG.to(device=weight.device, dtype=torch.float32)
    torch.bmm(kg.expand(K, 36, 9), weight.detach().reshape(K, C, 9).transpose(1, 2), out=u.view(K, 36, C))
    return u.view(K, 36, C).permute(1, 2, 0)


# Small calls (fewer than WINOGRAD_MIN_TILES tiles: a UNet's deep levels at small batches) stay with oneDNN, which
# reorders the weight into its blocked layout on every call: for a call of few pixels that reorder, not the
# arithmetic, is most of the time (the weight is read and written once more per call, and above glibc's 32 MB mmap
# threshold it comes as fresh pages). Measured on 2 threads, F.conv2d against oneDNN with the weight packed once
# (ms): [1,256,4,4] 0.159 against 0.094, [1,256,8,8] 0.438 against 0.311, [1,512,8,8] 1.99 against 1.16,
# [1,1024,8,8] 19.8 against 5.2; inside the CIFAR-10 DDPM UNet at batch 1 the forward went from 0.82 to 0.74 of
# diffusers' time. A packed weight is as large as the weight itself, so packs are kept only for the length of one
# node run (`scratch_released`), up to PACK_BUDGET of the model's weights, and a shape takes its pack only where it
# measured faster (`WinogradConv2d._measure`). Outside a run (e.g. core samplers driving the model through the
# ComfyUI bridge, where weights may be patched between runs) nothing is packed.
PACK_BUDGET = 0.5  # packed weights one run may keep, as a fraction of the model's weight bytes


@functools.cache
def packing_usable() -> bool:
    """oneDNN's packed-weight convolution (`torch.ops.mkldnn._convolution_pointwise`, what PyTorch's own freezing
    uses) exists in this build and agrees with F.conv2d."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 5, 7, generator=gen)
        w = torch.randn(16, 8, 3, 3, generator=gen)
        b = torch.randn(16, generator=gen)
        with torch.inference_mode():
            got = packed_conv(x, pack_weight(w, tuple(x.shape), (1, 1)), b, (1, 1))
            ok = torch.allclose(got, F.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)
    except Exception as e:  # noqa: BLE001 (any failure means: do not use it)
        log.debug("packed oneDNN convolution unusable: %s", e)
        return False
    return bool(ok)


def pack_weight(weight: torch.Tensor, shape: tuple, padding: tuple[int, int]) -> torch.Tensor:
    """A 3x3 stride-1 weight [Cout,Cin,3,3] in the blocked layout oneDNN picks for inputs of `shape` (a oneDNN
    tensor, as large as the weight)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().contiguous().to_mkldnn(), list(padding),
                                                     [1, 1], [1, 1], 1, list(shape))


def packed_conv(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int]) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding) from `pack_weight`'s packed weight; [N,Cin,H,W] -> [N,Cout,H,W],
    channels-last."""
    return torch.ops.mkldnn._convolution_pointwise(x.contiguous(memory_format=torch.channels_last), packed, bias,
                                                   list(padding), [1, 1], [1, 1], 1, "none", [], "")


class _Scratch:
    """The float32 work buffers a model's Winograd layers share, grown to the largest call and reused (fresh buffers
    per layer would each come as new zeroed pages from the OS, glibc mapping blocks above its threshold, which cost
    more than the products themselves at batch 16), one set per calling thread so that concurrent calls never share
    one; `release()` drops the calling thread's."""

    def __init__(self, pack_budget: int = 0) -> None:
        self._local = threading.local()
        self.faster: dict[tuple, bool] = {}  # (input shape, weight shape, threads) -> the fast way measured faster
        self.pack_budget = pack_budget  # bytes of packed weights one run may keep (`packed`)

    @property
    def bufs(self) -> dict[str, torch.Tensor]:
        if not hasattr(self._local, "bufs"):
            self._local.bufs = {}
        return self._local.bufs

    def take(self, name: str, n: int) -> torch.Tensor:
        bufs = self.bufs
        buf = bufs.get(name)
        if buf is None or buf.numel() < n:
            bufs.pop(name, None)  # free the old one before allocating the larger one
            buf = bufs[name] = torch.empty(n)
        return buf

    @property
    def in_run(self) -> bool:
        """Inside `scratch_released` on this thread: the one place where packed weights may be kept."""
        return getattr(self._local, "runs", 0) > 0

    def packed(self, layer: torch.nn.Conv2d, shape: tuple) -> torch.Tensor | None:
        """The layer's weight packed for calls of `shape` (`pack_weight`), made at the first such call of a run and
        kept until the run ends, while the run's packed weights stay within `pack_budget`; None beyond it."""
        packs = self.bufs.setdefault("packed", {})
        key = (id(layer), shape)
        w = packs.get(key)
        if w is None:
            size = layer.weight.numel() * layer.weight.element_size()
            used = self.bufs.get("packed_bytes", 0)
            if used + size > self.pack_budget:
                return None
            w = packs[key] = pack_weight(layer.weight, shape, layer.padding)
            self.bufs["packed_bytes"] = used + size
        return w

    def unpack(self, layer: torch.nn.Conv2d, shape: tuple) -> None:
        """Drop the layer's pack for `shape` and give its bytes back to the run's budget."""
        if self.bufs.get("packed", {}).pop((id(layer), shape), None) is not None:
            self.bufs["packed_bytes"] -= layer.weight.numel() * layer.weight.element_size()

    def release(self) -> None:
        self._local.bufs = {}


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
                     scratch: _Scratch | None = None) -> torch.Tensor:
    """A 3x3, stride-1, padding-1 convolution [N,C,H,W] -> [N,K,H,W] (channels-last) from transformed kernels
    `u` [36,C,K] (`winograd_kernels`); CPU float32. Images go in groups that keep each work buffer under
    WINOGRAD_SCRATCH floats."""
    N, C, H, W = x.shape
    K = u.shape[2]
    th, tw = -(-H // 4), -(-W // 4)
    per_image = 36 * th * tw * max(C, K)
    group = max(1, min(N, WINOGRAD_SCRATCH // per_image))
    scratch = scratch or _Scratch()
    a, b = scratch.take("a", group * per_image), scratch.take("b", group * per_image)
    out = torch.empty(N, th * 4, tw * 4, K, dtype=x.dtype)
    for i in range(0, N, group):
        xi = x[i:i + group]
        _winograd_tiles(xi, u, bias, a, b, out[i:i + group])
    return out[:, :H, :W].permute(0, 3, 1, 2)  # NCHW view with channels-last strides


def _winograd_tiles(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                    out: torch.Tensor) -> None:
    """One group of images: x [n,C,H,W] -> out [n, 4*th, 4*tw, K] (NHWC), through the work buffers a and b."""
    N, C, H, W = x.shape
    K = u.shape[2]
    th, tw = -(-H // 4), -(-W // 4)
    P = N * th * tw  # tiles
    xp = F.pad(x, (1, tw * 4 + 1 - W, 1, th * 4 + 1 - H))
    d = a[:36 * P * C].view(6, 6, N, th, tw, C)
    d.copy_(xp.unfold(2, 6, 4).unfold(3, 6, 4).permute(4, 5, 0, 2, 3, 1))  # the tiles, [6,6,P,C]
    # Each transform is two batched products, one per tile axis. The one over the outer axis reads its operand as
    # a strided batch (transpose(0, 1), no copy), which leaves the result with its two axes swapped: so the 36
    # products come ordered (column, row), as _KG orders the kernels, and the output transform swaps them back.
    # One torch.mm over the outer axis instead ([6, 6] @ [6, 36 P C]) took 2.5-3.6x as long as the strided bmm.
    bt, at = _BT.to(torch.float32), _AT.to(torch.float32)
    t = b[:36 * P * C].view(6, 6, P * C)
    torch.bmm(bt.expand(6, 6, 6), d.view(6, 6, P * C), out=t)  # d B over tile columns: [row, column']
    v = a[:36 * P * C].view(6, 6, P * C)
    torch.bmm(bt.expand(6, 6, 6), t.transpose(0, 1), out=v)  # B^T (d B) over tile rows: [column', row']
    m = b[:36 * P * K].view(36, P, K)
    torch.bmm(v.view(36, P, C), u, out=m)  # the 36 products over the input channels, [column, row]
    y = a[:24 * P * K].view(6, 4, P * K)
    torch.bmm(at.expand(6, 4, 6), m.view(6, 6, P * K), out=y)  # A^T m over tile rows: [column, row']
    z = b[:16 * P * K].view(4, 4, P * K)
    torch.bmm(at.expand(4, 4, 6), y.transpose(0, 1), out=z)  # ... A over tile columns: [row', column']
    tiles = z.view(4, 4, N, th, tw, K).permute(2, 3, 0, 4, 1, 5)  # [N, th, 4, tw, 4, K]
    if bias is None:
        out.view(N, th, 4, tw, 4, K).copy_(tiles)
    else:
        torch.add(tiles, bias, out=out.view(N, th, 4, tw, 4, K))


class WinogradConv2d(torch.nn.Conv2d):
    """An eligible `nn.Conv2d` (`eligible`, padding 1, at least WINOGRAD_MIN_CHANNELS in and out) whose CPU float32
    inference calls on maps of at least WINOGRAD_MIN_SIDE a side and WINOGRAD_MIN_TILES tiles run `winograd_conv3x3`
    with kernels transformed per call, where it measured faster than PyTorch's convolution for that shape (`_measure`);
    smaller calls inside a node run take oneDNN with the weight packed once per run and shape (`_Scratch.packed`),
    likewise where that measured faster. Identical parameters and keys; nothing kept between runs but those choices
    (and the work buffers of calls made outside `scratch_released`)."""

    scratch: _Scratch | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N,Cin,H,W] -> [N,Cout,H,W]
        w = self.weight
        if x.ndim == 4 and x.dtype == torch.float32 and x.device.type == "cpu" and w.dtype == torch.float32 \
                and not torch.is_grad_enabled():
            if self.scratch is None:  # a layer converted by hand: its own scratch, so its choices are remembered
                self.scratch = _Scratch()
            scratch = self.scratch
            key = (tuple(x.shape), tuple(w.shape), torch.get_num_threads())
            faster = scratch.faster.get(key)
            if min(x.shape[2:]) >= WINOGRAD_MIN_SIDE \
                    and x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4) >= WINOGRAD_MIN_TILES:
                fast = self._winograd
            elif faster is not False and scratch.in_run and packing_usable() \
                    and scratch.packed(self, tuple(x.shape)) is not None:  # no pack for a shape it did not speed up
                fast = self._packed
            else:
                fast = None
            if fast is not None:
                if faster is None:
                    return self._measure(x, scratch, key, fast)
                if faster:
                    return fast(x, scratch)
        return F.conv2d(x, w, self.bias, padding=self.padding)

    def _winograd(self, x: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
        u = winograd_kernels(self.weight, scratch.take("u", self.weight[:, :, 0, 0].numel() * 36))
        return winograd_conv3x3(x, u, self.bias, scratch)

    def _packed(self, x: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
        return packed_conv(x, scratch.packed(self, tuple(x.shape)), self.bias, self.padding)

    def _measure(self, x: torch.Tensor, scratch: _Scratch, key: tuple, fast) -> torch.Tensor:
        """The first call of a shape: run it both ways, twice each after one call of the fast way (`_winograd` or
        `_packed`) that allocates its scratch or pack, and remember which was faster (the better of each pair), for
        this model and thread count. The machine decides, not a table measured on another one: on many cores
        oneDNN's direct convolution may beat Winograd."""
        y = fast(x, scratch)  # scratch allocated, pages touched
        best = {True: float("inf"), False: float("inf")}
        for use_fast in (False, True, False, True):
            t0 = time.perf_counter()
            if use_fast:
                fast(x, scratch)
            else:
                F.conv2d(x, self.weight, self.bias, padding=self.padding)
            best[use_fast] = min(best[use_fast], time.perf_counter() - t0)
        scratch.faster[key] = best[True] < best[False]
        if fast == self._packed and not scratch.faster[key]:
            scratch.unpack(self, tuple(x.shape))  # its budget goes to the shapes it speeds up
        return y


def use_winograd(model: torch.nn.Module) -> int:
    """Convert the model's eligible 3x3 convolutions (padding 1, at least WINOGRAD_MIN_CHANNELS in and out) to
    `WinogradConv2d`, in place, once (at load), sharing one `_Scratch`. Returns how many layers converted."""
    layers = [m for m in model.modules() if eligible(m) and m.padding == (1, 1)
              and min(m.in_channels, m.out_channels) >= WINOGRAD_MIN_CHANNELS]
    scratch = _Scratch(int(PACK_BUDGET * sum(p.numel() * p.element_size() for p in model.parameters())))
    for m in layers:
        m.__class__ = WinogradConv2d
        m.scratch = scratch
    return len(layers)


def pack_budget(model: torch.nn.Module) -> int:
    """Bytes of packed weights one run of `model` may keep (0 for a model without `use_winograd`'s layers)."""
    return next((m.scratch.pack_budget for m in model.modules() if type(m) is WinogradConv2d and m.scratch is not None),
                0)


@contextlib.contextmanager
def scratch_released(model: torch.nn.Module):
    """Around one node run of `model`: inside, its small calls may keep packed weights (see PACK_BUDGET); afterwards
    the calling thread's Winograd work buffers and packed weights are dropped, so nothing stays with the loaded model
    but its weights and the per-shape choices."""
    scratches = {id(m.scratch): m.scratch for m in model.modules()
                 if type(m) is WinogradConv2d and m.scratch is not None}.values()
    for s in scratches:
        s._local.runs = getattr(s._local, "runs", 0) + 1
    try:
        yield
    finally:
        for s in scratches:
            s._local.runs -= 1
            if not s._local.runs:
                s.release()
