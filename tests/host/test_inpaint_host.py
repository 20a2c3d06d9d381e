"""Crop and stitch around core's VAE chain on a real ComfyUI (issue 13): Atelier Inpaint Crop -> core VAE Encode ->
Set Latent Noise Mask -> core VAE Decode -> Atelier Inpaint Stitch. The VAE round trip (a TAESD with random weights,
loaded by core's VAELoader) changes every pixel of the crop; after the stitch the unmasked pixels are the input's,
bit for bit. (No diffusion checkpoint can be had here, so the KSampler between Set Latent Noise Mask and VAE Decode
is left out: the VAE round trip is what touches the unmasked pixels.) Skips without a ComfyUI (tests/host/conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers_taesd import random_taesd_combined  # tests/ is on pytest's pythonpath

pytestmark = pytest.mark.host


def _image(h: int, w: int) -> np.ndarray:  # [h,w,3] uint8
    skimage_data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(np.ascontiguousarray(skimage_data.astronaut())).float().div(255)[None].movedim(-1, 1)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="area")[0].movedim(0, -1)
    return (x.numpy() * 255).round().astype("uint8")


def test_crop_stitch_round_trip_through_core_vae_keeps_unmasked_pixels(comfy):
    save_file(random_taesd_combined(), str(comfy.models_root / "vae" / "taesd_inpaint.safetensors"))
    img = _image(96, 128)
    comfy.put_input("inpaint_host.png", img)
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "inpaint_host.png"}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 96}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 30, "height": 20}},
        "4": {"class_type": "MaskComposite", "inputs": {"destination": ["2", 0], "source": ["3", 0], "x": 50, "y": 40,
                                                         "operation": "add"}},
        "5": {"class_type": "AtelierInpaintCrop", "inputs": {"image": ["1", 0], "mask": ["4", 0], "context": 1.5,
                                                              "padding": 8, "mode": "size", "size": 64, "multiple": 8}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd_inpaint.safetensors"}},
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["7", 0], "mask": ["5", 1]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["6", 0]}},
        "10": {"class_type": "AtelierInpaintStitch", "inputs": {"stitch": ["5", 2], "image": ["9", 0], "blend": 4}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "inpaint_stitch"}},
    }
    images = dict(comfy.image_arrays(comfy.run(prompt)))
    out = images["11:0"].astype(np.int16)
    assert out.shape == img.shape
    mask = np.zeros(img.shape[:2], bool)
    mask[40:60, 50:80] = True
    assert np.array_equal(out[~mask], img[~mask].astype(np.int16))  # unmasked: bit for bit
    assert np.abs(out[mask] - img[mask]).mean() > 2  # the round trip did change the masked pixels
