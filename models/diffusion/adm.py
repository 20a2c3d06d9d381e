"""OpenAI guided-diffusion `UNetModel` ("ADM", Dhariwal & Nichol 2021), the network of RePaint's checkpoints, in
plain PyTorch with the reference's state-dict keys (`input_blocks.N.M...`, `middle_block`, `output_blocks`, `out`).

Own code written from the published description (the golden README in ../shared/golden/adm); guided-diffusion is a
test reference only. The config comes from the state dict alone (rules in `infer_config`); what the weights cannot
tell (the attention heads and their channel order) comes, in this order, from meta["config"] / meta
["create_model_kwargs"] (guided-diffusion's create_model or UNetModel names: num_heads, num_head_channels,
num_heads_upsample, use_new_attention_order), else from the table of released checkpoints (`KNOWN`, matched by
model_channels, channel_mult, num_res_blocks, in_channels), else guided-diffusion's script defaults: num_heads=4,
num_head_channels=-1, legacy attention order. Also not in the weights: image_size (None: any multiple of
2^(levels-1)), the diffusion schedule (the released table's, else linear 1e-4..0.02 over 1000 steps, epsilon),
dropout. learn_sigma shows as out_channels == 2 * in_channels.

Forward (facts.py's contract): `model(x [B,C,H,W], t [B] float timesteps, class_labels [B] long | None)`.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import InputError, ModelLoadError
from ..loading import owned_float32
from .facts import DiffusionFacts, TrainingSchedule
from .layers import SinusoidalEmbedding, attention, cpu_layout, group_norm, norm_silu, silu

log = logging.getLogger(__name__)

GROUPS, EPS = 32, 1e-5  # GroupNorm32: always 32 groups, eps 1e-5, computed in float32

# Released guided-diffusion checkpoints: (model_channels, channel_mult, num_res_blocks, in_channels) -> head settings
# and schedule (from the guided-diffusion README; RePaint's CelebA-HQ and Places2 models are 256x256 uncond ones).
KNOWN: dict[tuple, dict[str, Any]] = {
    (192, (1, 2, 3, 4), 3, 3): {"name": "64x64_diffusion", "num_head_channels": 64, "use_new_attention_order": True,
                                "schedule": "squaredcos_cap_v2", "image_size": 64},
    (256, (1, 1, 2, 3, 4), 2, 3): {"name": "128x128_diffusion", "num_heads": 4, "image_size": 128},
    (256, (1, 1, 2, 2, 4, 4), 2, 3): {"name": "256x256_diffusion", "num_head_channels": 64, "image_size": 256},
    (256, (0.5, 1, 1, 2, 2, 4, 4), 2, 3): {"name": "512x512_diffusion", "num_head_channels": 64, "image_size": 512},
    (192, (1, 1, 2, 2, 4, 4), 2, 6): {"name": "64_256_upsampler", "num_heads": 4, "image_size": 256},
    (192, (0.5, 1, 1, 2, 2, 4, 4), 2, 6): {"name": "128_512_upsampler", "num_head_channels": 64, "image_size": 512},
}
HEAD_KEYS = ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order")


# ---------------------------------------------------------------------------------------------------------------
# Layers (attribute names = guided-diffusion's state-dict keys)
# ---------------------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """in_layers (GN, SiLU, conv), emb_layers (SiLU, Linear), out_layers (GN, SiLU, dropout, conv), skip."""

    def __init__(self, cin: int, emb: int, cout: int, scale_shift: bool, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(GROUPS, cin, eps=EPS), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * cout if scale_shift else cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(GROUPS, cout, eps=EPS), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.scale_shift, self.up, self.down = scale_shift, up, down

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:  # [B,C,H,W], silu(emb) [B,E]
        h = norm_silu(x, self.in_layers[0], fp32=True)
        if self.up:
            x, h = F.interpolate(x, scale_factor=2.0, mode="nearest"), F.interpolate(h, scale_factor=2.0, mode="nearest")
        elif self.down:
            x, h = F.avg_pool2d(x, 2, 2), F.avg_pool2d(h, 2, 2)
        h = self.in_layers[2](h)
        e = self.emb_layers[1](emb_act).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = silu(torch.addcmul(shift, group_norm(h, self.out_layers[0], fp32=True), 1 + scale))
        else:
            h = norm_silu(h + e, self.out_layers[0], fp32=True)
        h = self.out_layers[3](h)
        x = self.skip_connection(x)
        return h.add_(x) if not h.requires_grad else h + x


class AttentionBlock(nn.Module):
    """x + proj_out(attention(qkv(GN(x)))) over the H*W positions; legacy or new q/k/v channel order."""

    def __init__(self, channels: int, heads: int, new_order: bool) -> None:
        super().__init__()
        if channels % heads:
            raise ModelLoadError(f"ADM attention: {heads} heads do not divide {channels} channels")
        self.norm = nn.GroupNorm(GROUPS, channels, eps=EPS)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.heads, self.new_order = heads, new_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W]
        b, c, hh, ww = x.shape
        h = group_norm(x, self.norm, fp32=True).permute(0, 2, 3, 1).reshape(b, hh * ww, c)  # [B,T,C]
        qkv = F.linear(h, self.qkv.weight[:, :, 0], self.qkv.bias)  # [B,T,3C]
        ch = c // self.heads
        # legacy: per head [q k v] blocks of ch channels; new: all q, then all k, then all v
        qkv = qkv.view(b, -1, 3, self.heads, ch) if self.new_order else qkv.view(b, -1, self.heads, 3, ch).transpose(2, 3)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B,heads,T,ch]
        a = attention(q, k, v).transpose(1, 2).reshape(b, hh * ww, c)  # [B,T,C]
        out = F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)
        return out.view(b, hh, ww, c).permute(0, 3, 1, 2) + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """guided-diffusion's TimestepEmbedSequential: ResBlocks get the embedding, other layers only x."""

    def forward(self, h: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            h = layer(h, emb_act) if isinstance(layer, ResBlock) else layer(h)
        return h


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class ADMUNet(nn.Module):
    """guided-diffusion UNetModel; `config` in its constructor names (see `infer_config` for the ones used)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg = dict(config)
        mc, mult, nrb = cfg["model_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
        attn_ds, ss, updown = set(cfg["attention_resolutions"]), cfg["use_scale_shift_norm"], cfg["resblock_updown"]
        new_order = cfg.get("use_new_attention_order", False)
        emb = 4 * mc

        def heads(c: int, upsample: bool = False) -> int:
            if cfg.get("num_head_channels", -1) not in (-1, None):
                if c % cfg["num_head_channels"]:
                    raise ModelLoadError(f"ADM: num_head_channels {cfg['num_head_channels']} does not divide {c}")
                return c // cfg["num_head_channels"]
            n = cfg.get("num_heads_upsample", -1) if upsample else -1
            return cfg.get("num_heads", 1) if n in (-1, None) else n

        self.time_proj = SinusoidalEmbedding(mc, flip_sin_to_cos=True, freq_shift=0)
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.num_classes = int(cfg.get("num_classes") or 0)
        if self.num_classes:
            self.label_emb = nn.Embedding(self.num_classes, emb)
        ch = int(mult[0] * mc)
        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(cfg["in_channels"], ch, 3, padding=1)])])
        chans, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(nrb):
                layers: list[nn.Module] = [ResBlock(ch, emb, int(m * mc), ss)]
                ch = int(m * mc)
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, heads(ch), new_order))
                self.input_blocks.append(EmbedSequential(layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(EmbedSequential([ResBlock(ch, emb, ch, ss, down=True) if updown
                                                          else Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential([ResBlock(ch, emb, ch, ss), AttentionBlock(ch, heads(ch), new_order),
                                             ResBlock(ch, emb, ch, ss)])
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(nrb + 1):
                layers = [ResBlock(ch + chans.pop(), emb, int(mc * m), ss)]
                ch = int(mc * m)
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, heads(ch, upsample=True), new_order))
                if level and i == nrb:
                    layers.append(ResBlock(ch, emb, ch, ss, up=True) if updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(layers))
        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch, eps=EPS), nn.SiLU(),
                                 nn.Conv2d(int(mult[0] * mc), cfg["out_channels"], 3, padding=1))
        self.in_channels, self.out_channels = cfg["in_channels"], cfg["out_channels"]
        self.size_multiple = 2 ** (len(mult) - 1)
        self.channels_last = False

    def use_channels_last(self, on: bool = True) -> "ADMUNet":
        """Keep 4-D weights and activations channels-last (results equal to float rounding)."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def reset_buffers(self) -> None:
        self.time_proj.reset_buffers(self.out[2].weight.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,in,H,W], t [B] (or scalar) training timesteps, class_labels [B] -> [B,out,H,W]."""
        if not torch.is_tensor(t):
            t = torch.tensor([float(t)], device=x.device)
        t = t.reshape(-1).to(x.device)
        if t.shape[0] not in (1, x.shape[0]):
            raise InputError(f"t: expected one timestep or {x.shape[0]} (one per sample), got {t.shape[0]}")
        t = t.expand(x.shape[0])
        dtype = self.out[2].weight.dtype
        emb = self.time_embed(self.time_proj(t).to(dtype))
        if self.num_classes:
            if class_labels is None:
                raise InputError("class_labels: this ADM model is class-conditional; give one label per sample")
            if class_labels.min() < 0 or class_labels.max() >= self.num_classes:
                raise InputError(f"class_labels: expected labels in [0,{self.num_classes}), got {class_labels.tolist()}")
            emb = emb + self.label_emb(class_labels.to(x.device).long())
        elif class_labels is not None:
            raise InputError("class_labels: this ADM model is unconditional; give None")
        emb_act = silu(emb)
        h = x.to(dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb_act)
            hs.append(h)
        h = self.middle_block(h, emb_act)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb_act)
        return self.out[2](norm_silu(h, self.out[0], fp32=True)).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Config from the state dict
# ---------------------------------------------------------------------------------------------------------------
_CORE = ("time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.1.qkv.weight", "out.2.weight")


def detect(state_dict: dict, meta: dict) -> bool:
    return all(k in state_dict for k in _CORE)


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def infer_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every UNetModel argument the weights determine (the golden README's rules)."""
    bad = next((k for k in sd if ".transformer_blocks." in k or k.startswith(("input_blocks", "output_blocks"))
                and ".proj_in." in k), None)
    if bad:
        raise ModelLoadError(f"ADM: {bad.split('.transformer_blocks.')[0]} is a SpatialTransformer (text "
                             f"cross-attention, a latent-diffusion UNet), which is not supported (key {bad!r})")
    mc = int(sd["time_embed.0.weight"].shape[1])
    n = len({int(m.group(1)) for k in sd if (m := re.match(r"output_blocks\.(\d+)\.", k))})
    nrb = next((j for j in range(n) for s in (1, 2)
                if f"output_blocks.{j}.{s}.conv.weight" in sd or f"output_blocks.{j}.{s}.in_layers.0.weight" in sd), n - 1)
    if n % (nrb + 1):
        raise ModelLoadError(f"ADM: {n} output blocks do not split into levels of {nrb + 1}")
    levels = n // (nrb + 1)
    first = [1 + lv * (nrb + 1) for lv in range(levels)]
    mult = [_num(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] / mc) for i in first]
    attn = [2 ** lv for lv, i in enumerate(first) if f"input_blocks.{i}.1.qkv.weight" in sd]
    c1 = sd["input_blocks.1.0.out_layers.0.weight"].shape[0]
    return {
        "in_channels": int(sd["input_blocks.0.0.weight"].shape[1]),
        "model_channels": mc,
        "out_channels": int(sd["out.2.weight"].shape[0]),
        "num_res_blocks": nrb,
        "attention_resolutions": attn,  # as downsampling factors ds (image_size / the command line's numbers)
        "channel_mult": mult,
        "num_classes": int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None,
        "use_scale_shift_norm": sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * c1,
        "resblock_updown": levels > 1 and f"input_blocks.{nrb + 1}.0.in_layers.0.weight" in sd,
    }


