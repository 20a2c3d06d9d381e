"""Noise schedules as plain functions: the training schedule (betas, alphas_cumprod, sigmas), the timestep <-> sigma
mapping, and the step spacings that turn a step count into a sigma sequence ending in 0 (k-diffusion's convention).

Sigma is the variance-exploding noise level of k-diffusion: x = x0 + sigma * noise, with sigma = sqrt((1 - ac) / ac)
for the variance-preserving training schedule's alphas_cumprod `ac`. The betas are computed exactly as diffusers'
schedulers compute them (float32), everything derived from them in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError
from .facts import BETA_SCHEDULES, TrainingSchedule

SPACINGS = ("leading", "trailing", "linspace", "karras")


def get_betas(schedule: TrainingSchedule) -> torch.Tensor:  # [T] float32
    """The training betas, as diffusers' DDPMScheduler computes them (explicit trained_betas win)."""
    n = int(schedule.num_train_timesteps)
    if getattr(schedule, "trained_betas", None) is not None:
        return torch.tensor(schedule.trained_betas, dtype=torch.float32)
    if schedule.beta_schedule == "linear":
        return torch.linspace(schedule.beta_start, schedule.beta_end, n, dtype=torch.float32)
    if schedule.beta_schedule == "scaled_linear":
        return torch.linspace(schedule.beta_start ** 0.5, schedule.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    if schedule.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, capped at 0.999
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise InputError(f"beta_schedule: expected one of {', '.join(BETA_SCHEDULES)}, got {schedule.beta_schedule!r}")


def get_alphas_cumprod(schedule: TrainingSchedule) -> torch.Tensor:  # [T] float32
    """Cumulative product of (1 - beta), as diffusers computes it (float32)."""
    return torch.cumprod(1.0 - get_betas(schedule), dim=0)


def training_sigmas(schedule: TrainingSchedule) -> torch.Tensor:  # [T] float64, ascending with t
    """sigma_t = sqrt((1 - ac_t) / ac_t) for every training timestep t."""
    ac = get_alphas_cumprod(schedule).double()
    return ((1 - ac) / ac).sqrt()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous training timestep of each sigma, interpolated linearly in log sigma (k-diffusion's
    DiscreteSchedule.sigma_to_t; diffusers' _sigma_to_t). log_sigmas [T] ascending; returns float64, shape of sigma."""
    shape = sigma.shape
    log_sigmas = log_sigmas.double().cpu()
    log_sigma = sigma.detach().double().cpu().reshape(-1).clamp_min(1e-10).log()
    dists = log_sigma[None] - log_sigmas[:, None]  # [T,N]
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(shape)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma of continuous timesteps t, interpolated linearly in log sigma (the inverse of sigma_to_t)."""
    t = t.double().cpu().clamp(0, log_sigmas.shape[0] - 1)
    low_idx, high_idx = t.floor().long(), t.ceil().long()
    w = t - low_idx
    log_sigma = (1 - w) * log_sigmas[low_idx].double() + w * log_sigmas[high_idx].double()
    return log_sigma.exp()


def spaced_timesteps(steps: int, num_train_timesteps: int, spacing: str = "leading",
                     steps_offset: int = 0) -> np.ndarray:  # [steps] float64, descending
    """The timesteps of a run of `steps` steps, as diffusers' schedulers space them (Lin et al. 2023, table 2):
    leading (DDPM/DDIM default) and trailing give integers; linspace gives EulerDiscreteScheduler's fractional ones."""
    n, T = int(steps), int(num_train_timesteps)
    if n < 1 or n > T:
        raise InputError(f"steps: expected 1 to {T} (the model's training timesteps), got {steps}")
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round().astype(np.float64) - 1
    raise InputError(f"spacing: expected one of leading, trailing, linspace, karras; got {spacing!r}")


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:  # [n+1]
    """Karras et al. (2022) noise levels, ending in 0 (k-diffusion's get_sigmas_karras)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sigmas_from_timesteps(timesteps: np.ndarray | torch.Tensor, schedule: TrainingSchedule) -> torch.Tensor:
    """Sigmas of the given (descending) training timesteps, then a final 0. [N+1] float64."""
    log_sigmas = training_sigmas(schedule).log()
    t = torch.as_tensor(np.asarray(timesteps, dtype=np.float64))
    return torch.cat([t_to_sigma(t, log_sigmas), torch.zeros(1, dtype=torch.float64)])


def get_sigmas(schedule: TrainingSchedule, steps: int, spacing: str = "leading", rho: float = 7.0) -> torch.Tensor:
    """The sigma sequence [steps+1] (float64, descending, last 0) for `steps` model steps with `spacing`
    (leading, trailing, linspace as diffusers' schedulers; karras between the model's smallest and largest sigma)."""
    if spacing == "karras":
        T = int(schedule.num_train_timesteps)
        if steps < 1:
            raise InputError(f"steps: expected at least 1, got {steps}")
        s = training_sigmas(schedule)
        return get_sigmas_karras(steps, float(s[0]), float(s[T - 1]), rho)
    return sigmas_from_timesteps(spaced_timesteps(steps, schedule.num_train_timesteps, spacing), schedule)


def alpha_cumprod_of_sigma(sigma: float) -> float:
    """The variance-preserving alphas_cumprod of a sigma: 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigma * sigma)
