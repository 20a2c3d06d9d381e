"""Training on a real ComfyUI (issue 12): Image Folder Dataset (a folder under the input directory) -> Train
Diffusion -> Diffusion Sample in one prompt, run by ComfyUI's executor (inference mode, its progress and caches).
The file lands in models/diffusion_models where Load Diffusion Model lists it; queueing the same prompt again trains
two more steps of the same run (IS_CHANGED), 2 -> 4.

The trainer writes into ComfyUI's model folder, so this test starts its own server with --base-directory in a temp
folder (the shared server's default model folders are in the ComfyUI tree). Skips without ComfyUI."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from safetensors import safe_open

pytestmark = pytest.mark.host


def _host_conftest():
    """tests/host/conftest.py as pytest imported it (its module name depends on the rootdir)."""
    for mod in list(sys.modules.values()):
        if (getattr(mod, "__file__", None) or "").endswith(os.path.join("host", "conftest.py")) and hasattr(
                mod, "ComfyServer"):
            return mod
    raise RuntimeError("tests/host/conftest.py is not loaded")


_hc = _host_conftest()
REPO, ComfyServer, comfyui_location = _hc.REPO, _hc.ComfyServer, _hc.comfyui_location


class _BaseDirServer(ComfyServer):
    """A ComfyUI whose models, inputs and outputs all live under `base` (nothing else configured)."""

    def prepare(self) -> None:
        for d in (self.custom_nodes, self.input_dir, self.output_dir, self.user_dir, self.models_root):
            d.mkdir(parents=True, exist_ok=True)
        self.pack_dir.symlink_to(REPO, target_is_directory=True)

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:"]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    loc = comfyui_location()
    if isinstance(loc, str):
        pytest.skip(loc)
    s = _BaseDirServer(loc[0], loc[1], tmp_path_factory.mktemp("comfyui_train"), request.getfixturevalue("shared_dir"))
    s.prepare()
    try:
        s.start()
    except Exception:
        s.stop()
        raise
    yield s
    s.stop()


def _prompt() -> dict:
    return {
        "1": {"class_type": "AtelierImageFolderDataset", "inputs": {
            "folder": "train_host", "resolution": 8, "channels": "grey", "crop": "center", "flip": False,
            "labels_from_subfolders": True}},
        "2": {"class_type": "AtelierTrainDiffusion", "inputs": {
            "dataset": ["1", 0], "name": "host_run", "steps": 2, "model_size": "tiny", "schedule": "cosine",
            "prediction": "epsilon", "batch_size": 4, "learning_rate": 0.001, "warmup": 0, "ema": 0.9, "seed": 3,
            "save_every": 0, "preview_every": 0, "continue": True}},
        "3": {"class_type": "AtelierDiffusionSample", "inputs": {
            "model": ["2", 0], "seed": 0, "batch_size": 2, "width": 0, "height": 0, "steps": 4, "sampler": "ddim",
            "spacing": "trailing", "eta": 0.0, "class_label": 1, "guidance": 1.0, "clip": "auto"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "trained"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["2", 2], "filename_prefix": "loss"}},
    }


def _step(path) -> int:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["atelier_train_state"])["step"]


def test_train_then_sample_in_one_prompt_and_continue(server):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for i in range(3):
            server.put_input(f"train_host/{label}/{i}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    offset = server.log_size()  # (core's own optional nodes may log import tracebacks at start-up)
    entry = server.run(_prompt())
    images = dict(server.image_arrays(entry))
    assert images["4:0"].shape == (8, 8, 3) and images["5:0"].shape == (360, 640, 3)
    report = entry["outputs"]["2"]["text"][0]
    assert "step 2" in report and "6 images" in entry["outputs"]["1"]["text"][0]
    state = server.models_root / "diffusion_models" / "host_run.train-state"
    assert (server.models_root / "diffusion_models" / "host_run.safetensors").is_file() and _step(state) == 2
    listed = server.get_json("/object_info/AtelierLoadDiffusionModel")
    choices = listed["AtelierLoadDiffusionModel"]["input"]["required"]["model_name"][0]
    assert "diffusion_models/host_run.safetensors" in choices

    again = server.run(_prompt())  # the same prompt: the trainer runs again (dataset cached) and continues
    assert _step(state) == 4 and "continued" in again["outputs"]["2"]["text"][0]
    assert "Traceback" not in server.log_since(offset)
