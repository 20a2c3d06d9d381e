"""Style transfer on the shared manager: load a style model, stylise a batch, any size, with strength and colours.

    desc = load_style_model("decoder_iter_160000.pth.tar")           # MicroAST: the other three parts come along
    images, notes = stylise(desc, content, style, strength=0.8, preserve_colours=True)

Images are [B,C,H,W] float32 in [0,1] on the CPU (alpha, if any, is kept aside and put back). Strength:
- MicroAST and TransformerNet blend in pixel space (MicroAST was trained only at feature alpha 1; its feature blend
  leaves [0,1] entirely at 0.5: ../shared/golden/microast/README.md);
- AdaIN uses upstream's own alpha, a blend of relu4_1 features.
Batches: one style for every content image, or one style per content image (pairs); other counts are an error.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from .. import colour
from ..descriptor import ModelDescriptor
from ..errors import InputError
from ..manager import ModelManager, get_manager, placement
from ..progress import Progress
from ..image import match_channels, split_alpha
from . import adain, fast_style, microast

log = logging.getLogger(__name__)

FOLDER = "style"
CPU_WORK_BYTES = 768 << 20  # activation bytes per call on the CPU (tiles of ~1600 px: context costs < 10 %)
MIN_STYLE_SIDE = 32  # smaller style images (down to 1x1) are enlarged: their statistics then have no spread, guarded
MIN_CONTENT_SIDE = 16
MAX_SIDE = 16384


def load_style_model(name: str, folder: str = FOLDER, *, manager: ModelManager | None = None) -> ModelDescriptor:
    """A style model from `folder` (MicroAST part or packed file, AdaIN vgg/decoder, TransformerNet)."""
    return (manager or get_manager()).load(name, folder, family="style")


def is_arbitrary(desc: ModelDescriptor) -> bool:
    """Whether the model takes a style image (MicroAST, AdaIN) or has one style built in (TransformerNet)."""
    return bool(desc.config.get("arbitrary"))


def _rgb(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.ndim != 4 or x.shape[1] not in (1, 2, 3, 4):
        raise InputError(f"{name}: expected [B,C,H,W] with 1-4 channels, got {tuple(x.shape)}")
    rgb, alpha = split_alpha(x.float())
    return match_channels(rgb, 3), alpha


def prepare_style(style: torch.Tensor, style_size: int) -> torch.Tensor:  # [B,C,h,w] -> [B,3,h',w']
    """Drop alpha, grey to RGB, shorter side to `style_size` (0: as it is), at least MIN_STYLE_SIDE."""
    s, _ = _rgb(style, "style")
    h, w = s.shape[-2:]
    target = style_size if style_size and style_size > 0 else min(h, w)
    target = max(target, MIN_STYLE_SIDE)
    if target != min(h, w):
        k = target / min(h, w)
        size = (max(1, round(h * k)), max(1, round(w * k)))
        s = F.interpolate(s, size=size, mode="bilinear", align_corners=False, antialias=k < 1).clamp(0, 1)
    return s


def check_pairs(content: torch.Tensor, style: torch.Tensor | None) -> None:
    if style is not None and style.shape[0] not in (1, content.shape[0]):
        raise InputError(f"style: expected 1 style image (used for every content image) or {content.shape[0]} (one "
                         f"per content image), got a batch of {style.shape[0]}")


def _pad(x: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    """Reflect-pad right/bottom to a multiple (replicate where the image is too small to reflect)."""
    H, W = x.shape[-2:]
    ph = -(-max(H, minimum) // multiple) * multiple - H
    pw = -(-max(W, minimum) // multiple) * multiple - W
    if not (ph or pw):
        return x
    mode = "reflect" if ph < H and pw < W else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _budget(manager: ModelManager, desc: ModelDescriptor, device: torch.device) -> int:
    budget = manager.activation_budget(desc)
    return min(budget, CPU_WORK_BYTES) if device.type == "cpu" else budget


def _run_one(desc: ModelDescriptor, model: torch.nn.Module, x: torch.Tensor, code, alpha: float, tile: int | None,
             budget: int) -> torch.Tensor:  # x [1,3,H,W] in [0,1] -> [1,3,H,W] in [0,1]
    device, dtype = placement(model)
    align = int(desc.config.get("align", 4))
    H, W = x.shape[-2:]
    xp = _pad(x, align, MIN_CONTENT_SIDE)
    kw = dict(tile=tile, budget=budget, device=device, dtype=dtype)
    if desc.architecture == "MicroAST":
        out = microast.stylise(model, xp, code, **kw)
    elif desc.architecture == "AdaIN":
        out = adain.stylise(model, xp, code, alpha=alpha, **kw)
    else:
        out = fast_style.stylise(model, xp * 255.0, **kw) / 255.0
    out = out[..., :H, :W].float().cpu()
    if not torch.isfinite(out).all():
        raise InputError(f"{os.path.basename(desc.source)}: the output has NaN/Inf values (a degenerate style "
                         "image or an overflow in reduced precision)")
    return out.clamp_(0, 1)


def _style_code(desc: ModelDescriptor, model: torch.nn.Module, s: torch.Tensor):
    device, dtype = placement(model)
    return model.style_code(s.to(device=device, dtype=dtype))


def _inputs(desc: ModelDescriptor, content: torch.Tensor, style: torch.Tensor | None, strength: float,
            style_size: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Checked inputs: (content RGB [B,3,H,W], its alpha or None, the prepared style or None, notes)."""
    if desc.family != "style":
        raise InputError(f"style_model: expected a style model, got a {desc.family} model ({desc.architecture})")
    if not 0.0 <= float(strength) <= 1.0:
        raise InputError(f"strength: expected a value in [0,1], got {strength}")
    rgb, alpha = _rgb(content, "content")
    if max(rgb.shape[-2:]) > MAX_SIDE:
        raise InputError(f"content: {rgb.shape[-2]}x{rgb.shape[-1]} is larger than {MAX_SIDE} pixels a side")
    notes: list[str] = []
    arbitrary = is_arbitrary(desc)
    name = os.path.basename(desc.source) or desc.architecture
    if arbitrary and style is None:
        raise InputError(f"style: {name} ({desc.architecture}) transfers the style of a style image; connect one")
    if not arbitrary and style is not None:
        notes.append(f"{name} ({desc.architecture}) has its style built in; the style image was ignored")
        style = None
    if style is not None:
        check_pairs(rgb, style)
        raw_side = min(style.shape[-2:])
        style = prepare_style(style, style_size)
        if raw_side < MIN_STYLE_SIDE:
            notes.append(f"style image {raw_side}px is tiny; enlarged to {MIN_STYLE_SIDE}px (a flat style gives flat "
                         "statistics: the result takes its colour)")
    return rgb, alpha, style, notes


