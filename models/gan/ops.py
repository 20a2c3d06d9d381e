"""Pure-PyTorch building blocks of the NVIDIA StyleGAN2/StyleGAN3 generators (no compiled ops).

Semantics follow NVIDIA's reference ops (`upfirdn2d`, `bias_act`, `conv2d_resample`, `filtered_lrelu`, in
NVlabs/stylegan3 `torch_utils/ops`), re-derived here so that each op does less work on a CPU:

- FIR filters that are separable (every 1-D filter, and the rank-1 2-D `[1,3,3,1]` filter of StyleGAN2) run as two
  depthwise 1-D convolutions instead of one 2-D one;
- upsampling is polyphase (one short filter per output phase, then an interleave), never zero-insertion followed by
  a convolution over the zeros;
- downsampling is a strided convolution, never a full-rate convolution whose samples are then thrown away;
- modulated convolution at batch > 1 scales the activations and runs one convolution with the shared weight
  (`fused=False`) instead of a grouped convolution with one weight per sample; both are exact rewrites.

Conventions: `padding` is `[x0, x1, y0, y1]` (negative = crop), filters are float tensors `[taps]` (separable)
or `[fh, fw]`, `flip_filter=False` means true convolution, as in NVIDIA's code.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# name -> (function, default alpha, default gain)
_ACTIVATIONS = {
    "linear": (lambda x, a: x, 0.0, 1.0),
    "relu": (lambda x, a: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": (lambda x, a: F.leaky_relu(x, a), 0.2, math.sqrt(2)),
    "tanh": (lambda x, a: torch.tanh(x), 0.0, 1.0),
    "sigmoid": (lambda x, a: torch.sigmoid(x), 0.0, 1.0),
    "elu": (lambda x, a: F.elu(x), 0.0, 1.0),
    "selu": (lambda x, a: F.selu(x), 0.0, 1.0),
    "softplus": (lambda x, a: F.softplus(x), 0.0, 1.0),
    "swish": (lambda x, a: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}


def activation_gain(act: str) -> float:
    """NVIDIA's default gain of an activation (sqrt(2) for (l)relu/swish, 1 otherwise)."""
    return _ACTIVATIONS[act][2]


