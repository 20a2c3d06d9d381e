"""Every model spandrel knows (SR, restoration, face restoration, inpainting), as our ModelDescriptor: the adapter
the upscale and inpaint families share.

spandrel (and spandrel_extra_arches where installed) detects the architecture from the state dict and builds the
module; this module never lets spandrel open files (the manager reads them safely first) and adds what tiling and
memory planning need and spandrel does not say:

- `receptive_field`: input pixels of context a tile needs on each side so that its contributing pixels equal the
  untiled result. Pure convolution stacks get the exact bound (sum of kernel radii); architectures with something
  that sees the whole image (channel attention over global pooling, transposed attention, windows that wrap around
  the image) are "global": no context makes tiles exact, so they are tiled only when memory forces it, with a wide
  context and cross-fade. `tiling.measure_receptive_field` measures a model empirically.
- `bytes_per_pixel`: peak activation bytes per input pixel at fp32 (calibrated on the shared weights).

`desc.extra` is a `SpandrelFacts`: the tiling facts (window alignment, scope, exact tiles, width) and the spandrel
descriptor itself, for single-image models an `UpscaleModel`: a spandrel `ImageModelDescriptor` (so ComfyUI's core
`ImageUpscaleWithModel` accepts it as UPSCALE_MODEL) that knows its Atelier descriptor and casts its input to the
model's dtype.

The CPU path is set up here, once per model, when the descriptor is made (`from_spandrel`): the module's eligible
3x3 convolutions become `NNPACKConv2d` layers (models/cpu_conv.py; same weights and keys, NNPACK only in float32
on the CPU without gradients), and a Compact module gets `compact_cpu.cpu_forward` for those calls (see that
module). Nothing is patched or switched per call. Core's own UPSCALE_MODEL objects adopted here share the module,
so core's node gets the same convolutions for them.

Cancel: `add_interrupt_checks` registers (once, here) a forward pre-hook calling `host.throw_if_interrupted()` on
every module of the network (INTERRUPT_DEPTH), so a press of Cancel takes effect within one layer of one tile,
however large the tile, not only between tiles.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from .descriptor import ModelDescriptor, SizeRequirements
from .compact_cpu import use_compact_path
from .cpu_conv import use_nnpack
from .progress import add_interrupt_checks

log = logging.getLogger(__name__)

# What a scope means for tiling: "local" (finite receptive field; `exact` when the context is a proven bound),
# "global" (some layer sees the whole image: tile only when memory forces it).
GLOBAL_CONTEXT = 48  # input pixels of context for tiles of a "global" model when tiling is unavoidable
# Cancel is checked before every module of the network (None: all depths). DCTLSA at a 256^2 tile on one busy core:
# the longest stretch between two checks is 1.1 s with every module hooked (527 hooks), 5.8 s with the three upper
# levels only (47 hooks); a hook costs microseconds a call, about a millisecond per DCTLSA call.
INTERRUPT_DEPTH: int | None = None


@dataclass(frozen=True)
class ArchFacts:
    """Tiling and memory facts of one spandrel architecture."""

    scope: str = "global"  # "local" | "global"
    context: int | None = None  # input pixels; None: the convolution bound (sum of kernel radii)
    exact: bool = False  # the context is a proven bound (tiles equal the untiled result up to rounding)
    maps: float = 48.0  # live fp32 feature maps per feature channel at the peak (bytes_per_pixel)
    note: str = ""


@dataclass(frozen=True)
class SpandrelFacts:
    """What the families need to run a spandrel model (`desc.extra`)."""

    spandrel: Any  # the spandrel descriptor: an UpscaleModel (UPSCALE_MODEL) or a MaskedImageModelDescriptor
    scope: str  # "local" | "global" (ArchFacts)
    exact: bool  # tiles with `receptive_field` context equal the untiled result up to float rounding
    align: int  # tile starts and sizes must be multiples of it (attention windows, pixel-unshuffle, U-Nets)
    features: int  # width of the network (the first convolution's output channels)
    conv_bound: int  # sum of the convolutions' radii
    note: str = ""


_CONV = ArchFacts("local", None, True, 3.5, "stride-1 convolutions and pointwise ops only: the bound is exact")
_UNKNOWN = ArchFacts(note="not studied: treated as seeing the whole image")

# Measured on the shared weights with `measure_receptive_field` (astronaut crops, tolerance 1/255) where marked.
ARCH_FACTS: dict[str, ArchFacts] = {
    "Compact": ArchFacts("local", None, True, 2.5, "18 3x3 convs: bound 18 px; measured 9-12 px at 1/255"),
    "DnCNN": ArchFacts("local", None, True, 3.5, "17 3x3 convs: bound 17 px; measured 7-13 px at 1/255"),
    "SPAN": _CONV,
    "SwiftSRGAN": _CONV,
    "ESRGAN": ArchFacts("local", 40, False, 6.0, "RRDB bound ~350 px; effective field well under 40 px"),
    "PLKSR": ArchFacts("local", 48, False, 6.0, "large-kernel convs; estimate"),
    "MoSR": ArchFacts("local", 40, False, 8.0, "conv mixer; estimate"),
    "MoESR": ArchFacts("local", 40, False, 8.0, "conv mixer; estimate"),
    "SwinIR": ArchFacts("local", 48, False, 48.0, "masked shifted windows; estimate, window-aligned"),
    "Swin2SR": ArchFacts("local", 48, False, 48.0, "masked shifted windows; estimate, window-aligned"),
    "SCUNet": ArchFacts("local", 64, False, 48.0, "swin-conv U-Net; estimate"),
    "DRUNet": ArchFacts("local", 64, False, 8.0, "conv U-Net, 3 downsamplings; estimate"),
    "CRAFT": ArchFacts("global", maps=42.0, note="transposed (channel) attention over the whole image; measured: "
                       "seams stay above 1/255 at any context"),
    "DCTLSA": ArchFacts("global", maps=60.0, note="shifted windows without mask: the image edges wrap around"),
    "HAT": ArchFacts("global", note="channel attention on global average pooling"),
    "DAT": ArchFacts("global", note="channel attention on global pooling"),
    "DRCT": ArchFacts("global", note="channel attention on global pooling"),
    "GRL": ArchFacts("global", note="global anchor attention"),
    "OmniSR": ArchFacts("global", note="global pooling in OSA blocks"),
    "RCAN": ArchFacts("global", maps=8.0, note="channel attention on global average pooling"),
    "RealCUGAN": ArchFacts("global", maps=8.0, note="squeeze-excitation on global means"),
    "SAFMN": ArchFacts("global", maps=8.0, note="pooling to sizes relative to the image"),
    "SAFMNBCIE": ArchFacts("global", maps=8.0, note="pooling to sizes relative to the image"),
    "ATD": ArchFacts("global", note="adaptive token dictionary: categories span the image"),
    "RGT": ArchFacts("global", note="recursive-generalisation attention over the image"),
    # inpainters (family "inpaint"): run whole or per masked region by models/inpaint, never tiled
    "LaMa": ArchFacts("global", maps=5.0, note="fast Fourier convolutions see the whole image; peak measured at 512^2: "
                      "270 MB above the loaded process (bench/inpaint.py), ~1 KB per pixel"),
    "MAT": ArchFacts("global", note="mask-aware transformer over the whole (512-multiple, square) image"),
}


def facts(arch_id: str) -> ArchFacts:
    return ARCH_FACTS.get(arch_id, _UNKNOWN)


@functools.lru_cache(maxsize=1)
def spandrel_registry() -> Any:
    """spandrel's MAIN_REGISTRY, plus spandrel_extra_arches when importable (a copy: the global is left alone)."""
    from spandrel import MAIN_REGISTRY

    reg = MAIN_REGISTRY.copy()
    try:
        from spandrel_extra_arches import EXTRA_REGISTRY  # optional, non-commercial licences
    except ImportError:
        return reg
    reg.add(*EXTRA_REGISTRY, ignore_duplicates=True)
    log.info("spandrel_extra_arches registered (%d architectures)", len(EXTRA_REGISTRY))
    return reg


