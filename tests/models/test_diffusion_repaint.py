"""RePaint against diffusers' RePaintPipeline/RePaintScheduler on the same network, image, mask and noise.

Both draw from one ordered noise stream (diffusers' randn_tensor patched in the pipeline and the scheduler), so the
resampling jumps, the known-region noise and the starting noise are the same draws in the same order. The settings
have the reference's structure (jumps of jump_length steps, each stretch walked jump_n_sample times) at a size a CPU
test affords; bench/diffusion.py runs the reference 250/10/10.
"""
from __future__ import annotations

import pytest
import torch
from helpers_diffusion import DiffusersAdapter, NoiseStream, facts_for, patch_randn, tiny_unet

from atelier.models.diffusion import repaint as rp
from atelier.models.diffusion.denoiser import Denoiser
from atelier.models.errors import InputError

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.deprecated.repaint import pipeline_repaint  # noqa: E402
from diffusers.schedulers import scheduling_repaint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 3, 16, 16)


def _inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(SHAPE, generator=g) * 2 - 1
    keep = torch.ones(1, 1, 16, 16)
    keep[..., 4:12, 3:10] = 0  # the hole
    return image, keep


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_repaint_equals_diffusers_pipeline(monkeypatch, eta):
    unet = tiny_unet().inner  # the plain diffusers network; RePaint clips x0, so samples stay in -1..1
    image, keep = _inputs()
    sched = rp.RePaintSchedule(steps=50, jump_length=5, jump_n_sample=3, eta=eta)
    theirs = NoiseStream(SHAPE)
    patch_randn(monkeypatch, scheduling_repaint, theirs)
    patch_randn(monkeypatch, pipeline_repaint, theirs)
    pipe = diffusers.RePaintPipeline(unet=unet, scheduler=diffusers.RePaintScheduler())
    pipe.set_progress_bar_config(disable=True)
    want = pipe(image, keep, num_inference_steps=sched.steps, eta=eta, jump_length=sched.jump_length,
                jump_n_sample=sched.jump_n_sample, output_type="np").images  # [B,H,W,C] in 0..1
    calls = []
    den = Denoiser(DiffusersAdapter(unet), facts_for(unet), clip=True)
    ours = NoiseStream(SHAPE)
    got = rp.repaint(den, image, keep, ours, sched, callback=calls.append)
    got01 = ((got / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert ours.count == theirs.count  # the same number of draws, in the same order
    assert den.calls == len(calls) == rp.model_calls(sched) == 50 + 9 * 2 * 5
    err = abs(got01 - want).max()
    assert err < 1e-4, err
    # the known region is the original (its last step adds no noise)
    torch.testing.assert_close(got * keep, image * keep, atol=1e-5, rtol=0)


def test_reference_and_cheap_call_counts():
    assert rp.model_calls(rp.REFERENCE) == 2410  # the paper's 250 steps, j = r = 10
    assert rp.model_calls(rp.CHEAP) * 4 <= 2410
    no_jumps = rp.RePaintSchedule(steps=40, jump_n_sample=1)
    assert rp.repaint_steps(no_jumps, 1000) == list(range(39, -1, -1))


def test_mask_checks():
    image, keep = _inputs()
    with pytest.raises(InputError, match="mask: expected the image's size 16x16, got 8x8"):
        rp.check_mask(keep[..., :8, :8], image)
    assert rp.check_mask(torch.ones_like(keep), image) == "all known"
    assert rp.check_mask(torch.zeros_like(keep), image) == "all unknown"
    assert rp.check_mask(keep, image) is None


# ---------------------------------------------------------------------------------------------------------------
# class_label "auto": the class the kept part most likely shows


class PointMasses(torch.nn.Module):
    """The exact epsilon network for data that is the constant image means[c] for class c: from
    x_in = c_in (x0 + sigma eps), eps = (x_in - c_in means[c]) / (c_in sigma)."""

    def __init__(self, means: list[float], schedule) -> None:
        super().__init__()
        from atelier.models.diffusion.schedules import training_sigmas

        self.register_buffer("means", torch.tensor(means))
        self.log_sigmas = training_sigmas(schedule).log()  # [T] float64, what Denoiser interpolates
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # for placement (device, dtype)

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = t.double().cpu()
        lo = t.floor().long().clamp(0, len(self.log_sigmas) - 2)
        frac = t - lo
        s = ((1 - frac) * self.log_sigmas[lo] + frac * self.log_sigmas[lo + 1]).exp().float().view(-1, 1, 1, 1)
        c_in = 1 / (s * s + 1).sqrt()
        return (x_in - c_in * self.means[labels].view(-1, 1, 1, 1)) / (c_in * s)


def _point_masses():
    from atelier.models.descriptor import ModelDescriptor, SizeRequirements
    from atelier.models.diffusion.facts import DiffusionFacts, TrainingSchedule

    schedule = TrainingSchedule()
    facts = DiffusionFacts(kind="UNet2DModel", in_channels=1, sample_size=8, size_multiple=1, num_classes=4,
                           learned_variance=False, latent=False, schedule=schedule)
    net = PointMasses([-0.6, -0.2, 0.2, 0.6], schedule)
    desc = ModelDescriptor(family="diffusion", architecture="UNet2DModel", model=net, purpose="Denoiser",
                           in_channels=1, out_channels=1, size_requirements=SizeRequirements(multiple_of=1),
                           tiling="none", bytes_per_pixel=64.0, config={}, extra=facts)
    return net, facts, desc


def test_class_evidence_finds_the_class_of_the_kept_part():
    net, facts, _ = _point_masses()
    image = net.means.view(4, 1, 1, 1).expand(4, 1, 8, 8).clone()  # image i is class i
    image[..., 4:, :] = torch.rand(4, 1, 4, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # hidden: noise
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 4:, :] = 0
    err = rp.class_evidence(Denoiser(net, facts, clip=False), image, keep, 4, levels=8,
                            generator=torch.Generator().manual_seed(1))
    assert err.shape == (4, 4) and err.argmin(1).tolist() == [0, 1, 2, 3]


def test_auto_class_repaint_completes_toward_it(manager):
    """run.inpaint with class_label AUTO_CLASS fills each hole with its kept part's class (the point mass), and an
    unconditional model is told that auto needs classes."""
    from atelier.models.diffusion import run

    net, _, desc = _point_masses()
    image = net.means[[3, 0]].view(2, 1, 1, 1).expand(2, 1, 8, 8).clone()
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 2:6, 2:6] = 0
    out = run.inpaint(manager, desc, image, keep, rp.RePaintSchedule(steps=10, jump_length=2, jump_n_sample=2),
                      seed=0, class_label=run.AUTO_CLASS)
    assert (out - image).abs().max().item() < 1e-3  # the hole holds the class's value too
    unet = tiny_unet(num_class_embeds=None)
    from helpers_diffusion import descriptor_for

    with pytest.raises(InputError, match="auto.*class-conditional"):
        run.inpaint(manager, descriptor_for(unet), torch.zeros(1, unet.config.in_channels, 16, 16), keep.expand(
            1, 1, 8, 8).repeat(1, 1, 2, 2), rp.CHEAP, seed=0, class_label=run.AUTO_CLASS)


def test_class_evidence_screens_then_scores_the_finalists():
    """After `screen` levels only each image's `finalists` best classes are scored: the call count is
    evidence_calls', the dropped classes come back inf, and the class of the kept part still wins."""
    net, facts, _ = _point_masses()
    image = net.means[[2, 0, 3]].view(3, 1, 1, 1).expand(3, 1, 8, 8).clone()
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 4:, :] = 0
    den = Denoiser(net, facts, clip=False)
    calls = []
    raw = den.raw
    den.raw = lambda *a: calls.append(1) or raw(*a)
    err = rp.class_evidence(den, image, keep, 4, levels=6, screen=2, finalists=2,
                            generator=torch.Generator().manual_seed(1))
    assert len(calls) == rp.evidence_calls(4, levels=6, screen=2, finalists=2) == 2 * 4 + 4 * 2
    assert err.argmin(1).tolist() == [2, 0, 3]
    assert (torch.isinf(err).sum(1) == 2).all() and torch.isfinite(err.gather(1, err.argsort(1)[:, :2])).all()