def parse_padding(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """int, [x, y] or [x0, x1, y0, y1] -> (x0, x1, y0, y1)."""
    if isinstance(padding, (int, np.integer)):
        padding = [int(padding)] * 2
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        padding = [padding[0], padding[0], padding[1], padding[1]]
    if len(padding) != 4:
        raise ValueError(f"padding: expected an int, [x, y] or [x0, x1, y0, y1], got {padding}")
    x0, x1, y0, y1 = padding
    return x0, x1, y0, y1


def setup_filter(f: Sequence[float] | torch.Tensor | None, normalize: bool = True) -> torch.Tensor:
    """A FIR filter as NVIDIA stores it: 1-D lists of fewer than 8 taps become their 2-D outer product."""
    f = torch.as_tensor([1.0] if f is None else f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1 and f.numel() < 8:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f


def separable_factors(f: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fy, fx) with outer(fy, fx) == f for a rank-1 2-D filter (or a 1-D one); None if f is not separable."""
    if f is None:
        return None
    if f.ndim == 1:
        return f, f
    fy = f.sum(dim=1)
    fx = f.sum(dim=0) / f.sum()
    if torch.allclose(torch.outer(fy, fx), f, rtol=1e-5, atol=1e-7 * float(f.abs().max())):
        return fy, fx
    return None


# ----------------------------------------------------------------------------------------------------------------
# upfirdn2d


def _depthwise(x: torch.Tensor, taps: torch.Tensor, axis: int, stride: int = 1, pad: int = 0) -> torch.Tensor:
    """Correlate every channel of x [B,C,H,W] with 1-D `taps` [k] (or [P,k]: P outputs per channel) along axis."""
    c = x.shape[1]
    k = taps.shape[-1]
    w = taps.reshape(-1, 1, 1, k) if axis == -1 else taps.reshape(-1, 1, k, 1)
    w = w.repeat(c, 1, 1, 1)  # [C*P,1,1,k] or [C*P,1,k,1]
    s = (1, stride) if axis == -1 else (stride, 1)
    p = (0, pad) if axis == -1 else (pad, 0)
    return F.conv2d(x, w, stride=s, padding=p, groups=c)


def _pad_axis(x: torch.Tensor, axis: int, p0: int, p1: int) -> torch.Tensor:
    if p0 == 0 and p1 == 0:
        return x
    return F.pad(x, [p0, p1] if axis == -1 else [0, 0, p0, p1])  # negative values crop


def _upfir1d(x: torch.Tensor, f: torch.Tensor, up: int, down: int, p0: int, p1: int, axis: int) -> torch.Tensor:
    """One axis of upfirdn2d: zero-insertion `up`, pad (p0, p1), convolve with f [k], keep every `down`-th sample."""
    k = f.numel()
    n = x.shape[axis]
    out_len = n * up + p0 + p1 - k + 1
    if out_len < 1:
        raise ValueError(f"upfirdn2d: filter of {k} taps is longer than the padded, upsampled signal ({n}*{up})")
    if up == 1:
        if k == 1:
            y = _pad_axis(x, axis, p0, p1) * f.reshape(())
            return y[_stride_index(axis, down)] if down > 1 else y
        # Symmetric, non-negative padding goes into the convolution itself (no padded copy).
        if p0 == p1 and p0 >= 0:
            return _depthwise(x, f.flip(0), axis, stride=down, pad=p0)
        return _depthwise(_pad_axis(x, axis, p0, p1), f.flip(0), axis, stride=down)
    # Polyphase: output sample j*up + r of the full convolution uses taps f[r::up] only.
    phases = -(-k // up)
    g = f.new_zeros(up, phases)
    for r in range(up):
        tr = f[r::up]
        g[r, : tr.numel()] = tr
    y = _depthwise(x, g.flip(1), axis, pad=phases - 1)  # [B, C*up, ...] full convolution per phase
    b, cu = y.shape[:2]
    c = cu // up
    if axis == -1:
        h, m = y.shape[2], y.shape[3]
        y = y.reshape(b, c, up, h, m).permute(0, 1, 3, 4, 2).reshape(b, c, h, m * up)
    else:
        m, w = y.shape[2], y.shape[3]
        y = y.reshape(b, c, up, m, w).permute(0, 1, 3, 2, 4).reshape(b, c, m * up, w)
    # y[i] is the full convolution of the zero-inserted signal; output t reads y[t + k - 1 - p0].
    start = k - 1 - p0
    y = _pad_axis(y, axis, -start, out_len - (y.shape[axis] - start))
    if down > 1:
        y = y[_stride_index(axis, down)]
    return y


def _stride_index(axis: int, step: int) -> tuple:
    return (Ellipsis, slice(None, None, step)) if axis == -1 else (Ellipsis, slice(None, None, step), slice(None))


def _upfir2d_dense(x: torch.Tensor, f: torch.Tensor, up: int, down: int, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Non-separable 2-D filter: zero-insertion (only if up > 1), pad, depthwise 2-D conv, strided by `down`."""
    b, c, h, w = x.shape
    x0, x1, y0, y1 = pad
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(b, c, h * up, w * up)
    x = F.pad(x, [x0, x1, y0, y1])
    weight = f.flip([0, 1])[None, None].repeat(c, 1, 1, 1)  # [C,1,fh,fw]
    return F.conv2d(x, weight, stride=down, groups=c)


def upfirdn2d(
    x: torch.Tensor,  # [B,C,H,W]
    f: torch.Tensor | None,  # [taps] separable, [fh,fw], or None = identity
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
    separable: bool | None = None,
) -> torch.Tensor:
    """Upsample (zero insertion), pad, FIR-filter and downsample every channel, like NVIDIA's upfirdn2d.

    `separable=None` tests a 2-D filter for rank 1 (a host sync on GPU); modules that know pass True/False.
    Returns [B,C,H',W'] with H' = (H*up + y0 + y1 - fh + 1) // down (rounded up), likewise W'.
    """
    x0, x1, y0, y1 = parse_padding(padding)
    if f is None:
        f = torch.ones(1, dtype=x.dtype, device=x.device)
    f = f.to(dtype=x.dtype, device=x.device)
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    factors = None
    if f.ndim == 1:
        factors = (f, f)
    elif up == 1 and f.numel() <= 16:  # small 2-D filter, no upsampling: one depthwise pass beats two
        factors = None
    elif separable is None or separable:
        factors = separable_factors(f)
        if factors is None and separable:
            raise ValueError("upfirdn2d: separable=True but the 2-D filter is not of rank 1")
    if factors is None:
        return _upfir2d_dense(x, f * gain, up, down, (x0, x1, y0, y1))
    fy, fx = factors
    g = math.sqrt(gain) if gain != 1 else 1.0
    x = _upfir1d(x, fx * g if g != 1 else fx, up, down, x0, x1, axis=-1)
    return _upfir1d(x, fy * g if g != 1 else fy, up, down, y0, y1, axis=-2)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, separable: bool | None = None) -> torch.Tensor:
    """x [B,C,H,W] -> [B,C,H*up,W*up], FIR-interpolated with gain up**2 (NVIDIA's upsample2d, padding 0)."""
    fw = f.shape[-1]
    fh = f.shape[0]
    pad = [(fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=pad, gain=up * up, separable=separable)


# ----------------------------------------------------------------------------------------------------------------
# bias + activation


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
    dim: int = 1,
    inplace: bool = False,
) -> torch.Tensor:
    """x + b (along `dim`), activation, times gain, clamped to +-clamp: NVIDIA's bias_act, in that order.

    inplace=True overwrites x (for fresh intermediates: saves the allocations, which dominate on large maps).
    """
    func, def_alpha, def_gain = _ACTIVATIONS[act]
    alpha = def_alpha if alpha is None else float(alpha)
    gain = def_gain if gain is None else float(gain)
    if b is not None:
        shape = [-1 if i == dim % x.ndim else 1 for i in range(x.ndim)]
        b = b.to(x.dtype).reshape(shape)
        x = x.add_(b) if inplace else x + b
        inplace = True
    if act == "lrelu":
        x = F.leaky_relu_(x, alpha) if inplace else F.leaky_relu(x, alpha)
        inplace = True
    elif act != "linear":
        x = func(x, alpha)
        inplace = True
    if gain != 1:
        x = x.mul_(gain) if inplace else x * gain
        inplace = True
    if clamp is not None and clamp >= 0:
        x = x.clamp_(-clamp, clamp) if inplace else x.clamp(-clamp, clamp)
    return x


# ----------------------------------------------------------------------------------------------------------------
# modulated convolution (StyleGAN2)


def _resample_padding(kw: int, kh: int, fw: int, fh: int, up: int, padding: int) -> tuple[int, int, int, int]:
    """Padding of the FIR step after a transposed (up) convolution, as in NVIDIA's conv2d_resample."""
    px0 = padding + (fw + up - 1) // 2 - (kw - 1)
    px1 = padding + (fw - up) // 2 - (kw - up)
    py0 = padding + (fh + up - 1) // 2 - (kh - 1)
    py1 = padding + (fh - up) // 2 - (kh - up)
    return px0, px1, py0, py1


def conv2d_up(
    x: torch.Tensor,  # [N,I*g,H,W]
    w: torch.Tensor,  # [O*g,I,kh,kw]
    f: torch.Tensor,  # resampling filter
    up: int,
    padding: int,
    groups: int = 1,
    separable: bool | None = None,
) -> torch.Tensor:
    """Convolution followed by FIR upsampling, like NVIDIA's conv2d_resample(up>1, flip_weight=False).

    A strided transposed convolution does the upsampling with the weight, then the FIR filter smooths.
    """
    oc, ipg, kh, kw = w.shape
    fh, fw = f.shape[0], f.shape[-1]
    if kw == 1 and kh == 1:  # 1x1: convolve at the low rate, then upsample
        x = F.conv2d(x, w, groups=groups)
        px0 = padding + (fw + up - 1) // 2
        px1 = padding + (fw - up) // 2
        py0 = padding + (fh + up - 1) // 2
        py1 = padding + (fh - up) // 2
        return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up * up, separable=separable)
    if groups == 1:
        wt = w.transpose(0, 1)  # [I,O,kh,kw]
    else:
        wt = w.reshape(groups, oc // groups, ipg, kh, kw).transpose(1, 2).reshape(groups * ipg, oc // groups, kh, kw)
    px0, px1, py0, py1 = _resample_padding(kw, kh, fw, fh, up, padding)
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    x = F.conv_transpose2d(x, wt, stride=up, padding=[pyt, pxt], groups=groups)
    return upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up * up, separable=separable)


