"""What the diffusion nodes run: sample from noise, image-to-image, checks of their inputs.

Everything goes through the manager (`manager.run(desc, fn)`: placement on the compute device, the model's dtype),
batches are cut into chunks that fit `manager.activation_budget(desc)`, progress advances per sampler step (which is
where a user interrupt is seen) and, inside ComfyUI, a preview of the current x0 estimate shows every few steps.
Seeds: the starting noise of item i comes from seed + i (stream 0), its per-step noise from seed + i (stream 1) and
a random class from seed + i (stream 2), so one item of a batch equals the same seed run alone, on any device and
at any chunk size. Tensors here are in model space: pixels in -1..1 or latents, [B,C,H,W].
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..budget import call_budget, fit_batch, scaled_bpp
from ..cpu_conv import pack_budget, scratch_released
from ..descriptor import ModelDescriptor
from ..errors import InputError, WrongFamilyError
from ..latents import generator, seeded_normal
from ..progress import Progress, interruptible
from .denoiser import Denoiser, check_class_labels
from .facts import DiffusionFacts
from .samplers import SAMPLERS, seeded_noise_sampler
from .schedules import SPACINGS, get_sigmas

log = logging.getLogger(__name__)

PREVIEW_EVERY = 5  # steps between node previews
LABEL_STREAM = 2
AUTO_CLASS = -2  # class_label: the class the kept part most likely shows (RePaint)


@dataclass(frozen=True)
class SampleSettings:
    """The sampler settings a node passes down (validated by `check`)."""

    steps: int = 50
    sampler: str = "ddim"
    spacing: str = "leading"
    eta: float = 0.0
    guidance: float = 1.0
    clip: bool | None = None  # None: the model's default (on for pixel models)

    def check(self) -> None:
        if self.steps < 1:
            raise InputError(f"steps: expected at least 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.spacing not in SPACINGS:
            raise InputError(f"spacing: expected one of {', '.join(SPACINGS)}, got {self.spacing!r}")


def facts_of(desc: ModelDescriptor, name: str = "model") -> DiffusionFacts:
    if desc.family != "diffusion" or not isinstance(desc.extra, DiffusionFacts):
        raise WrongFamilyError(f"{name}: expected a diffusion model (Load Diffusion Model), got a {desc.family} model "
                               f"({desc.architecture})")
    return desc.extra


def check_size(facts: DiffusionFacts, height: int, width: int, name: str = "image") -> None:
    m = max(1, facts.size_multiple)
    if height < m or width < m or height % m or width % m:
        unit = "latent cells" if facts.latent else "pixels"
        raise InputError(f"{name}: expected a height and width that are multiples of {m} {unit} (the model halves "
                         f"the size {int(math.log2(m))} times), got {width}x{height}; crop or resize it first")


def class_labels(facts: DiffusionFacts, class_label: int, seed: int, batch: int) -> torch.Tensor | None:
    """[B] long labels: class_label for every item, or with -1 a random class per item from its seed (None for an
    unconditional model)."""
    if class_label < -1:
        raise InputError(f"class_label: expected -1 (none/random) or a class 0..{max(0, facts.num_classes - 1)}, "
                         f"got {class_label}")
    if facts.num_classes <= 0:
        if class_label != -1:
            raise InputError(f"class_label: this model is unconditional (no classes); set it to -1, got {class_label}")
        return None
    if class_label >= 0:
        labels = torch.full((batch,), int(class_label), dtype=torch.long)
    else:
        real = facts.num_classes - (1 if facts.null_class == facts.num_classes - 1 else 0)  # never the null class
        labels = torch.stack([torch.randint(real, (), generator=generator(seed + i, LABEL_STREAM))
                              for i in range(batch)])
    check_class_labels(facts, labels)
    return labels


def chunk_size(manager, desc: ModelDescriptor, batch: int, height: int, width: int, guidance: float) -> int:
    """Items per network call so its activations fit the manager's budget (guidance doubles the batch)."""
    dtype = manager.dtype_for(desc)
    per_item = scaled_bpp(desc.bytes_per_pixel, dtype) * height * width * (2 if guidance != 1.0 else 1)
    return fit_batch(per_item, batch, call_budget(manager.activation_budget(desc), manager.compute_device))


def to_preview(x0: torch.Tensor, latent: bool) -> torch.Tensor:  # [H,W,3] in 0..1
    """The first item of an x0 estimate as a picture: pixels mapped from -1..1; latents' first three channels
    stretched to their range."""
    img = x0[0, :3].float()
    if img.shape[0] < 3:
        img = img[:1].expand(3, -1, -1)
    if latent:
        lo, hi = img.amin(), img.amax()
        img = (img - lo) / (hi - lo).clamp_min(1e-6)
    else:
        img = (img + 1) / 2
    return img.movedim(0, -1)


