"""A diffusion network and its training schedule wrapped into k-diffusion's denoiser: `denoiser(x, sigma) -> x0`.

x lives in k-diffusion's variance-exploding space (x = x0 + sigma * noise); the network sees the variance-preserving
input x * c_in with c_in = 1 / sqrt(sigma^2 + 1) at the training timestep of sigma (interpolated in log sigma). Its
output is an epsilon, v or x0 prediction (Karras et al. 2022, table 1; Salimans & Ho 2022 for v):

    epsilon:       x0 = x - sigma * eps
    v_prediction:  x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
    sample:        x0 = out

With classes, `class_labels` [B] pick the class; guidance g != 1 mixes conditional and unconditional predictions
(Ho & Salimans 2022) out = uncond + g (cond - uncond) with the model's null class. Score-SDE UNets (facts.time_input
"sigma") see x unscaled at t = sigma and give the score: x0 = x + sigma^2 * out. A model with learned variance
(guided-diffusion's learned_range) also gives, on request, the interpolation fraction in [0, 1] between the
posterior's log variance and log beta that the DDPM sampler needs.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .facts import DiffusionFacts
from .schedules import sigma_to_t, training_sigmas

# Sentinel for "the model's own default" of the clip switch.
DEFAULT = None


def null_class_of(facts: DiffusionFacts) -> int | None:
    """The class index that means "no class" (trained for classifier-free guidance), or None when the model has none."""
    value = getattr(facts, "null_class", None)
    return None if value is None else int(value)


def check_class_labels(facts: DiffusionFacts, labels: torch.Tensor | None, name: str = "class_label") -> None:
    """Raise InputError when labels are given to an unconditional model or lie outside 0..num_classes-1."""
    if labels is None:
        return
    if facts.num_classes <= 0:
        raise InputError(f"{name}: this model is unconditional (no classes); use -1 (none), got "
                         f"{labels.flatten()[:4].tolist()}")
    bad = (labels < 0) | (labels >= facts.num_classes)
    if bool(bad.any()):
        raise InputError(f"{name}: expected a class in 0..{facts.num_classes - 1}, got {labels[bad][0].item()}")


class Denoiser:
    """k-diffusion denoiser over a network `model(x, t, class_labels) -> [B,out,H,W]` with its DiffusionFacts.

    clip: clamp x0 to the schedule's clip range (None: on for pixel models whose schedule says clip_sample, off for
    latent models). guidance: classifier-free guidance scale (1: off). The network is called in its own dtype and
    device (`placement`); x0 comes back in x's dtype.
    """

    def __init__(self, model: torch.nn.Module, facts: DiffusionFacts, *, clip: bool | None = DEFAULT,
                 guidance: float = 1.0) -> None:
        self.model = model
        self.facts = facts
        sched = facts.schedule
        self.prediction = sched.prediction_type
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"prediction_type: expected epsilon, v_prediction or sample, got {self.prediction!r}")
        self.clip = (sched.clip_sample and not facts.latent) if clip is None else bool(clip)
        self.clip_range = float(sched.clip_sample_range)
        self.guidance = float(guidance)
        self.sigmas = training_sigmas(sched)  # [T] float64
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self.learned_variance = bool(facts.learned_variance)
        self.sigma_input = getattr(facts, "time_input", "timestep") == "sigma"
        self.calls = 0  # network evaluations (a guided step counts once)
        if self.guidance != 1.0:
            if facts.num_classes <= 0:
                raise InputError(f"guidance: classifier-free guidance needs a class-conditional model; this one is "
                                 f"unconditional, set guidance to 1 (got {self.guidance:g})")
            if null_class_of(facts) is None:
                raise InputError(f"guidance: this model has no null (unconditional) class to guide against; set "
                                 f"guidance to 1 (got {self.guidance:g})")

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous training timesteps [B] (float64, CPU) of sigmas [B]."""
        return sigma_to_t(sigma, self.log_sigmas)

    def _network(self, x_in: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        device, dtype = _placement(self.model)
        out = self.model(x_in.to(device, dtype), t.to(device, torch.float32),
                         None if labels is None else labels.to(device))
        self.calls += 1
        return out.float()

    def raw(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
            ) -> torch.Tensor:  # [B,out,H,W] float32
        """The guided network output for x [B,C,H,W] at sigma [B] (prediction channels, then variance if learned)."""
        sig = sigma.detach().double().cpu().reshape(-1).expand(x.shape[0])
        if self.sigma_input:  # score-SDE (Fourier) UNets: unscaled x at the noise level itself
            t, x_in = sig, x
        else:
            c_in = (1.0 / (sig * sig + 1).sqrt()).to(x.device, x.dtype).view(-1, 1, 1, 1)
            t, x_in = self.sigma_to_t(sig), x * c_in
        if self.guidance == 1.0 or class_labels is None:
            return self._network(x_in, t, class_labels)
        null = torch.full_like(class_labels, null_class_of(self.facts))
        both = self._network(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([class_labels, null]))
        cond, uncond = both.chunk(2)
        c = x.shape[1]
        pred = uncond[:, :c] + self.guidance * (cond[:, :c] - uncond[:, :c])
        return torch.cat([pred, cond[:, c:]], dim=1)

    def to_x0(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor, clip: bool | None = None
              ) -> torch.Tensor:
        """x0 from the prediction channels of a raw output (clipped when the switch, or `clip`, is on)."""
        clip = self.clip if clip is None else clip
        sig = sigma.detach().double().cpu().reshape(-1).expand(x.shape[0])
        pred = out[:, : x.shape[1]]
        s = sig.to(x.device, x.dtype).view(-1, 1, 1, 1)
        if self.sigma_input:  # the network gives the score -eps / sigma
            x0 = x + s * s * pred
        elif self.prediction == "epsilon":
            x0 = x - s * pred
        elif self.prediction == "v_prediction":
            x0 = x / (s * s + 1) - pred * s / (s * s + 1).sqrt()
        else:
            x0 = pred
        return x0.clamp(-self.clip_range, self.clip_range) if clip else x0

    def x0_and_eps(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                   **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, possibly clipped; epsilon of the unclipped prediction) for x [B,C,H,W] at sigma [B]: what
        RePaint's step uses (diffusers' RePaintScheduler keeps the model's own epsilon for the direction term)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        x0 = self.to_x0(x, sigma, self.raw(x, sigma, class_labels), clip=False)
        s = sigma.reshape(-1).expand(x.shape[0]).to(x.device, x.dtype).view(-1, 1, 1, 1)
        eps = (x - x0) / s
        return (x0.clamp(-self.clip_range, self.clip_range) if self.clip else x0), eps

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                 return_variance: bool = False, **_: object):
        """x0 [B,C,H,W] for x at sigma [B]; with return_variance also the learned-range fraction [B,C,H,W] in [0,1]
        (None when the variance is not learned)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        out = self.raw(x, sigma, class_labels)
        x0 = self.to_x0(x, sigma, out)
        if not return_variance:
            return x0
        frac = (out[:, x.shape[1]:] + 1) / 2 if self.learned_variance and out.shape[1] == 2 * x.shape[1] else None
        return x0, frac


def _placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    from ..budget import placement

    return placement(model)
