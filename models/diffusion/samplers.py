"""Samplers as plain functions in k-diffusion's shape:

    x0_sample = sample_euler(denoiser, x, sigmas, extra_args={"class_labels": y}, callback=cb)

`model(x, sigma, **extra_args) -> x0` is a denoiser (denoiser.py) in the variance-exploding space x = x0 + sigma * n;
`x` starts as noise * sigmas[0] (or a noised image for img2img); `sigmas` [N+1] descends to 0 (schedules.py).
`callback({"x", "i", "sigma", "sigma_hat", "denoised"})` runs after each step's first network call. Stochastic
samplers draw fresh noise through `noise_sampler(sigma, sigma_next) -> [B,C,H,W]`; the default one draws item i from
its own CPU generator seeded with seed + i (models/latents.py), so a batch item equals the same seed run alone.
Each sampler equals the diffusers scheduler of the same name given the same sigmas and noise (tests/models/
test_diffusion_samplers.py). Scalar coefficients are computed in float64 from python floats, so sigmas may live on any
device and the sampler works on CUDA and MPS alike.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..latents import generator

NoiseSampler = Callable[[float, float], torch.Tensor]
NOISE_STREAM = 1  # the per-step noise stream of a seed; stream 0 is the initial noise


def seeded_noise_sampler(x: torch.Tensor, seed: int = 0, stream: int = NOISE_STREAM) -> NoiseSampler:
    """Noise like x [B,...]: item i from its own CPU generator seeded with seed + i (stream `stream`), drawn on the
    CPU and moved to x's device and dtype; each call advances every item's generator."""
    gens = [generator(int(seed) + i, stream) for i in range(x.shape[0])]
    shape, device, dtype = tuple(x.shape[1:]), x.device, x.dtype

    def sample(sigma: float = 0.0, sigma_next: float = 0.0) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)

    return sample


def _sigma_list(sigmas: torch.Tensor) -> list[float]:
    return [float(s) for s in sigmas.detach().double().cpu().tolist()]


def _steps(n: int, disable: bool | None) -> range | Any:
    if disable is False:
        from tqdm.auto import trange

        return trange(n)
    return range(n)


def _call(model: Callable, x: torch.Tensor, sigma: float, extra: dict, **kw: Any) -> Any:
    return model(x, torch.full((x.shape[0],), sigma, dtype=torch.float64), **extra, **kw)


def _noise(noise_sampler: NoiseSampler | None, x: torch.Tensor) -> NoiseSampler:
    return noise_sampler if noise_sampler is not None else seeded_noise_sampler(x, 0)


def _report(callback: Callable | None, x: torch.Tensor, i: int, sigma: float, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 2 without churn)."""
    extra, s = extra_args or {}, _sigma_list(sigmas)
    for i in _steps(len(s) - 1, disable):
        denoised = _call(model, x, s[i], extra)
        _report(callback, x, i, s[i], denoised)
        x = x + (x - denoised) * ((s[i + 1] - s[i]) / s[i])
    return x


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to (k-diffusion)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return math.sqrt(sigma_to ** 2 - up ** 2), up


