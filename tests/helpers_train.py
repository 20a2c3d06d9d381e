"""Training-loop test helpers: a tiny denoising conv autoencoder as a `TrainTask` (GroupNorm only, so a batch split
over processes gives the same gradients as one process), a dataset of random images, and tensor comparisons."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atelier.models.train.data import ImageDataset, from_images
from atelier.models.train.loop import StepContext, TrainTask


class TinyAE(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.enc = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(4, width)
        self.dec = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,S,S] -> [B,C,S,S]
        return self.dec(F.silu(self.norm(self.enc(x))))


class AETask(TrainTask):
    """Denoise x + 0.2 noise back to x. nan_at / raise_at (0-based steps): a NaN loss, or `exc` raised inside the
    step before any weight update; loss_scale multiplies the loss (big gradients for the clipping test)."""

    kind = "test-ae"

    def __init__(self, channels: int = 3, width: int = 8, size: int = 8, *, nan_at: int | None = None,
                 raise_at: int | None = None, exc: BaseException | None = None, loss_scale: float = 1.0) -> None:
        self.channels, self.width, self.size = channels, width, size
        self.nan_at, self.raise_at, self.exc, self.loss_scale = nan_at, raise_at, exc, loss_scale
        self.seen_lr: list[float] = []  # the learning rate the optimizer used, per step

    def arch(self) -> dict[str, Any]:
        return {"channels": self.channels, "width": self.width}

    def build(self, device: torch.device) -> dict[str, nn.Module]:
        net = TinyAE(self.channels, self.width).to(device).train()
        self.initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return {"ae": net}

    def optimizers(self) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
        return {"ae": (("ae",), {})}

    def ema_networks(self) -> tuple[str, ...]:
        return ("ae",)

    def train_step(self, ctx: StepContext, batch: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.raise_at is not None and ctx.step == self.raise_at:
            raise self.exc
        noisy = batch + 0.2 * ctx.randn(*batch.shape[1:])
        with ctx.autocast():
            loss = F.mse_loss(ctx.nets["ae"](noisy).float(), batch) * self.loss_scale
        if self.nan_at is not None and ctx.step >= self.nan_at:
            loss = loss * float("nan")
        ctx.backward("ae", loss)
        self.seen_lr.append(ctx._loop.opts["ae"][0].param_groups[0]["lr"])
        return {"loss": loss.detach()}

    def sample(self, nets: dict[str, nn.Module], n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand((n, self.channels, self.size, self.size), generator=g)
        dev = next(nets["ae"].parameters()).device
        return nets["ae"](x.to(dev)).sigmoid()

    def save_model(self, path: str, nets: dict[str, nn.Module], meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        sd = {k: v.detach().cpu().contiguous() for k, v in nets["ae"].state_dict().items()}
        save_file(sd, path, metadata={**meta, "config": json.dumps(self.arch())})


def random_dataset(n: int = 12, size: int = 8, channels: int = 3, seed: int = 0, **kw) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return from_images(torch.rand((n, size, size, channels), generator=g), size, channels=channels, **kw)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def listing(folder: str) -> list[str]:
    return sorted(os.listdir(folder))