def denoise(manager, desc: ModelDescriptor, x: torch.Tensor, sigmas: torch.Tensor, settings: SampleSettings, *,
            seed: int, labels: torch.Tensor | None, what: str = "Diffusion sample") -> torch.Tensor:
    """Run the sampler from x [B,C,H,W] (noised at sigmas[0]) down sigmas; returns x0 [B,C,H,W] float32 on the CPU."""
    facts = facts_of(desc)
    B, _, H, W = x.shape
    chunk = chunk_size(manager, desc, B, H, W, settings.guidance)
    steps = len(sigmas) - 1
    sampler = SAMPLERS[settings.sampler]
    kw = {"eta": settings.eta} if settings.sampler in ("ddim", "euler_ancestral", "dpmpp_2m_sde") else {}

    def fn(model: torch.nn.Module) -> torch.Tensor:
        den = Denoiser(model, facts, clip=settings.clip, guidance=settings.guidance)
        device = manager.compute_device
        outs = []
        # Cancel is seen after every step and, inside a network call, between its blocks (depth 2)
        with Progress(steps * math.ceil(B / chunk), what) as bar, interruptible(model, depth=2), \
                scratch_released(model):
            for start in range(0, B, chunk):
                xc = x[start:start + chunk].to(device, torch.float32)
                extra = {} if labels is None else {"class_labels": labels[start:start + chunk].to(device)}
                if settings.sampler in ("ddpm", "ddim", "euler_ancestral", "dpmpp_2m_sde"):
                    kw["noise_sampler"] = seeded_noise_sampler(xc, seed + start)
                outs.append(sampler(den, xc, sigmas, extra_args=extra, callback=_callback(bar, facts, steps),
                                    **kw).float().cpu())
        log.debug("%s: %d network calls", what, den.calls)
        return torch.cat(outs)

    return manager.run(desc, fn, memory_required=run_bytes(manager, desc, chunk, H, W))


def run_bytes(manager, desc: ModelDescriptor, chunk: int, height: int, width: int) -> int:
    """Memory one node run needs: the weights, one chunk's activations, and the packed weights its small CPU calls
    may keep (`cpu_conv.pack_budget`)."""
    return desc.weight_bytes + pack_budget(desc.model) + chunk * int(
        scaled_bpp(desc.bytes_per_pixel, manager.dtype_for(desc)) * height * width)


def _callback(bar: Progress, facts: DiffusionFacts, steps: int) -> Callable[[dict], None]:
    def cb(d: dict) -> None:
        i = int(d["i"])
        show = bar.shows_previews and (i % PREVIEW_EVERY == PREVIEW_EVERY - 1 or i == steps - 1)
        bar.update(1, to_preview(d["denoised"], facts.latent) if show else None)

    return cb


def sample(manager, desc: ModelDescriptor, settings: SampleSettings, *, seed: int, batch: int, height: int,
           width: int, class_label: int = -1) -> torch.Tensor:  # [B,C,H,W] model space, CPU float32
    """Images (or latents) from noise: item i from seed + i."""
    facts = facts_of(desc)
    settings.check()
    if batch < 1:
        raise InputError(f"batch_size: expected at least 1, got {batch}")
    check_size(facts, height, width, "width/height")
    labels = class_labels(facts, class_label, seed, batch)
    sigmas = get_sigmas(facts.schedule, settings.steps, settings.spacing)
    # unit-variance noise in the variance-preserving space, as DDPM/DDIM pipelines start: sqrt(1 + sigma^2) here
    x = seeded_normal((batch, facts.in_channels, height, width), seed) * math.sqrt(1 + float(sigmas[0]) ** 2)
    return denoise(manager, desc, x, sigmas, settings, seed=seed, labels=labels)


def img2img_sigmas(facts: DiffusionFacts, settings: SampleSettings, strength: float) -> torch.Tensor:
    """The tail of the schedule an image-to-image run walks: the last int(steps * strength) steps (diffusers' img2img
    rule), so strength 1 is a full run from pure noise and small strengths change little."""
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength: expected 0..1, got {strength}")
    sigmas = get_sigmas(facts.schedule, settings.steps, settings.spacing)
    keep = min(int(settings.steps * strength), settings.steps)
    return sigmas[settings.steps - keep:]


