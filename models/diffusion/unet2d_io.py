"""diffusers UNet2DModel files: detection, config from the file or from shapes, the training schedule, saving.

Formats read (all through `models/loading.py`, nothing in a file is run):
(a) a diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (or `.bin`); the user picks the weights
    file, the reader picks up `config.json` beside it into meta["config"] and the scheduler config from
    `../scheduler/scheduler_config.json` or a `scheduler_config.json` beside it into meta["scheduler_config"];
(b) one `.safetensors` whose metadata holds `config` (the UNet2DModel config as JSON) and optionally
    `scheduler_config` (JSON) and `latent` ("true"/"false"): what `save_unet` writes;
(c) a bare state dict: the config is inferred from the shapes. What shapes cannot tell takes diffusers' default,
    listed in desc.config["guessed"]; a partial meta["config"] overrides any of them:
      flip_sin_to_cos True, freq_shift 0      (the google/ddpm-* conversions used False, 1)
      downsample_padding 1                    (the google/ddpm-* conversions used 0)
      attention_head_dim 8 if it divides every attention width, else one head (None)
      norm_num_groups 32, or the largest of 16, 8, 4, 2, 1 dividing every normalised width; norm_eps 1e-5
      mid_block_scale_factor 1, center_input_sample False, sample_size None (any multiple of 2^downsamplings)
      the training schedule: TrainingSchedule() (linear 1e-4..0.02, 1000 steps, epsilon, clip)
    A last down block without attention and resampler is DownBlock2D (ResnetDownsampleBlock2D computes the same).

A config that does not match the weights (other keys or shapes) is a ModelLoadError listing what differs.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch

from ..descriptor import ModelDescriptor, SizeRequirements
from ..errors import ModelLoadError
from ..loading import write_safetensors
from .facts import BETA_SCHEDULES, PREDICTIONS, DiffusionFacts, TrainingSchedule
from .unet2d import UNet2DModel, build, full_config, rename_legacy_keys

log = logging.getLogger(__name__)

_CORE_KEYS = ("conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
              "up_blocks.0.resnets.0.conv1.weight", "conv_out.weight")
# keys of diffusers blocks this module does not implement -> the block type to name in the error
_UNSUPPORTED_MARKS = {"transformer_blocks": "CrossAttnDownBlock2D/CrossAttnUpBlock2D (text cross-attention)",
                      "skip_conv": "SkipDownBlock2D/SkipUpBlock2D (score-SDE skip path)",
                      "add_embedding": "UNet2DConditionModel (added embeddings)",
                      "encoder_hid_proj": "UNet2DConditionModel (encoder projection)"}


def detect(state_dict: dict, meta: dict) -> bool:
    return all(k in state_dict for k in _CORE_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# Config from shapes
# ---------------------------------------------------------------------------------------------------------------
def _count(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _unsupported(sd: dict) -> None:
    for k in sd:
        for mark, what in _UNSUPPORTED_MARKS.items():
            if f".{mark}." in k or k.startswith(f"{mark}."):
                block = ".".join(k.split(".")[:2])
                raise ModelLoadError(f"UNet2DModel: {block} is a {what} block, which is not supported "
                                     f"(key {k!r}); supported: DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D "
                                     "and their Up counterparts")


def infer_config(sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list[str]]:
    """(UNet2DModel config, names of the values that are defaults rather than read from shapes)."""
    _unsupported(sd)
    n = _count(sd, "down_blocks.")
    ch = [int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n)]
    lpb = _count(sd, "down_blocks.0.resnets.")
    down_types, up_types, down_kind, up_kind = [], [], set(), set()
    for i in range(n):
        attn = f"down_blocks.{i}.attentions.0.to_q.weight" in sd
        res_s = f"down_blocks.{i}.downsamplers.0.conv1.weight" in sd
        down_types.append("AttnDownBlock2D" if attn else ("ResnetDownsampleBlock2D" if res_s else "DownBlock2D"))
        if attn and i < n - 1:
            down_kind.add("resnet" if res_s else "conv")
        attn = f"up_blocks.{i}.attentions.0.to_q.weight" in sd
        res_s = f"up_blocks.{i}.upsamplers.0.conv1.weight" in sd
        up_types.append("AttnUpBlock2D" if attn else ("ResnetUpsampleBlock2D" if res_s else "UpBlock2D"))
        if attn and i < n - 1:
            up_kind.add("resnet" if res_s else "conv")
    if len(down_kind) > 1 or len(up_kind) > 1:
        raise ModelLoadError("UNet2DModel: attention blocks mix conv and resnet resamplers; "
                             "one downsample_type/upsample_type applies to all of them")
    temb = sd["time_embedding.linear_1.weight"]
    fourier = "time_proj.weight" in sd and sd["time_proj.weight"].ndim == 1
    proj = sd["down_blocks.0.resnets.0.time_emb_proj.weight"].shape[0]
    cfg: dict[str, Any] = {
        "in_channels": int(sd["conv_in.weight"].shape[1]),
        "out_channels": int(sd["conv_out.weight"].shape[0]),
        "block_out_channels": ch,
        "layers_per_block": lpb,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "downsample_type": down_kind.pop() if down_kind else "conv",
        "upsample_type": up_kind.pop() if up_kind else "conv",
        "time_embedding_type": "fourier" if fourier else "positional",
        "time_embedding_dim": int(temb.shape[0]) if temb.shape[0] != ch[0] * 4 else None,
        "resnet_time_scale_shift": "scale_shift" if proj == 2 * ch[0] else "default",
        "mid_block_type": "UNetMidBlock2D" if "mid_block.resnets.0.conv1.weight" in sd else None,
        "add_attention": "mid_block.attentions.0.to_q.weight" in sd,
    }
    if "class_embedding.weight" in sd:
        cfg["num_class_embeds"] = int(sd["class_embedding.weight"].shape[0])
    elif "class_embedding.linear_1.weight" in sd:
        cfg["class_embed_type"] = "timestep"
    mid_gn = cfg["add_attention"] and "mid_block.attentions.0.group_norm.weight" in sd
    if cfg["add_attention"] and cfg["mid_block_type"] and not mid_gn and cfg["resnet_time_scale_shift"] == "default":
        raise ModelLoadError("UNet2DModel: the mid-block attention has no GroupNorm although the resnets use the "
                             "default time embedding; no UNet2DModel config builds that")
    widths = [int(v.shape[0]) for k, v in sd.items() if k.endswith(("norm1.weight", "norm2.weight", "group_norm.weight",
                                                                    "conv_norm_out.weight"))]
    guessed = ["flip_sin_to_cos", "freq_shift", "downsample_padding", "attention_head_dim", "norm_num_groups",
               "norm_eps", "mid_block_scale_factor", "sample_size"]
    cfg["norm_num_groups"] = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
    if mid_gn and cfg["resnet_time_scale_shift"] == "scale_shift":
        cfg["attn_norm_num_groups"] = cfg["norm_num_groups"]
    attn_widths = [int(v.shape[0]) for k, v in sd.items() if k.endswith("to_q.weight")]
    cfg["attention_head_dim"] = 8 if all(w % 8 == 0 for w in attn_widths) else None
    return cfg, guessed


# ---------------------------------------------------------------------------------------------------------------
# The training schedule
# ---------------------------------------------------------------------------------------------------------------
def schedule_from_config(sc: dict[str, Any] | None) -> tuple[TrainingSchedule, bool | None]:
    """diffusers scheduler_config -> (TrainingSchedule, learned variance or None when the config does not say)."""
    if not sc:
        return TrainingSchedule(), None
    beta = sc.get("beta_schedule", "linear")
    betas = sc.get("trained_betas")
    if betas is None and beta not in BETA_SCHEDULES:
        raise ModelLoadError(f"scheduler_config: beta_schedule {beta!r} is not supported; supported: {BETA_SCHEDULES}")
    pred = sc.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise ModelLoadError(f"scheduler_config: prediction_type {pred!r} is not supported; supported: {PREDICTIONS}")
    variance = sc.get("variance_type")
    learned = None if variance is None else variance in ("learned", "learned_range")
    sched = TrainingSchedule(
        num_train_timesteps=int(sc.get("num_train_timesteps", 1000)),
        beta_schedule=beta if beta in BETA_SCHEDULES else "linear",
        beta_start=float(sc.get("beta_start", 0.0001)),
        beta_end=float(sc.get("beta_end", 0.02)),
        prediction_type=pred,
        clip_sample=bool(sc.get("clip_sample", True)),
        clip_sample_range=float(sc.get("clip_sample_range", 1.0)),
        trained_betas=tuple(float(b) for b in betas) if betas is not None else None,
    )
    return sched, learned


def scheduler_config(schedule: TrainingSchedule, learned_variance: bool = False) -> dict[str, Any]:
    """TrainingSchedule -> a diffusers DDPMScheduler config (what `save_unet` writes)."""
    out: dict[str, Any] = {"_class_name": "DDPMScheduler", "num_train_timesteps": schedule.num_train_timesteps,
                           "beta_schedule": schedule.beta_schedule, "beta_start": schedule.beta_start,
                           "beta_end": schedule.beta_end, "prediction_type": schedule.prediction_type,
                           "clip_sample": schedule.clip_sample, "clip_sample_range": schedule.clip_sample_range,
                           "variance_type": "learned_range" if learned_variance else "fixed_small"}
    if schedule.trained_betas is not None:
        out["trained_betas"] = list(schedule.trained_betas)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _json(value: Any, name: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{name}: not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise ModelLoadError(f"{name}: expected a JSON object, got {type(out).__name__}")
    return out


def _config(sd: dict[str, torch.Tensor], meta: dict) -> tuple[dict[str, Any], str, list[str]]:
    """(config, where it came from, guessed names). A full config (with block types) is used as it is; a partial one
    overrides what the shapes could not tell."""
    given = _json(meta.get("config"), "config") or {}
    if "down_block_types" in given and "block_out_channels" in given:
        return given, str(meta.get("config_source", "metadata")), []
    inferred, guessed = infer_config(sd)
    overrides = {k: v for k, v in given.items() if not k.startswith("_")}
    return {**inferred, **overrides}, "inferred from shapes", [g for g in guessed if g not in overrides]


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    sd = rename_legacy_keys(state_dict)
    config, source, guessed = _config(sd, meta)
    full = full_config(config)  # checks the block types before anything is built
    where = f"config ({source})"
    model = build(full, sd) if source != "inferred from shapes" else _build_inferred(full, sd)
    if guessed:
        log.info("UNet2DModel %s: config inferred from shapes; defaults used for %s",
                 os.path.basename(str(meta.get("source", ""))), ", ".join(guessed))
    sched, learned = schedule_from_config(_json(meta.get("scheduler_config"), "scheduler_config"))
    learned_variance = bool(learned) if learned is not None else model.out_channels == 2 * model.in_channels
    if learned_variance and model.out_channels != 2 * model.in_channels:
        raise ModelLoadError(f"scheduler_config says learned variance but the UNet has {model.out_channels} output "
                             f"channels for {model.in_channels} input channels (expected {2 * model.in_channels})")
    latent = _latent(meta, model.in_channels)
    facts = DiffusionFacts(kind="UNet2DModel", in_channels=model.in_channels, sample_size=_size(full["sample_size"]),
                           size_multiple=model.size_multiple, num_classes=model.num_classes,
                           learned_variance=learned_variance, latent=latent, schedule=sched,
                           time_input="sigma" if full["time_embedding_type"] == "fourier" else "timestep",
                           **_classes(meta, model.num_classes))
    config_out = {**{k: full[k] for k in full}, "config_source": where, "guessed": guessed,
                  "scheduler_config": scheduler_config(sched, learned_variance)}
    return descriptor(model, facts, config_out, "UNet2DModel")


def _classes(meta: dict, num_classes: int) -> dict[str, Any]:
    """null_class / class_names from the metadata (written by the pack's trainer), checked against the UNet."""
    out: dict[str, Any] = {}
    null = meta.get("null_class")
    if null not in (None, ""):
        try:
            n = int(null)
        except (TypeError, ValueError):
            raise ModelLoadError(f"metadata null_class: expected an integer, got {null!r}") from None
        if not 0 <= n < num_classes:
            raise ModelLoadError(f"metadata null_class: expected 0..{num_classes - 1} for this UNet, got {n}")
        out["null_class"] = n
    names = meta.get("class_names")
    if names:
        try:
            parsed = json.loads(names) if isinstance(names, str) else names
            out["class_names"] = tuple(str(x) for x in parsed)
        except (TypeError, ValueError):
            log.info("metadata class_names: not a JSON list; ignored")
    return out


def _build_inferred(cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> UNet2DModel:
    try:
        return build(cfg, sd)
    except ModelLoadError as e:
        raise ModelLoadError(f"UNet2DModel state dict: the layout inferred from its shapes does not fit ({e})") from e


def _size(s: Any) -> int | None:
    if isinstance(s, (list, tuple)):
        return int(s[0]) if s else None
    return int(s) if s else None


def _latent(meta: dict, in_channels: int) -> bool:
    flag = meta.get("latent")
    if isinstance(flag, str):
        return flag.strip().lower() in ("1", "true", "yes")
    if isinstance(flag, bool):
        return flag
    return in_channels == 4  # SD-style VAE latents; pixel models have 1 or 3 channels


def activation_bytes_per_pixel(widths_at_levels: list[tuple[int, int]]) -> float:
    """fp32 activation bytes per input pixel for one sample: every skip kept for the decoder plus ~12 working maps at
    the widest level (the decoder's concatenations, norms, convolutions and shortcut at full resolution).
    `widths_at_levels`: (channels, downsampling factor) of every skip tensor. Checked on the CPU (peak RSS growth,
    CIFAR-10 DDPM config at 64x64, batch 8): 8320 bytes/pixel measured, 8560 estimated."""
    skips = sum(c / (f * f) for c, f in widths_at_levels)
    widest = max(c / (f * f) for c, f in widths_at_levels)
    return 4.0 * (skips + 12 * widest)


def _skips(model: UNet2DModel) -> list[tuple[int, int]]:
    out, f = [(model.conv_in.out_channels, 1)], 1
    for block in model.down_blocks:
        c = block.resnets[0].conv1.out_channels
        out += [(c, f)] * len(block.resnets)
        if block.sampler is not None:
            f *= 2
            out.append((c, f))
    return out


def descriptor(model: UNet2DModel, facts: DiffusionFacts, config: dict[str, Any], arch: str) -> ModelDescriptor:
    return ModelDescriptor(
        family="diffusion",
        architecture=arch,
        model=model,
        purpose="Denoiser",
        scale=1,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        supports_half=True,  # GroupNorm and the attention softmax run in fp32-safe ways (layers.py)
        supports_bfloat16=True,
        size_requirements=SizeRequirements(minimum=facts.size_multiple, multiple_of=facts.size_multiple),
        tiling="none",  # attention and GroupNorm see the whole image
        bytes_per_pixel=activation_bytes_per_pixel(_skips(model)),
        config=config,
        extra=facts,
    )


# ---------------------------------------------------------------------------------------------------------------
# Saving (format b)
# ---------------------------------------------------------------------------------------------------------------
def save_unet(path: str | os.PathLike, model_or_sd: torch.nn.Module | dict[str, torch.Tensor], config: dict[str, Any],
              schedule: TrainingSchedule | None = None, *, learned_variance: bool = False,
              latent: bool | None = None, extra_meta: dict[str, str] | None = None) -> str:
    """Write one `.safetensors` with the config and training schedule as JSON metadata (temporary name, then rename)."""
    path = os.fspath(path)
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else dict(model_or_sd)
    cfg = {"_class_name": "UNet2DModel", **{k: v for k, v in full_config(config).items()}}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet2DModel(cfg).state_dict().items()}
    from .unet2d import check_weights

    check_weights(expected, sd, "save_unet: config")
    meta = {"config": json.dumps(cfg), "architecture": "UNet2DModel"}
    if schedule is not None:
        meta["scheduler_config"] = json.dumps(scheduler_config(schedule, learned_variance))
    if latent is not None:
        meta["latent"] = "true" if latent else "false"
    meta.update(extra_meta or {})
    write_safetensors(path, sd, meta)
    return path
