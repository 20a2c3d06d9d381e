"""The field's evaluation: PSNR, SSIM and MS-SSIM between image batches; FID and KID between image sets.

    psnr(a, b), ssim(a, b), ms_ssim(a, b)        # [B,C,H,W] in [0,1] -> [B] per image (float64, CPU)
    f_real = features(desc, real); f_fake = features(desc, fake)    # [N,D] float64 from a feature network
    fid(f_real, f_fake); kid(f_real, f_fake, subset_size=1000, subsets=100, seed=0)

Pairs: two batches of equal size are compared image by image; a batch of one is compared with every image of the
other. Values follow the published definitions and their common implementations:
- SSIM (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, population (co)variances, averaged over
  the pixels where the window fits entirely and over channels: scikit-image's `structural_similarity(...,
  gaussian_weights=True, use_sample_covariance=False, data_range=1)`.
- MS-SSIM (Wang, Simoncelli & Bovik 2003): 5 scales with the weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333, 2x2
  average pooling between scales, contrast-structure at scales 1-4 and SSIM at scale 5, negative terms clipped at 0
  (torchmetrics' default `normalize="relu"`). As in Wang's code and TensorFlow, every term averages only where the
  window fits; torchmetrics averages its scale-5 SSIM over a reflection-padded border instead, so values differ
  from torchmetrics' by that border (the contrast terms are equal).
- FID (Heusel et al. 2017): Fréchet distance of Gaussian fits (unbiased covariances), in float64; the trace of the
  matrix square root from symmetric eigen-decompositions (no scipy).
- KID (Bińkowski et al. 2018): unbiased MMD² with the kernel (x.y/d + 1)^3, mean and population standard deviation
  over random subsets (torchmetrics' `KernelInceptionDistance`), seeded here.

FID and KID depend on the feature network: a score is comparable only with scores from the same network on the
same number of images. Inception weights are never assumed: `features` runs any extractor the manager loaded.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import budget, host
from .descriptor import ModelDescriptor
from .errors import InputError
from .image import match_channels, split_alpha
from .manager import ModelManager, get_manager
from .progress import Progress

log = logging.getLogger(__name__)

WINDOW = 11  # SSIM Gaussian window (taps)
SIGMA = 1.5
K1, K2 = 0.01, 0.03
MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, scales 1 (full size) to 5
MS_MIN_SIDE = WINDOW * 2 ** (len(MS_WEIGHTS) - 1)  # 176: the window still fits at the coarsest scale
KID_DEGREE = 3
MAX_FEATURE_CHUNK = 1024  # images per extractor call, at most


@dataclass(frozen=True)
class FeatureFacts:
    """What a feature network needs and gives (`desc.extra` of family "features"). `desc.model(x)` maps
    [B,in_channels,input_size,input_size] in [0,1] to features [B,dim]."""

    name: str  # e.g. "LeNet-5 f6": the network and the layer the features come from
    dim: int  # feature size
    input_size: int  # square side the network takes; images are resized to it (bilinear)
    in_channels: int  # 1: images are turned to grey (luma); 3: grey images are repeated


# ---------------------------------------------------------------- pairs of image batches


def _pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked [B,C,H,W] pair, broadcast one-vs-many, float32 on a's device."""
    for x, n in zip((a, b), names):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or 0 in x.shape:
            raise InputError(f"{n}: expected an image batch [B,C,H,W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not torch.isfinite(x).all():
            raise InputError(f"{n}: the images have NaN or Inf pixels")
    if a.shape[1:] != b.shape[1:]:
        raise InputError(f"{names[1]}: expected images like {names[0]} ({a.shape[1]} channels, "
                         f"{a.shape[2]}x{a.shape[3]}), got {b.shape[1]} channels, {b.shape[2]}x{b.shape[3]}; "
                         f"resize or convert one of them first")
    n = max(a.shape[0], b.shape[0])
    for x, nm in zip((a, b), names):
        if x.shape[0] not in (1, n):
            raise InputError(f"{nm}: expected 1 image or {n} (one per image of the other batch), got a batch of "
                             f"{x.shape[0]}")
    return a.float().expand(n, -1, -1, -1), b.to(a.device).float().expand(n, -1, -1, -1)


def _chunks(n: int, per_item_bytes: int, what: str, device: torch.device) -> list[slice]:
    """Slices of a batch of n whose intermediates stay within one call's budget (refused when one item cannot fit)."""
    budget.require(per_item_bytes, what, device)
    k = budget.fit_batch(per_item_bytes, n, budget.CPU_CALL_BYTES)  # a working set like any CPU call
    return [slice(i, min(n, i + k)) for i in range(0, n, k)]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0,
         names: tuple[str, str] = ("a", "b")) -> torch.Tensor:  # [B,C,H,W] x2 -> [B]
    """Peak signal-to-noise ratio in dB per image: 10 log10(range² / MSE); identical images give inf."""
    a, b = _pair(a, b, names)
    mse = torch.cat([(a[s].double() - b[s].double()).pow(2).flatten(1).mean(1)
                     for s in _chunks(a.shape[0], budget.tensor_bytes(*a.shape[1:], dtype=torch.float64) * 3,
                                      "PSNR", a.device)])
    return (10 * torch.log10(data_range**2 / mse)).cpu()