def _canonical(state_dict: dict) -> dict:
    from spandrel import canonicalize_state_dict

    return canonicalize_state_dict(state_dict)


def detect(state_dict: dict, meta: dict) -> bool:
    """True when any spandrel architecture claims the state dict (key names and shapes only)."""
    sd = _canonical(state_dict)
    for support in spandrel_registry().architectures("detection"):
        try:
            if support.detect(sd):
                return True
        except Exception:  # noqa: BLE001 (a detector tripping over a foreign state dict is a "no")
            continue
    return False


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    """Build the module with spandrel (strict state-dict load inside spandrel) and describe it."""
    from spandrel import UnsupportedModelError

    sd = _canonical(state_dict)
    try:
        sp = spandrel_registry().load(sd)
    except UnsupportedModelError as e:
        raise ValueError("no spandrel architecture recognised the weights") from e
    except (RuntimeError, KeyError, ValueError, IndexError):
        raise
    except Exception as e:  # noqa: BLE001 (spandrel asserts on odd shapes: report, don't leak a stack trace)
        raise ValueError(f"spandrel could not build the model ({type(e).__name__}: {e})") from e
    return from_spandrel(sp)


# ---------------------------------------------------------------- descriptor mapping


def from_spandrel(sp: Any, source: str = "") -> ModelDescriptor:
    """Our descriptor for a spandrel ImageModelDescriptor / MaskedImageModelDescriptor (e.g. core's UPSCALE_MODEL)."""
    from spandrel import ImageModelDescriptor

    cached = getattr(sp, "atelier", None)
    if isinstance(cached, ModelDescriptor):
        return cached
    arch_id = str(sp.architecture.id)
    fx = facts(arch_id)
    model = sp.model
    req = sp.size_requirements
    align = _lcm(req.multiple_of, _window(model))
    bound = conv_bound(model)
    if fx.scope == "local":  # the convolution bound says nothing of attention windows: it caps only conv nets
        windowed = _window(model) > 1
        context = bound if fx.context is None else fx.context if windowed else min(fx.context, bound)
        exact = fx.exact or (context == bound and not windowed)
    else:
        context, exact = GLOBAL_CONTEXT, False
    context = math.ceil(context / align) * align
    purpose = str(sp.purpose)
    tiling = {"SUPPORTED": "supported", "DISCOURAGED": "discouraged", "INTERNAL": "internal"}[sp.tiling.name]
    if fx.scope == "global" and tiling == "supported":
        tiling = "discouraged"
    nf = _features(model)
    bpp = 4.0 * (nf * fx.maps + 2 * sp.scale**2 * sp.output_channels)
    desc = ModelDescriptor(
        family="inpaint" if purpose == "Inpainting" else "upscale",
        architecture=arch_id,
        model=model,
        purpose=purpose,
        scale=sp.scale,
        in_channels=sp.input_channels,
        out_channels=sp.output_channels,
        supports_half=bool(sp.supports_half),
        supports_bfloat16=bool(sp.supports_bfloat16),
        size_requirements=SizeRequirements(req.minimum, req.multiple_of, req.square),
        tiling=tiling,
        receptive_field=int(context),
        bytes_per_pixel=bpp,
        config={"spandrel_id": arch_id, "spandrel_name": sp.architecture.name, "tags": list(sp.tags)},
        source=source,
    )
    if desc.family == "upscale":  # the CPU path and the cancel checks, set up once here (module docstring)
        use_nnpack(model)
        use_compact_path(model)
        add_interrupt_checks(model, INTERRUPT_DEPTH)
    wrapped = upscale_model_class().wrap(sp, desc) if isinstance(sp, ImageModelDescriptor) else sp
    desc.extra = SpandrelFacts(wrapped, fx.scope, bool(exact), int(align), int(nf), int(bound), fx.note)
    for obj in (sp, wrapped):  # core's object remembers its descriptor too: adopted once, not per run
        try:
            obj.atelier = desc
        except AttributeError:  # a foreign object with __slots__: nothing to cache on
            pass
    return desc


