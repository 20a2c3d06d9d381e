"""The diffusion bridge on a real ComfyUI: core's KSampler on a model from Atelier Diffusion To MODEL gives what our
Diffusion Sample gives with the matching sampler, sigmas (core "simple" = our "trailing") and noise (batch 1: core's
noise for a seed equals ours), within 1e-4 on float tensors. Runs tests/host/diffusion_bridge_worker.py under
ComfyUI's interpreter; skips with the reason when no ComfyUI is configured (see tests/host/conftest.py)."""
from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

import helpers_diffusion

pytestmark = pytest.mark.host

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _location():
    import importlib.util

    spec = importlib.util.spec_from_file_location("host_conftest", HERE / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.comfyui_location()


def test_core_ksampler_on_bridged_model_equals_diffusion_sample(tmp_path):
    loc = _location()
    if isinstance(loc, str):
        pytest.skip(loc)
    comfy_dir, python = loc
    helpers_diffusion.write_tiny_folder(tmp_path / "diffusers")
    proc = subprocess.run([python, str(HERE / "diffusion_bridge_worker.py"), str(comfy_dir), str(REPO),
                           str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=str(comfy_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))
    for name, r in res.items():
        assert r["image_shape"] == [1, 16, 16, 3], (name, r)
        assert r["max"] <= 1e-4 * max(1.0, r["scale"]), (name, r)
