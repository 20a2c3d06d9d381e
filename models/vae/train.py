"""Training a convolutional VAE (Kingma & Welling 2014) with the ELBO: the VAE family's `TrainTask` for the shared
loop in `models/train/loop.py`.

Loss per image: reconstruction (Bernoulli: BCE with the decoder's logits, or Gaussian: squared error of its sigmoid
output) + beta * KL(q(z|x) || N(0, I)), the KL weight rising linearly from 0 over `kl_warmup` steps (Bowman et al.
2016) so the decoder learns to use z before the prior pulls it in. Both terms are divided by the pixel count, which
leaves the optimum unchanged and keeps gradient norms near 1 (so the loop's clipping does not bind). The file is the
ConvVAE `.safetensors` of `conv.save_conv_vae`, which Load VAE lists and the VAE nodes encode, decode and sample.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..train.loop import StepContext, TrainTask
from .conv import ConvVAE, full_config, save_conv_vae

RECONSTRUCTIONS = ("bce", "mse")


class VAETask(TrainTask):
    kind = "vae"

    def __init__(self, *, resolution: int, channels: int, width: int = 32, latent_dim: int = 32,
                 res_blocks: int = 1, reconstruction: str = "bce", beta: float = 1.0, kl_warmup: int = 1000) -> None:
        if reconstruction not in RECONSTRUCTIONS:
            raise InputError(f"reconstruction: expected one of {', '.join(RECONSTRUCTIONS)}, got {reconstruction!r}")
        if not beta >= 0:
            raise InputError(f"beta: expected a KL weight >= 0, got {beta}")
        cfg = {"in_channels": channels, "resolution": resolution, "channels": [width, 2 * width, 4 * width],
               "res_blocks": res_blocks, "latent_dim": latent_dim if latent_dim > 0 else None,
               "latent_channels": None if latent_dim > 0 else 4, "groups": 8}
        self.config = full_config(cfg, what="VAE settings")
        self.reconstruction, self.beta, self.kl_warmup = reconstruction, float(beta), int(kl_warmup)

    def arch(self) -> dict[str, Any]:
        return {"convvae": self.config, "reconstruction": self.reconstruction}

    def build(self, device: torch.device) -> dict[str, nn.Module]:
        return {"vae": ConvVAE(self.config).to(device).train()}

    def optimizers(self) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
        return {"vae": (("vae",), {})}

    def ema_networks(self) -> tuple[str, ...]:
        return ("vae",)

    def kl_weight(self, step: int) -> float:
        return self.beta * (min(1.0, step / self.kl_warmup) if self.kl_warmup > 0 else 1.0)

    def train_step(self, ctx: StepContext, batch: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        vae = ctx.nets["vae"]
        model = vae.module if hasattr(vae, "module") else vae  # DDP wraps it
        with ctx.autocast():
            mean, logvar = model.encode_stats(batch)
        mean, logvar = mean.float(), logvar.float().clamp(-30, 20)
        z = mean + (0.5 * logvar).exp() * ctx.randn(*mean.shape[1:])
        with ctx.autocast():
            logits = model.decode_logits(z).float()
        pixels = batch[0].numel()
        if self.reconstruction == "bce":
            rec = F.binary_cross_entropy_with_logits(logits, batch, reduction="none").flatten(1).sum(1)
        else:
            rec = (torch.sigmoid(logits) - batch).square().flatten(1).sum(1)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        loss = (rec + self.kl_weight(ctx.step) * kl).mean() / pixels
        ctx.backward("vae", loss)
        return {"loss": loss.detach(), "recon": rec.mean().detach() / pixels, "kl": kl.mean().detach()}

    def sample(self, nets: dict[str, nn.Module], n: int, seed: int) -> torch.Tensor:
        vae = nets["vae"]
        device = next(vae.parameters()).device
        c, r = vae.latent_channels, vae.resolution
        shape = (n, c) if vae.flat else (n, c, r // vae.factor, r // vae.factor)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
        return vae.decode(z).float().cpu()

    def save_model(self, path: str, nets: dict[str, nn.Module], meta: dict[str, str]) -> None:
        save_conv_vae(path, nets["vae"], extra_meta={**meta, "reconstruction": self.reconstruction,
                                                       "beta": str(self.beta)})
