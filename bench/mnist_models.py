"""The goals of the pack's shipped MNIST models (issue: training), measured with the LeNet-5 of ../shared/weights/mnist.

    python bench/mnist_models.py [--ddpm FILE] [--vae FILE] [--dcgan FILE] [--n 1000] [--shared ../shared]

- DDPM: n samples (DDIM, 50 steps; class-conditional models get classes drawn per seed, unconditional via the null
  class too): mean LeNet confidence (goal >= 0.90) and the share of every digit (goal >= 5 %).
- Conv VAE: PSNR of reconstructions (posterior mean) of the 2,000 held-out digits (goal >= 22 dB; the fully
  connected VAE in ../shared/weights/mnist is measured beside it), and prior samples' confidence (goal >= 0.8).
  Two PSNRs: the mean of the per-image PSNRs, and the PSNR of the pooled squared error of all pixels.
- DCGAN: confidence of n samples (goal >= 0.90).
- FID and KID with the LeNet's f6 features against the held-out digits (the last 2,000 test digits), next to the
  floor (the held-out digits split in two random halves) and the MLP GAN in ../shared/weights/mnist.
Every model is read and run through the pack's manager and family engines, as the nodes run them.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import REPO, pkg_root  # noqa: E402

HELD_OUT = 2000


def mnist(shared: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:  # [N,1,28,28] in 0..1, [N]
    import gzip

    import numpy as np

    root = shared / "data" / "mnist"
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "rb") as f:
        x = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        y = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return torch.from_numpy(x.astype("float32") / 255), torch.from_numpy(y.astype("int64"))


class Judge:
    """LeNet-5 confidence, digit shares, FID and KID against the held-out digits."""

    def __init__(self, pkg, shared: pathlib.Path) -> None:
        self.metrics = pkg.models.metrics
        self.lenet = pkg.models.manager.get_manager().load(str(shared / "weights/mnist/lenet_classifier.pth"),
                                                           family="features")
        images, _ = mnist(shared)
        self.held = images[-HELD_OUT:]
        self.held_f = self.metrics.features(self.lenet, self.held)

    def classify(self, x: torch.Tensor) -> torch.Tensor:  # [N,1,H,W] in 0..1 -> [N,10] probabilities
        net = self.lenet.model
        x = F.interpolate(x.float().clamp(0, 1), size=(32, 32), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > 32)
        with torch.inference_mode():
            return torch.cat([net.classify(x[i:i + 500]).exp() for i in range(0, len(x), 500)])

    def score(self, x: torch.Tensor) -> dict:
        p = self.classify(x)
        conf, digit = p.max(1)
        shares = torch.bincount(digit, minlength=10).float() / len(x)
        f = self.metrics.features(self.lenet, x)
        kid, kid_std, _ = self.metrics.kid(self.held_f, f, subset_size=min(1000, len(x), len(self.held_f)))
        return {"n": len(x), "confidence": round(float(conf.mean()), 4), "min_digit_share": round(float(shares.min()), 4),
                "digit_shares": [round(float(s), 3) for s in shares],
                "fid": round(self.metrics.fid(self.held_f, f), 3), "kid": round(kid, 4), "kid_std": round(kid_std, 4)}

    def floor(self) -> dict:
        perm = torch.randperm(len(self.held), generator=torch.Generator().manual_seed(0))
        a, b = self.held_f[perm[: len(perm) // 2]], self.held_f[perm[len(perm) // 2:]]
        kid, kid_std, _ = self.metrics.kid(a, b, subset_size=len(a) // 2)
        return {"fid": round(self.metrics.fid(a, b), 3), "kid": round(kid, 4), "kid_std": round(kid_std, 4)}


def ddpm(pkg, path: str, n: int, steps: int, guidance: float = 1.0, unconditional: bool = True,
         guided_only: bool = False) -> dict[str, torch.Tensor]:
    run = pkg.models.diffusion.run
    m = pkg.models.manager.get_manager()
    desc = m.load(path, family="diffusion")
    facts = desc.extra
    s = facts.sample_size
    out = {}
    settings = run.SampleSettings(steps=steps, sampler="ddim", spacing="trailing")
    guided = run.SampleSettings(steps=steps, sampler="ddim", spacing="trailing", guidance=guidance)
    t0 = time.perf_counter()
    if not guided_only:
        x = run.sample(m, desc, settings, seed=0, batch=n, height=s, width=s, class_label=-1)
        out["ddpm_classes"] = ((x + 1) / 2).clamp(0, 1)
    if guidance != 1.0 and facts.null_class is not None:
        x = run.sample(m, desc, guided, seed=0, batch=n, height=s, width=s, class_label=-1)
        out[f"ddpm_classes_guidance_{guidance:g}"] = ((x + 1) / 2).clamp(0, 1)
    print(f"DDPM: class-conditional samples in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if unconditional and facts.null_class is not None:
        x = run.sample(m, desc, settings, seed=10_000, batch=n, height=s, width=s, class_label=facts.null_class)
        out["ddpm_unconditional"] = ((x + 1) / 2).clamp(0, 1)
    return out


def gan_samples(pkg, path: str, n: int) -> torch.Tensor:  # [n,1,S,S] in 0..1
    m = pkg.models.manager.get_manager()
    desc = m.load(path, family="gan")
    sampling = pkg.models.gan.sampling
    gen = sampling.check_generator(desc)
    z = sampling.seeds_to_z(0, n, gen.z_dim)
    labels = None
    if gen.c_dim:
        labels = F.one_hot(torch.arange(n) % gen.c_dim, gen.c_dim).float()
    with torch.inference_mode():
        x = m.run(desc, lambda model: torch.cat([model.generate(z[i:i + 250], None if labels is None else
                                                                labels[i:i + 250]).float().cpu()
                                                 for i in range(0, n, 250)]))
    return x[:, :1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pre = REPO / "pretrained"
    ap.add_argument("--ddpm", default=str(pre / "diffusion_models" / "atelier_mnist_ddpm.safetensors"))
    ap.add_argument("--dcgan", default=str(pre / "gans" / "atelier_mnist_dcgan.safetensors"))
    ap.add_argument("--vae", default=str(pre / "vae" / "atelier_mnist_convvae.safetensors"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=1.0, help="also sample with classifier-free guidance")
    ap.add_argument("--no-unconditional", action="store_true", help="skip the null-class samples")
    ap.add_argument("--guided-only", action="store_true", help="only the guided samples")
    ap.add_argument("--shared", default=os.environ.get("ATELIER_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--only", default="", help="comma list of ddpm,dcgan,vae,mlp")
    a = ap.parse_args()
    sys.path.insert(0, str(pkg_root()))
    import atelier.models.diffusion.run  # noqa: F401
    import atelier.models.gan.sampling  # noqa: F401
    import atelier.models.manager  # noqa: F401
    import atelier.models.metrics  # noqa: F401

    pkg = atelier  # noqa: F821
    shared = pathlib.Path(a.shared)
    only = set(filter(None, a.only.split(",")))
    judge = Judge(pkg, shared)
    result: dict = {"floor_heldout_halves": judge.floor()}
    if (not only or "mlp" in only):
        result["mlp_gan_reference"] = judge.score(gan_samples(pkg, str(shared / "weights/mnist/gan_mlp_G.ckpt"), a.n))
    if (not only or "ddpm" in only) and os.path.isfile(a.ddpm):
        for k, x in ddpm(pkg, a.ddpm, a.n, a.steps, a.guidance, not a.no_unconditional,
                         a.guided_only).items():
            result[k] = judge.score(x)
    if (not only or "dcgan" in only) and os.path.isfile(a.dcgan):
        result["dcgan"] = judge.score(gan_samples(pkg, a.dcgan, a.n))
    if (not only or "vae" in only) and os.path.isfile(a.vae):
        result.update(vae(pkg, a.vae, judge, a.n, shared))
    for k, v in result.items():
        print(f"{k:>22}: {json.dumps(v)}", file=sys.stderr)
    print(json.dumps(result))


def vae(pkg, path: str, judge: Judge, n: int, shared: pathlib.Path) -> dict:
    """Reconstruction PSNR of the held-out digits (posterior mean) through the VAE family's codec, beside the fully
    connected VAE of ../shared/weights/mnist, and prior samples' confidence."""
    m = pkg.models.manager.get_manager()
    held = judge.held  # [N,1,28,28] in 0..1
    out = {}
    for key, file in (("convvae", path), ("fc_vae_reference", str(shared / "weights/mnist/vae_fc.pth"))):
        desc = m.load(file, family="vae")
        net = desc.model
        res = getattr(net, "resolution", 28)
        x = held if res == 28 else F.interpolate(held, size=(res, res), mode="bilinear", align_corners=False)

        def run(model, x=x):
            with torch.inference_mode():
                z = torch.cat([model.encode(x[i:i + 500]) for i in range(0, len(x), 500)])
                rec = torch.cat([model.decode(z[i:i + 500]) for i in range(0, len(z), 500)]).float().cpu()
                zs = torch.randn((n,) + tuple(z.shape[1:]), generator=torch.Generator().manual_seed(0))
                prior = torch.cat([model.decode(zs[i:i + 500]) for i in range(0, n, 500)]).float().cpu()
            return rec, prior

        rec, prior = m.run(desc, run)
        rec = rec.reshape(len(x), 1, res, res)
        psnr = pkg.models.metrics.psnr(rec.clamp(0, 1), x).mean().item()
        pooled = 10 * math.log10(1 / float((rec.clamp(0, 1) - x).square().mean()))
        out[key] = {"psnr_heldout_db": round(psnr, 2), "psnr_pooled_db": round(pooled, 2),
                    "prior": judge.score(prior.reshape(n, 1, res, res))}
    return out


if __name__ == "__main__":
    main()