def stylise(
    desc: ModelDescriptor,
    content: torch.Tensor,  # [B,C,H,W] in [0,1]
    style: torch.Tensor | None = None,  # [1|B,C,h,w] in [0,1]
    *,
    strength: float = 1.0,
    style_size: int = 512,
    preserve_colours: bool = False,
    tile: int | None = None,
    manager: ModelManager | None = None,
) -> tuple[torch.Tensor, list[str]]:  # ([B,C,H,W] in [0,1], notes for the user)
    """Stylise every content image (see the module docstring). Returns the images and notes (ignored inputs etc.)."""
    manager = manager or get_manager()
    rgb, alpha, style, notes = _inputs(desc, content, style, strength, style_size)
    alpha_feat = float(strength) if desc.architecture == "AdaIN" else 1.0
    B = rgb.shape[0]
    outs = []
    codes: dict[tuple[int, int], object] = {}  # (model, style index) -> its code, computed once per style
    with Progress(B, "stylise", enabled=B > 1) as bar:
        for b in range(B):
            x = rgb[b : b + 1]

            def work(model: torch.nn.Module, x=x, b=b) -> torch.Tensor:
                with torch.no_grad():
                    code = None
                    if style is not None:
                        key = (id(model), min(b, style.shape[0] - 1))  # a float32 rerun gets its own
                        if key not in codes:
                            codes[key] = _style_code(desc, model, style[key[1] : key[1] + 1])
                        code = codes[key]
                    return _run_one(desc, model, x, code, alpha_feat, tile, _budget(manager, desc, placement(model)[0]))

            y = manager.run(desc, work, memory_required=_need(desc, x))
            if preserve_colours:
                y = colour.luminance_transfer(y, x)
            if desc.architecture != "AdaIN" and strength < 1.0:
                y = x + float(strength) * (y - x)  # pixel-space strength
            outs.append(y)
            bar.update()
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if alpha is not None:
        out = torch.cat([out, alpha.to(out)], 1)
    return out, notes


def _need(desc: ModelDescriptor, x: torch.Tensor) -> int:
    """Device memory to ask for: the weights and one call's activations (calls are capped at 1 GiB)."""
    px = x.shape[-2] * x.shape[-1]
    return desc.weight_bytes + int(min((desc.bytes_per_pixel or 1024.0) * px, 1 << 30))
