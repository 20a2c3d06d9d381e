"""GAN latents and sampling as plain functions: seeds -> latents, truncation, interpolation, style mixing, sampling.

    lat = make_latent(manager, desc, seed=0, batch_size=4, space="w")        # GANLatent in w space
    img = sample(manager, desc, lat, truncation_psi=0.7)                       # [4,3,H,W] in 0..1

A `GANLatent` carries its tensor, its space ("z": [B,z_dim]; "w": [B,num_ws,w_dim]), the identity of the model it
belongs to (so a latent of one model is refused by another) and the class labels of conditional models. Latents live
on the CPU in float32; item i of a batch made from seed s is the item made alone from seed s + i (NVIDIA's
gen_images.py `--seeds` convention), drawn with a CPU `torch.Generator` so a seed gives the same latent on every
device. Generators follow the contract of `latent.py` / `dcgan.py` (z_dim, c_dim, w_dim, num_ws, mapping, synthesis,
forward). Image-to-image generators (CycleGAN/pix2pix) are applied by `translate`, tiled by the shared engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass

import torch

from .. import budget, host
from ..budget import SMALL_CALL_BYTES, fit_batch, scaled_bpp
from ..descriptor import ModelDescriptor
from ..errors import InputError
from ..image import match_channels, pad_to, split_alpha, to_range, to_unit
from ..manager import ModelManager, placement
from ..progress import Progress, interruptible
from ..tiling import tiled_apply
from ..latents import generator as seed_generator
from ..latents import lerp, seeded_normal, slerp
from .contract import NOISE_MODES, Generator
from .latent import style_mix

log = logging.getLogger(__name__)

SPACES = ("auto", "w", "z")
INTERPOLATIONS = ("auto", "lerp", "slerp")
PSI_RANGE = (-2.0, 2.0)
# NVIDIA's style-mixing split of the 18 ws of a 1024px StyleGAN (4-8px coarse, 16-32px middle, 64-1024px fine),
# scaled to a model's num_ws: boundaries at 4/18 and 8/18 of the rows.
_GROUP_BOUNDS = (4 / 18, 8 / 18)
MAX_CHUNK = 256
RAM = torch.device("cpu")  # where results sized by the user are gathered (memory guards)
LONG_PASS_BYTES = 16 << 20  # a call whose activations are smaller is short anyway: no per-layer Cancel checks


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value; compare .tensor yourself
class GANLatent:
    """Latent codes of one generator: the GAN_LATENT socket type."""

    tensor: torch.Tensor  # z: [B,z_dim]; w: [B,num_ws,w_dim]; float32 on the CPU
    space: str  # "z" | "w"
    model_id: str  # model_identity() of the generator it belongs to
    model_name: str  # the generator's file name, for messages
    labels: torch.Tensor | None = None  # [B,c_dim] one-hot (soft after interpolation); None for unconditional models

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def replace(self, **changes) -> "GANLatent":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------------
# checks


def model_identity(desc: ModelDescriptor) -> str:
    """What makes two generators the same: architecture and source file (the module itself when it has none)."""
    src = desc.source or f"module@{id(desc.model):x}"  # the manager records the real path of the file
    return f"{desc.architecture}:{src}"


def model_name(desc: ModelDescriptor) -> str:
    return os.path.basename(desc.source) if desc.source else f"(unsaved {desc.architecture})"


def check_generator(desc: ModelDescriptor, name: str = "gan") -> torch.nn.Module:
    """The generator module of a GAN descriptor; InputError for anything else (an image-to-image GAN, a VAE...)."""
    if not isinstance(desc, ModelDescriptor):
        raise InputError(f"{name}: expected a GAN model from Load GAN, got {type(desc).__name__}")
    if desc.family != "gan" or desc.purpose != "Generator":
        what = f"{desc.family} model ({desc.architecture}{', ' + desc.purpose if desc.purpose else ''})"
        hint = "; use Image-to-Image GAN for it" if desc.purpose == "ImageToImage" else ""
        raise InputError(f"{name}: {model_name(desc)} is a {what}, not a latent generator (StyleGAN, DCGAN, "
                         f"MLP GAN){hint}")
    return desc.model


def check_image_to_image(desc: ModelDescriptor, name: str = "gan") -> torch.nn.Module:
    if not isinstance(desc, ModelDescriptor):
        raise InputError(f"{name}: expected a GAN model from Load GAN, got {type(desc).__name__}")
    if desc.family != "gan" or desc.purpose != "ImageToImage":
        raise InputError(f"{name}: {model_name(desc)} is a {desc.family} {desc.purpose or 'model'} "
                         f"({desc.architecture}), not an image-to-image GAN (CycleGAN/pix2pix); use GAN Latent and "
                         "GAN Sample for generators")
    return desc.model


def check_latent(latent: GANLatent, desc: ModelDescriptor, name: str = "latent") -> GANLatent:
    """A latent of this generator, of a shape it takes; InputError naming `name` otherwise."""
    if not isinstance(latent, GANLatent):
        raise InputError(f"{name}: expected a GAN_LATENT (from GAN Latent), got {type(latent).__name__}")
    if latent.model_id != model_identity(desc):
        raise InputError(
            f"{name}: this latent belongs to {latent.model_name} ({latent.model_id.split(':')[0]}), but the gan "
            f"input is {model_name(desc)} ({desc.architecture}); latents only mean something to the model that made "
            "them. Make the latent with a GAN Latent node fed by the same Load GAN"
        )
    g = desc.model
    want = [g.z_dim] if latent.space == "z" else [g.num_ws, g.w_dim]
    if list(latent.tensor.shape[1:]) != want:
        raise InputError(f"{name}: expected a {latent.space} latent [B,{','.join(map(str, want))}], "
                         f"got {list(latent.tensor.shape)}")
    return latent


def check_psi(truncation_psi: float, name: str = "truncation_psi") -> float:
    psi = float(truncation_psi)
    if not (PSI_RANGE[0] <= psi <= PSI_RANGE[1]):
        raise InputError(f"{name}: expected a value in [{PSI_RANGE[0]:g}, {PSI_RANGE[1]:g}] (1 = no truncation, "
                         f"0 = the mean image), got {truncation_psi}")
    return psi


def _check_same(a: GANLatent, b: GANLatent, name: str = "latent_b") -> None:
    if a.model_id != b.model_id:
        raise InputError(f"{name}: belongs to {b.model_name} but latent_a to {a.model_name}; both must come from the "
                         "same model")
    if a.space != b.space or a.tensor.shape[1:] != b.tensor.shape[1:]:
        raise InputError(f"{name}: a {b.space} latent {list(b.tensor.shape)} cannot be mixed with latent_a, a "
                         f"{a.space} latent {list(a.tensor.shape)}; make both in the same space")


# ----------------------------------------------------------------------------------------------------------------
# latents from seeds


def seeds_to_z(seed: int, batch_size: int, z_dim: int) -> torch.Tensor:  # [B,z_dim] float32 CPU
    """z for seeds seed, seed+1, ... (one CPU generator per item, so item i alone equals item i of a batch)."""
    if batch_size < 1:
        raise InputError(f"batch_size: expected at least 1, got {batch_size}")
    return seeded_normal((batch_size, z_dim), seed)


def class_labels(c_dim: int, class_label: int, seed: int, batch_size: int, what: str = "this model"
                 ) -> torch.Tensor | None:  # [B,c_dim]
    """One-hot labels [B,c_dim]: `class_label` for every item, or (-1) a class per item drawn from seed + i."""
    label = int(class_label)
    if c_dim == 0:
        if label >= 0:
            raise InputError(f"class_label: {what} is unconditional (no classes); set class_label to -1, got {label}")
        return None
    if not -1 <= label < c_dim:
        raise InputError(f"class_label: {what} has {c_dim} classes; expected 0..{c_dim - 1} (or -1 for a random class "
                         f"per image), got {label}")
    if label >= 0:
        idx = torch.full((batch_size,), label)
    else:
        idx = torch.cat([torch.randint(c_dim, (1,), generator=seed_generator(seed + i, 1)) for i in range(batch_size)])
    return torch.nn.functional.one_hot(idx, c_dim).float()


def resolve_space(desc: ModelDescriptor, space: str, name: str = "space") -> str:
    """'auto' -> 'w' where the model has a w space, else 'z'; 'w' on a z-only model is an InputError."""
    if space not in SPACES:
        raise InputError(f"{name}: expected one of {SPACES}, got {space!r}")
    has_w = bool(getattr(desc.model, "w_dim", None)) and int(getattr(desc.model, "num_ws", 0) or 0) > 0
    if space == "auto":
        return "w" if has_w else "z"
    if space == "w" and not has_w:
        raise InputError(f"{name}: {model_name(desc)} ({desc.architecture}) has no w space, only z; choose z or auto")
    return space


def make_latent(manager: ModelManager, desc: ModelDescriptor, seed: int, batch_size: int = 1, space: str = "auto",
                class_label: int = -1) -> GANLatent:
    """Latents for seeds seed..seed+B-1: z drawn on the CPU; w = mapping(z, c) without truncation."""
    g = check_generator(desc)
    space = resolve_space(desc, space)
    z = seeds_to_z(seed, batch_size, g.z_dim)  # [B,z_dim]
    labels = class_labels(g.c_dim, class_label, seed, batch_size, f"{model_name(desc)} ({desc.architecture})")
    lat = GANLatent(z, "z", model_identity(desc), model_name(desc), labels)
    return to_w(manager, desc, lat) if space == "w" else lat


def to_w(manager: ModelManager, desc: ModelDescriptor, latent: GANLatent, name: str = "latent") -> GANLatent:
    """A z latent mapped to w (psi = 1); a w latent as it is."""
    check_latent(latent, desc, name)
    if latent.space == "w":
        return latent
    resolve_space(desc, "w", name)

    def fn(model: torch.nn.Module) -> torch.Tensor:
        dev = placement(model)[0]
        c = latent.labels.to(dev) if latent.labels is not None else None
        with torch.no_grad():
            return model.mapping(latent.tensor.to(dev), c).float().cpu()  # [B,num_ws,w_dim]

    ws = manager.run(desc, fn)
    return latent.replace(tensor=ws, space="w")


# ----------------------------------------------------------------------------------------------------------------
# interpolation and mixing


def _blend(a: GANLatent, b: torch.Tensor, b_labels: torch.Tensor | None, t: torch.Tensor, method: str
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B,T,...] latents and labels between a and b."""
    if method not in INTERPOLATIONS:
        raise InputError(f"method: expected one of {INTERPOLATIONS}, got {method!r}")
    use_slerp = method == "slerp" or (method == "auto" and a.space == "z")
    if use_slerp:
        flat_a, flat_b = a.tensor.flatten(1), b.flatten(1)
        x = slerp(flat_a, flat_b, t).view(a.tensor.shape[0], t.numel(), *a.tensor.shape[1:])
    else:
        x = lerp(a.tensor, b, t)
    labels = lerp(a.labels, b_labels, t) if a.labels is not None and b_labels is not None else None
    return x, labels


