"""Copy a trained model file into pretrained/<folder>/ in fp16 when that is exact enough, else as it is.

    python tools/ship_model.py SRC.safetensors pretrained/<folder>/NAME.safetensors [--tolerance 0.002]

"Exact enough": the family's model loaded from the fp16 copy gives the same output as the original on fixed
inputs within the tolerance (in 0..1 image units; the default is half a grey level). The metadata is kept.
Written to a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


def _probe(desc) -> torch.Tensor:  # a fixed output of the model in 0..1 image units
    g = torch.Generator().manual_seed(0)
    m, fam = desc.model, desc.family
    with torch.inference_mode():
        if fam == "gan":
            z = torch.randn(16, m.z_dim, generator=g)
            c = torch.nn.functional.one_hot(torch.arange(16) % m.c_dim, m.c_dim).float() if m.c_dim else None
            return m.generate(z, c).float()
        if fam == "vae":
            return m.decode(torch.randn(16, m.latent_channels, 1, 1, generator=g)).float()
        if fam == "diffusion":
            s = desc.extra.sample_size
            x = torch.randn(8, desc.extra.in_channels, s, s, generator=g)
            t = torch.linspace(10, 990, 8)
            labels = torch.arange(8) % max(desc.extra.num_classes, 1) if desc.extra.num_classes else None
            return m(x, t, labels).float() / 2  # eps units -> about image units of x0 at mid noise
    raise SystemExit(f"no probe for family {fam}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tolerance", type=float, default=0.002)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO.parent))
    from safetensors import safe_open
    from safetensors.torch import save_file

    from atelier.models.loading import write_safetensors
    from atelier.models.manager import ModelManager

    with safe_open(a.src, "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    m = ModelManager(models_root=str(REPO / "user_models"))
    with tempfile.TemporaryDirectory() as tmpdir:  # the fp16 candidate, probed through the family's loader
        probe = os.path.join(tmpdir, os.path.basename(a.dst))
        save_file(half, probe, metadata=meta)
        ref, got = _probe(m.load(os.path.abspath(a.src))), _probe(m.load(probe))
    diff = float((ref - got).abs().max())
    if diff > a.tolerance:
        print(f"fp16 differs by {diff:.4g} > {a.tolerance}: shipping fp32")
    else:
        print(f"fp16 max difference {diff:.4g} <= {a.tolerance}: shipping fp16")
    write_safetensors(a.dst, sd if diff > a.tolerance else half, meta)  # temporary name, then rename
    print(f"{a.dst}: {os.path.getsize(a.dst) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
