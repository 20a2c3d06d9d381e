"""Diffusion nodes on real files loaded through the manager: a tiny random diffusers UNet2DModel saved as a diffusers
folder (config.json, scheduler/scheduler_config.json) in models/diffusers, and a class-conditional one as a single
.safetensors in models/diffusion_models. References: diffusers' DDIMPipeline, DDIMScheduler and RePaintPipeline on
the same weights, fed our seeded noise; properties (batch items equal their seeds alone at any chunk size); errors."""
from __future__ import annotations

import pytest
import torch
from helpers_diffusion import tiny_unet, write_tiny_folder

from atelier.models import host
from atelier.models.diffusion import unet2d_io
from atelier.models.errors import InputError, WrongFamilyError
from atelier.models.latents import generator, seeded_normal
from atelier.nodes.diffusion import (AtelierDiffusionImg2Img, AtelierDiffusionSample, AtelierLoadDiffusionModel,
                                     AtelierRePaint)

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.ddim import pipeline_ddim  # noqa: E402
from diffusers.pipelines.deprecated.repaint import pipeline_repaint  # noqa: E402
from diffusers.schedulers import scheduling_repaint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
UNCOND = "diffusers/tiny/unet/diffusion_pytorch_model.safetensors"
COND = "diffusion_models/tiny_cond.safetensors"


@pytest.fixture
def models(manager, models_root):
    write_tiny_folder(models_root / "diffusers")  # the model the example workflows load
    unet = tiny_unet().inner  # the same seeded weights, as diffusers' reference network
    cond = tiny_unet(seed=1, num_class_embeds=4).inner
    unet2d_io.save_unet(models_root / "diffusion_models" / "tiny_cond.safetensors", cond, dict(cond.config))
    return unet, cond


def _sample_args(**kw):
    args = dict(seed=5, batch_size=2, width=0, height=0, steps=10, sampler="ddim", spacing="leading", eta=0.0,
                class_label=-1, guidance=1.0, clip="auto")
    args.update(kw)
    return args


def test_loader_lists_both_folders(models):
    choices = AtelierLoadDiffusionModel.INPUT_TYPES()["required"]["model_name"][0]
    assert UNCOND in choices and COND in choices
    assert not any(c.endswith("config.json") for c in choices)
    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    assert desc.family == "diffusion" and desc.extra.schedule.clip_sample and desc.extra.num_classes == 0
    with pytest.raises(InputError, match="model_name"):
        AtelierLoadDiffusionModel().load("gans/x.pt")


def test_sample_equals_diffusers_ddim_pipeline(models, monkeypatch):
    unet, _ = models
    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    image, latent = AtelierDiffusionSample().sample(desc, **_sample_args())
    assert image.shape == (2, 16, 16, 3) and latent["samples"].shape == (2, 3, 16, 16)
    # diffusers' pipeline from our seeded starting noise (item i from seed + i)
    monkeypatch.setattr(pipeline_ddim, "randn_tensor", lambda shape, **_: seeded_normal(shape, 5))
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    want = pipe(batch_size=2, num_inference_steps=10, eta=0.0, use_clipped_model_output=True,
                output_type="np").images
    err = (image.numpy() - want).__abs__().max()
    assert err < 1e-4, err


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "ddpm"])
def test_batch_items_equal_their_seed_alone_at_any_chunk(models, manager, monkeypatch, sampler):
    from atelier.models.diffusion import run

    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    args = _sample_args(batch_size=3, sampler=sampler, eta=1.0, steps=6)
    whole = AtelierDiffusionSample().sample(desc, **args)[1]["samples"]
    assert run.chunk_size(manager, desc, 3, 16, 16, 1.0) == 3
    monkeypatch.setattr(manager, "activation_budget", lambda d: 1)  # no room: one item per call
    assert run.chunk_size(manager, desc, 3, 16, 16, 1.0) == 1
    chunked = AtelierDiffusionSample().sample(desc, **args)[1]["samples"]
    one = AtelierDiffusionSample().sample(desc, **{**args, "seed": 6, "batch_size": 1})[1]["samples"]
    # the same numbers up to batch-size-dependent float32 rounding in the convolutions
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)
    torch.testing.assert_close(one[0], whole[1], atol=1e-4, rtol=0)


