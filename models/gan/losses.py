"""GAN losses on discriminator logits: non-saturating, hinge and WGAN-GP, and the gradient penalty.

- non_saturating (Goodfellow et al. 2014, the -log D(G(z)) form):
    D: softplus(-D(x)) + softplus(D(G(z)))       G: softplus(-D(G(z)))
- hinge (Lim & Ye 2017; Miyato et al. 2018):
    D: relu(1 - D(x)) + relu(1 + D(G(z)))        G: -D(G(z))
- wgan_gp (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs"):
    D: D(G(z)) - D(x) (+ gradient_penalty)       G: -D(G(z))
Every term is a mean over the batch. Logits are [B] (or any shape: all elements are averaged).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

LOSSES = ("non_saturating", "hinge", "wgan_gp")


def _check(kind: str) -> None:
    if kind not in LOSSES:
        raise InputError(f"loss: expected one of {LOSSES}, got {kind!r}")


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:  # scalar
    """The discriminator's loss for `kind` (without WGAN-GP's penalty: add `gradient_penalty`): the sum of its real
    and fake parts, which `d_loss_real` / `d_loss_fake` give one at a time."""
    return d_loss_real(kind, real_logits) + d_loss_fake(kind, fake_logits)


def d_loss_real(kind: str, real_logits: torch.Tensor) -> torch.Tensor:  # scalar
    _check(kind)
    if kind == "non_saturating":
        return F.softplus(-real_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean()
    return -real_logits.mean()


def d_loss_fake(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:  # scalar
    _check(kind)
    if kind == "non_saturating":
        return F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 + fake_logits).mean()
    return fake_logits.mean()


def g_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:  # scalar
    """The generator's loss for `kind`."""
    _check(kind)
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def gradient_penalty(
    D: torch.nn.Module,  # called as D(x, labels) -> [B] logits
    real: torch.Tensor,  # [B,C,H,W]
    fake: torch.Tensor,  # [B,C,H,W], same shape (detached or not: only the interpolate is differentiated)
    labels: torch.Tensor | None = None,  # [B] class indices for a conditional D
    weight: float = 10.0,  # lambda
    generator: torch.Generator | None = None,  # source of the interpolation weights (CPU), for reproducibility
) -> torch.Tensor:  # scalar
    """weight * E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = eps * real + (1 - eps) * fake, eps ~ U[0,1] per sample;
    the graph is kept (create_graph) so the penalty trains D."""
    if real.shape != fake.shape or real.dim() < 2:
        raise InputError(f"fake: expected the shape of real {list(real.shape)}, got {list(fake.shape)}")
    b = real.shape[0]
    eps = torch.rand((b,) + (1,) * (real.dim() - 1), generator=generator)  # [B,1,1,1] drawn on the CPU
    eps = eps.to(device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)  # [B,C,H,W]
    out = D(x_hat, labels) if labels is not None else D(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)  # [B,C,H,W]
    return weight * ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
