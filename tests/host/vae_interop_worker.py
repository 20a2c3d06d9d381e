"""Worker for tests/host/test_vae_interop.py, run by ComfyUI's own interpreter (not collected by pytest).

    python vae_interop_worker.py COMFYUI_DIR REPO_DIR MODELS_DIR IMAGE.pt TILED_LATENT.pt

Imports ComfyUI as a standalone script must (args parsing on, --cpu), registers MODELS_DIR/vae, imports this pack
as a package, and runs core's VAELoader/VAEEncode/VAEDecode/VAEDecodeTiled and our nodes on the same files, in one
process, on float tensors (no 8-bit round trip in between). Prints one JSON line of max/mean differences.
"""
from __future__ import annotations

import json
import os
import sys

import comfy_worker  # beside this file (the script's folder is on sys.path)


def main(comfy_dir: str, repo: str, models: str, image_file: str, latent_file: str) -> dict:
    comfy_worker.start(comfy_dir, repo, "vae", os.path.join(models, "vae"))
    import torch
    import nodes as core  # ComfyUI's nodes.py

    from atelier.nodes import vae as ours

    image = torch.load(image_file, weights_only=True)  # IMAGE [1,H,W,3]
    tiled_latent = torch.load(latent_file, weights_only=True)  # [1,4,h,w]
    out: dict = {}

    def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
        d = (a.float() - b.float()).abs()
        return {"max": d.max().item(), "mean": d.mean().item()}

    with torch.inference_mode():
        for name in sorted(os.listdir(os.path.join(models, "vae"))):
            core_vae = core.VAELoader().load_vae(name)[0]
            our_vae = ours.AtelierLoadVAE().load(f"vae/{name}")[0]
            core_lat = core.VAEEncode().encode(core_vae, image)[0]
            our_lat = ours.AtelierVAEEncode().encode(our_vae, image, "mean", 0)[0]
            core_of_core = core.VAEDecode().decode(core_vae, core_lat)[0]
            res = {
                "core_dtype": str(core_vae.vae_dtype),
                "latent_scale": core_lat["samples"].abs().max().item(),
                "latents": diff(our_lat["samples"], core_lat["samples"]),
                # our LATENT into core's decoder, core's LATENT into ours, against core's own chain
                "core_decode_of_ours": diff(core.VAEDecode().decode(core_vae, our_lat)[0], core_of_core),
                "ours_decode_of_core": diff(ours.AtelierVAEDecode().decode(our_vae, core_lat)[0], core_of_core),
                "image_std": core_of_core.std().item(),
            }
            if name.startswith("sd"):  # tiled decodes of a 128x192 image on the same weights, against untiled
                lat = {"samples": tiled_latent}
                full = core.VAEDecode().decode(core_vae, lat)[0]
                core_tiled = core.VAEDecodeTiled().decode(core_vae, lat, 128, 32)[0]  # 16-latent tiles
                our_tiled = ours.AtelierVAEDecode().decode(our_vae, lat, 128)[0]
                res["untiled_std"] = full.std().item()
                res["core_tiled_vs_untiled"] = diff(core_tiled, full)
                res["ours_tiled_vs_untiled"] = diff(our_tiled, full)
            out[name] = res
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:6])))