def modulated_conv2d(
    x: torch.Tensor,  # [B,I,H,W]
    weight: torch.Tensor,  # [O,I,kh,kw]
    styles: torch.Tensor,  # [B,I]
    noise: torch.Tensor | None = None,  # broadcastable to [B,O,H',W']
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    fused: bool | None = None,
    separable: bool | None = None,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution (up=1: correlation; up=2: transposed conv + FIR, NVIDIA's flip convention).

    fused=None picks the faster exact form: one grouped convolution with per-sample weights at batch 1, activation
    scaling around one shared-weight convolution at batch > 1. Weight maths run in float32 whatever x's dtype.
    """
    b = x.shape[0]
    o, i, kh, kw = weight.shape
    wf = weight.float()
    s = styles.float()  # [B,I]
    if x.dtype == torch.float16 and demodulate:  # keep fp16 activations in range (cancels under demodulation)
        wf = wf * (1 / math.sqrt(i * kh * kw) / wf.abs().amax(dim=[1, 2, 3], keepdim=True))
        s = s / s.abs().amax(dim=1, keepdim=True)
    dcoefs = None
    if demodulate:
        wsq = wf.square().sum(dim=[2, 3])  # [O,I]
        dcoefs = (s.square() @ wsq.t() + 1e-8).rsqrt()  # [B,O]
    if fused is None:
        fused = b == 1
    if fused:
        w = wf[None] * s[:, None, :, None, None]  # [B,O,I,kh,kw]
        if dcoefs is not None:
            w = w * dcoefs[:, :, None, None, None]
        w = w.reshape(b * o, i, kh, kw).to(x.dtype)
        xg = x.reshape(1, b * i, *x.shape[2:])
        if up > 1:
            y = conv2d_up(xg, w, resample_filter, up, padding, groups=b, separable=separable)
        else:
            y = F.conv2d(xg, w, padding=padding, groups=b)
        y = y.reshape(b, o, *y.shape[2:])
        return y.add_(noise.to(y.dtype)) if noise is not None else y
    xs = x * s.to(x.dtype)[:, :, None, None]
    wx = wf.to(x.dtype)
    y = conv2d_up(xs, wx, resample_filter, up, padding, separable=separable) if up > 1 else F.conv2d(xs, wx, padding=padding)
    if dcoefs is not None:
        y = y.mul_(dcoefs.to(y.dtype)[:, :, None, None])
    return y.add_(noise.to(y.dtype)) if noise is not None else y


# ----------------------------------------------------------------------------------------------------------------
# StyleGAN3: modulated convolution, filtered leaky ReLU, filter design


def modulated_conv2d_sg3(
    x: torch.Tensor,  # [B,I,H,W]
    weight: torch.Tensor,  # [O,I,k,k]
    styles: torch.Tensor,  # [B,I]
    demodulate: bool = True,
    padding: int = 0,
    input_gain: torch.Tensor | None = None,  # [] or [I]
    bias: torch.Tensor | None = None,  # [O], added to the output
    fused: bool | None = None,
) -> torch.Tensor:
    """StyleGAN3 modulated convolution (weights and styles pre-normalised, optional input gain).

    The style normalisation is per sample (NVIDIA's is over the whole batch); under demodulation it cancels up
    to the 1e-8 epsilon, and per-sample keeps every sample independent of the others in the batch.
    """
    b = x.shape[0]
    o, i, kh, kw = weight.shape
    wf = weight.float()
    s = styles.float()  # [B,I]
    if demodulate:
        wf = wf * wf.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()
        s = s * s.square().mean(dim=1, keepdim=True).rsqrt()
    dcoefs = None
    if demodulate:
        wsq = wf.square().sum(dim=[2, 3])  # [O,I]
        dcoefs = (s.square() @ wsq.t() + 1e-8).rsqrt()  # [B,O]
    if input_gain is not None:
        s = s * input_gain.float()
    if fused is None:
        fused = b == 1
    if fused:
        w = wf[None] * s[:, None, :, None, None]  # [B,O,I,k,k]
        if dcoefs is not None:
            w = w * dcoefs[:, :, None, None, None]
        w = w.reshape(b * o, i, kh, kw).to(x.dtype)
        bb = bias.to(x.dtype).repeat(b) if bias is not None else None
        y = F.conv2d(x.reshape(1, b * i, *x.shape[2:]), w, bb, padding=padding, groups=b)
        return y.reshape(b, o, *y.shape[2:])
    y = F.conv2d(x * s.to(x.dtype)[:, :, None, None], wf.to(x.dtype), padding=padding)
    if dcoefs is not None:
        y = y.mul_(dcoefs.to(y.dtype)[:, :, None, None])
    if bias is not None:
        y = y.add_(bias.to(y.dtype)[None, :, None, None])
    return y


def filtered_lrelu(
    x: torch.Tensor,  # [B,C,H,W]
    fu: torch.Tensor | None = None,
    fd: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    gain: float = math.sqrt(2),
    slope: float = 0.2,
    clamp: float | None = None,
) -> torch.Tensor:
    """Bias, FIR upsample (gain up**2), leaky ReLU times gain, clamp, FIR downsample: NVIDIA's filtered_lrelu."""
    if b is not None:
        x = x + b.to(x.dtype)[None, :, None, None]
    # leaky ReLU is positively homogeneous, so the gain rides along with the upsampling filter's.
    y = upfirdn2d(x, fu, up=up, padding=padding, gain=up * up * gain, separable=fu is None or fu.ndim == 1)
    if y is x:
        y = y.clone()
    if slope != 1:
        y = F.leaky_relu_(y, slope)
    if clamp is not None:
        y = y.clamp_(-clamp, clamp)
    if fd is None and down == 1:
        return y
    return upfirdn2d(y, fd, down=down, separable=fd is None or fd.ndim == 1)


def _kaiser_beta(numtaps: int, width: float) -> float:
    """Kaiser window beta for a transition width (fraction of Nyquist), as scipy.signal.kaiser_beta/atten."""
    atten = 2.285 * (numtaps - 1) * np.pi * width + 7.95
    if atten > 50:
        return 0.1102 * (atten - 8.7)
    if atten > 21:
        return 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21)
    return 0.0


def design_lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float, radial: bool = False) -> torch.Tensor | None:
    """StyleGAN3's Kaiser-windowed low-pass filter: separable sinc (scipy's firwin) or radial jinc; None if 1 tap."""
    if numtaps == 1:
        return None
    nyq = fs / 2
    beta = _kaiser_beta(numtaps, width / nyq)
    window = np.kaiser(numtaps, beta)
    if not radial:
        m = np.arange(numtaps) - 0.5 * (numtaps - 1)
        c = cutoff / nyq
        h = c * np.sinc(c * m) * window
        return torch.as_tensor(h / h.sum(), dtype=torch.float32)
    t = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    r = torch.as_tensor(np.hypot(*np.meshgrid(t, t)), dtype=torch.float64)
    arg = 2 * cutoff * (np.pi * r)
    j1 = torch.special.bessel_j1(arg)
    f = torch.where(r > 0, j1 / (np.pi * r).clamp_min(1e-300), torch.full_like(r, cutoff))  # limit at r=0
    f = f.numpy() * np.outer(window, window)
    return torch.as_tensor(f / f.sum(), dtype=torch.float32)
