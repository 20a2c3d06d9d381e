"""DCGAN-style generators: a stack of ConvTranspose2d + BatchNorm2d + ReLU from a 1x1 latent, Tanh at the end.

Radford, Metz & Chintala 2016, "Unsupervised Representation Learning with Deep Convolutional Generative Adversarial
Networks" (the layout of the PyTorch DCGAN tutorial). Everything is read from the state dict:

- the layers: one `nn.Sequential` under any single prefix (`main.0.weight`, `gen.3.weight`, or nested blocks such as
  `net.1.0.weight`); 4-D weights are transposed convolutions in their `[in, out, k, k]` layout, each followed by a
  BatchNorm2d except the last; the first kernel gives the starting size (4 -> 4x4), every later layer doubles it;
- z_dim/c_dim: the first layer's input channels are `z_dim + label channels`. A label embedding (`label_emb.weight`
  `[num_classes, embed_dim]`) gives both numbers. A concatenated one-hot label cannot be told from noise by shape:
  meta `config` (`{"z_dim": 100, "c_dim": 8}` in safetensors metadata) decides; without it, a first layer wider than a
  usual z size is split as usual-z + classes (108 -> 100 + 8), logged and recorded in `config["c_dim_source"]`.

The module also holds `LatentGenerator`, the latent-generator contract shared with the MLP GAN and matching the
StyleGAN one in `latent.py`: attributes z_dim, c_dim, w_dim=None, num_ws=0, img_resolution, img_channels,
output_range, and `forward(z, c=None, truncation_psi=1, truncation_cutoff=None, noise_mode="const", generator=None,
unit=False) -> [B,C,H,W]`. Without a mapping network, truncation scales z toward its mean (0): z * psi.

At load the eval-mode BatchNorms are folded into the convolutions before them and the weights are kept channels-last
(fewer passes over memory; oneDNN and tensor cores prefer NHWC); `unit=True` maps the tanh head straight to [0,1].
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..descriptor import ModelDescriptor
from ..errors import InputError
from ..manager import placement

log = logging.getLogger(__name__)

# Latent sizes seen in published z-only generators; used only to split an ambiguous first layer.
_USUAL_Z = (10, 16, 20, 32, 50, 64, 100, 120, 128, 200, 256, 512)
_MAX_GUESSED_CLASSES = 1000
_BN_KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_NUM = re.compile(r"^\d+$")
NOISE_MODES = ("const", "random", "none")  # the StyleGAN contract's values (models/gan/latent.py)
HEADS = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}  # output activation -> output_range


# ----------------------------------------------------------------------------------------------------------------
# The latent-generator contract (shared with models/gan/mlp.py)


class LatentGenerator(nn.Module):
    """Base of z -> image generators without a mapping network. Subclasses implement `synthesize(z, c)`."""

    w_dim = None  # no intermediate latent space
    num_ws = 0

    def __init__(
        self,
        z_dim: int,  # latent size
        c_dim: int,  # number of classes (0 = unconditional)
        img_resolution: int,  # output side in pixels
        img_channels: int,  # output channels
        output_activation: str = "tanh",  # the head: "tanh" -> [-1,1], "sigmoid" -> [0,1]
    ) -> None:
        super().__init__()
        if output_activation not in HEADS:
            raise ValueError(f"output_activation: expected one of {sorted(HEADS)}, got {output_activation!r}")
        self.z_dim = int(z_dim)
        self.c_dim = int(c_dim)
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.output_activation = output_activation
        self.output_range = HEADS[output_activation]

    def head(self, x: torch.Tensor, unit: bool) -> torch.Tensor:
        """The output activation on the last layer's fresh result, in place (relu_/tanh_/sigmoid_ keep autograd:
        their backward reads the output). unit=True gives [0,1] directly: (tanh x + 1) / 2 = sigmoid(2x)."""
        if self.output_activation == "sigmoid":
            return x.sigmoid_()
        return x.mul_(2).sigmoid_() if unit else x.tanh_()

    def check_inputs(self, z: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate z [B,z_dim] (or [B,z_dim,1,1]) and c [B,c_dim]; cast both to the weights' device and dtype."""
        if not isinstance(z, torch.Tensor):
            raise InputError(f"z: expected a tensor [B,{self.z_dim}], got {type(z).__name__}")
        if z.dim() == 4 and z.shape[2:] == (1, 1):
            z = z.flatten(1)
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise InputError(f"z: expected [B,{self.z_dim}], got {list(z.shape)}")
        dev, dtype = placement(self)
        z = z.to(device=dev, dtype=dtype)
        if self.c_dim == 0:
            if c is not None and c.numel() > 0:
                raise InputError(f"c: this generator is unconditional (c_dim=0), got a label tensor {list(c.shape)}")
            return z, None
        if c is None:
            raise InputError(f"c: this generator is class-conditional; expected one-hot [B,{self.c_dim}], got None")
        if c.dim() != 2 or c.shape[1] != self.c_dim or c.shape[0] not in (1, z.shape[0]):
            raise InputError(f"c: expected one-hot [{z.shape[0]},{self.c_dim}], got {list(c.shape)}")
        c = c.to(device=dev, dtype=dtype).expand(z.shape[0], -1)
        return z, c

    def forward(
        self,
        z: torch.Tensor,  # [B,z_dim]
        c: torch.Tensor | None = None,  # [B,c_dim] one-hot, or None when c_dim == 0
        truncation_psi: float = 1.0,  # scales z toward the mean latent (0) for z-only models
        truncation_cutoff: int | None = None,  # no per-layer latents here: ignored
        noise_mode: str = "const",  # no noise inputs here: accepted for the shared contract, no effect
        generator: torch.Generator | None = None,  # random noise source in StyleGAN's contract: unused here
        unit: bool = False,  # images in [0,1] instead of output_range, mapped by the head (cheaper than after it)
    ) -> torch.Tensor:  # [B,img_channels,img_resolution,img_resolution] in output_range (unit: in [0,1])
        if noise_mode not in NOISE_MODES:
            raise InputError(f"noise_mode: expected one of {NOISE_MODES}, got {noise_mode!r}")
        z, c = self.check_inputs(z, c)
        if truncation_psi != 1:
            z = z * truncation_psi
        return self.synthesize(z, c, unit)

    def synthesize(self, z: torch.Tensor, c: torch.Tensor | None, unit: bool = False) -> torch.Tensor:
        raise NotImplementedError


def attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at dotted `path` under `root`, creating plain containers on the way."""
    parts = path.split(".")
    node = root
    for p in parts[:-1]:
        child = node._modules.get(p)
        if child is None:
            child = nn.Module()
            node.add_module(p, child)
        node = child
    node.add_module(parts[-1], module)


def config_from_meta(meta: dict) -> dict[str, Any]:
    """The `config` dict a file may carry in its metadata (JSON in safetensors), or {}."""
    cfg = meta.get("config") if isinstance(meta, dict) else None
    return cfg if isinstance(cfg, dict) else {}


def split_latent(width: int, cfg: dict[str, Any], what: str) -> tuple[int, int, str]:
    """Split a first layer's input width into (z_dim, c_dim, how it was decided)."""
    if "z_dim" in cfg or "c_dim" in cfg:
        c_dim = int(cfg.get("c_dim", width - int(cfg.get("z_dim", width))))
        z_dim = int(cfg.get("z_dim", width - c_dim))
        if z_dim + c_dim != width or z_dim <= 0 or c_dim < 0:
            raise ValueError(f"{what}: metadata z_dim={z_dim} + c_dim={c_dim} does not match the input width {width}")
        return z_dim, c_dim, "metadata"
    if width in _USUAL_Z:
        return width, 0, "shape"
    below = [z for z in _USUAL_Z if z < width and width - z <= _MAX_GUESSED_CLASSES]
    if below:
        z_dim = max(below)
        log.warning(
            "%s: first layer takes %d channels; read as z_dim=%d + %d one-hot classes (a guess: put "
            '{"z_dim": .., "c_dim": ..} in the file\'s config metadata to override)', what, width, z_dim, width - z_dim
        )
        return z_dim, width - z_dim, "guessed"
    return width, 0, "shape"


# ----------------------------------------------------------------------------------------------------------------
# DCGAN


@dataclass(frozen=True)
class _Stage:
    conv: str  # module path of the ConvTranspose2d
    bn: str | None  # module path of its BatchNorm2d, None for the last stage
    in_ch: int
    out_ch: int
    kernel: int
    bias: bool


