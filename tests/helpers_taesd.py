"""A random-weight TAESD in ComfyUI's combined file layout, for tests that hand a VAE to ComfyUI and to our nodes."""
from __future__ import annotations

import torch

from atelier.models.vae import taesd


def random_taesd_combined(seed: int = 4) -> dict[str, torch.Tensor]:
    """taesd_encoder./taesd_decoder. keys plus vae_scale/vae_shift (ComfyUI's layout); weights stirred so that the
    decoder's output is not flat, its last bias at 0.5 (mid-grey images)."""
    torch.manual_seed(seed)
    enc, dec = taesd.Encoder(4), taesd.Decoder(4)
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            p.mul_(1.5).add_(torch.randn_like(p) * 0.02)
        dec[-1].bias.fill_(0.5)
    sd = {f"taesd_encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"taesd_decoder.{k}": v for k, v in dec.state_dict().items()})
    sd.update(vae_scale=torch.tensor(0.18215), vae_shift=torch.tensor(0.0))
    return sd
