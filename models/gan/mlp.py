"""Fully connected GAN generators (Goodfellow et al. 2014, "Generative Adversarial Nets"): Linear/ReLU layers, Tanh.

The layout of csinva/gan-vae-pretrained-pytorch's MNIST generator: one `nn.Sequential` of Linear layers
(`0.weight`, `2.weight`, ... optionally under a single prefix such as `main.`), ReLU between them, Tanh after the
last. Sizes come from the weight shapes; the last layer's width is `channels * side * side`, which is read as a square
greyscale image when it is a perfect square (784 -> 1x28x28) and as RGB when a third of it is (3072 -> 3x32x32);
the two never coincide. A file may carry `config` metadata: `{"z_dim": .., "c_dim": ..}` for a one-hot label
concatenated after z, `{"output_activation": "sigmoid"}` for a [0,1] output.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..descriptor import ModelDescriptor
from .contract import HEADS, LatentGenerator, attach, config_from_meta

_NUM = re.compile(r"^\d+$")
_MIN_SIDE = 8  # smaller "images" are a discriminator's or classifier's logits, not a generator's output


def _layers(state_dict: dict) -> list[tuple[str, torch.Tensor, bool]] | None:
    """[(module path, weight [out,in], has bias)] in order; None unless the dict is a plain Linear Sequential."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor) or "." not in k:
            return None
        path, param = k.rsplit(".", 1)
        if param not in ("weight", "bias"):
            return None
        mods.setdefault(path, {})[param] = v
    if len(mods) < 2:
        return None
    prefixes = set()
    for path in mods:
        parts = path.split(".")
        if not _NUM.match(parts[-1]) or len(parts) > 2 or (len(parts) == 2 and _NUM.match(parts[0])):
            return None
        prefixes.add(parts[0] if len(parts) == 2 else "")
    if len(prefixes) != 1:
        return None
    out = []
    for path in sorted(mods, key=lambda p: int(p.split(".")[-1])):
        ps = mods[path]
        w, b = ps.get("weight"), ps.get("bias")
        if w is None or w.dim() != 2 or (b is not None and tuple(b.shape) != (w.shape[0],)):
            return None
        out.append((path, w, b is not None))
    for (_, a, _), (_, b, _) in zip(out, out[1:]):
        if b.shape[1] != a.shape[0]:
            return None
    return out


def _image_shape(width: int) -> tuple[int, int] | None:
    """(channels, side) for a flat output width, or None."""
    for ch in (1, 3):
        if width % ch == 0:
            side = math.isqrt(width // ch)
            if side * side * ch == width and side >= _MIN_SIDE:
                return ch, side
    return None


class MLPGenerator(LatentGenerator):
    """z [B,z_dim] (+ one-hot c) -> Linear/ReLU ... Linear -> Tanh -> [B,C,S,S]."""

    def __init__(
        self,
        layers: list[tuple[str, int, int, bool]],  # (module path, in features, out features, bias) in order
        z_dim: int,  # noise size
        c_dim: int,  # classes concatenated after z as one-hot (0 = unconditional)
        img_channels: int,  # output channels (1 or 3)
        img_resolution: int,  # output side
        output_activation: str = "tanh",  # "tanh" -> [-1,1], "sigmoid" -> [0,1]
    ) -> None:
        super().__init__(z_dim, c_dim, img_resolution, img_channels, output_activation)
        for path, fin, fout, bias in layers:
            attach(self, path, nn.Linear(fin, fout, bias=bias))
        # the layers in order, looked up once (a plain list: the modules stay registered under their file paths)
        self._linears = [self.get_submodule(p) for p, *_ in layers]

    def transpose_weights(self) -> None:
        """Store each [out,in] weight as the transpose of a contiguous [in,out] matrix: same values and shape, but
        x @ W.t() then reads memory in order (about 15 % faster at batch 1 on CPU). Call after loading."""
        for lin in self._linears:
            lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t(), lin.weight.requires_grad)

    def synthesize(self, z: torch.Tensor, c: torch.Tensor | None, unit: bool = False) -> torch.Tensor:
        x = z if c is None else torch.cat([z, c], dim=1)  # [B,z_dim+c_dim]
        *hidden, out = self._linears
        for lin in hidden:
            x = F.linear(x, lin.weight, lin.bias).relu_()  # [B,features]; fresh, so the activation works in place
        if unit and self.output_activation == "tanh" and out.bias is not None:  # sigmoid(2 (x W^T + b)) in 2 ops
            x = torch.addmm(out.bias, x, out.weight.t(), beta=2, alpha=2).sigmoid_()
        else:
            x = self.head(F.linear(x, out.weight, out.bias), unit)
        return x.view(x.shape[0], self.img_channels, self.img_resolution, self.img_resolution)  # [B,C,S,S]


def detect(state_dict: dict, meta: dict) -> bool:
    """A Linear-only Sequential whose last width is a square image and which widens from input to output."""
    layers = _layers(state_dict)
    if layers is None:
        return False
    fin, fout = layers[0][1].shape[1], layers[-1][1].shape[0]
    return fin < fout and _image_shape(int(fout)) is not None


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    layers = _layers(state_dict)
    if layers is None or not detect(state_dict, meta):
        raise ValueError("not an MLP generator state dict")
    cfg = config_from_meta(meta)
    width = int(layers[0][1].shape[1])
    c_dim = int(cfg.get("c_dim", 0))
    z_dim = int(cfg.get("z_dim", width - c_dim))
    if z_dim + c_dim != width or z_dim <= 0 or c_dim < 0:
        raise ValueError(f"metadata z_dim={z_dim} + c_dim={c_dim} does not match the input width {width}")
    activation = str(cfg.get("output_activation", "tanh"))
    if activation not in HEADS:
        raise ValueError(f"metadata output_activation={activation!r}; expected one of {sorted(HEADS)}")
    shape = _image_shape(int(layers[-1][1].shape[0]))
    assert shape is not None
    channels, side = shape
    spec = [(p, int(w.shape[1]), int(w.shape[0]), bias) for p, w, bias in layers]
    model = MLPGenerator(spec, z_dim, c_dim, channels, side, activation)
    model.load_state_dict(state_dict, strict=True)
    model.eval().requires_grad_(False)
    model.transpose_weights()
    return ModelDescriptor(
        family="gan",
        architecture="MLP GAN",
        model=model,
        purpose="Generator",
        scale=1,
        in_channels=0,
        out_channels=channels,
        supports_half=True,
        supports_bfloat16=True,
        tiling="none",
        bytes_per_pixel=4.0 * 2 * sum(f for _, _, f, _ in spec) / (side * side),  # per output pixel of one sample
        config={
            "z_dim": z_dim,
            "c_dim": c_dim,
            "conditioning": "onehot" if c_dim else "none",
            "img_resolution": side,
            "img_channels": channels,
            "layers": [width] + [f for _, _, f, _ in spec],
            "output_activation": activation,
            "output_range": list(model.output_range),
        },
    )
