"""A real ComfyUI server for the host tests (issues 2 and 3), started once per session.

Where ComfyUI is: `$ATELIER_COMFYUI` (its source directory, holding main.py). Its interpreter:
`$ATELIER_COMFYUI_PYTHON`, else `$ATELIER_COMFYUI/.venv/bin/python`, else this interpreter. Without them every
host test skips with the reason (CI has no ComfyUI).

The server runs `main.py --cpu` on 127.0.0.1 and a free port, with everything it writes under a temp dir:
  <tmp>/extra_model_paths.yaml    custom_nodes + model folders of the "atelier_test" section
  <tmp>/custom_nodes/atelier-nodes-test -> the repository (a hyphenated name: ComfyUI imports the folder by path)
  <tmp>/models/<folder>/...       copies of ../shared/weights files (the same root feeds the headless runner)
  <tmp>/input, output, temp, user  --input-directory, --output-directory, --temp-directory, --user-directory
and its log in <tmp>/comfyui.log. The process is killed at the end of the session.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "atelier-nodes-test"  # hyphenated on purpose: not an importable module name
START_TIMEOUT_S = 120.0
PROMPT_TIMEOUT_S = 300.0

# Weights placed in each model folder, relative to ../shared/weights. ComfyUI's folder_paths names.
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "upscale_models": (
        "realesr-animevideov3/realesr-animevideov3.pth",
        "craft/craft_x4.pth",
        "dctlsa/DCTLSA_X2.pt",
        "dctlsa/DCTLSA_X3.pt",
        "dctlsa/DCTLSA_X4.pt",
        "dncnn/dncnn_25.pth",
    ),
    "vae_approx": (
        "taef2/taef2_encoder.pth",
        "taef2/taef2_decoder.pth",
        "taef2/taesana_encoder.pth",
    ),
    "vae": (
        "taef2/taef2_encoder.pth",
        "taef2/taef2_decoder.pth",
        "mnist/vae_fc.pth",
    ),
    "gans": ("mnist/gan_mlp_G.ckpt",),
    "inpaint": (),
    "checkpoints": (),
    "diffusion_models": (),
    "diffusers": (),  # a tiny random UNet2DModel folder is written there (helpers_diffusion.write_tiny_folder)
    "style": tuple(f"microast/{part}_iter_160000.pth.tar"  # MicroAST: the four parts side by side
                   for part in ("content_encoder", "style_encoder", "modulator", "decoder")),
    "feature_extractors": ("mnist/lenet_classifier.pth",),
}
# Real weights shipped inside registry packages (installed --no-deps by .ci/setup; read as files, never imported),
# under the names .ci/models gives them: (folder, package, file inside the package, name in the folder).
REGISTRY_FILES = (
    ("gans", "gan_face_generate", "weights.tar", "dcgan_faces_64.tar"),
    ("gans", "omniart_eye_generator", "generator_model_state.pth", "dcgan_eyes_128.pth"),
    ("gans", "vintagify", "resources/G_A2B_epoch33.pth", "cyclegan_vintage.pth"),
)


# --------------------------------------------------------------------------------------------- locating ComfyUI
def comfyui_location() -> tuple[pathlib.Path, str] | str:
    """(ComfyUI dir, its python) or the reason why the host tests cannot run."""
    root = os.environ.get("ATELIER_COMFYUI")
    if not root:
        return "ATELIER_COMFYUI is not set (path of a ComfyUI source tree); host tests need a real ComfyUI"
    comfy = pathlib.Path(root).expanduser().resolve()
    if not (comfy / "main.py").is_file():
        return f"ATELIER_COMFYUI={root}: no main.py there"
    py = os.environ.get("ATELIER_COMFYUI_PYTHON")
    if py:
        if not os.access(py, os.X_OK):
            return f"ATELIER_COMFYUI_PYTHON={py} is not an executable"
    else:
        venv_py = comfy / ".venv" / "bin" / "python"
        py = str(venv_py) if venv_py.exists() else sys.executable
    return comfy, py


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy(src: pathlib.Path, dst: pathlib.Path) -> None:
    # A copy, not a symlink: the pack's ModelManager.resolve refuses links that point outside their model folder.
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        shutil.copy2(src, dst)


def _package_dir(name: str) -> pathlib.Path | None:
    """Folder of an installed top-level package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    return pathlib.Path(locs[0]) if locs else None


def populate_models(models_root: pathlib.Path, weights: pathlib.Path) -> None:
    """Copies the shared weights (and registry-package weights, where installed) into `models_root/<folder>/`
    (~150 MB; missing files are left out, not an error: workflows needing them then fail to validate on ComfyUI)."""
    for folder, files in MODEL_FOLDERS.items():
        (models_root / folder).mkdir(parents=True, exist_ok=True)
        for rel in files:
            src = weights / rel
            if src.is_file():
                _copy(src, models_root / folder / src.name)
    for folder, package, rel, name in REGISTRY_FILES:
        pkg = _package_dir(package)
        if pkg is not None and (pkg / rel).is_file():
            _copy(pkg / rel, models_root / folder / name)
    import helpers_diffusion  # tests/ is on pytest's pythonpath

    helpers_diffusion.write_tiny_folder(models_root / "diffusers")  # what workflows/diffusion_*.json load


def _id_key(node_id: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(node_id)))


