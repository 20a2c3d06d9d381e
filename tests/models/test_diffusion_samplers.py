"""Schedules, the denoiser and every sampler against diffusers' schedulers on the same network, sigmas and noise.

The network is a tiny random diffusers UNet2DModel behind the pack's diffusion contract (helpers_diffusion). The
reference loop is diffusers' own (scale_model_input, network, step); its randn_tensor is patched to draw from the
same ordered noise stream our samplers' noise_sampler draws from, so both consume identical noise in identical order.
Final samples (sigma 0, where the VP and VE spaces coincide) must agree within 1e-4 in float32.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_diffusion import NoiseStream, facts_for, patch_randn, tiny_unet, DiffusersAdapter

from atelier.models.diffusion import samplers as S
from atelier.models.diffusion import schedules as sch
from atelier.models.diffusion.denoiser import Denoiser
from atelier.models.diffusion.facts import TrainingSchedule
from atelier.models.errors import InputError

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import (  # noqa: E402
    scheduling_ddim, scheduling_ddpm, scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete)

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (2, 3, 16, 16)
TOL = 1e-4


def _sched_cfg(s: TrainingSchedule) -> dict:
    return dict(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule, beta_start=s.beta_start,
                beta_end=s.beta_end, prediction_type=s.prediction_type)


def _reference(sched, unet, x: torch.Tensor, vp: bool, step_kw: dict | None = None, labels=None) -> torch.Tensor:
    """diffusers' sampling loop; x is in the VE space at the first sigma, converted to the scheduler's space."""
    if vp:
        ac = sched.alphas_cumprod[int(sched.timesteps[0])].double()
        x = (x.double() * ac.sqrt()).float()
    sample = x
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(sample, t)
            out = unet(inp, t, class_labels=labels).sample
            sample = sched.step(out, t, sample, **(step_kw or {})).prev_sample
    return sample


def _ours(sampler, unet, facts, x, sigmas, stream=None, clip=False, labels=None, **kw) -> torch.Tensor:
    den = Denoiser(DiffusersAdapter(unet), facts, clip=clip)
    extra = {"class_labels": labels} if labels is not None else None
    if stream is not None:
        kw["noise_sampler"] = stream
    return sampler(den, x.clone(), sigmas, extra_args=extra, **kw)


def _x(sigma0: float, seed: int = 7) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * sigma0


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a.double() - b.double()).abs().max().item()
    assert err < TOL, f"max |ours - diffusers| = {err:.3g} (scale {b.abs().max().item():.3g})"


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_sigmas_match_diffusers(beta_schedule):
    s = TrainingSchedule(beta_schedule=beta_schedule, beta_start=0.00085 if beta_schedule == "scaled_linear"
                         else 0.0001, beta_end=0.012 if beta_schedule == "scaled_linear" else 0.02)
    ref = diffusers.DDPMScheduler(**_sched_cfg(s))
    assert torch.equal(sch.get_betas(s), ref.betas)
    assert torch.equal(sch.get_alphas_cumprod(s), ref.alphas_cumprod)
    ac = ref.alphas_cumprod.double()
    torch.testing.assert_close(sch.training_sigmas(s), ((1 - ac) / ac).sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "karras"])
@pytest.mark.parametrize("steps", [7, 10, 50])
def test_spacings_match_euler_scheduler(spacing, steps):
    s = TrainingSchedule()
    ref = diffusers.EulerDiscreteScheduler(**_sched_cfg(s), timestep_spacing="linspace" if spacing == "karras"
                                           else spacing, use_karras_sigmas=spacing == "karras")
    ref.set_timesteps(steps)
    ours = sch.get_sigmas(s, steps, spacing)
    assert ours[-1] == 0 and len(ours) == steps + 1
    # fractional linspace timesteps: ours interpolate in log sigma (k-diffusion), Euler linearly in sigma
    torch.testing.assert_close(ours.float(), ref.sigmas.float(), rtol=5e-4 if spacing == "linspace" else 2e-5, atol=0)
    # timestep <-> sigma round trip, and sigma_to_t gives diffusers' model timesteps
    log_sigmas = sch.training_sigmas(s).log()
    torch.testing.assert_close(sch.sigma_to_t(ours[:-1], log_sigmas), torch.as_tensor(ref.timesteps).double(),
                               rtol=0, atol=2e-3 if spacing in ("linspace", "karras") else 1e-6)


def test_sigma_t_round_trip_and_bad_steps():
    s = TrainingSchedule(beta_schedule="squaredcos_cap_v2")
    log_sigmas = sch.training_sigmas(s).log()
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sch.sigma_to_t(sch.t_to_sigma(t, log_sigmas), log_sigmas), t, rtol=0, atol=1e-9)
    with pytest.raises(InputError, match="steps"):
        sch.get_sigmas(s, 0)
    with pytest.raises(InputError, match="spacing"):
        sch.get_sigmas(s, 10, "bogus")


# ------------------------------------------------------------------ samplers vs diffusers


def _ve_sigmas_of(sched) -> torch.Tensor:
    """Sigmas (float64, then 0) of a VP scheduler's integer timesteps."""
    ac = sched.alphas_cumprod.double()[torch.as_tensor(sched.timesteps).long()]
    return torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_equals_diffusers(monkeypatch, spacing, variance):
    if variance == "fixed_large" and spacing == "trailing":
        pytest.skip("diffusers adds beta-sized noise on the step from t=99 to the end (its t > 0 test); ours, like "
                    "guided-diffusion (golden adm_b), adds none on the last step")
    learned = variance == "learned_range"
    unet = tiny_unet(learned_variance=learned)
    s = TrainingSchedule()
    ref = diffusers.DDPMScheduler(**_sched_cfg(s), timestep_spacing=spacing, clip_sample=True, variance_type=variance)
    ref.set_timesteps(10)
    sigmas = sch.get_sigmas(s, 10, spacing)
    torch.testing.assert_close(sigmas, _ve_sigmas_of(ref), rtol=1e-12, atol=0)
    x = _x(float(sigmas[0]))
    patch_randn(monkeypatch, scheduling_ddpm, theirs := NoiseStream(SHAPE))
    want = _reference(ref, unet, x, vp=True)
    kw = {} if learned else {"variance": variance}
    got = _ours(S.sample_ddpm, unet, facts_for(unet, s), x, sigmas, NoiseStream(SHAPE), clip=True, **kw)
    assert theirs.count >= 9
    # learned range, trailing: diffusers still adds exp(0.5 * log-variance) ~ 1e-5 noise on the step to t = -1
    # (its clamped 1e-20 floor); ours, like guided-diffusion, adds none on the last step
    _close(got, want)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("pred,beta", [("epsilon", "linear"), ("v_prediction", "scaled_linear"),
                                       ("sample", "squaredcos_cap_v2")])
