"""MicroAST (Wang et al., "MicroAST: Towards Super-Fast Ultra-Resolution Arbitrary Style Transfer", AAAI 2023).

0.47 M parameters, arbitrary styles, no VGG at inference: a content encoder and a style encoder (same layout, own
weights), a modulator (depthwise conv + global pooling on the style features) and a decoder whose two residual layers
are filter-modulated and preceded by AdaIN. Upstream (EndyWon/MicroAST) ships four state dicts:
`content_encoder_*.pth.tar`, `style_encoder_*`, `modulator_*`, `decoder_*`. Loading any one of them finds the other
three beside it; `export_packed` writes the four as one `.safetensors` (keys prefixed `content_encoder.` etc.).

Any size: the content's features at 1/4 resolution (64 channels, 16 bytes per image pixel) are kept whole, so both
AdaIN points see whole-image statistics, and the full-resolution parts (encoder stem, decoder tail) run in tiles with
their receptive field as context (`stylise`).
"""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import InputError, ModelLoadError
from ..loading import read_state_dict
from ..tiling import tiled_apply
from .ops import ConvLayer, Stats, adain, balanced_tile, channels_last, mean_std

log = logging.getLogger(__name__)

PARTS = ("content_encoder", "style_encoder", "modulator", "decoder")
ALIGN = 4  # two stride-2 convolutions
ENCODER_CONTEXT = 24  # receptive radius 23 input pixels (9x9, 3x3/2, 3x3/2 at 1/2, two residual layers at 1/4)
HEAD_CONTEXT = 4  # dec1 at 1/4: two 3x3 convolutions
TAIL_CONTEXT = 6  # dec2 + dec3 from 1/4: 2 + bilinear 1 + 0.5 + bilinear 0.5 + 0.25 + 9x9 at full res 1 = 5.25
# Activation bytes per pixel at fp32, measured on the CPU (peak resident set growth of one call), rounded up.
ENCODER_BPP = 200.0  # per image pixel (192 measured)
TAIL_BPP = 7700.0  # per 1/4-resolution pixel, i.e. per 16 image pixels (7615 measured)


# ---------------------------------------------------------------- network


class ResidualLayer(nn.Module):
    """x + conv2(relu(conv1(x))); filter-modulated in the decoder: h2 = w*h1 + b*x, out = x + (w*h4 + b*h3)."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3)
        self.conv2 = ConvLayer(channels, channels, 3)

    def forward(self, x: torch.Tensor, w: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        if w is None:
            return x + self.conv2(F.relu(self.conv1(x), inplace=True))
        h3 = F.relu(torch.addcmul(b * x, w, self.conv1(x)), inplace=True)
        return x + (w * self.conv2(h3) + b * h3)


class Encoder(nn.Module):
    """enc1: 9x9 3->16, 3x3/2 16->32 (g16), 1x1, 3x3/2 32->64 (g32), 1x1, residual; enc2: residual. -> [x1, x2]."""

    def __init__(self):
        super().__init__()
        relu = nn.ReLU(inplace=True)  # inference only: nothing reads a conv output after its ReLU
        self.enc1 = nn.Sequential(
            ConvLayer(3, 16, 9), relu, ConvLayer(16, 32, 3, 2, groups=16), relu, ConvLayer(32, 32, 1), relu,
            ConvLayer(32, 64, 3, 2, groups=32), relu, ConvLayer(64, 64, 1), relu, ResidualLayer(64),
        )
        self.enc2 = nn.Sequential(ResidualLayer(64))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # [B,3,H,W] -> 2x [B,64,H/4,W/4]
        x1 = self.enc1(x)
        return [x1, self.enc2(x1)]


class Modulator(nn.Module):
    """weight1/bias1 read style x1, weight2/bias2 style x2: a depthwise 3x3 conv then global average pooling."""

    def __init__(self, channels: int = 64):
        super().__init__()
        for name in ("weight1", "bias1", "weight2", "bias2"):
            self.add_module(name, nn.Sequential(ConvLayer(channels, channels, 3, groups=channels),
                                                nn.AdaptiveAvgPool2d(1)))

    def forward(self, s: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [self.weight1(s[0]), self.weight2(s[1])], [self.bias1(s[0]), self.bias2(s[1])]


class Decoder(nn.Module):
    """dec1, dec2: modulated residual layers; dec3: up x2 (bilinear), 3x3 64->32 (g32), 1x1, up x2, 3x3 32->16 (g16),
    1x1, 9x9 16->3. No output activation."""

    def __init__(self):
        super().__init__()
        self.dec1 = ResidualLayer(64)
        self.dec2 = ResidualLayer(64)
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        relu = nn.ReLU(inplace=True)
        self.dec3 = nn.Sequential(
            up, ConvLayer(64, 32, 3, groups=32), relu, ConvLayer(32, 32, 1), relu,
            up, ConvLayer(32, 16, 3, groups=16), relu, ConvLayer(16, 16, 1), relu, ConvLayer(16, 3, 9),
        )


class StyleCode:
    """What the decoder needs from a style image: AdaIN statistics of its x1/x2 and the modulation [1,64,1,1]."""

    def __init__(self, s1: Stats, s2: Stats, w: list[torch.Tensor], b: list[torch.Tensor]):
        self.s1, self.s2, self.w, self.b = s1, s2, w, b


class MicroAST(nn.Module):
    """The four networks. `forward(content, style, alpha)` is upstream's TestNet (untiled, raw output)."""

    def __init__(self):
        super().__init__()
        self.content_encoder = Encoder()
        self.style_encoder = Encoder()
        self.modulator = Modulator()
        self.decoder = Decoder()

    def style_code(self, style: torch.Tensor) -> StyleCode:  # style [B,3,h,w]
        s = self.style_encoder(style)
        w, b = self.modulator(s)
        return StyleCode(mean_std(s[0]), mean_std(s[1]), w, b)

    def head(self, c2: torch.Tensor, code: StyleCode, c2_stats: Stats, alpha: float = 1.0) -> torch.Tensor:
        """AdaIN at x2 (with given content statistics) and dec1 (modulated by x2's filters)."""
        f = adain(c2, c2_stats, code.s2, alpha)
        return self.decoder.dec1(f, code.w[1].to(f), code.b[1].to(f))

    def tail(self, f1: torch.Tensor, code: StyleCode, f1_stats: Stats, alpha: float = 1.0) -> torch.Tensor:
        """AdaIN at x1 (with given statistics of dec1's output), dec2 (x1's filters), dec3 to image resolution."""
        f = adain(f1, f1_stats, code.s1, alpha)
        f = self.decoder.dec2(f, code.w[0].to(f), code.b[0].to(f))
        return self.decoder.dec3(f)

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        code = self.style_code(style)
        c2 = self.content_encoder(content)[1]
        f1 = self.head(c2, code, mean_std(c2), alpha)
        return self.tail(f1, code, mean_std(f1), alpha)