def interpolate(a: GANLatent, b: GANLatent, steps: int, method: str = "auto") -> GANLatent:
    """`steps` latents from a to b (both ends included) per item: lerp in w, slerp in z (method 'auto').

    a, b: batches of B (or one of them 1). Result: B * steps latents, item-major (item 0's frames first)."""
    _check_same(a, b)
    if steps < 2:
        raise InputError(f"steps: expected at least 2 (both ends), got {steps}")
    n = max(len(a), len(b))
    if len(a) not in (1, n) or len(b) not in (1, n):
        raise InputError(f"latent_b: batch of {len(b)} cannot pair with latent_a's {len(a)}; give equal batches "
                         "or one of 1")
    a = a.replace(tensor=a.tensor.expand(n, *a.tensor.shape[1:]),
                  labels=None if a.labels is None else a.labels.expand(n, -1))
    bt = b.tensor.expand(n, *b.tensor.shape[1:])
    bl = None if b.labels is None else b.labels.expand(n, -1)
    _require_latents(a, n * steps, f"GAN Interpolate: {n} x {steps} steps")
    x, labels = _blend(a, bt, bl, torch.linspace(0, 1, steps), method)
    return a.replace(tensor=x.flatten(0, 1).contiguous(),
                     labels=None if labels is None else labels.flatten(0, 1).contiguous())