def test_class_labels_and_guidance_errors(models):
    cond = AtelierLoadDiffusionModel().load(COND)[0]
    uncond = AtelierLoadDiffusionModel().load(UNCOND)[0]
    a = AtelierDiffusionSample().sample(cond, **_sample_args(class_label=1, steps=4))[1]["samples"]
    b = AtelierDiffusionSample().sample(cond, **_sample_args(class_label=2, steps=4))[1]["samples"]
    assert (a - b).abs().max() > 1e-3  # the label reaches the network
    with pytest.raises(InputError, match="class_label: expected a class in 0..3, got 4"):
        AtelierDiffusionSample().sample(cond, **_sample_args(class_label=4))
    with pytest.raises(InputError, match="class_label: this model is unconditional"):
        AtelierDiffusionSample().sample(uncond, **_sample_args(class_label=0))
    with pytest.raises(InputError, match="guidance"):
        AtelierDiffusionSample().sample(cond, **_sample_args(class_label=1, guidance=3.0))


def test_bad_sizes_steps_and_types(models):
    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    with pytest.raises(InputError, match="width/height: expected .* multiples of 2 pixels.*got 17x16"):
        AtelierDiffusionSample().sample(desc, **_sample_args(width=17, height=16))
    with pytest.raises(InputError, match="steps: expected at least 1, got 0"):
        AtelierDiffusionSample().sample(desc, **_sample_args(steps=0))
    with pytest.raises(InputError, match=r"latent: expected 3 channels .* got shape \(1, 4, 8, 8\)"):
        AtelierDiffusionImg2Img().img2img(desc, 0.5, 0, 10, "ddim", "leading", 0.0, -1, 1.0, "auto",
                                          latent={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(WrongFamilyError, match="model: expected a diffusion model"):
        from atelier.models.descriptor import ModelDescriptor
        AtelierDiffusionSample().sample(ModelDescriptor(family="gan", architecture="DCGAN", model=torch.nn.Linear(1, 1)),
                                        **_sample_args())


def test_img2img_equals_diffusers_scheduler_from_the_noised_input(models):
    unet, _ = models
    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    got = AtelierDiffusionImg2Img().img2img(desc, 0.6, 9, 10, "ddim", "leading", 0.0, -1, 1.0, "auto",
                                            image=image)[0]
    same = AtelierDiffusionImg2Img().img2img(desc, 0.0, 9, 10, "ddim", "leading", 0.0, -1, 1.0, "auto",
                                             image=image)[0]
    torch.testing.assert_close(same, image, atol=1e-6, rtol=0)  # strength 0: the input back
    # diffusers: add_noise at the first of the last int(10 * 0.6) timesteps, then DDIM steps
    sched = diffusers.DDIMScheduler(clip_sample=True)
    sched.set_timesteps(10)
    ts = sched.timesteps[10 - 6:]
    x0 = image.movedim(-1, 1) * 2 - 1
    x = sched.add_noise(x0, seeded_normal(x0.shape, 9), ts[:1])
    with torch.no_grad():
        for t in ts:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    want = ((x + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert (got - want).abs().max() < 1e-4


def _repaint_inputs():
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 16, 16)
    mask[:, 5:12, 4:9] = 1  # fill here
    return image, mask


def test_repaint_node_equals_diffusers_pipeline(models, monkeypatch):
    unet, _ = models
    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    image, mask = _repaint_inputs()
    got = AtelierRePaint().inpaint(desc, image, mask, 4, 20, 5, 2, 0.0, 0.0, "auto")[0]
    gen = generator(4, 1)  # our per-step stream of seed 4; the start comes from stream 0
    first = {"done": False}

    def fake(shape, **_):
        if not first["done"]:
            first["done"] = True
            return seeded_normal(shape, 4)
        return torch.randn(shape[1:], generator=gen)[None]

    monkeypatch.setattr(pipeline_repaint, "randn_tensor", fake)
    monkeypatch.setattr(scheduling_repaint, "randn_tensor", fake)
    pipe = diffusers.RePaintPipeline(unet=unet, scheduler=diffusers.RePaintScheduler())
    pipe.set_progress_bar_config(disable=True)
    want = pipe(image.movedim(-1, 1) * 2 - 1, 1 - mask[:, None], num_inference_steps=20, eta=0.0, jump_length=5,
                jump_n_sample=2, output_type="np").images
    assert (got.numpy() - want).__abs__().max() < 1e-4
    keep = (1 - mask)[..., None].bool().expand_as(image)
    torch.testing.assert_close(got[keep], image[keep], atol=1e-5, rtol=0)


def test_repaint_mask_errors(models):
    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    image, mask = _repaint_inputs()
    args = (4, 10, 5, 2, 0.0, 0.0, "auto")
    with pytest.raises(InputError, match="mask: expected the image's size 16x16, got 8x8"):
        AtelierRePaint().inpaint(desc, image, mask[:, :8, :8], *args)
    with pytest.raises(InputError, match="mask: covers the whole image"):
        AtelierRePaint().inpaint(desc, image, torch.ones_like(mask), *args)
    same = AtelierRePaint().inpaint(desc, image, torch.zeros_like(mask), *args)[0]  # nothing to fill
    torch.testing.assert_close(same, image, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="image: expected a height and width that are multiples of 2"):
        AtelierRePaint().inpaint(desc, image[:, :15], mask[:, :15], *args)


def test_interrupt_stops_within_a_step(models, monkeypatch):
    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    calls = {"n": 0, "net": 0}
    net = desc.model
    orig = net.forward

    def counted(*a, **k):
        calls["net"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(net, "forward", counted)
    monkeypatch.setattr(host, "throw_if_interrupted", lambda: calls.__setitem__("n", calls["n"] + 1))
    AtelierDiffusionSample().sample(desc, **_sample_args(batch_size=1, steps=1))
    per_step = calls["n"]
    assert per_step > 3  # entry, the step, and checks between the network's blocks

    class Stop(Exception):
        pass

    def check():
        calls["n"] += 1
        if calls["n"] > 3:
            raise Stop

    calls.update(n=0, net=0)
    monkeypatch.setattr(host, "throw_if_interrupted", check)
    with pytest.raises(Stop):
        AtelierDiffusionSample().sample(desc, **_sample_args(steps=50))
    assert calls["n"] == 4 and calls["net"] == 1  # stopped inside the first network call, at the check asked


def test_progress_per_step_and_previews_every_few_steps(models, monkeypatch):
    from atelier.models.diffusion import run

    desc = AtelierLoadDiffusionModel().load(UNCOND)[0]
    updates = []

    class Bar:  # stands in for ComfyUI's ProgressBar
        def update_absolute(self, value, total, preview=None):
            updates.append((value, total, preview))

    monkeypatch.setattr(host, "progress_bar", lambda total: Bar())
    AtelierDiffusionSample().sample(desc, **_sample_args(batch_size=1, steps=12))
    assert [u[0] for u in updates] == list(range(1, 13)) and all(u[1] == 12 for u in updates)
    shown = [u[0] for u in updates if u[2] is not None]
    assert shown == [run.PREVIEW_EVERY, 2 * run.PREVIEW_EVERY, 12]  # every few steps, and the last
    kind, image, size = updates[-1][2]
    assert kind == "JPEG" and image.size == (16, 16)


def test_latent_model_gives_and_takes_latents(manager, models_root):
    unet = tiny_unet(seed=2, channels=4).inner
    unet2d_io.save_unet(models_root / "diffusion_models" / "tiny_latent.safetensors", unet, dict(unet.config),
                        latent=True)
    desc = AtelierLoadDiffusionModel().load("diffusion_models/tiny_latent.safetensors")[0]
    assert desc.extra.latent
    image, latent = AtelierDiffusionSample().sample(desc, **_sample_args(steps=4, width=8, height=6))
    assert latent["samples"].shape == (2, 4, 6, 8) and image.shape == (2, 6, 8, 3)
    again = AtelierDiffusionImg2Img().img2img(desc, 0.5, 0, 4, "euler", "trailing", 0.0, -1, 1.0, "auto",
                                              latent=latent)[1]
    assert again["samples"].shape == (2, 4, 6, 8)
    with pytest.raises(InputError, match="image: this is a latent model"):
        AtelierDiffusionImg2Img().img2img(desc, 0.5, 0, 4, "euler", "trailing", 0.0, -1, 1.0, "auto",
                                          image=torch.rand(1, 8, 8, 3))
    with pytest.raises(InputError, match="RePaint works on pixel-space models"):
        AtelierRePaint().inpaint(desc, torch.rand(1, 8, 8, 3), torch.zeros(1, 8, 8), 0, 10, 5, 2, 0.0, 0.0, "auto")