def img2img(manager, desc: ModelDescriptor, init: torch.Tensor, settings: SampleSettings, *, strength: float,
            seed: int, class_label: int = -1, name: str = "image") -> torch.Tensor:  # [B,C,H,W] model space
    """Noise init [B,C,H,W] (model space) to the step that `strength` selects, then denoise from there."""
    facts = facts_of(desc)
    settings.check()
    if init.shape[1] != facts.in_channels:
        raise InputError(f"{name}: expected {facts.in_channels} channels for this model, got {init.shape[1]}")
    check_size(facts, init.shape[2], init.shape[3], name)
    sigmas = img2img_sigmas(facts, settings, strength)
    if len(sigmas) < 2:
        log.info("img2img: strength %.3g of %d steps leaves no step to run; the input comes back", strength,
                 settings.steps)
        return init.float().cpu()
    labels = class_labels(facts, class_label, seed, init.shape[0])
    noise = seeded_normal(tuple(init.shape), seed)
    x = init.float().cpu() + noise * float(sigmas[0])
    return denoise(manager, desc, x, sigmas, settings, seed=seed, labels=labels, what="Diffusion img2img")


def inpaint(manager, desc: ModelDescriptor, image: torch.Tensor, keep: torch.Tensor, schedule, *, seed: int,
            clip: bool | None = None, class_label: int = -1) -> torch.Tensor:  # [B,C,H,W] model space
    """RePaint image [B,C,H,W] (model space) where keep [B,1,H,W] is 0. A keep that is all 1 gives the image back.
    class_label: a class, -1 none (the null class where the model has one), AUTO_CLASS the class each image's kept
    part most likely shows (`repaint.class_evidence`)."""
    from .repaint import check_mask, class_evidence, evidence_calls, model_calls, repaint

    facts = facts_of(desc)
    if facts.latent:
        raise InputError("model: RePaint works on pixel-space models; this one works on latents")
    if image.shape[1] != facts.in_channels:
        raise InputError(f"image: expected {facts.in_channels} channels for this model, got {image.shape[1]}")
    check_size(facts, image.shape[2], image.shape[3], "image")
    state = check_mask(keep, image)
    if state == "all known":
        log.info("RePaint: the mask marks nothing to inpaint; the image comes back unchanged")
        return image.float().cpu()
    if state == "all unknown":
        raise InputError("mask: covers the whole image, so nothing of it is kept to inpaint around; use Diffusion "
                         "Sample to generate a new image")
    B, _, H, W = image.shape
    keep = keep.expand(B, -1, -1, -1).float()
    auto = class_label == AUTO_CLASS
    if auto:
        if facts.num_classes <= 0:
            raise InputError(f"class_label: {AUTO_CLASS} (auto) needs a class-conditional model; this one is "
                             "unconditional, use -1")
        classes = facts.num_classes - (1 if facts.null_class == facts.num_classes - 1 else 0)
        labels = None
    else:
        if class_label == -1 and facts.null_class is not None:  # no class asked: the model's unconditional score
            class_label = facts.null_class
        labels = class_labels(facts, class_label, seed, B)
    chunk = chunk_size(manager, desc, B, H, W, 1.0)
    calls = model_calls(schedule, facts.schedule.num_train_timesteps) + (evidence_calls(classes) if auto else 0)

    def fn(model: torch.nn.Module) -> torch.Tensor:
        den = Denoiser(model, facts, clip=clip)
        device = manager.compute_device
        outs = []
        with Progress(calls * math.ceil(B / chunk), "RePaint") as bar, interruptible(model, depth=2), \
                scratch_released(model):
            for start in range(0, B, chunk):
                img = image[start:start + chunk].to(device, torch.float32)
                kp = keep[start:start + chunk].to(device)
                if auto:  # the most likely class of each image's kept part, then RePaint toward it
                    err = class_evidence(den, img, kp, classes, generator=generator(seed + start, LABEL_STREAM))
                    bar.update(evidence_calls(classes))
                    found = err.argmin(1)
                    log.info("RePaint: class of the kept part, images %d-%d: %s", start, start + len(img) - 1,
                             found.tolist())
                    extra = {"class_labels": found}
                else:
                    extra = {} if labels is None else {"class_labels": labels[start:start + chunk].to(device)}
                draw = seeded_noise_sampler(img, seed + start)
                x = seeded_normal(tuple(img.shape), seed + start).to(device)

                def cb(d: dict) -> None:
                    show = bar.shows_previews and d["i"] % (PREVIEW_EVERY * 4) == 0
                    bar.update(1, to_preview(d["x"], False) if show else None)

                outs.append(repaint(den, img, kp, lambda: draw(0.0, 0.0),
                                    schedule, x=x, callback=cb, extra_args=extra).float().cpu())
        return torch.cat(outs)

    return manager.run(desc, fn, memory_required=run_bytes(manager, desc, chunk, H, W))