def walk(keys: GANLatent, steps: int, method: str = "auto", loop: bool = True) -> GANLatent:
    """A latent walk through the batch's items as keyframes, `steps` frames per segment (a loop returns to item 0
    and leaves its last frame out, so the frames repeat seamlessly)."""
    if len(keys) < 2:
        raise InputError(f"latent_a: a walk needs at least 2 keyframes (batch size >= 2), got {len(keys)}; or connect "
                         "latent_b to interpolate between two latents")
    if steps < 1:
        raise InputError(f"steps: expected at least 1 frame per segment, got {steps}")
    order = list(range(len(keys))) + ([0] if loop else [])
    _require_latents(keys, (len(order) - 1) * steps + 1, f"GAN latent walk: {len(order) - 1} segments x {steps} steps")
    a = keys.replace(tensor=keys.tensor[order[:-1]], labels=None if keys.labels is None else keys.labels[order[:-1]])
    b_idx = order[1:]
    t = torch.arange(steps, dtype=torch.float32) / steps  # end of each segment = start of the next
    x, labels = _blend(a, keys.tensor[b_idx], None if keys.labels is None else keys.labels[b_idx], t, method)
    x, labels = x.flatten(0, 1), None if labels is None else labels.flatten(0, 1)
    if not loop:  # close on the last keyframe
        x = torch.cat([x, keys.tensor[-1:]])
        labels = None if labels is None else torch.cat([labels, keys.labels[-1:]])
    return keys.replace(tensor=x.contiguous(), labels=None if labels is None else labels.contiguous())


