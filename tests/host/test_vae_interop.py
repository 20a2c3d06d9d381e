"""Issue 5 on a real ComfyUI: LATENTs interchange with core's VAE nodes on the same files.

1. In one ComfyUI process (tests/host/vae_interop_worker.py under ComfyUI's interpreter, float tensors throughout):
   a full-size SD KL autoencoder and a TAESD, both with random weights, loaded by core's VAELoader and by Atelier
   Load VAE. Our encode decoded by core's VAEDecode, and core's encode decoded by ours, match core's own chain within
   1e-3; on the SD VAE core's VAEDecodeTiled and our tiled decode are measured against the untiled decode (ours
   within 3/255 mean and 12/255 max; core's figures printed for comparison).
2. On the session's ComfyUI server: a graph that mixes core's and our nodes runs, 8-bit outputs within 2/255.
Both skip with the reason when no ComfyUI is configured (see tests/host/conftest.py).
"""
from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from atelier.models.vae import kl
from helpers_taesd import random_taesd_combined  # tests/ is on pytest's pythonpath

pytestmark = pytest.mark.host

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOL = 1e-3


def _location():
    import importlib.util

    spec = importlib.util.spec_from_file_location("host_conftest", HERE / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.comfyui_location()


def _sd_vae() -> dict[str, torch.Tensor]:
    """A full-size SD1 KL autoencoder (CompVis keys) with random weights; GroupNorm affine stirred off identity."""
    torch.manual_seed(3)
    model = kl.AutoencoderKL(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, latent_channels=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)
    return {k: v.half().contiguous() for k, v in model.state_dict().items()}  # fp16 on disk: half the file


def _image(h: int, w: int) -> torch.Tensor:  # IMAGE [1,h,w,3]
    skimage_data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(np.ascontiguousarray(skimage_data.astronaut())).float().div(255)[None].movedim(-1, 1)
    return torch.nn.functional.interpolate(x, size=(h, w), mode="area").movedim(1, -1).contiguous()


def test_latents_interchange_with_core_vae_nodes(tmp_path):
    loc = _location()
    if isinstance(loc, str):
        pytest.skip(loc)
    comfy_dir, python = loc
    (tmp_path / "vae").mkdir()
    save_file(_sd_vae(), str(tmp_path / "vae" / "sd_random.safetensors"))
    save_file(random_taesd_combined(), str(tmp_path / "vae" / "taesd_random.safetensors"))
    torch.save(_image(64, 96), tmp_path / "image.pt")
    torch.save(torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(5)), tmp_path / "latent.pt")
    proc = subprocess.run([python, str(HERE / "vae_interop_worker.py"), str(comfy_dir), str(REPO), str(tmp_path),
                           str(tmp_path / "image.pt"), str(tmp_path / "latent.pt")],
                          capture_output=True, text=True, timeout=900, cwd=str(comfy_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))
    for name, r in res.items():
        assert r["image_std"] > 0.02, (name, r)  # random weights that still draw something
        assert r["latents"]["max"] <= TOL * max(1.0, r["latent_scale"]), (name, r["latents"])
        assert r["core_decode_of_ours"]["max"] <= TOL, (name, r["core_decode_of_ours"])
        assert r["ours_decode_of_core"]["max"] <= TOL, (name, r["ours_decode_of_core"])
    sd = res["sd_random.safetensors"]
    ours, core = sd["ours_tiled_vs_untiled"], sd["core_tiled_vs_untiled"]
    assert ours["mean"] * 255 <= 3 and ours["max"] * 255 <= 12, ours
    assert ours["max"] <= core["max"], (ours, core)  # and no worse than core's tiled decode


def test_mixed_graph_runs_on_the_server(comfy):
    save_file(random_taesd_combined(), str(comfy.models_root / "vae" / "taesd_mixed.safetensors"))
    comfy.put_input("vae_mixed.png", (_image(64, 96)[0].numpy() * 255).round().astype("uint8"))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "vae_mixed.png"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd_mixed.safetensors"}},
        "3": {"class_type": "AtelierLoadVAE", "inputs": {"vae_name": "vae/taesd_mixed.safetensors"}},
        "4": {"class_type": "AtelierVAEEncode",
              "inputs": {"vae": ["3", 0], "image": ["1", 0], "mode": "mean", "seed": 0}},
        "5": {"class_type": "VAEDecode", "inputs": {"vae": ["2", 0], "samples": ["4", 0]}},
        "6": {"class_type": "VAEEncode", "inputs": {"vae": ["2", 0], "pixels": ["1", 0]}},
        "7": {"class_type": "AtelierVAEDecode", "inputs": {"vae": ["3", 0], "samples": ["6", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"vae": ["2", 0], "samples": ["6", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "vae_mixed_a"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "vae_mixed_b"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "vae_mixed_c"}},
    }
    images = dict(comfy.image_arrays(comfy.run(prompt)))
    a, b, c = (images[k].astype(np.int16) for k in ("10:0", "11:0", "12:0"))
    assert a.shape == b.shape == c.shape == (64, 96, 3)
    assert c.std() > 5  # the random TAESD draws something
    assert np.abs(a - c).max() <= 2 and np.abs(b - c).max() <= 2  # ours -> core and core -> ours, vs core -> core
