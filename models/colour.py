"""Colour transfer shared by every family: Reinhard mean/std in CIE Lab, histogram matching, luminance transfer.

Images are RGB tensors [B,3,H,W] in [0,1] (sRGB). Every function accepts optional masks in [0,1]:

* `mask` [B|1,H,W] (or [B|1,1,H,W]) on the image: where the image is changed, and where its own statistics come from
  (soft values weight both). None means the whole image.
* `ref_mask` [B|1,h,w] on the reference: where the reference's statistics come from. None means the whole reference.

The inpainting family's colour match is `colour_transfer(result, original, mask=hole, ref_mask=1 - hole)`: the hole
takes the colours of its surroundings. The style family's "preserve colours" is `luminance_transfer`.

The sRGB <-> Lab conversion follows scikit-image's `rgb2lab`/`lab2rgb` (D65 white, 2° observer) exactly, so results
can be checked against it. Nothing here needs gradients.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch

from .errors import InputError

log = logging.getLogger(__name__)

Method = Literal["reinhard", "histogram"]
METHODS: tuple[str, ...] = ("reinhard", "histogram")

# sRGB (linear) -> XYZ, the matrix scikit-image uses (ITU-R BT.709 primaries, D65).
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS_STD = 1e-6  # a channel with less spread than this is treated as constant: only its mean moves


# ---------------------------------------------------------------- sRGB <-> Lab


def _mix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix over the channel axis of [B,3,H,W]."""
    return torch.einsum("ij,bjhw->bihw", m.to(device=x.device, dtype=x.dtype), x)


def _lab_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 unless the input is float64 (half inputs are converted up: cube roots in fp16 lose too much)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] in [0,1] -> [B,3,H,W] L in [0,100], a, b
    """sRGB to CIE Lab (D65), as skimage.color.rgb2lab."""
    _check_rgb(rgb, "image")
    x = rgb.to(_lab_dtype(rgb))
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055).clamp_min(0).pow(2.4), x / 12.92)
    xyz = _mix(lin, _XYZ_FROM_RGB) / _WHITE_D65.to(x).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0).pow(1 / 3), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] Lab -> [B,3,H,W] sRGB clipped to [0,1]
    """CIE Lab (D65) to sRGB, as skimage.color.lab2rgb (negative Z clipped, result clipped to [0,1])."""
    x = lab.to(_lab_dtype(lab))
    L, a, b = x.unbind(1)
    fy = (L + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp_min(0)], 1)
    xyz = torch.where(f > 0.2068966, f.pow(3), (f - 16.0 / 116.0) / 7.787) * _WHITE_D65.to(x).view(1, 3, 1, 1)
    lin = _mix(xyz, torch.linalg.inv(_XYZ_FROM_RGB))
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0).pow(1 / 2.4) - 0.055, lin * 12.92)
    return rgb.clamp(0, 1)


# ---------------------------------------------------------------- masks and statistics


def _check_rgb(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"{name}: expected an RGB tensor [B,3,H,W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name}: expected floating-point values in [0,1], got dtype {x.dtype}")


def _weights(mask: torch.Tensor | None, like: torch.Tensor, name: str) -> torch.Tensor:  # -> [B|1,1,H,W] in [0,1]
    """A mask as per-pixel weights broadcastable over `like` [B,3,H,W]; all ones when None."""
    B, _, H, W = like.shape
    if mask is None:
        return torch.ones(1, 1, H, W, dtype=like.dtype, device=like.device)
    m = mask
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[-2:] != (H, W) or m.shape[0] not in (1, B):
        raise InputError(f"{name}: expected [B,H,W] with B 1 or {B} and size {H}x{W}, got {tuple(mask.shape)}")
    return m.to(device=like.device, dtype=like.dtype).clamp(0, 1)


def _batch_size(image: torch.Tensor, reference: torch.Tensor) -> int:
    if reference.shape[0] not in (1, image.shape[0]):
        raise InputError(
            f"reference: expected a batch of 1 (one reference for all) or {image.shape[0]} (one per image), "
            f"got {reference.shape[0]}"
        )
    return image.shape[0]


