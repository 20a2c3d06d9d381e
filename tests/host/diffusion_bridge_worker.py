"""Worker for tests/host/test_diffusion_bridge.py, run by ComfyUI's own interpreter (not collected by pytest).

    python diffusion_bridge_worker.py COMFYUI_DIR REPO_DIR MODELS_DIR

Imports ComfyUI as a standalone script must (--cpu), registers MODELS_DIR/diffusers, imports this pack as a package,
loads the tiny UNet2DModel folder with Atelier Load Diffusion Model and runs, on float tensors in one process: our
Diffusion Sample (clip off, trailing spacing) and core's KSampler (scheduler "simple", cfg 1) on the bridged MODEL
from Atelier Diffusion To MODEL, Empty Pixel Latent and Empty Conditioning, same seed. Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys

import comfy_worker  # beside this file (the script's folder is on sys.path)


def main(comfy_dir: str, repo: str, models: str) -> dict:
    comfy_worker.start(comfy_dir, repo, "diffusers", os.path.join(models, "diffusers"))
    import torch
    import nodes as core  # ComfyUI's nodes.py

    from atelier.nodes import diffusion as ours

    desc = ours.AtelierLoadDiffusionModel().load("diffusers/tiny/unet/diffusion_pytorch_model.safetensors")[0]
    model = ours.AtelierDiffusionToModel().bridge(desc, -1)[0]
    latent = ours.AtelierEmptyPixelLatent().make(desc, 16, 16, 1)[0]
    cond = ours.AtelierEmptyConditioning().make()[0]
    out: dict = {}
    with torch.inference_mode():
        for name in ("euler", "heun", "dpmpp_2m"):
            want = ours.AtelierDiffusionSample().sample(
                desc, seed=3, batch_size=1, width=16, height=16, steps=10, sampler=name, spacing="trailing",
                eta=0.0, class_label=-1, guidance=1.0, clip="off")[1]["samples"]
            got = core.KSampler().sample(model, 3, 10, 1.0, name, "simple", cond, cond, latent, denoise=1.0)[0]
            image = ours.AtelierPixelLatentToImage().convert(got)[0]
            out[name] = {"max": (got["samples"].float() - want).abs().max().item(), "scale": want.abs().max().item(),
                         "image_shape": list(image.shape)}
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