def _given(meta: dict) -> dict[str, Any]:
    """Head settings (and an image size) a file's metadata or the caller gives."""
    out: dict[str, Any] = {}
    for key in ("create_model_kwargs", "unet_model_kwargs", "config"):
        v = meta.get(key)
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                continue
        if isinstance(v, dict):
            out.update({k: v[k] for k in (*HEAD_KEYS, "image_size") if k in v})
    return out


def resolve_config(sd: dict[str, torch.Tensor], meta: dict) -> tuple[dict[str, Any], str, str | None]:
    """(full config, where the head settings came from, released checkpoint name or None)."""
    cfg = infer_config(sd)
    sig = (cfg["model_channels"], tuple(cfg["channel_mult"]), cfg["num_res_blocks"], cfg["in_channels"])
    known = KNOWN.get(sig)
    heads = {"num_heads": 4, "num_head_channels": -1, "num_heads_upsample": -1, "use_new_attention_order": False}
    source = "guided-diffusion defaults"
    if known:
        heads.update({k: known[k] for k in HEAD_KEYS if k in known})
        if "num_head_channels" in known:
            heads["num_heads"] = -1
        source = f"released checkpoint table ({known['name']})"
        cfg["image_size"] = known["image_size"]
    given = _given(meta)
    if any(k in given for k in HEAD_KEYS):
        heads.update({k: given[k] for k in HEAD_KEYS if k in given})
        if "num_heads" in given and "num_head_channels" not in given:
            heads["num_head_channels"] = -1
        source = "file metadata / config"
    if "image_size" in given:
        cfg["image_size"] = given["image_size"]
    cfg.update(heads)
    return cfg, source, known["name"] if known else None


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    cfg, head_source, known = resolve_config(state_dict, meta)
    with torch.device("meta"):
        model = ADMUNet(cfg)
    from .unet2d import check_weights

    check_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict, "ADM config (inferred)")
    model.load_state_dict(owned_float32(state_dict, channels_last=True), strict=True, assign=True)
    model.reset_buffers()
    cpu_layout(model.eval().requires_grad_(False))
    schedule = TrainingSchedule(beta_schedule=KNOWN.get((cfg["model_channels"], tuple(cfg["channel_mult"]),
                                                         cfg["num_res_blocks"], cfg["in_channels"]), {})
                                .get("schedule", "linear"))
    sc = meta.get("scheduler_config")
    learned = None
    if sc:
        from .unet2d_io import _json, schedule_from_config

        schedule, learned = schedule_from_config(_json(sc, "scheduler_config"))
    latent = _latent(meta, model.in_channels)
    facts = DiffusionFacts(kind="ADM", in_channels=model.in_channels, sample_size=cfg.get("image_size"),
                           size_multiple=model.size_multiple, num_classes=model.num_classes,
                           learned_variance=learned if learned is not None else model.out_channels == 2 * model.in_channels,
                           latent=latent, schedule=schedule)
    skips = _skips(cfg)
    from .unet2d_io import activation_bytes_per_pixel

    config = {**cfg, "heads_source": head_source, "released_checkpoint": known}
    return ModelDescriptor(
        family="diffusion", architecture="ADM", model=model, purpose="Denoiser", scale=1,
        in_channels=model.in_channels, out_channels=model.out_channels, supports_half=True, supports_bfloat16=True,
        size_requirements=SizeRequirements(minimum=model.size_multiple, multiple_of=model.size_multiple),
        tiling="none", bytes_per_pixel=activation_bytes_per_pixel(skips), config=config, extra=facts)


def _latent(meta: dict, in_channels: int) -> bool:
    flag = meta.get("latent")
    if isinstance(flag, str):
        return flag.strip().lower() in ("1", "true", "yes")
    return bool(flag) if isinstance(flag, bool) else in_channels == 4


def _skips(cfg: dict[str, Any]) -> list[tuple[int, int]]:
    mc, out, f = cfg["model_channels"], [], 1
    out.append((int(cfg["channel_mult"][0] * mc), 1))
    for lv, m in enumerate(cfg["channel_mult"]):
        out += [(int(m * mc), f)] * cfg["num_res_blocks"]
        if lv != len(cfg["channel_mult"]) - 1:
            f *= 2
            out.append((int(m * mc), f))
    return out