def _require_latents(like: GANLatent, count: int, what: str) -> None:
    """`count` latents shaped like `like`'s, built three times over (blend, flatten, result): refused unless they fit."""
    per = like.tensor[0].numel() + (like.labels[0].numel() if like.labels is not None else 0)
    budget.require(budget.tensor_bytes(count, per) * 3, f"{what} = {count} latents", RAM)


def layer_groups(num_ws: int) -> dict[str, list[int]]:
    """Rows of ws per style group: coarse (pose, shape), middle (features), fine (colour, texture)."""
    c = max(1, round(num_ws * _GROUP_BOUNDS[0]))
    m = max(c + 1, round(num_ws * _GROUP_BOUNDS[1])) if num_ws > 2 else min(num_ws, c + 1)
    return {"coarse": list(range(0, c)), "middle": list(range(c, m)), "fine": list(range(m, num_ws))}


def parse_layers(text: str, num_ws: int, name: str = "layers") -> list[int]:
    """'0-3, 8' -> [0, 1, 2, 3, 8]; every index in 0..num_ws-1."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if m is None:
            raise InputError(f"{name}: expected comma-separated indices or ranges like '0-3, 8', got {part!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= num_ws:
            raise InputError(f"{name}: {part!r} is outside 0..{num_ws - 1} (this model has {num_ws} style rows)")
        out += range(lo, hi + 1)
    return sorted(set(out))


def _need_w(desc: ModelDescriptor, name: str = "gan") -> int:
    num_ws = int(getattr(check_generator(desc, name), "num_ws", 0) or 0)
    if not num_ws:
        raise InputError(f"{name}: {model_name(desc)} ({desc.architecture}) has no per-layer styles (no w space); "
                         "style mixing needs a StyleGAN")
    return num_ws


def style_layers(desc: ModelDescriptor, coarse: bool, middle: bool, fine: bool, layers: str = "") -> list[int]:
    """The ws rows to take from the style latent: `layers` text when given, else the chosen groups."""
    num_ws = _need_w(desc)
    if layers and layers.strip():
        return parse_layers(layers, num_ws)
    groups = layer_groups(num_ws)
    return [i for key, on in (("coarse", coarse), ("middle", middle), ("fine", fine)) if on for i in groups[key]]


def mix_styles(manager: ModelManager, desc: ModelDescriptor, base: GANLatent, source: GANLatent,
               layers: list[int]) -> GANLatent:
    """w of `base` with the rows in `layers` taken from `source` (batches equal, or source of 1). Result in w."""
    _need_w(desc)
    wa, wb = to_w(manager, desc, base, "latent"), to_w(manager, desc, source, "style_latent")
    if len(wb) not in (1, len(wa)):
        raise InputError(f"style_latent: batch of {len(wb)} cannot pair with latent's {len(wa)}; give the same batch "
                         "size or 1")
    return wa.replace(tensor=style_mix(wa.tensor, wb.tensor, layers))


# ----------------------------------------------------------------------------------------------------------------
# sampling


def _sample_bytes(desc: ModelDescriptor) -> float:
    """Activation bytes of one sample (a rough upper bound: float32, plus half again)."""
    return scaled_bpp(desc.bytes_per_pixel) * desc.model.img_resolution**2 * 1.5


def _chunk_size(manager: ModelManager, desc: ModelDescriptor, batch: int, per: float) -> int:
    if batch * per <= SMALL_CALL_BYTES:  # one call, without asking the device for its free memory
        return min(batch, MAX_CHUNK)
    return fit_batch(per, batch, manager.activation_budget(desc), MAX_CHUNK)


def sample(manager: ModelManager, desc: ModelDescriptor, latent: GANLatent, truncation_psi: float = 1.0,
           truncation_cutoff: int | None = None, noise_mode: str = "const", noise_seed: int = 0,
           chunk: int | None = None) -> torch.Tensor:  # [B,C,H,W] float32 in 0..1 on the CPU
    """Images of a latent batch: truncation toward the mean w (z-only models: z * psi), batched within the memory
    budget, through `manager.run` (a half-precision result with NaN/Inf is redone in float32)."""
    g = check_generator(desc)
    check_latent(latent, desc)
    psi = check_psi(truncation_psi)
    if noise_mode not in NOISE_MODES:
        raise InputError(f"noise_mode: expected one of {NOISE_MODES}, got {noise_mode!r}")
    if truncation_cutoff is not None:
        cutoff = int(truncation_cutoff)
        if g.num_ws and not 0 <= cutoff <= g.num_ws:
            raise InputError(f"truncation_cutoff: expected 0 (all layers) .. {g.num_ws} for {model_name(desc)}, "
                             f"got {cutoff}")
        truncation_cutoff = cutoff if g.num_ws else None  # z-only models: psi scales all of z
    if g.c_dim and latent.space == "z" and latent.labels is None:
        raise InputError(f"latent: {model_name(desc)} is class-conditional but this z latent carries no class labels")
    gen = torch.Generator().manual_seed(int(noise_seed)) if noise_mode == "random" else None
    per = _sample_bytes(desc)

    def fn(model: Generator, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:  # [b,C,H,W] in 0..1
        kw = dict(space=latent.space, psi=psi, cutoff=truncation_cutoff, noise_mode=noise_mode, generator=gen)
        if per * x.shape[0] < LONG_PASS_BYTES:  # a tiny call: not worth the hooks (nor a context manager)
            return model.generate(x, labels, **kw)
        with interruptible(model):  # a chunk can take long on a CPU: Cancel stops between layers
            return model.generate(x, labels, **kw)

    n = len(latent)
    res = int(g.img_resolution)
    budget.require(budget.tensor_bytes(n, max(3, int(getattr(g, "img_channels", 3))), res, res) * 2,
                   f"GAN Sample: {n} images of {res}x{res}", RAM)
    step = chunk or _chunk_size(manager, desc, n, per)
    if n <= step:  # one call, the usual case: no bar, no slices (this path is timed at batch 1 by bench/gan.py)
        host.throw_if_interrupted()
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            img = manager.run(desc, lambda model: fn(model, latent.tensor, latent.labels), memory_required=int(per * n))
        return img.float().cpu()  # [B,C,H,W]
    outs = []
    with Progress(math.ceil(n / step), "GAN sample") as bar, torch.no_grad():
        for i in range(0, n, step):
            x = latent.tensor[i : i + step]
            lab = latent.labels[i : i + step] if latent.labels is not None else None
            img = manager.run(desc, lambda model, x=x, lab=lab: fn(model, x, lab), memory_required=int(per * len(x)))
            outs.append(img.float().cpu())  # [b,C,H,W]
            bar.update()
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# ----------------------------------------------------------------------------------------------------------------
# image to image


def translate(manager: ModelManager, desc: ModelDescriptor, image: torch.Tensor, tile: int | None = None,
              ) -> torch.Tensor:  # [B,C',H,W] float32 in 0..1
    """Apply a CycleGAN/pix2pix generator to image [B,C,H,W] in 0..1, tiled by the shared engine for large images.

    Alpha is kept as it was; grey <-> RGB converted to the model's channels; sizes padded to the model's needs."""
    check_image_to_image(desc)
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or min(image.shape) == 0:
        raise InputError(f"image: expected images [B,C,H,W] with at least 1 pixel, got "
                         f"{tuple(getattr(image, 'shape', ())) or type(image).__name__}")
    H, W = image.shape[-2:]
    req = desc.size_requirements
    ph, pw = req.padded_size(H, W)
    channels = max(3, desc.in_channels, desc.out_channels)  # input copies (scaled, padded), output, its [0,1] copy
    budget.require(budget.tensor_bytes(image.shape[0], channels, ph, pw) * 5,
                   f"Image-to-Image GAN: {image.shape[0]} image(s) of {W}x{H}", RAM)
    rgb, alpha = split_alpha(image.float())
    x = match_channels(rgb, desc.in_channels)
    model = desc.model
    x = pad_to(to_range(x, model.input_range), ph, pw)  # reflect like the generators' own padding; replicate if small
    context = int(desc.receptive_field or 32)
    act_budget = manager.activation_budget(desc)

    def fn(model: torch.nn.Module) -> torch.Tensor:
        dev, dt = placement(model)
        long = scaled_bpp(desc.bytes_per_pixel) * x.shape[0] * ph * pw >= LONG_PASS_BYTES
        with torch.no_grad(), interruptible(model, enabled=long):  # a big tile is one long call on a CPU
            return tiled_apply(model, x, scale=1, out_channels=desc.out_channels, tile=tile or None, context=context,
                               blend=16, align=max(1, req.multiple_of), bytes_per_pixel=desc.bytes_per_pixel,
                               budget_bytes=act_budget, device=dev, dtype=dt, progress="GAN tiles")

    y = manager.run(desc, fn)[..., :H, :W]  # [B,C',H,W] in output_range
    out = to_unit(y, model.output_range)
    if alpha is not None:
        out = torch.cat([out, alpha.to(out)], dim=1)
    return out
