"""Training a pixel DDPM (Ho et al. 2020) with the pack's UNet2DModel: the diffusion family's `TrainTask` for the
shared loop in `models/train/loop.py`.

The denoising loss: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at a uniform t, and the UNet regresses eps (or
v = sqrt(a_t) eps - sqrt(1 - a_t) x0). Class-conditional runs add one extra class, the null class, that replaces
the label with probability `uncond_prob` so the model also learns the unconditional score (classifier-free
guidance). The file is the UNet2DModel `.safetensors` of `unet2d_io.save_unet` with the schedule, null class and
class names in its metadata, so Load Diffusion Model lists and samples it.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..train.loop import StepContext, TrainTask
from .denoiser import Denoiser
from .facts import DiffusionFacts, TrainingSchedule
from .samplers import sample_ddim
from .schedules import get_alphas_cumprod, get_sigmas
from .unet2d import UNet2DModel, full_config
from .unet2d_io import save_unet

# UNet sizes: (block_out_channels, layers_per_block, attention at which levels)
SIZES: dict[str, tuple[tuple[int, ...], int, tuple[bool, ...]]] = {
    "tiny": ((32, 64, 64), 1, (False, False, True)),  # ~0.9 M parameters
    "small": ((64, 128, 128), 2, (False, True, True)),  # ~6 M
    "base": ((128, 256, 256, 256), 2, (False, True, False, False)),  # ~35 M, the DDPM CIFAR-10 layout
}
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}


def unet_config(size: str, resolution: int, channels: int, num_classes: int) -> dict[str, Any]:
    if size not in SIZES:
        raise InputError(f"model_size: expected one of {', '.join(SIZES)}, got {size!r}")
    widths, layers, attn = SIZES[size]
    m = 2 ** (len(widths) - 1)
    if resolution % m or resolution < m:
        raise InputError(f"resolution: the {size} UNet halves the image {len(widths) - 1} times, so the resolution "
                         f"must be a multiple of {m}; got {resolution}")
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    cfg = {"sample_size": resolution, "in_channels": channels, "out_channels": channels,
           "block_out_channels": list(widths), "layers_per_block": layers, "down_block_types": down,
           "up_block_types": [d.replace("Down", "Up") for d in reversed(down)], "attention_head_dim": 32,
           "norm_num_groups": 32}
    if num_classes:
        cfg["num_class_embeds"] = num_classes + 1  # + the null class
    return full_config(cfg)


class DiffusionTask(TrainTask):
    kind = "diffusion"

    def __init__(self, *, resolution: int, channels: int, size: str = "tiny", schedule: str = "linear",
                 prediction: str = "epsilon", class_names: tuple[str, ...] = (), uncond_prob: float = 0.1,
                 preview_steps: int = 20) -> None:
        if schedule not in SCHEDULES:
            raise InputError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if prediction not in PREDICTIONS:
            raise InputError(f"prediction: expected one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if not 0.0 <= uncond_prob < 1.0:
            raise InputError(f"uncond_prob: expected 0 <= p < 1, got {uncond_prob}")
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.config = unet_config(size, resolution, channels, self.num_classes)
        self.size, self.channels, self.resolution = size, channels, resolution
        self.schedule = TrainingSchedule(beta_schedule=SCHEDULES[schedule], prediction_type=PREDICTIONS[prediction],
                                         clip_sample=True)
        self.uncond_prob = uncond_prob if self.num_classes else 0.0
        self.preview_steps = preview_steps
        self.alphas_cumprod = get_alphas_cumprod(self.schedule)  # [T] float32

    def arch(self) -> dict[str, Any]:
        return {"unet": {k: self.config[k] for k in ("in_channels", "block_out_channels", "layers_per_block",
                                                     "down_block_types", "num_class_embeds", "sample_size")},
                "schedule": self.schedule.beta_schedule, "prediction": self.schedule.prediction_type,
                "classes": list(self.class_names)}

    def build(self, device: torch.device) -> dict[str, nn.Module]:
        return {"unet": UNet2DModel(self.config).to(device).train()}

    def optimizers(self) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
        return {"unet": (("unet",), {})}

    def ema_networks(self) -> tuple[str, ...]:
        return ("unet",)

    def extra_state(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}

    def train_step(self, ctx: StepContext, batch: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        x0 = batch * 2 - 1  # [b,C,S,S] in -1..1
        t = ctx.randint(len(self.alphas_cumprod))  # [b]
        noise = ctx.randn(*x0.shape[1:])
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if self.schedule.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        if labels is not None:
            drop = ctx.rand() < self.uncond_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        with ctx.autocast():
            pred = ctx.nets["unet"](xt, t.float(), labels)
        loss = F.mse_loss(pred.float(), target)
        ctx.backward("unet", loss)
        return {"loss": loss.detach()}

    def facts(self) -> DiffusionFacts:
        return DiffusionFacts(kind="UNet2DModel", in_channels=self.channels, sample_size=self.resolution,
                              size_multiple=2 ** (len(self.config["block_out_channels"]) - 1),
                              num_classes=self.num_classes + 1 if self.num_classes else 0,
                              null_class=self.num_classes if self.num_classes else None, schedule=self.schedule)

    def sample(self, nets: dict[str, nn.Module], n: int, seed: int) -> torch.Tensor:
        unet = nets["unet"]
        device = next(unet.parameters()).device
        den = Denoiser(unet, self.facts())
        sigmas = get_sigmas(self.schedule, self.preview_steps, "trailing")
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((n, self.channels, self.resolution, self.resolution), generator=g).to(device)
        x = x * math.sqrt(1 + float(sigmas[0]) ** 2)
        extra = {}
        if self.num_classes:
            extra["class_labels"] = (torch.arange(n) % self.num_classes).to(device)
        out = sample_ddim(den, x, sigmas, extra_args=extra, disable=True)
        return (out.float().cpu() + 1) / 2

    def save_model(self, path: str, nets: dict[str, nn.Module], meta: dict[str, str]) -> None:
        extra = dict(meta)
        if self.num_classes:
            extra["null_class"] = str(self.num_classes)
            extra["class_names"] = json.dumps(list(self.class_names))
        save_unet(path, nets["unet"], self.config, self.schedule, latent=False, extra_meta=extra)