@torch.no_grad()
def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Euler ancestral sampling (Song et al. 2021 reverse SDE, k-diffusion's ancestral step)."""
    extra, s, noise = extra_args or {}, _sigma_list(sigmas), _noise(noise_sampler, x)
    for i in _steps(len(s) - 1, disable):
        denoised = _call(model, x, s[i], extra)
        _report(callback, x, i, s[i], denoised)
        down, up = get_ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) * ((down - s[i]) / s[i])
        if s[i + 1] > 0 and up > 0:
            x = x + noise(s[i], s[i + 1]) * up
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, algorithm 1); the last step to sigma 0 is Euler."""
    extra, s = extra_args or {}, _sigma_list(sigmas)
    for i in _steps(len(s) - 1, disable):
        denoised = _call(model, x, s[i], extra)
        _report(callback, x, i, s[i], denoised)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
            continue
        x2 = x + d * dt
        d2 = (x2 - _call(model, x2, s[i + 1], extra)) / s[i + 1]
        x = x + (d + d2) * (dt / 2)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2; midpoint form, first order at the ends)."""
    extra, s = extra_args or {}, _sigma_list(sigmas)
    old_denoised, h_last = None, 0.0
    for i in _steps(len(s) - 1, disable):
        denoised = _call(model, x, s[i], extra)
        _report(callback, x, i, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i]) - math.log(s[i + 1])  # lambda = -log sigma
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
        x = x * (s[i + 1] / s[i]) - d * math.expm1(-h)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", SDE variant; midpoint form as k-diffusion/diffusers)."""
    extra, s, noise = extra_args or {}, _sigma_list(sigmas), _noise(noise_sampler, x)
    old_denoised, h_last = None, 0.0
    for i in _steps(len(s) - 1, disable):
        denoised = _call(model, x, s[i], extra)
        _report(callback, x, i, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        eta_h = eta * h
        x = x * (s[i + 1] / s[i] * math.exp(-eta_h)) + denoised * (-math.expm1(-h - eta_h))
        if old_denoised is not None:
            r = h_last / h
            x = x + (denoised - old_denoised) * (0.5 * -math.expm1(-h - eta_h) / r)
        if eta:
            x = x + noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, eta: float = 0.0,
                noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12; eta 0 deterministic, 1 DDPM-like);
    epsilon is re-derived from the (possibly clipped) x0, as guided-diffusion does."""
    extra, s = extra_args or {}, _sigma_list(sigmas)
    noise = _noise(noise_sampler, x) if eta else None
    for i in _steps(len(s) - 1, disable):
        denoised = _call(model, x, s[i], extra)
        _report(callback, x, i, s[i], denoised)
        ac, acp = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        var = eta * eta * (1 - acp) / (1 - ac) * (1 - ac / acp)
        eps = (x - denoised) / s[i]
        x = denoised + eps * math.sqrt(max(1 - acp - var, 0.0) / acp)
        if noise is not None and s[i + 1] > 0 and var > 0:
            x = x + noise(s[i], s[i + 1]) * math.sqrt(var / acp)
    return x


@torch.no_grad()
def sample_ddpm(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None,
                noise_sampler: NoiseSampler | None = None, variance: str = "fixed_small") -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, algorithm 2) over any sigma sequence, with the posterior's fixed-small
    variance (or fixed_large: beta), or the learned range of Nichol & Dhariwal 2021 when the denoiser returns one."""
    extra, s, noise = extra_args or {}, _sigma_list(sigmas), _noise(noise_sampler, x)
    for i in _steps(len(s) - 1, disable):
        denoised, frac = _call(model, x, s[i], extra, return_variance=True)
        _report(callback, x, i, s[i], denoised)
        ac, acp = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        beta = 1 - ac / acp
        x_vp = x * math.sqrt(ac)
        mean = denoised * (math.sqrt(acp) * beta / (1 - ac)) + x_vp * (math.sqrt(1 - beta) * (1 - acp) / (1 - ac))
        if s[i + 1] > 0:
            var = max((1 - acp) / (1 - ac) * beta, 1e-20)
            if frac is None and variance == "fixed_large":
                var = beta
            if frac is not None:
                std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(var)))
            else:
                std = math.sqrt(var)
            mean = mean + noise(s[i], s[i + 1]) * std
        x = mean / math.sqrt(acp)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
STOCHASTIC = ("ddpm", "ddim", "euler_ancestral", "dpmpp_2m_sde")


def model_calls(sampler: str, steps: int) -> int:
    """Network evaluations a sampler makes for `steps` steps ending at sigma 0 (guidance doubles the batch, not this)."""
    return 2 * steps - 1 if sampler == "heun" else steps
