"""guided-diffusion's own 25-step respaced DDPM and DDIM trajectories (../shared/golden/adm, README inside),
reproduced by our samplers on our ADM loaded through the manager: adm_a (learned-range variance) and adm_b (class
labels, fixed-large variance). The respaced chain is our sigma sequence of the kept timesteps; the golden per-step
noise is fed in loop order. Tolerances are the README's (DDIM amplifies rounding near t = 0)."""
from __future__ import annotations

import lzma
import math

import pytest
import torch
from safetensors.torch import load as st_load

from atelier.models.diffusion import samplers as S
from atelier.models.diffusion.denoiser import Denoiser
from atelier.models.diffusion.schedules import sigmas_from_timesteps
from helpers_golden import golden_folder  # noqa: E402 (tests/ is on pytest's pythonpath)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden_adm(shared_dir):
    d = golden_folder(shared_dir, "adm")
    return d


def _load(golden_adm, name, manager, models_root):
    src = golden_adm / f"adm_{name}.safetensors"
    out = models_root / "diffusion_models" / src.name
    out.write_bytes(src.read_bytes() if src.is_file() else lzma.open(str(src) + ".xz").read())
    return manager.load(src.name, "diffusion_models", family="diffusion")


@pytest.mark.parametrize("name", ["a", "b"])
def test_guided_diffusion_trajectories(name, golden_adm, manager, models_root):
    desc = _load(golden_adm, name, manager, models_root)
    gold = st_load((golden_adm / f"adm_{name}.sampling.safetensors").read_bytes())
    noise = st_load((golden_adm / "sampling_noise.safetensors").read_bytes())
    ts = gold["timestep_map"].flip(0).double()  # 999, 957, ..., 0
    sigmas = sigmas_from_timesteps(ts.numpy(), desc.extra.schedule)
    ac = 1 / (1 + sigmas[:-1] ** 2)
    torch.testing.assert_close(ac.flip(0), gold["alphas_cumprod"], rtol=1e-5, atol=0)  # float32 vs float64 tables
    x = noise["x_T"] * math.sqrt(1 + float(sigmas[0]) ** 2)  # x_T is unit-variance (VP): into sigma space
    extra = {"class_labels": gold["y"]} if "y" in gold else {}
    for sampler, key, tol in ((S.sample_ddpm, "ddpm", 1e-4), (S.sample_ddim, "ddim", 1e-3)):
        den = Denoiser(desc.model, desc.extra, clip=True)
        seq, steps = [], iter(noise["step_noise"])
        kw = {"noise_sampler": lambda s, sn: next(steps)} if key == "ddpm" else {"eta": 0.0}
        if key == "ddpm" and not desc.extra.learned_variance:
            kw["variance"] = "fixed_large"
        final = sampler(den, x.clone(), sigmas, extra_args=extra,
                        callback=lambda d: seq.append(d["x"][0] / math.sqrt(1 + d["sigma"] ** 2)), **kw)
        err = (final - gold[f"{key}_final"]).abs()
        assert err.max() < tol, (key, err.max().item())
        assert err.mean() < 1e-5, (key, err.mean().item())
        if f"{key}_x_seq0" in gold:  # what the model received at each step (variance-preserving x)
            traj = (torch.stack(seq) - gold[f"{key}_x_seq0"]).abs()
            assert traj.max() < tol, (key, traj.max().item())
