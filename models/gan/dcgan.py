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
- class names: meta `config["class_names"]` (one string per class, as `train_nets.save_dcgan` writes them) is kept in
  the descriptor's config; otherwise the classes are named "0".."c_dim-1".

The generator follows the one GAN contract (`contract.py`, a `LatentGenerator`): without a mapping network,
truncation scales z toward its mean (0): z * psi.

At load the eval-mode BatchNorms are folded into the convolutions before them and the weights are kept channels-last
(fewer passes over memory; oneDNN and tensor cores prefer NHWC); `unit=True` maps the tanh head straight to [0,1].
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..descriptor import ModelDescriptor
from .contract import LatentGenerator, attach, config_from_meta, split_latent

log = logging.getLogger(__name__)

# Latent sizes seen in published z-only generators; used only to split an ambiguous first layer.
_BN_KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_NUM = re.compile(r"^\d+$")


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
            "class_names": class_names(cfg, c_dim),
        },
    )


def class_names(cfg: dict, c_dim: int) -> list[str]:
    """The metadata's class names when they are one string per class, else "0".."c_dim-1" (logged when ignored)."""
    names = cfg.get("class_names")
    if isinstance(names, list) and len(names) == c_dim and all(isinstance(n, str) for n in names):
        return list(names)
    if names is not None:
        log.warning("DCGAN: config class_names ignored (expected %d names, got %r)", c_dim, names)
    return [str(i) for i in range(c_dim)]