def conv_bound(model: torch.nn.Module) -> int:
    """Sum of the spatial radii of all convolutions: an upper bound of the receptive field of a stride-1 network
    (exact for a plain stack; convolutions after upsampling count in full, which only overestimates)."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            kh, kw = m.kernel_size
            dh, dw = m.dilation
            total += max(dh * (kh - 1), dw * (kw - 1)) // 2
    return max(total, 1)


def _window(model: torch.nn.Module) -> int:
    """Attention window size (tiles must start on the window grid): the lcm of the windows of all layers (capped),
    1 when the model has none."""
    found = 1
    for m in model.modules():
        for name in ("window_size", "split_size"):
            w = getattr(m, name, None)
            sizes = [w] if isinstance(w, int) else list(w) if isinstance(w, (tuple, list)) else []
            for v in sizes:
                if isinstance(v, int) and 0 < v <= 64:
                    found = _lcm(found, v)
    return found if found <= 64 else 1


def _features(model: torch.nn.Module) -> int:
    """Width of the network: the output channels of its first convolution."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.out_channels)
    return 64


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


# ---------------------------------------------------------------- the UPSCALE_MODEL object


@functools.lru_cache(maxsize=1)
def upscale_model_class() -> type:
    """The UPSCALE_MODEL class (built on first use, so importing this module does not import spandrel)."""
    from spandrel import ImageModelDescriptor

    class UpscaleModel(ImageModelDescriptor):
        """A spandrel ImageModelDescriptor sharing the module of an Atelier descriptor (`.atelier`).

        Core's ImageUpscaleWithModel calls it with float32 images; the module may sit in fp16/bf16 on a GPU (the
        manager's policy), so `__call__` casts the input to the module's dtype and the result back.
        """

        atelier: ModelDescriptor

        @classmethod
        def wrap(cls, sp: Any, desc: ModelDescriptor) -> "UpscaleModel":
            if isinstance(sp, cls):
                return sp
            obj = cls.__new__(cls)
            obj.__dict__.update(sp.__dict__)  # same module, same spandrel facts; no second state-dict load
            obj.atelier = desc
            return obj

        def __call__(self, image: torch.Tensor) -> torch.Tensor:  # [N,C,H,W] -> [N,C',H*s,W*s]
            p = next(self.model.parameters(), None)
            if p is None or (image.dtype == p.dtype and image.device == p.device):
                return super().__call__(image)
            return super().__call__(image.to(device=p.device, dtype=p.dtype)).to(image.dtype)

    return UpscaleModel


def is_spandrel_image_model(obj: Any) -> bool:
    """A single-image spandrel descriptor (ours or core's UPSCALE_MODEL)."""
    try:
        from spandrel import ImageModelDescriptor
    except ImportError:
        return False
    return isinstance(obj, ImageModelDescriptor)