@dataclass(frozen=True)
class _Plan:
    stages: tuple[_Stage, ...]
    embed: str | None  # module path of the label embedding
    embed_shape: tuple[int, int] | None  # [num_classes, embed_dim]


def _sort_key(path: str) -> tuple[int, ...]:
    return tuple(int(p) for p in path.split(".")[1:] if _NUM.match(p))


def _modules(state_dict: dict) -> dict[str, dict[str, torch.Tensor]] | None:
    """Group keys by module path: {path: {param: tensor}}; None unless every key is `<module>.<param>`."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor) or "." not in k:
            return None
        path, param = k.rsplit(".", 1)
        mods.setdefault(path, {})[param] = v
    return mods


def _plan(state_dict: dict) -> _Plan | None:
    """Read the layer plan from keys and shapes; None when the state dict is not a DCGAN generator."""
    mods = _modules(state_dict)
    if not mods:
        return None
    embed = [p for p, ps in mods.items() if set(ps) == {"weight"} and ps["weight"].dim() == 2 and
             ("emb" in p.lower() or "label" in p.lower())]
    if len(embed) > 1:
        return None
    layers = {p: ps for p, ps in mods.items() if p not in embed}
    prefixes = {p.split(".")[0] for p in layers}
    if len(prefixes) != 1:
        return None
    for p in layers:
        parts = p.split(".")
        if len(parts) < 2 or _NUM.match(parts[0]) or not all(_NUM.match(x) for x in parts[1:]):
            return None
    stages: list[_Stage] = []
    pending: tuple[str, torch.Tensor, bool] | None = None
    for path in sorted(layers, key=_sort_key):
        ps = layers[path]
        w = ps.get("weight")
        if w is not None and w.dim() == 4 and set(ps) <= {"weight", "bias"}:
            if "bias" in ps and tuple(ps["bias"].shape) != (w.shape[1],):  # [in,out,k,k]: a bias per output
                return None
            if pending is not None:  # a convolution not followed by a norm must be the last one
                return None
            pending = (path, w, "bias" in ps)
        elif w is not None and w.dim() == 1 and set(ps) <= _BN_KEYS and {"running_mean", "running_var"} <= set(ps):
            if pending is None or w.shape[0] != pending[1].shape[1]:
                return None
            stages.append(_stage(pending, path))
            pending = None
        else:
            return None
    if pending is None or len(stages) < 1:
        return None
    stages.append(_stage(pending, None))
    if not _chain_ok(stages):
        return None
    emb_shape = tuple(mods[embed[0]]["weight"].shape) if embed else None
    if emb_shape is not None and not 0 < emb_shape[1] < stages[0].in_ch:
        return None
    return _Plan(tuple(stages), embed[0] if embed else None, emb_shape)  # type: ignore[arg-type]


def _stage(conv: tuple[str, torch.Tensor, bool], bn: str | None) -> _Stage:
    path, w, bias = conv
    return _Stage(path, bn, int(w.shape[0]), int(w.shape[1]), int(w.shape[2]), bias)


def _chain_ok(stages: list[_Stage]) -> bool:
    first = stages[0]
    if not 1 <= first.kernel <= 8 or first.in_ch < 2:
        return False
    for a, b in zip(stages, stages[1:]):
        if a.out_ch != b.in_ch or b.kernel != 4:
            return False
    return 1 <= stages[-1].out_ch <= 4


class DCGANGenerator(LatentGenerator):
    """ConvTranspose2d stack: 1x1 latent -> k x k -> doubling per stage -> Tanh. Module paths mirror the file."""

    def __init__(
        self,
        plan: _Plan,  # layer plan read from the state dict
        z_dim: int,  # noise channels
        c_dim: int,  # classes (0 = unconditional)
        label_first: bool = False,  # label channels before the noise in the concatenation
    ) -> None:
        first = plan.stages[0]
        resolution = first.kernel * 2 ** (len(plan.stages) - 1)
        super().__init__(z_dim, c_dim, resolution, plan.stages[-1].out_ch)
        self.label_first = label_first
        self._stage_paths = [(s.conv, s.bn) for s in plan.stages]
        self._embed_path = plan.embed
        for i, s in enumerate(plan.stages):
            stride, pad = (1, 0) if i == 0 else (2, 1)
            attach(self, s.conv, nn.ConvTranspose2d(s.in_ch, s.out_ch, s.kernel, stride, pad, bias=s.bias))
            if s.bn is not None:
                attach(self, s.bn, nn.BatchNorm2d(s.out_ch))
        if plan.embed is not None:
            assert plan.embed_shape is not None
            attach(self, plan.embed, nn.Embedding(*plan.embed_shape))
        self.folded = False

    def fold_batchnorm(self) -> None:
        """Fold each eval-mode BatchNorm into the transposed convolution before it (exact: an affine map per output
        channel), leaving one convolution per stage; the BatchNorm modules become Identity. Call after loading."""
        for conv_path, bn_path in self._stage_paths:
            if bn_path is None:
                continue
            conv, bn = self.get_submodule(conv_path), self.get_submodule(bn_path)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                        bn.bias, transpose=True)
            conv.weight, conv.bias = nn.Parameter(w.detach(), False), nn.Parameter(b.detach(), False)
            attach(self, bn_path, nn.Identity())
        self.folded = True

    def synthesize(self, z: torch.Tensor, c: torch.Tensor | None, unit: bool = False) -> torch.Tensor:
        x = z  # [B,z_dim]
        if c is not None:
            label = c  # [B,c_dim] one-hot (soft labels interpolate)
            if self._embed_path is not None:
                label = c @ self.get_submodule(self._embed_path).weight  # [B,embed_dim], == Embedding(argmax c)
            x = torch.cat([label, x] if self.label_first else [x, label], dim=1)
        x = x[:, :, None, None]  # [B,C0,1,1]
        last = len(self._stage_paths) - 1
        for i, (conv, bn) in enumerate(self._stage_paths):
            x = self.get_submodule(conv)(x)  # [B,C,H,W], H doubles after the first stage
            if bn is not None and not self.folded:
                x = self.get_submodule(bn)(x)
            x = self.head(x, unit) if i == last else x.relu_()  # in place on fresh tensors
        return x


def detect(state_dict: dict, meta: dict) -> bool:
    """A DCGAN generator: ConvTranspose2d/BatchNorm2d pairs in one Sequential, channels chaining in [in,out] layout."""
    return _plan(state_dict) is not None


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    plan = _plan(state_dict)
    if plan is None:
        raise ValueError("not a DCGAN generator state dict")
    cfg = config_from_meta(meta)
    width = plan.stages[0].in_ch
    if plan.embed_shape is not None:
        num_classes, embed_dim = plan.embed_shape
        z_dim, c_dim, how, conditioning = width - embed_dim, num_classes, "embedding", "embedding"
    else:
        z_dim, c_dim, how = split_latent(width, cfg, "DCGAN")
        conditioning = "onehot" if c_dim else "none"
    model = DCGANGenerator(plan, z_dim, c_dim, label_first=bool(cfg.get("label_first", False)))
    model.load_state_dict(state_dict, strict=True)
    model.eval().requires_grad_(False)
    model.fold_batchnorm()
    # NHWC transposed convolutions run faster on CPU (oneDNN) and on tensor cores; .to(device) keeps the layout
    model.to(memory_format=torch.channels_last)
    res = model.img_resolution
    channels = [s.in_ch for s in plan.stages] + [plan.stages[-1].out_ch]
    sides = [plan.stages[0].kernel * 2**i for i in range(len(plan.stages))]
    act = sum(2 * s.out_ch * side * side for s, side in zip(plan.stages, sides)) * 4.0 / (res * res)
    return ModelDescriptor(
        family="gan",
        architecture="DCGAN",
        model=model,
        purpose="Generator",
        scale=1,
        in_channels=0,
        out_channels=model.img_channels,
        supports_half=True,
        supports_bfloat16=True,
        tiling="none",
        bytes_per_pixel=act,  # per output pixel of one sample
        config={
            "z_dim": z_dim,
            "c_dim": c_dim,
            "c_dim_source": how,
            "conditioning": conditioning,
            "label_first": model.label_first,
            "img_resolution": res,
            "img_channels": model.img_channels,
            "channels": channels,
            "ngf": plan.stages[-2].out_ch,
            "output_range": list(model.output_range),
            "batchnorm_folded": True,
        },
    )
