"""RePaint quality against model calls, on a model whose exact answer is known.

    python bench/repaint_quality.py [--size 16] [--batch 64] [--hole 8] [--eta 1.0]

The "model" is the exact denoiser of a Gaussian image prior (a stationary, smooth Gaussian random field on a periodic
size x size grid, pixel std 0.5): for x_t = sqrt(a) x0 + sqrt(1-a) n its best epsilon is closed form per Fourier mode,
so RePaint's schedules are judged against exact Bayesian inpainting rather than a random network. A perfect posterior
sampler fills the hole with a draw from p(hole | known), whose expected squared error to the truth is twice the
conditional variance; the score is MSE(fill, truth) / (2 * mean conditional variance): 1.0 is exact, higher is worse
(the conditional mean alone would score 0.5 but is not a sample). Schedules: the paper's 250/10/10 (2,410 calls), the
pack's cheaper schedule (models/diffusion/repaint.py CHEAP), and others; each with the model-call count. Last line one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from _bench_common import pkg_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hole", type=int, default=8)
    p.add_argument("--eta", type=float, default=1.0, help="1: the paper's DDPM step; 0: diffusers' default")
    p.add_argument("--only", default="", help="comma-separated schedule names")
    p.add_argument("--seed", type=int, default=0, help="seed of the true images (the fills use seed + 1)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(pkg_root()))
    import torch

    from atelier.models.diffusion import repaint as rp
    from atelier.models.diffusion.denoiser import Denoiser
    from atelier.models.diffusion.facts import DiffusionFacts, TrainingSchedule
    from atelier.models.diffusion.schedules import get_alphas_cumprod

    torch.set_grad_enabled(False)
    n = a.size
    k = torch.fft.fftfreq(n) * n
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    power = 1.0 / (1.0 + k2 / 4.0) ** 2  # smooth field: correlation length of a few pixels
    power = power * (0.25 * n * n / power.sum())  # pixel variance 0.25
    sched = TrainingSchedule(clip_sample=False)
    ac_table = get_alphas_cumprod(sched).double()

    class ExactEps(torch.nn.Module):
        """The Bayes-optimal epsilon for the Gaussian prior at training timestep t (integer or interpolated)."""

        def __init__(self) -> None:
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, labels=None):
            lo = t.double().floor().long().clamp(0, len(ac_table) - 1)
            hi = (lo + 1).clamp(max=len(ac_table) - 1)
            w = t.double() - lo
            ac = torch.exp((1 - w) * ac_table[lo].log() + w * ac_table[hi].log()).view(-1, 1, 1)
            X = torch.fft.fft2(x.double()[:, 0])
            x0 = torch.fft.ifft2(X * (ac.sqrt() * power / (ac * power + 1 - ac))).real
            return ((x.double()[:, 0] - ac.sqrt() * x0) / (1 - ac).sqrt()).unsqueeze(1).float()

    facts = DiffusionFacts(kind="exact-gaussian", in_channels=1, sample_size=n, size_multiple=1, schedule=sched)
    # the truth: draws from the prior
    g = torch.Generator().manual_seed(a.seed)
    white = torch.randn(a.batch, n, n, generator=g, dtype=torch.float64)
    truth = torch.fft.ifft2(torch.fft.fft2(white) * power.sqrt()).real.float().unsqueeze(1)  # [B,1,n,n]
    keep = torch.ones(1, 1, n, n)
    s0 = (n - a.hole) // 2
    keep[..., s0:s0 + a.hole, s0:s0 + a.hole] = 0
    # exact conditional variance of the hole
    eye = torch.eye(n * n, dtype=torch.float64).view(-1, n, n)
    cov = torch.fft.ifft2(torch.fft.fft2(eye) * power).real.view(n * n, n * n)
    h = (keep.view(-1) == 0)
    c_hh, c_hk, c_kk = cov[h][:, h], cov[h][:, ~h], cov[~h][:, ~h]
    cond = c_hh - c_hk @ torch.linalg.solve(c_kk, c_hk.T)
    target = 2 * cond.diagonal().mean().item()
    schedules = {
        "reference_250_j10_r10": rp.REFERENCE,
        "cheap_250_j10_r2": rp.CHEAP,
        "100_j10_r10_noisy_half": rp.RePaintSchedule(steps=100, jump_n_sample=10, resample_from=0.5),
        "100_j10_r5_noisy_half": rp.RePaintSchedule(steps=100, jump_n_sample=5, resample_from=0.5),
        "250_j10_r3": rp.RePaintSchedule(steps=250, jump_n_sample=3),
        "no_resampling_250": rp.RePaintSchedule(steps=250, jump_n_sample=1),
        "no_resampling_100": rp.RePaintSchedule(steps=100, jump_n_sample=1),
        "200_j10_r3": rp.RePaintSchedule(steps=200, jump_n_sample=3),
        "250_j10_r3_noisy_half": rp.RePaintSchedule(steps=250, jump_n_sample=3, resample_from=0.5),
        "150_j10_r5_noisy_half": rp.RePaintSchedule(steps=150, jump_n_sample=5, resample_from=0.5),
    }
    if a.only:
        schedules = {k: v for k, v in schedules.items() if k in a.only.split(",")}
    out = {"size": n, "hole": a.hole, "batch": a.batch, "eta": a.eta, "seed": a.seed, "target_mse": target,
           "schedules": {}}
    for name, sched_ in schedules.items():
        sched_ = rp.RePaintSchedule(**{**vars(sched_), "eta": a.eta})
        gen = torch.Generator().manual_seed(a.seed + 1)
        den = Denoiser(ExactEps(), facts, clip=False)
        t0 = time.perf_counter()
        fill = rp.repaint(den, truth, keep, lambda: torch.randn(truth.shape, generator=gen), sched_)
        mse = ((fill - truth) ** 2)[..., s0:s0 + a.hole, s0:s0 + a.hole].mean().item()
        known = ((fill - truth) * keep).abs().max().item()
        out["schedules"][name] = {"model_calls": den.calls, "mse_ratio": round(mse / target, 3),
                                  "known_max_err": known, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"  {name:32s} calls {den.calls:5d}  MSE/optimal {mse / target:.3f}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