def _gaussian(device: torch.device, dtype: torch.dtype) -> torch.Tensor:  # [WINDOW]
    x = torch.arange(WINDOW, dtype=torch.float64) - (WINDOW - 1) / 2
    g = torch.exp(-0.5 * (x / SIGMA) ** 2)
    return (g / g.sum()).to(device, dtype)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # [...,H,W] -> [...,H-10,W-10]
    """Separable Gaussian over the positions where the window fits: a weighted sum of shifted views (float64
    convolutions have no fast CPU kernel; this is memory-bound and exact)."""
    h, w = x.shape[-2:]
    k, taps = len(g), g.tolist()
    y = x[..., : w - k + 1] * taps[0]
    for i in range(1, k):
        y.add_(x[..., i : i + w - k + 1], alpha=taps[i])
    z = y[..., : h - k + 1, :] * taps[0]
    for i in range(1, k):
        z.add_(y[..., i : i + h - k + 1, :], alpha=taps[i])
    return z


def _ssim_cs(a: torch.Tensor, b: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSIM, contrast-structure) per image of [n,C,H,W] float64, each averaged over the valid window positions and
    the channels -> ([n], [n]). Computed in bands of rows (overlapping by the window) within one call's budget:
    the sums over the bands are the sums over the image, so a band size changes nothing but memory. Bands near the
    cache size (budget.CPU_CACHE_BYTES): 3x faster than whole 1024² images, measured."""
    n, c, h, w = a.shape
    rows = h - WINDOW + 1
    band = max(1, min(rows, budget.CPU_CACHE_BYTES // budget.tensor_bytes(16, n, c, 1, w, dtype=torch.float64)))
    g = _gaussian(a.device, a.dtype)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    sim_sum = cs_sum = torch.zeros(n, dtype=torch.float64, device=a.device)
    for r in range(0, rows, band):
        part = slice(r, min(rows, r + band) + WINDOW - 1)
        x, y = a[..., part, :], b[..., part, :]
        mu_a, mu_b, e_aa, e_bb, e_ab = _blur(torch.stack([x, y, x * x, y * y, x * y]), g).unbind(0)  # [n,c,r',w']
        var_a, var_b, cov = e_aa - mu_a * mu_a, e_bb - mu_b * mu_b, e_ab - mu_a * mu_b
        cs = (2 * cov + c2) / (var_a + var_b + c2)
        lum = (2 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)
        sim_sum = sim_sum + (lum * cs).flatten(1).sum(1)
        cs_sum = cs_sum + cs.flatten(1).sum(1)
        host.throw_if_interrupted()
    count = c * rows * (w - WINDOW + 1)
    return sim_sum / count, cs_sum / count


def _ssim_bytes(c: int, h: int, w: int) -> int:
    """Bytes per image pair outside the bands: float64 copies of both (and, for MS-SSIM, their pooled copies)."""
    return budget.tensor_bytes(4, c, h, w, dtype=torch.float64)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0,
         names: tuple[str, str] = ("a", "b")) -> torch.Tensor:  # [B,C,H,W] x2 -> [B]
    """Structural similarity per image (Gaussian window 11, sigma 1.5; see the module docstring)."""
    a, b = _pair(a, b, names)
    if min(a.shape[-2:]) < WINDOW:
        raise InputError(f"{names[0]}: SSIM needs images of at least {WINDOW}x{WINDOW} pixels (its window), got "
                         f"{a.shape[-2]}x{a.shape[-1]}")
    out = []
    parts = _chunks(a.shape[0], _ssim_bytes(*a.shape[1:]), f"SSIM of {a.shape[-2]}x{a.shape[-1]} images", a.device)
    with Progress(len(parts), "SSIM", enabled=len(parts) > 1) as p:
        for s in parts:
            out.append(_ssim_cs(a[s].double(), b[s].double(), data_range)[0])
            p.update()
    return torch.cat(out).cpu()


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0,
            names: tuple[str, str] = ("a", "b")) -> torch.Tensor:  # [B,C,H,W] x2 -> [B]
    """Multi-scale SSIM per image (5 scales; see the module docstring). Both sides must be >= MS_MIN_SIDE (176)."""
    a, b = _pair(a, b, names)
    h, w = a.shape[-2:]
    if min(h, w) < MS_MIN_SIDE:
        raise InputError(f"{names[0]}: MS-SSIM needs images of at least {MS_MIN_SIDE}x{MS_MIN_SIDE} pixels (5 scales: "
                         f"the {WINDOW}-pixel window must fit at 1/16 size), got {h}x{w}; use SSIM for small images")
    weights = torch.tensor(MS_WEIGHTS, dtype=torch.float64, device=a.device)
    out = []
    parts = _chunks(a.shape[0], _ssim_bytes(*a.shape[1:]), f"MS-SSIM of {h}x{w} images", a.device)
    with Progress(len(parts), "MS-SSIM", enabled=len(parts) > 1) as p:
        for s in parts:
            x, y = a[s].double(), b[s].double()
            terms = []
            for k in range(len(MS_WEIGHTS)):
                sim, cs = _ssim_cs(x, y, data_range)
                terms.append(cs if k < len(MS_WEIGHTS) - 1 else sim)
                if k < len(MS_WEIGHTS) - 1:
                    x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            values = torch.stack(terms).clamp(min=0)  # [5,n]
            out.append((values ** weights[:, None]).prod(0))
            p.update()
    return torch.cat(out).cpu()


# ---------------------------------------------------------------- FID and KID from features


def _features_in(f: torch.Tensor, name: str, min_rows: int = 2) -> torch.Tensor:
    if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[1] == 0:
        raise InputError(f"{name}: expected features [N,D], got "
                         f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
    if f.shape[0] < min_rows:
        raise InputError(f"{name}: expected at least {min_rows} images (a covariance needs two samples or more), "
                         f"got {f.shape[0]}")
    if not torch.isfinite(f).all():
        raise InputError(f"{name}: the features have NaN or Inf values")
    return f.detach().to("cpu", torch.float64)


def _same_dim(f1: torch.Tensor, f2: torch.Tensor, names: tuple[str, str]) -> None:
    if f1.shape[1] != f2.shape[1]:
        raise InputError(f"{names[1]}: expected {f1.shape[1]}-d features like {names[0]}, got {f2.shape[1]}-d "
                         f"(both sets must go through the same feature network)")


def gaussian_fit(f: torch.Tensor, name: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """[N,D] -> (mean [D], unbiased covariance [D,D]), float64."""
    f = _features_in(f, name)
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:  # [D,D] symmetric PSD -> its symmetric square root
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """||mu1 - mu2||² + tr(s1 + s2 - 2 (s1 s2)^½), with tr (s1 s2)^½ = sum of sqrt eigenvalues of s1^½ s2 s1^½
    (similar to s1 s2, but symmetric PSD: no complex square root, no scipy)."""
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def fid(f1: torch.Tensor, f2: torch.Tensor, names: tuple[str, str] = ("real", "generated")) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets [N1,D], [N2,D] (N >= 2 each)."""
    mu1, s1 = gaussian_fit(f1, names[0])
    mu2, s2 = gaussian_fit(f2, names[1])
    _same_dim(f1, f2, names)
    return frechet_distance(mu1, s1, mu2, s2)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² of two equal-size sets [m,D] with the kernel (x.y/D + 1)^3 (Bińkowski et al. 2018)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** KID_DEGREE
    k_yy = (y @ y.T / d + 1) ** KID_DEGREE
    k_xy = (x @ y.T / d + 1) ** KID_DEGREE
    same = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(same - 2 * k_xy.sum() / (m * m))