# ---------------------------------------------------------------- any size


def stylise(
    model: MicroAST,
    content: torch.Tensor,  # [1,3,H,W] in [0,1], H and W multiples of 4
    code: StyleCode,
    *,
    tile: int | None,
    budget: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:  # [1,3,H,W] float32 on the CPU, raw (not clamped)
    """Encoder stem in tiles -> whole 1/4 map -> whole-map statistics -> dec1 in tiles -> statistics -> tail in tiles.
    Equals `model(content, style)` up to float rounding at any tile size."""
    H, W = content.shape[-2:]
    enc = model.content_encoder
    t_enc = tile or balanced_tile(H, W, ENCODER_BPP, budget, ENCODER_CONTEXT, ALIGN)
    c2 = tiled_apply(lambda t: enc(channels_last(t))[1], content, scale=1 / ALIGN, out_channels=64, tile=t_enc,
                     context=ENCODER_CONTEXT, blend=0, align=ALIGN, max_batch=1, device=device, dtype=dtype,
                     progress="encode")  # [1,64,H/4,W/4] float32 CPU
    h, w = c2.shape[-2:]
    t_low = max(16, (tile // ALIGN) if tile else balanced_tile(h, w, TAIL_BPP, budget, TAIL_CONTEXT))
    st = mean_std(c2)
    f1 = tiled_apply(lambda t: model.head(channels_last(t), code, st), c2, tile=t_low, context=HEAD_CONTEXT, blend=0,
                     max_batch=1, device=device, dtype=dtype, progress="decode")  # [1,64,h,w]
    del c2
    st = mean_std(f1)
    return tiled_apply(lambda t: model.tail(channels_last(t), code, st), f1, scale=ALIGN, out_channels=3, tile=t_low,
                       context=TAIL_CONTEXT, blend=0, max_batch=1, device=device, dtype=dtype, progress="decode")


# ---------------------------------------------------------------- files


def _part_keys() -> dict[str, set[str]]:
    with torch.device("meta"):
        return {"encoder": set(Encoder().state_dict()), "modulator": set(Modulator().state_dict()),
                "decoder": set(Decoder().state_dict())}


def _which(sd: dict) -> str | None:
    """"packed", "encoder", "modulator", "decoder" or None."""
    keys = set(sd)
    known = _part_keys()
    if all(any(k.startswith(p + ".") for k in keys) for p in PARTS):
        split = {p: {k[len(p) + 1:] for k in keys if k.startswith(p + ".")} for p in PARTS}
        ok = (split["content_encoder"] == known["encoder"] == split["style_encoder"]
              and split["modulator"] == known["modulator"] and split["decoder"] == known["decoder"])
        return "packed" if ok and sum(map(len, split.values())) == len(keys) else None
    return next((kind for kind, ks in known.items() if keys == ks), None)


def detect(state_dict: dict, meta: dict) -> bool:
    kind = _which(state_dict)
    if kind is None:
        return False
    if kind == "encoder":  # MicroAST's and nothing else's: its first conv is 9x9 3->16
        return tuple(state_dict["enc1.0.conv_layer.weight"].shape) == (16, 3, 9, 9)
    return True


def _companions(source: str, kind: str) -> dict[str, str]:
    """part -> file for the other three parts beside `source` (upstream names: <part>_iter_N.pth.tar)."""
    folder, base = os.path.split(source)
    low = base.lower()
    mine = next((p for p in PARTS if low.startswith(p)), None)
    if mine is None and kind == "encoder":
        mine = "style_encoder" if "style" in low else "content_encoder" if "content" in low else None
    if mine is None:
        mine = kind if kind in PARTS else None
    suffix = base[len(mine):] if mine and low.startswith(mine) else None
    found: dict[str, str] = {}
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for part in PARTS:
        if part == mine:
            continue
        exact = part + suffix if suffix is not None else None
        if exact and exact in names:
            found[part] = os.path.join(folder, exact)
            continue
        cands = [n for n in names if n.lower().startswith(part) and not n.endswith((".partial", ".tmp"))]
        if len(cands) == 1:
            found[part] = os.path.join(folder, cands[0])
    return {mine or "?": source, **found}


def load_parts(state_dict: dict, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The four state dicts: from a packed file, or the given part plus its companions read from its folder."""
    kind = _which(state_dict)
    if kind == "packed":
        return {p: {k[len(p) + 1:]: v for k, v in state_dict.items() if k.startswith(p + ".")} for p in PARTS}
    source = str(meta.get("source", ""))
    files = _companions(source, kind or "")
    missing = [p for p in PARTS if p not in files]
    if "?" in files or missing:
        raise ModelLoadError(
            f"MicroAST part {os.path.basename(source)!r} ({kind}): its companion files "
            f"{', '.join(p + '_*' for p in (missing or PARTS))} were not found beside it in "
            f"{os.path.dirname(source)!r}. "
            "Keep the four upstream files (content_encoder_, style_encoder_, modulator_, decoder_) in one folder, "
            "or load a packed .safetensors (models.style.microast.export_packed)"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for part, path in files.items():
        sd = state_dict if path == source else read_state_dict(path)[0]
        want = "encoder" if part.endswith("encoder") else part
        if _which(sd) != want:
            raise ModelLoadError(f"MicroAST: {os.path.basename(path)!r} should hold the {part}, but its keys do "
                                 "not match")
        parts[part] = sd
    return parts


def build(parts: dict[str, dict[str, torch.Tensor]]) -> MicroAST:
    with torch.device("meta"):
        model = MicroAST()
    for part in PARTS:
        getattr(model, part).load_state_dict({k: v.float().contiguous() for k, v in parts[part].items()},
                                             strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    parts = load_parts(state_dict, meta)
    model = build(parts).to(memory_format=torch.channels_last)
    return ModelDescriptor(
        family="style", architecture="MicroAST", model=model, purpose="Arbitrary style transfer",
        supports_half=True, supports_bfloat16=False,  # bf16: 8-bit mantissa, visible steps
        size_requirements=SizeRequirements(minimum=ALIGN, multiple_of=ALIGN), tiling="internal",
        receptive_field=ENCODER_CONTEXT, bytes_per_pixel=ENCODER_BPP,
        config={"arbitrary": True, "strength": "pixel", "align": ALIGN},
    )


def export_packed(source: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """Read one MicroAST part (its companions beside it) or a packed file and write the four as one .safetensors
    (`<part>.<key>`); written to a temporary name, then renamed. Never overwrites. Returns the path written."""
    from safetensors.torch import save_file

    out_path = os.fspath(out_path)
    if not out_path.endswith(".safetensors"):
        raise InputError(f"out_path: expected a name ending in .safetensors, got {os.path.basename(out_path)!r}")
    if os.path.exists(out_path):
        raise InputError(f"out_path: {out_path!r} already exists; refusing to overwrite it")
    sd, meta = read_state_dict(source)
    if _which(sd) is None:
        raise InputError(f"source: {os.path.basename(os.fspath(source))!r} is not a MicroAST file")
    parts = load_parts(sd, {**meta, "source": os.path.realpath(os.fspath(source))})
    tensors = {f"{p}.{k}": v.detach().float().contiguous().clone() for p in PARTS for k, v in parts[p].items()}
    md = {"format": "pt", "architecture": "MicroAST", "converted_by": "atelier",
          "sources": json.dumps([os.path.basename(os.fspath(source))])}
    tmp = f"{out_path}.partial-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=md)
        if os.path.exists(out_path):
            raise InputError(f"out_path: {out_path!r} already exists; refusing to overwrite it")
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path

