"""The typed facts of a loaded diffusion denoiser network: what the samplers and nodes need to know about it.

The contract between the architectures (`unet2d.py`, `adm.py`) and everything that samples:

    desc.family == "diffusion"; desc.extra is a DiffusionFacts
    eps_or_v_or_x0 = desc.model(x, t, class_labels)   # x [B,C,H,W] (model space: pixels in -1..1 or latents),
                                                       # t [B] float training timesteps in [0, T), class_labels [B]
                                                       # long or None -> [B,out_channels,H,W]

With learned variance the output has 2*C channels: the first C are the prediction, the rest the variance
interpolation values (guided-diffusion's "learned_range"). Samplers never see the network: `denoiser.py` wraps it
with its schedule into k-diffusion's `model(x, sigma) -> x0`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class TrainingSchedule:
    """The noise schedule the network was trained with (diffusers' scheduler_config names)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # one of BETA_SCHEDULES (diffusers' meaning: "linear" is linear in beta)
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # one of PREDICTIONS
    clip_sample: bool = True  # clip x0 to [-clip_sample_range, clip_sample_range] (pixel models)
    clip_sample_range: float = 1.0
    trained_betas: tuple[float, ...] | None = None  # explicit betas (diffusers' trained_betas); wins over the above


@dataclass(frozen=True)
class DiffusionFacts:
    kind: str  # "UNet2DModel" | "ADM"
    in_channels: int
    sample_size: int | None  # the training resolution (None: unknown); any multiple of size_multiple runs
    size_multiple: int  # H and W must be multiples of this (2 ** number of downsamplings)
    num_classes: int = 0  # 0: unconditional
    learned_variance: bool = False  # output has 2*in_channels channels
    latent: bool = False  # works on VAE latents (LATENT in/out) rather than pixels in -1..1
    schedule: TrainingSchedule = field(default_factory=TrainingSchedule)
    null_class: int | None = None  # the class index trained as "no class" (classifier-free guidance), if any
    class_names: tuple[str, ...] = ()  # names of the classes 0..num_classes-1 when the file says them
    time_input: str = "timestep"  # what t is: "timestep" (training step, 0..T-1) or "sigma" (Fourier-embedded
    #                               score-SDE UNets; their output is already divided by sigma)