def weighted_mean_std(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (population) std of x [B,C,H,W] under weights w [B|1,1,H,W] -> [B,C,1,1]."""
    total = w.sum((-2, -1), keepdim=True).clamp_min(1e-12)  # [B|1,1,1,1]
    mean = (x * w).sum((-2, -1), keepdim=True) / total
    var = ((x - mean).square() * w).sum((-2, -1), keepdim=True) / total
    return mean, var.clamp_min(0).sqrt()


def _require_weight(w: torch.Tensor, name: str) -> None:
    empty = (w.flatten(1).sum(1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"{name}: the mask selects no pixels (item {empty[0]}); it must cover part of the image")


# ---------------------------------------------------------------- transfers


def colour_transfer(
    image: torch.Tensor,  # [B,3,H,W] in [0,1]
    reference: torch.Tensor,  # [B|1,3,h,w] in [0,1]
    method: Method = "reinhard",
    mask: torch.Tensor | None = None,  # [B|1,H,W] where to change `image` (and where its statistics come from)
    ref_mask: torch.Tensor | None = None,  # [B|1,h,w] where the reference's statistics come from
    strength: float = 1.0,
) -> torch.Tensor:  # [B,3,H,W] in [0,1], image's dtype and device
    """Give `image` the colours of `reference`: "reinhard" matches per-channel mean and std in CIE Lab (Reinhard et
    al. 2001, in Lab rather than lαβ); "histogram" matches each RGB channel's cumulative histogram (as
    skimage.exposure.match_histograms). `strength` in [0,1] blends between the image (0) and the transfer (1)."""
    _check_rgb(image, "image")
    _check_rgb(reference, "reference")
    if method not in METHODS:
        raise InputError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 <= float(strength) <= 1.0:
        raise InputError(f"strength: expected a value in [0,1], got {strength}")
    B = _batch_size(image, reference)
    w_img = _weights(mask, image, "mask")
    w_ref = _weights(ref_mask, reference, "ref_mask")
    _require_weight(w_ref, "ref_mask")
    if strength == 0 or float(w_img.sum()) == 0:
        return image.clone()
    out = torch.empty_like(image)
    for b in range(B):  # one item at a time: Lab copies of a 4K batch would not fit
        img, wi = image[b : b + 1], w_img[min(b, w_img.shape[0] - 1)][None]
        ref = reference[min(b, reference.shape[0] - 1)][None]
        wr = w_ref[min(b, w_ref.shape[0] - 1)][None]
        if method == "reinhard":
            moved = _reinhard(img, ref, wi, wr)
        else:
            moved = _histogram(img, ref, wi, wr)
        k = wi * float(strength)  # [1,1,H,W]: soft masks and strength blend alike
        out[b : b + 1] = (img + k * (moved.to(img) - img)).clamp(0, 1)
    return out


def _reinhard(img: torch.Tensor, ref: torch.Tensor, wi: torch.Tensor, wr: torch.Tensor) -> torch.Tensor:
    """[1,3,H,W] with its Lab mean/std (under wi) moved to the reference's (under wr)."""
    src, tgt = rgb_to_lab(img), rgb_to_lab(ref)
    if float(wi.sum()) <= 0:
        return img
    m_s, s_s = weighted_mean_std(src, wi.to(src))
    m_t, s_t = weighted_mean_std(tgt, wr.to(tgt))
    scale = torch.where(s_s > _EPS_STD, s_t / s_s.clamp_min(_EPS_STD), torch.ones_like(s_s))  # constant: shift only
    return lab_to_rgb((src - m_s) * scale + m_t)


def _weighted_quantiles(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted distinct values, their cumulative weight share, and each input's index into them."""
    uniq, inverse = torch.unique(values, sorted=True, return_inverse=True)
    mass = torch.zeros(uniq.shape[0], dtype=torch.float64, device=values.device)
    mass.index_add_(0, inverse, weights.to(torch.float64))
    return uniq, mass.cumsum(0) / mass.sum().clamp_min(1e-300), inverse


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp for increasing xp: piecewise linear, constant beyond the ends."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    i = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = ((x - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0, 1)
    return f0 + t * (f1 - f0)


def match_channel(src: torch.Tensor, w_src: torch.Tensor, tmpl: torch.Tensor, w_tmpl: torch.Tensor) -> torch.Tensor:
    """One channel's values [N] remapped so their weighted cumulative histogram matches the template's [M]."""
    keep_s, keep_t = w_src > 0, w_tmpl > 0
    s_vals, s_q, _ = _weighted_quantiles(src[keep_s], w_src[keep_s])
    t_vals, t_q, _ = _weighted_quantiles(tmpl[keep_t], w_tmpl[keep_t])
    mapped = _interp(s_q, t_q, t_vals.to(torch.float64))  # [distinct source values]
    idx = torch.searchsorted(s_vals, src).clamp_max(s_vals.numel() - 1)
    exact = s_vals[idx] == src  # pixels outside the mask may hold values the mask never saw: interpolate those
    if bool(exact.all()):
        return mapped[idx]
    return torch.where(exact, mapped[idx], _interp(src.to(torch.float64), s_vals.to(torch.float64), mapped))


def _histogram(img: torch.Tensor, ref: torch.Tensor, wi: torch.Tensor, wr: torch.Tensor) -> torch.Tensor:
    """[1,3,H,W] with each channel's histogram (under wi) matched to the reference's (under wr)."""
    out = torch.empty_like(img, dtype=torch.float64)
    w_src, w_tmpl = wi.flatten(), wr.flatten()
    for c in range(3):
        src, tmpl = img[0, c].contiguous().view(-1), ref[0, c].contiguous().view(-1)
        out[0, c] = match_channel(src, w_src, tmpl, w_tmpl).view(img.shape[-2:])
    return out


def luminance_transfer(
    stylised: torch.Tensor,  # [B,3,H,W] in [0,1]
    content: torch.Tensor,  # [B,3,H,W] in [0,1], same size
) -> torch.Tensor:  # [B,3,H,W]
    """Keep the content's colours: Lab lightness from `stylised`, a/b chroma from `content` (Gatys et al. 2016,
    "Preserving color in neural artistic style transfer", luminance-only transfer)."""
    _check_rgb(stylised, "stylised")
    _check_rgb(content, "content")
    if stylised.shape != content.shape:
        raise InputError(f"content: expected shape {tuple(stylised.shape)} like the stylised image, got "
                         f"{tuple(content.shape)}")
    out = torch.empty_like(stylised)
    for b in range(stylised.shape[0]):
        s, c = rgb_to_lab(stylised[b : b + 1]), rgb_to_lab(content[b : b + 1])
        out[b : b + 1] = lab_to_rgb(torch.cat([s[:, :1], c[:, 1:]], 1)).to(out)
    return out
