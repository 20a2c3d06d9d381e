"""AdaIN (Huang and Belongie, "Arbitrary Style Transfer in Real-time with Adaptive Instance Normalization", ICCV 2017).

The files people have (naoto0804/pytorch-AdaIN): `vgg_normalised.pth`, the normalised VGG-19 as an `nn.Sequential`
(up to relu5_4; only modules 0-30, to relu4_1, are used: later keys are ignored) and `decoder.pth`, the mirrored
decoder. Loading either finds the other beside it; a packed file holds both as `vgg.<i>.*` and `decoder.<i>.*`.

Strength is upstream's alpha, a blend in relu4_1 feature space. Any size: relu4_1 (512 channels at 1/8, 32 bytes per
image pixel) is kept whole so AdaIN sees whole-image statistics; the encoder and decoder run in tiles with their
receptive fields as context.
"""
from __future__ import annotations

import logging
import os
import re

import torch
import torch.nn as nn

from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import ModelLoadError
from ..loading import read_state_dict
from ..tiling import tiled_apply
from .ops import Stats, adain, balanced_tile, channels_last, mean_std

log = logging.getLogger(__name__)

ALIGN = 8  # three 2x2 max-pools
ENCODER_CONTEXT = 48  # receptive radius to relu4_1: 37 image pixels
DECODER_CONTEXT = 8  # in 1/8-resolution pixels: about 4
ENCODER_BPP = 800.0  # activation bytes per image pixel at fp32, measured (786: 64-channel full-resolution maps)
DECODER_BPP = 64000.0  # per 1/8-resolution pixel (64 image pixels), measured 63610
# (index, in, out) of the 3x3 convolutions; pools after indices 5, 12, 25 (at 7, 14, 27) and the 1x1 at 0.
_VGG_CONVS = [(2, 3, 64), (5, 64, 64), (9, 64, 128), (12, 128, 128), (16, 128, 256), (19, 256, 256), (22, 256, 256),
              (25, 256, 256), (29, 256, 512)]
_DEC_CONVS = [(1, 512, 256), (5, 256, 256), (8, 256, 256), (11, 256, 256), (14, 256, 128), (18, 128, 128),
              (21, 128, 64), (25, 64, 64), (28, 64, 3)]
_VGG_POOLS, _DEC_UPS = (7, 14, 27), (3, 16, 23)


def make_vgg() -> nn.Sequential:
    """Modules 0-30 of the normalised VGG-19 (indices as upstream, so its keys load)."""
    layers: dict[int, nn.Module] = {0: nn.Conv2d(3, 3, 1)}
    for i, cin, cout in _VGG_CONVS:
        layers[i - 1], layers[i], layers[i + 1] = nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3), nn.ReLU(inplace=True)
    for i in _VGG_POOLS:
        layers[i] = nn.MaxPool2d(2, 2, 0, ceil_mode=True)
    return nn.Sequential(*(layers[i] for i in range(31)))


def make_decoder() -> nn.Sequential:
    layers: dict[int, nn.Module] = {}
    for i, cin, cout in _DEC_CONVS:
        layers[i - 1], layers[i] = nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3)
        if i != 28:
            layers[i + 1] = nn.ReLU(inplace=True)
    for i in _DEC_UPS:
        layers[i] = nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Sequential(*(layers[i] for i in range(29)))


class AdaIN(nn.Module):
    """`forward(content, style, alpha)` is upstream's style_transfer (untiled, raw decoder output)."""

    def __init__(self):
        super().__init__()
        self.vgg = make_vgg()
        self.decoder = make_decoder()

    def style_code(self, style: torch.Tensor) -> Stats:  # [B,3,h,w] -> relu4_1 statistics
        return mean_std(self.vgg(style))

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        f = self.vgg(content)
        return self.decoder(adain(f, mean_std(f), self.style_code(style), alpha))


