"""Model Info node and `atelier models inspect`: what a file is, before wiring it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from atelier.nodes.info import AtelierModelInfo


def test_model_info_node_describes_real_upscaler(manager, models_root, shared_dir):
    shutil.copy(shared_dir / "weights" / "dncnn" / "dncnn_25.pth", models_root / "upscale_models")
    choices = AtelierModelInfo.INPUT_TYPES()["required"]["model"][0]
    assert "upscale_models/dncnn_25.pth" in choices
    out = AtelierModelInfo().inspect("upscale_models/dncnn_25.pth")
    info = json.loads(out["result"][0])
    # spandrel's own reading of the file is the independent reference
    import spandrel  # a runtime dependency of the pack: missing is a failure, not a skip
    ref = spandrel.ModelLoader().load_from_file(str(shared_dir / "weights" / "dncnn" / "dncnn_25.pth"))
    assert info["family"] == "upscale" and info["architecture"] == ref.architecture.name
    assert info["scale"] == ref.scale and info["in_channels"] == ref.input_channels == 1
    assert info["parameters"] == sum(p.numel() for p in ref.model.parameters())
    assert out["ui"]["text"][0] == out["result"][0]


def test_cli_inspect_prints_descriptor_json(shared_dir):
    path = shared_dir / "weights" / "taef2" / "taef2_decoder.pth"
    r = subprocess.run([sys.executable, "-m", "atelier", "models", "inspect", str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "vae" and info["config"]  # TAEF2 decoder, 32 latent channels
    assert "32" in json.dumps(info["config"])


def test_cli_inspect_unknown_file_is_one_clear_line(tmp_path):
    from safetensors.torch import save_file
    import torch

    p = tmp_path / "mystery.safetensors"
    save_file({"what.is.this": torch.zeros(3)}, p)
    r = subprocess.run([sys.executable, "-m", "atelier", "models", "inspect", str(p)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "no detector recognised it" in r.stderr and "what.is" in r.stderr