# --------------------------------------------------------------------------------------------- the server
class ComfyServer:
    """A running ComfyUI: HTTP helpers and its log."""

    def __init__(self, comfy_dir: pathlib.Path, python: str, base: pathlib.Path, shared: pathlib.Path):
        self.comfy_dir = comfy_dir
        self.python = python
        self.base = base
        self.shared = shared
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.models_root = base / "models"
        self.custom_nodes = base / "custom_nodes"
        self.pack_dir = self.custom_nodes / PACK_LINK_NAME
        self.input_dir = base / "input"
        self.output_dir = base / "output"
        self.temp_parent = base / "tempdir"  # ComfyUI uses <this>/temp and deletes it at start
        self.user_dir = base / "user"
        self.log_path = base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # ---- setup
    def prepare(self) -> None:
        for d in (self.custom_nodes, self.input_dir, self.output_dir, self.temp_parent, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.pack_dir.symlink_to(REPO, target_is_directory=True)
        populate_models(self.models_root, self.shared / "weights")
        # is_default: these folders come first, so a trainer node writes its model here, never into the ComfyUI tree
        lines = ["atelier_test:", f"  base_path: {self.base}", "  is_default: true", "  custom_nodes: custom_nodes"]
        lines += [f"  {folder}: models/{folder}" for folder in MODEL_FOLDERS]
        (self.base / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [
            self.python, "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
            "--extra-model-paths-config", str(self.base / "extra_model_paths.yaml"),
            "--output-directory", str(self.output_dir),
            "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_parent),
            "--user-directory", str(self.user_dir),
            "--database-url", "sqlite:///:memory:",
            # DEBUG adds the "Unloading <Class>" lines of comfy.model_management.free_memory (test_memory)
            "--verbose", "DEBUG",
        ]

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PYTHONUNBUFFERED"] = "1"
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(), cwd=self.comfy_dir, env=env,
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} at start-up:\n{self.log_tail()}")
            try:
                self.object_info = self.get_json("/object_info", timeout=30)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer /object_info within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only what this fixture started
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()

    # ---- log
    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ---- HTTP
    def _request(self, path: str, data: bytes | None = None, timeout: float = 30) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str, timeout: float = 30) -> Any:
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, body: Any, timeout: float = 30) -> bytes:
        try:
            return self._request(path, json.dumps(body).encode(), timeout=timeout)
        except urllib.error.HTTPError as e:  # /prompt answers 400 with the validation errors as JSON
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:4000]}") from e

    def queue(self, prompt: dict, ui: dict | None = None) -> str:
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if ui is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": ui}}
        return json.loads(self.post_json("/prompt", body))["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        """The /history entry of a finished prompt; fails on an execution error or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise AssertionError(f"prompt {prompt_id} failed: {json.dumps(msgs, indent=1)[:6000]}")
                return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} not done within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, ui: dict | None = None, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        return self.wait(self.queue(prompt, ui), timeout)

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
        return self._request(f"/view?{q}", timeout=60)

    @staticmethod
    def images(entry: dict) -> list[tuple[str, int, dict]]:
        """(node id, index, image record) of every image a /history entry lists, ordered by node id."""
        out = []
        for node_id, node_out in sorted(entry.get("outputs", {}).items(), key=lambda kv: _id_key(kv[0])):
            for i, img in enumerate(node_out.get("images", [])):
                out.append((node_id, i, img))
        return out

    def image_arrays(self, entry: dict) -> list[tuple[str, np.ndarray]]:
        """("<node id>:<index>", uint8 [H,W,C] pixels) of every image of a /history entry, fetched through /view."""
        out = []
        for node_id, i, rec in self.images(entry):
            with Image.open(io.BytesIO(self.view(rec))) as im:
                out.append((f"{node_id}:{i}", np.asarray(im.convert("RGBA" if "A" in im.getbands() else "RGB"))))
        return out

    def put_input(self, name: str, src: pathlib.Path | np.ndarray) -> pathlib.Path:
        """Place an input file (a copy of `src`, or a uint8 [H,W,C] array saved as PNG) in the input directory."""
        dst = self.input_dir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, pathlib.Path):
            shutil.copyfile(src, dst)
        else:
            Image.fromarray(src).save(dst)
        return dst

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free and wait until the prompt worker has acted on it.

        /free only sets flags; the worker reads them after its next queue wake-up or prompt, so a prompt queued right
        after could run first. Two tiny prompts in a row are a barrier: the flags are read at the latest after the
        first one, before the second one starts."""
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})
        self.settle()

    def settle(self) -> None:
        """Run two trivial prompts (LoadImage -> PreviewImage) so that pending /free flags have been handled."""
        if not (self.input_dir / "settle.png").exists():
            self.put_input("settle.png", np.zeros((8, 8, 3), np.uint8))
        barrier = {"1": {"class_type": "LoadImage", "inputs": {"image": "settle.png"}},
                   "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        for _ in range(2):
            self.run(barrier, timeout=60)


@pytest.fixture(scope="session")
def comfy(request, tmp_path_factory) -> ComfyServer:
    """A ComfyUI server with this pack loaded from a hyphenated custom_nodes folder (skips without ComfyUI)."""
    loc = comfyui_location()
    if isinstance(loc, str):
        pytest.skip(loc)
    comfy_dir, python = loc
    shared_dir = request.getfixturevalue("shared_dir")
    base = tmp_path_factory.mktemp("comfyui")
    server = ComfyServer(comfy_dir, python, base, shared_dir)
    server.prepare()
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def pack_manager(comfy):
    """This process's atelier manager over the server's models root, on the CPU like the --cpu server."""
    import torch

    from atelier.models import manager as m

    fresh = m.ModelManager(str(comfy.models_root), device=torch.device("cpu"), offload_device=torch.device("cpu"))
    m.set_manager(fresh)
    yield fresh
    m.set_manager(None)
