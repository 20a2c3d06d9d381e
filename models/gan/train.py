"""Training a DCGAN (Radford et al. 2016) on a dataset: the GAN family's `TrainTask` for the shared loop in
`models/train/loop.py`.

One step: the discriminator on the real batch, then on a generated one (each part's backward before the next, as
the PyTorch DCGAN tutorial does; under DDP one call on both, one forward per backward), its loss (non-saturating, hinge or WGAN with gradient penalty), then the generator against the updated
discriminator on the same fakes. Class-conditional from the dataset's labels (sub-folder names): G's label embedding,
D's projection. The file is the generator in the DCGAN layout `dcgan.py` loads (EMA weights), with the class names
in its metadata, so Load GAN lists it and the GAN samplers draw from it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..train.loop import StepContext, TrainTask
from .losses import LOSSES, d_loss, d_loss_fake, d_loss_real, g_loss, gradient_penalty
from .train_nets import build_dcgan, check_resolution, save_dcgan

# Adam betas per loss: DCGAN's (0.5, 0.999); WGAN-GP's (0, 0.9) (Gulrajani et al. 2017)
BETAS = {"non_saturating": (0.5, 0.999), "hinge": (0.5, 0.999), "wgan_gp": (0.0, 0.9)}


class GANTask(TrainTask):
    kind = "gan"

    def __init__(self, *, resolution: int, channels: int, loss: str = "non_saturating", z_dim: int = 100,
                 base_width: int = 32, class_names: tuple[str, ...] = (), d_norm: str = "spectral",
                 gp_weight: float = 10.0) -> None:
        if loss not in LOSSES:
            raise InputError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        check_resolution(resolution)
        self.resolution, self.channels, self.loss = resolution, channels, loss
        self.z_dim, self.base_width, self.d_norm, self.gp_weight = z_dim, base_width, d_norm, gp_weight
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)

    def arch(self) -> dict[str, Any]:
        return {"dcgan": {"resolution": self.resolution, "channels": self.channels, "z_dim": self.z_dim,
                          "base_width": self.base_width, "num_classes": self.num_classes, "d_norm": self.d_norm},
                "loss": self.loss, "classes": list(self.class_names)}

    def build(self, device: torch.device) -> dict[str, nn.Module]:
        g, d = build_dcgan(self.resolution, self.channels, self.z_dim, self.base_width, self.num_classes,
                           d_norm=self.d_norm)
        return {"G": g.to(device).train(), "D": d.to(device).train()}

    def optimizers(self) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
        betas = BETAS[self.loss]
        return {"D": (("D",), {"betas": betas}), "G": (("G",), {"betas": betas})}

    def ema_networks(self) -> tuple[str, ...]:
        return ("G",)

    def extra_state(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}

    def train_step(self, ctx: StepContext, batch: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        G, D = ctx.nets["G"], ctx.nets["D"]
        real = batch * 2 - 1  # [b,C,R,R] in -1..1
        b = real.shape[0]
        z = ctx.randn(self.z_dim)  # [b,z]
        with ctx.autocast():
            fake = G(z, labels)
        if ctx.distributed:  # DDP: one discriminator forward per backward, on real and fake together
            both = None if labels is None else torch.cat([labels, labels])
            with ctx.autocast():
                logits = D(torch.cat([real, fake.detach()]), both).float()
            loss_d = d_loss(self.loss, logits[:b], logits[b:])
        else:  # real, then fake, as the DCGAN tutorial does: half the discriminator activations held at once
            with ctx.autocast():
                loss_real = d_loss_real(self.loss, D(real, labels).float())
            ctx.accumulate(loss_real)
            with ctx.autocast():
                loss_fake = d_loss_fake(self.loss, D(fake.detach(), labels).float())
            loss_d = loss_real.detach() + loss_fake
        if self.loss == "wgan_gp":
            seed = int(ctx.randint(2**62)[0])
            loss_d = loss_d + gradient_penalty(D, real, fake.detach().float(), labels, self.gp_weight,
                                               torch.Generator().manual_seed(seed))
        ctx.backward("D", loss_d)
        D.requires_grad_(False)  # the generator's step must not leave gradients in D
        try:
            with ctx.autocast():
                loss_g = g_loss(self.loss, D(fake, labels).float())
            ctx.backward("G", loss_g)
        finally:
            D.requires_grad_(True)
        return {"d_loss": loss_d.detach(), "g_loss": loss_g.detach()}

    def sample(self, nets: dict[str, nn.Module], n: int, seed: int) -> torch.Tensor:
        G = nets["G"]
        device = next(G.parameters()).device
        z = torch.randn((n, self.z_dim), generator=torch.Generator().manual_seed(seed)).to(device)
        labels = (torch.arange(n) % self.num_classes).to(device) if self.num_classes else None
        return (G(z, labels).float().cpu() + 1) / 2

    def save_model(self, path: str, nets: dict[str, nn.Module], meta: dict[str, str]) -> None:
        save_dcgan(path, nets["G"], {"class_names": list(self.class_names), "loss": self.loss}, extra_meta=meta)