def kid(f1: torch.Tensor, f2: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0,
        names: tuple[str, str] = ("real", "generated")) -> tuple[float, float, int]:
    """KID: (mean, population std) of the unbiased MMD² over `subsets` random subsets of each set, and the subset
    size used (`subset_size`, or the smaller set's size when that is smaller; at least 2)."""
    x, y = _features_in(f1, names[0]), _features_in(f2, names[1])
    _same_dim(x, y, names)
    if subsets < 1 or subset_size < 2:
        raise InputError(f"kid: expected subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    g = torch.Generator().manual_seed(int(seed))
    scores = torch.tensor([mmd2_unbiased(x[torch.randperm(x.shape[0], generator=g)[:m]],
                                         y[torch.randperm(y.shape[0], generator=g)[:m]]) for _ in range(subsets)],
                          dtype=torch.float64)
    return float(scores.mean()), float(scores.std(unbiased=False)), m


# ---------------------------------------------------------------- features of an image set


def features(desc: ModelDescriptor, images: torch.Tensor, *, manager: ModelManager | None = None,
             name: str = "images") -> torch.Tensor:
    """Features [N,D] float64 on the CPU of images [N,C,H,W] in [0,1] through a feature network (family
    "features"): alpha dropped, channels and size made what the network takes, run in chunks that fit the
    manager's activation budget on its device and dtype."""
    facts = desc.extra
    if not isinstance(facts, FeatureFacts):
        raise InputError(f"feature network: expected a feature extractor, got a {desc.family} model "
                         f"({desc.architecture})")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or 0 in images.shape or images.shape[1] > 4:
        raise InputError(f"{name}: expected an image batch [N,C,H,W] with 1-4 channels, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    manager = manager or get_manager()
    n, c, h, w = images.shape
    device, dtype = manager.compute_device, manager.dtype_for(desc)
    s = facts.input_size
    per_item = (budget.pass_bytes(desc, s * s, 1, dtype) + budget.tensor_bytes(c + facts.in_channels, h, w)
                + budget.tensor_bytes(facts.in_channels, s, s))
    chunk = budget.fit_batch(per_item, n, budget.call_budget(manager.activation_budget(desc), device),
                             MAX_FEATURE_CHUNK)
    out = []
    with manager.use(desc, desc.weight_bytes + per_item * chunk) as model:
        device, dtype = budget.placement(model)
        with Progress(math.ceil(n / chunk), f"features ({facts.name})", enabled=n > chunk) as p, torch.inference_mode():
            for i in range(0, n, chunk):
                x = _prepare(images[i : i + chunk].to(device, torch.float32), facts)  # [k,c',s,s]
                out.append(model(x.to(dtype)).double().cpu())  # [k,D]
                p.update()
    return torch.cat(out)


def _prepare(x: torch.Tensor, facts: FeatureFacts) -> torch.Tensor:  # [k,C,H,W] -> [k,in_channels,s,s]
    x, _alpha = split_alpha(x)
    x = match_channels(x, facts.in_channels)
    s = facts.input_size
    if tuple(x.shape[-2:]) != (s, s):
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                          antialias=min(x.shape[-2:]) > s).clamp(0, 1)
    return x


def extractor_label(desc: ModelDescriptor) -> str:
    """'LeNet-5 f6, 84-d, lenet_classifier.pth': what a score must be reported with."""
    facts: FeatureFacts = desc.extra
    return f"{facts.name}, {facts.dim}-d, {os.path.basename(desc.source) or desc.architecture}"
