"""Issue 16: "Unload models" (`POST /free {"unload_models": true, "free_memory": true}`) frees the pack's RAM.

The server's resident memory (VmRSS of the ComfyUI process, read from /proc) is read
  idle           after a /free, before our model was ever read
  loaded         after a prompt ran a ~320 MB random-weight ESRGAN through Atelier Load Upscaler + Upscale Image
  freed          after /free
and `freed` must be back within a fraction of the model's size of `idle` (before the fix the manager's RAM cache kept
the whole model resident through any number of /free calls). A run after /free must read the file again (the pack's
"loaded <file>" log line), and give the same pixels.
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.host

FILE = "atelier_big_esrgan.safetensors"
SMALL = "atelier_small_esrgan.safetensors"
RESIDUAL = 0.3  # of the model's size: what may stay resident after /free (allocator slack, caches)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def _esrgan(path, num_filters: int = 192, num_blocks: int = 32) -> int:
    """A random-weight 1x ESRGAN (spandrel's own class), by default ~320 MB in float32; returns the file's size."""
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    if not path.exists():
        torch.manual_seed(0)
        model = ESRGAN(num_filters=num_filters, num_blocks=num_blocks, scale=1)
        sd = {k: (v * 0.05 if v.ndim > 1 else v).contiguous() for k, v in model.state_dict().items()}
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, path)
    return path.stat().st_size


def test_free_releases_the_ram_of_a_model_the_pack_loaded(comfy):
    if not os.path.exists(f"/proc/{comfy.proc.pid}/status"):
        pytest.skip("no /proc: cannot read the server's resident memory")
    size = _esrgan(comfy.models_root / "upscale_models" / FILE)
    _esrgan(comfy.models_root / "upscale_models" / SMALL, 8, 1)
    comfy.put_input("unload_ram.png", (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "unload_ram.png"}},
        "2": {"class_type": "AtelierLoadUpscaler", "inputs": {"model_name": FILE}},
        "3": {"class_type": "AtelierUpscaleImage", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0],
                                                     "mode": "model scale", "factor": 2.0, "width": 0, "height": 0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "unload_ram"}},
    }
    warm = copy.deepcopy(prompt)  # the same code paths on a tiny model first: imports are not counted as the model's
    warm["2"]["inputs"]["model_name"] = SMALL
    comfy.run(warm)
    comfy.free()
    idle = _rss(comfy.proc.pid)

    off = comfy.log_size()
    out1 = comfy.image_arrays(comfy.run(prompt))
    assert f"loaded {FILE}" in comfy.log_since(off), "the model was not read by the pack's manager"
    loaded = _rss(comfy.proc.pid)
    mb = 1 << 20
    assert loaded - idle > 0.7 * size, (f"RSS grew by {(loaded - idle) / mb:.0f} MB for a {size / mb:.0f} MB model: "
                                        "too little to see a release")

    comfy.free(unload_models=True, free_memory=True)
    deadline = time.monotonic() + 10  # the heap is handed back a second after the model is collected
    while (freed := _rss(comfy.proc.pid)) - idle >= RESIDUAL * size and time.monotonic() < deadline:
        time.sleep(0.5)
    assert freed - idle < RESIDUAL * size, (
        f"after /free the server still holds {(freed - idle) / mb:.0f} MB over its idle {idle / mb:.0f} MB "
        f"(loaded: +{(loaded - idle) / mb:.0f} MB; the model is {size / mb:.0f} MB)")

    print(f"RSS idle {idle / mb:.0f} MB, loaded +{(loaded - idle) / mb:.0f} MB, after /free +{(freed - idle) / mb:.0f} MB "
          f"(model file {size / mb:.0f} MB)")
    off = comfy.log_size()
    out2 = comfy.image_arrays(comfy.run(prompt))
    assert f"loaded {FILE}" in comfy.log_since(off), "after /free the model was not read again from its file"
    assert [k for k, _ in out1] == [k for k, _ in out2]
    for (key, a), (_, b) in zip(out1, out2):
        assert a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1, key
    comfy.free()