def test_ddim_equals_diffusers(monkeypatch, eta, pred, beta):
    unet = tiny_unet()
    s = TrainingSchedule(beta_schedule=beta, prediction_type=pred)
    ref = diffusers.DDIMScheduler(**_sched_cfg(s), clip_sample=True)
    ref.set_timesteps(10)
    sigmas = sch.get_sigmas(s, 10, "leading")
    torch.testing.assert_close(sigmas, _ve_sigmas_of(ref), rtol=1e-12, atol=0)
    x = _x(float(sigmas[0]))
    patch_randn(monkeypatch, scheduling_ddim, NoiseStream(SHAPE))
    # guided-diffusion's DDIM re-derives epsilon from the clipped x0: diffusers' use_clipped_model_output=True
    want = _reference(ref, unet, x, vp=True, step_kw={"eta": eta, "use_clipped_model_output": True})
    got = _ours(S.sample_ddim, unet, facts_for(unet, s), x, sigmas, NoiseStream(SHAPE), clip=True, eta=eta)
    _close(got, want)


def test_ddim_with_class_labels_equals_diffusers():
    unet = tiny_unet(num_class_embeds=5)
    s = TrainingSchedule()
    ref = diffusers.DDIMScheduler(**_sched_cfg(s), clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(8)
    sigmas = sch.get_sigmas(s, 8, "trailing")
    x, labels = _x(float(sigmas[0])), torch.tensor([1, 4])
    want = _reference(ref, unet, x, vp=True, labels=labels)
    got = _ours(S.sample_ddim, unet, facts_for(unet, s), x, sigmas, labels=labels)
    _close(got, want)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_euler_heun_equal_diffusers(name, spacing):
    unet = tiny_unet()
    s = TrainingSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction" if name == "heun" else "epsilon")
    cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.HeunDiscreteScheduler
    ref = cls(**_sched_cfg(s), timestep_spacing="linspace" if spacing == "karras" else spacing,
              use_karras_sigmas=spacing == "karras")
    ref.set_timesteps(10)
    sigmas = sch.get_sigmas(s, 10, spacing)
    x = _x(float(sigmas[0]))
    want = _reference(ref, unet, x, vp=False)
    got = _ours(S.sample_euler if name == "euler" else S.sample_heun, unet, facts_for(unet, s), x, sigmas)
    _close(got, want)


def test_euler_ancestral_equals_diffusers(monkeypatch):
    unet = tiny_unet()
    s = TrainingSchedule()
    ref = diffusers.EulerAncestralDiscreteScheduler(**_sched_cfg(s), timestep_spacing="trailing")
    ref.set_timesteps(10)
    sigmas = sch.get_sigmas(s, 10, "trailing")
    x = _x(float(sigmas[0]))
    patch_randn(monkeypatch, scheduling_euler_ancestral_discrete, NoiseStream(SHAPE))
    want = _reference(ref, unet, x, vp=False)
    got = _ours(S.sample_euler_ancestral, unet, facts_for(unet, s), x, sigmas, NoiseStream(SHAPE))
    _close(got, want)


@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_dpmpp_2m_equal_diffusers(monkeypatch, algo, spacing):
    unet = tiny_unet()
    s = TrainingSchedule(prediction_type="v_prediction" if spacing == "trailing" else "epsilon")
    ref = diffusers.DPMSolverMultistepScheduler(**_sched_cfg(s), algorithm_type=algo, solver_order=2,
                                                timestep_spacing=spacing)
    ref.set_timesteps(12)
    sigmas = _ve_sigmas_of(ref)  # DPMSolver spaces its own way ("leading" over steps + 1): use its timesteps
    torch.testing.assert_close(sigmas.float(), ref.sigmas.float(), rtol=1e-5, atol=0)
    x = _x(float(sigmas[0]))
    patch_randn(monkeypatch, scheduling_dpmsolver_multistep, NoiseStream(SHAPE))
    want = _reference(ref, unet, x, vp=True)
    fn = S.sample_dpmpp_2m if algo == "dpmsolver++" else S.sample_dpmpp_2m_sde
    got = _ours(fn, unet, facts_for(unet, s), x, sigmas, NoiseStream(SHAPE) if "sde" in algo else None)
    _close(got, want)


# ------------------------------------------------------------------ denoiser properties


def test_guidance_mixes_conditional_and_null_predictions():
    unet = tiny_unet(num_class_embeds=4)
    facts = facts_for(unet, null_class=3)
    den = Denoiser(DiffusersAdapter(unet), facts, clip=False, guidance=3.0)
    x, sigma, labels = _x(2.0), torch.full((2,), 2.0, dtype=torch.float64), torch.tensor([0, 2])
    t = den.sigma_to_t(sigma).float()
    x_in = x / math.sqrt(5.0)
    cond = unet(x_in, t, class_labels=labels).sample
    uncond = unet(x_in, t, class_labels=torch.tensor([3, 3])).sample
    want = x - 2.0 * (uncond + 3.0 * (cond - uncond))
    _close(den(x, sigma, class_labels=labels), want)
    assert den.calls == 1  # one batched network call for both halves


def test_denoiser_bad_input_errors():
    unet = tiny_unet()
    with pytest.raises(InputError, match="guidance"):
        Denoiser(DiffusersAdapter(unet), facts_for(unet), guidance=2.0)
    cond = tiny_unet(num_class_embeds=4)
    with pytest.raises(InputError, match="null"):
        Denoiser(DiffusersAdapter(cond), facts_for(cond), guidance=2.0)


def test_seeded_noise_is_per_item():
    x = torch.zeros(3, 2, 4, 4)
    a = S.seeded_noise_sampler(x, seed=10)
    b = S.seeded_noise_sampler(x[:1], seed=11)
    first, second = a(1.0, 0.5), a(0.5, 0.1)
    assert torch.equal(first[1:2], b(1.0, 0.5)) and torch.equal(second[1:2], b(0.5, 0.1))
    assert not torch.equal(first, second)


def test_clip_default_follows_model_kind():
    unet = tiny_unet()
    assert Denoiser(DiffusersAdapter(unet), facts_for(unet)).clip is True
    assert Denoiser(DiffusersAdapter(unet), facts_for(unet, latent=True)).clip is False
    np.testing.assert_equal(S.model_calls("heun", 10), 19)