def stylise(model: AdaIN, content: torch.Tensor, code: Stats, *, alpha: float, tile: int | None, budget: int,
            device: torch.device, dtype: torch.dtype) -> torch.Tensor:  # [1,3,H,W] (multiples of 8) -> raw output
    """Tiled encoder -> whole relu4_1 map -> AdaIN with its whole-image statistics -> tiled decoder."""
    H, W = content.shape[-2:]
    t_enc = tile or balanced_tile(H, W, ENCODER_BPP, budget, ENCODER_CONTEXT, ALIGN)
    f = tiled_apply(lambda t: model.vgg(channels_last(t)), content, scale=1 / ALIGN, out_channels=512, tile=t_enc,
                    context=ENCODER_CONTEXT, blend=0, align=ALIGN, max_batch=1, device=device, dtype=dtype,
                    progress="encode")  # [1,512,H/8,W/8]
    f = adain(f, mean_std(f), code, alpha)
    h, w = f.shape[-2:]
    t_dec = max(16, (tile // ALIGN) if tile else balanced_tile(h, w, DECODER_BPP, budget, DECODER_CONTEXT))
    return tiled_apply(lambda t: model.decoder(channels_last(t)), f, scale=ALIGN, out_channels=3, tile=t_dec,
                       context=DECODER_CONTEXT, blend=0, max_batch=1, device=device, dtype=dtype, progress="decode")


# ---------------------------------------------------------------- files

_NUM = re.compile(r"^(\d+)\.(weight|bias)$")


def _shape(sd: dict, key: str) -> tuple[int, ...] | None:
    v = sd.get(key)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_vgg(sd: dict) -> bool:
    """Upstream's vgg_normalised (to relu5_4) or its first 31 modules: numeric keys, 1x1 3->3 first, 512 at 29."""
    if not sd or not all(_NUM.match(k) for k in sd):
        return False
    need = {0: (3, 3, 1, 1), **{i: (cout, cin, 3, 3) for i, cin, cout in _VGG_CONVS}}
    return all(_shape(sd, f"{i}.weight") == s and _shape(sd, f"{i}.bias") == (s[0],) for i, s in need.items())


def _is_decoder(sd: dict) -> bool:
    want = {f"{i}.{p}" for i, _, _ in _DEC_CONVS for p in ("weight", "bias")}
    return set(sd) == want and all(_shape(sd, f"{i}.weight") == (cout, cin, 3, 3) for i, cin, cout in _DEC_CONVS)


def _split_packed(sd: dict) -> tuple[dict, dict] | None:
    vgg = {k[4:]: v for k, v in sd.items() if k.startswith("vgg.")}
    dec = {k[8:]: v for k, v in sd.items() if k.startswith("decoder.")}
    return (vgg, dec) if len(vgg) + len(dec) == len(sd) and _is_vgg(vgg) and _is_decoder(dec) else None


def detect(state_dict: dict, meta: dict) -> bool:
    return _is_vgg(state_dict) or _is_decoder(state_dict) or _split_packed(state_dict) is not None


def _companion(source: str, want_vgg: bool) -> tuple[str, dict] | None:
    """The other half beside `source`: names with 'vgg' (or 'decoder') first, checked by their keys."""
    folder = os.path.dirname(source)
    if not os.path.isdir(folder):
        return None
    word = "vgg" if want_vgg else "decoder"
    names = sorted(n for n in os.listdir(folder) if word in n.lower() and os.path.join(folder, n) != source)
    for n in names:
        path = os.path.join(folder, n)
        try:
            sd = read_state_dict(path)[0]
        except Exception as e:  # noqa: BLE001 (an unreadable neighbour is not our file)
            log.debug("AdaIN companion candidate %s unreadable: %s", n, e)
            continue
        if (_is_vgg if want_vgg else _is_decoder)(sd):
            return path, sd
    return None


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    packed = _split_packed(state_dict)
    source = str(meta.get("source", ""))
    if packed is not None:
        vgg_sd, dec_sd = packed
    else:
        is_vgg = _is_vgg(state_dict)
        other = _companion(source, want_vgg=not is_vgg)
        if other is None:
            have, want = (("encoder", "decoder (e.g. decoder.pth)") if is_vgg
                          else ("decoder", "encoder (vgg_normalised.pth)"))
            raise ModelLoadError(f"AdaIN {have} {os.path.basename(source)!r}: its {want} was not found beside it in "
                                 f"{os.path.dirname(source)!r}; keep both files in one folder")
        vgg_sd, dec_sd = (state_dict, other[1]) if is_vgg else (other[1], state_dict)
    vgg_sd = {k: v for k, v in vgg_sd.items() if int(k.split(".")[0]) <= 30}  # relu5_4 layers unused
    with torch.device("meta"):
        model = AdaIN()
    model.vgg.load_state_dict({k: v.float().contiguous() for k, v in vgg_sd.items()}, strict=True, assign=True)
    model.decoder.load_state_dict({k: v.float().contiguous() for k, v in dec_sd.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    return ModelDescriptor(
        family="style", architecture="AdaIN", model=model, purpose="Arbitrary style transfer",
        supports_half=True, supports_bfloat16=False,  # bf16: 8-bit mantissa, visible steps
        size_requirements=SizeRequirements(minimum=ALIGN, multiple_of=ALIGN), tiling="internal",
        receptive_field=ENCODER_CONTEXT, bytes_per_pixel=ENCODER_BPP,
        config={"arbitrary": True, "strength": "feature", "align": ALIGN},
    )
