"""rosinality/stylegan2-pytorch generator checkpoints -> NVIDIA StyleGAN2 key names.

rosinality's `model.py` Generator is StyleGAN2 config E/F with the skip architecture, no conv clamp, an unconditional
8-layer (n_mlp) mapping with lr multiplier 0.01 and z_dim = w_dim = style_dim. Its `.pt` files hold
`{"g_ema": state_dict, "latent_avg": [style_dim], ...}`; `loading.canonicalise` unwraps `g_ema` and puts
`latent_avg` into meta. The layers map one to one:

    style.{i}.weight|bias                 -> mapping.fc{i-1}.weight|bias          (i = 1..n_mlp; style.0 is PixelNorm)
    input.input [1,C,4,4]                 -> synthesis.b4.const [C,4,4]
    conv1.*                               -> synthesis.b4.conv1.*
    convs.{2j}.*, convs.{2j+1}.*          -> synthesis.b{2^(j+3)}.conv0.*, .conv1.*
    to_rgb1.*, to_rgbs.{j}.*              -> synthesis.b4.torgb.*, synthesis.b{2^(j+3)}.torgb.*
      .conv.weight [1,O,I,k,k]            ->   .weight [O,I,k,k]      (same orientation: rosinality's converter and
                                                                     NVIDIA's legacy.py both flip TF's Conv0_up)
      .conv.modulation.weight|bias        ->   .affine.weight|bias
      .noise.weight [1]                   ->   .noise_strength []
      .activate.bias [O] / .bias [1,3,1,1]->   .bias [O]
    noises.noise_{n} [1,1,r,r]            -> noise_const [r,r] of conv layer n in order (b4.conv1, b8.conv0, b8.conv1 ...)
    convs.*.conv.blur.kernel, to_rgbs.*.upsample.kernel (filter x 4) -> resample_filter (normalised to sum 1)
    latent_avg (meta)                     -> mapping.w_avg
"""
from __future__ import annotations

import re
from typing import Any

import torch

from . import ops

_CONV = re.compile(r"(conv1|convs\.(\d+))\.(conv\.weight|conv\.modulation\.weight|conv\.modulation\.bias|noise\.weight|"
                   r"activate\.bias|conv\.blur\.kernel)$")
_RGB = re.compile(r"(to_rgb1|to_rgbs\.(\d+))\.(conv\.weight|conv\.modulation\.weight|conv\.modulation\.bias|bias|"
                  r"upsample\.kernel)$")
_SUFFIX = {"conv.weight": "weight", "conv.modulation.weight": "affine.weight", "conv.modulation.bias": "affine.bias",
           "noise.weight": "noise_strength", "activate.bias": "bias", "bias": "bias"}


def detect(sd: dict) -> bool:
    """rosinality's generator keys: style.1.weight, input.input, conv1.conv.weight, to_rgb1.conv.weight."""
    return all(k in sd for k in ("style.1.weight", "input.input", "conv1.conv.weight", "to_rgb1.conv.weight"))


def fixed_kwargs() -> dict[str, Any]:
    """What rosinality's Generator always is and shapes cannot show."""
    return {"conv_clamp": None, "architecture": "skip"}


def _conv_target(name: str) -> str:
    if name == "conv1":
        return "synthesis.b4.conv1"
    idx = int(name.split(".")[1])
    return f"synthesis.b{2 ** (idx // 2 + 3)}.conv{idx % 2}"


def _rgb_target(name: str) -> str:
    return "synthesis.b4.torgb" if name == "to_rgb1" else f"synthesis.b{2 ** (int(name.split('.')[1]) + 3)}.torgb"


def _filter(kernel: torch.Tensor | None) -> torch.Tensor:
    return ops.setup_filter([1, 3, 3, 1]) if kernel is None else kernel.float() / kernel.float().sum()


def to_nvidia(sd: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rename a rosinality g_ema state dict to NVIDIA keys; `latent_avg` from meta becomes mapping.w_avg."""
    out: dict[str, torch.Tensor] = {}
    blur = None
    conv_layers: list[str] = []
    unknown = []
    for k, v in sd.items():
        if m := re.fullmatch(r"style\.(\d+)\.(weight|bias)", k):
            out[f"mapping.fc{int(m.group(1)) - 1}.{m.group(2)}"] = v
        elif k == "input.input":
            out["synthesis.b4.const"] = v.reshape(v.shape[-3:])
        elif m := _CONV.match(k):
            target, suffix = _conv_target(m.group(1)), m.group(3)
            if suffix == "conv.blur.kernel":
                blur = v
                continue
            if suffix == "conv.weight":
                v = v.reshape(v.shape[-4:])
            elif suffix == "noise.weight":
                v = v.reshape(())
            out[f"{target}.{_SUFFIX[suffix]}"] = v
            conv_layers.append(target)
        elif m := _RGB.match(k):
            target, suffix = _rgb_target(m.group(1)), m.group(3)
            if suffix == "upsample.kernel":
                blur = v if blur is None else blur
                continue
            if suffix == "conv.weight":
                v = v.reshape(v.shape[-4:])
            elif suffix == "bias":
                v = v.reshape(-1)
            out[f"{target}.{_SUFFIX[suffix]}"] = v
        elif not re.fullmatch(r"noises\.noise_\d+", k):
            unknown.append(k)
    if unknown:
        raise KeyError(f"rosinality StyleGAN2: unexpected keys {unknown[:8]}")
    f = _filter(blur)
    layers = sorted(set(conv_layers), key=_layer_order)
    for n, target in enumerate(layers):
        out[f"{target}.resample_filter"] = f
        noise = sd.get(f"noises.noise_{n}")
        if noise is not None:
            out[f"{target}.noise_const"] = noise.reshape(noise.shape[-2:])
        else:  # rosinality draws fresh noise when none is stored; keep "const" deterministic
            r = int(target.split(".")[1][1:])
            out[f"{target}.noise_const"] = torch.randn([r, r], generator=torch.Generator().manual_seed(n))
    for r in {int(t.split(".")[1][1:]) for t in layers}:
        out[f"synthesis.b{r}.resample_filter"] = f
    avg = meta.get("latent_avg") if isinstance(meta, dict) else None
    if isinstance(avg, torch.Tensor):
        out["mapping.w_avg"] = avg.reshape(-1, avg.shape[-1])[0].float()  # [w_dim], [1,w_dim] or [n_latent,w_dim]
    meta = {k: v for k, v in (meta or {}).items() if k not in ("init_kwargs",)}
    return out, meta


def _layer_order(target: str) -> tuple[int, int]:
    _, block, conv = target.split(".")
    return int(block[1:]), int(conv[-1])
