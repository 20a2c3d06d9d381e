"""The one place that talks to ComfyUI. Every other module asks here; nothing else imports `comfy`.

Inside ComfyUI (its `comfy.model_management` is already imported by the time custom nodes load) this module hands
our models to ComfyUI's memory manager as `ModelPatcher`s, uses its devices, progress bars, interruption and folder
lists. Outside ComfyUI every function has a plain-torch fallback, so the engine runs and is tested without it.
"""
from __future__ import annotations

import logging
import os
import sys
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

# The pack's own model folders (ComfyUI has the others already).
PACK_FOLDERS = ("gans", "inpaint")
MODEL_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar"}


def _mm() -> ModuleType | None:
    """comfy.model_management when running inside ComfyUI (already imported by the host), else None."""
    return sys.modules.get("comfy.model_management")


def available() -> bool:
    return _mm() is not None


def _folder_paths() -> ModuleType | None:
    return sys.modules.get("folder_paths") if available() else None


# ---------------------------------------------------------------- folders


def register_folders() -> None:
    """Register the pack's model folders with folder_paths (merging into any that extra_model_paths.yaml made)."""
    fp = _folder_paths()
    if fp is None:
        return
    for name in PACK_FOLDERS:
        default = os.path.join(fp.models_dir, name)
        if name in fp.folder_names_and_paths:
            paths, exts = fp.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            if isinstance(exts, set) and exts:
                exts.update(MODEL_EXTENSIONS)
        else:
            fp.folder_names_and_paths[name] = ([default], set(MODEL_EXTENSIONS))


def folder_files(folder: str) -> list[str] | None:
    """Names ComfyUI lists for a model folder, or None outside ComfyUI / for a folder it does not know."""
    fp = _folder_paths()
    if fp is None or folder not in fp.folder_names_and_paths:
        return None
    return list(fp.get_filename_list(folder))


def folder_dirs(folder: str) -> list[str] | None:
    """The directories ComfyUI searches for a model folder, or None outside ComfyUI."""
    fp = _folder_paths()
    if fp is None or folder not in fp.folder_names_and_paths:
        return None
    return list(fp.get_folder_paths(folder))


def io_directory(kind: str) -> str | None:
    """ComfyUI's input/output/temp directory, or None outside ComfyUI."""
    fp = _folder_paths()
    if fp is None:
        return None
    return {"input": fp.get_input_directory, "output": fp.get_output_directory, "temp": fp.get_temp_directory}[kind]()


# ---------------------------------------------------------------- devices and memory


def compute_device() -> torch.device:
    mm = _mm()
    if mm is not None:
        return mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    mm = _mm()
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device` (RAM available on the CPU)."""
    mm = _mm()
    if mm is not None:
        return int(mm.get_free_memory(device))
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error on any device."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache() -> None:
    mm = _mm()
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- ComfyUI's memory manager


def make_patcher(module: torch.nn.Module, load_device: torch.device, offload: torch.device) -> Any:
    """Wrap a module so ComfyUI's manager sees it, or None outside ComfyUI."""
    if not available():
        return None
    import comfy.model_patcher  # noqa: PLC0415 (inside ComfyUI only)

    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload)


def load_patchers(patchers: list[Any], memory_required: int) -> None:
    """Ask ComfyUI to place our models on their load device, evicting others (and ours) as it sees fit."""
    mm = _mm()
    # Plain torch.nn layers cannot be partially loaded: full load (HOST.md).
    mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)


def unload_patcher(patcher: Any) -> None:
    """Remove one of ours from ComfyUI's loaded list and move it to its offload device."""
    mm = _mm()
    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is patcher:
            mm.current_loaded_models.pop(i).model_unload()
            break
    else:
        patcher.detach()


def is_loaded(patcher: Any) -> bool:
    mm = _mm()
    return any(loaded.model is patcher for loaded in mm.current_loaded_models)


# ---------------------------------------------------------------- progress and interruption


def progress_bar(total: int) -> Any:
    """ComfyUI's ProgressBar (websocket progress + interruption hook), or None outside ComfyUI."""
    if not available():
        return None
    import comfy.utils  # noqa: PLC0415

    return comfy.utils.ProgressBar(total)


def preview_payload(image: torch.Tensor | None, max_size: int = 512) -> Any:
    """A node preview for ProgressBar.update_absolute from [H,W,3] in 0..1 (ComfyUI's ("JPEG", PIL image, size)),
    or None."""
    if image is None:
        return None
    from PIL import Image  # noqa: PLC0415

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return ("JPEG", Image.fromarray(arr), max_size)


def throw_if_interrupted() -> None:
    mm = _mm()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------- the diffusion bridge (core MODEL over our denoisers)


class _BridgedNet(torch.nn.Module):
    """Our diffusion network with the call core's BaseModel makes: (x, t, context=..., control=..., ...) ->
    the prediction channels only (a learned variance is dropped: core samplers do not use it)."""

    def __init__(self, net: torch.nn.Module, channels: int, class_label: int | None) -> None:
        super().__init__()
        self.net = net
        self.channels = channels
        self.class_label = class_label

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Any = None, control: Any = None,
                transformer_options: Any = None, **kwargs: Any) -> torch.Tensor:
        labels = None
        if self.class_label is not None:
            labels = torch.full((x.shape[0],), self.class_label, dtype=torch.long, device=x.device)
        return self.net(x, t.float(), labels)[:, : self.channels]


def bridge_diffusion_model(desc: Any, sigmas: torch.Tensor, class_label: int | None = None) -> Any:
    """A core MODEL (ModelPatcher over a BaseModel) that runs our diffusion network: the latent space is the model's
    own space (pixels in -1..1 or its latents, scale 1), `model_sampling` is discrete with our training sigmas
    [T] (so core's timestep mapping sees the exact schedule), the prediction type maps to EPS / V_PREDICTION / X0.
    Core samplers never clip x0. Only inside ComfyUI."""
    if not available():
        raise RuntimeError("the diffusion bridge needs ComfyUI (its MODEL type exists only there)")
    import comfy.latent_formats as lf  # noqa: PLC0415
    import comfy.model_base as mb  # noqa: PLC0415
    import comfy.model_patcher as mp  # noqa: PLC0415
    import comfy.model_sampling as ms  # noqa: PLC0415
    import comfy.supported_models_base as smb  # noqa: PLC0415

    facts = desc.extra
    c = int(facts.in_channels)

    class PixelFormat(lf.LatentFormat):
        latent_channels = c
        latent_rgb_factors = [[1.0 if i == j else 0.0 for j in range(3)] for i in range(c)] if c == 3 else None

    class Config(smb.BASE):
        unet_config = {"disable_unet_model_creation": True, "in_channels": c}
        latent_format = PixelFormat
        sampling_settings = {"timesteps": int(facts.schedule.num_train_timesteps)}
        memory_usage_factor = float(desc.bytes_per_pixel or 1024.0) / (4 * 0.01 * 1024 * 1024)
        supported_inference_dtypes = [torch.float32]

    config = Config(Config.unet_config)
    base = mb.BaseModel(config, model_type=mb.ModelType.EPS, device=None)
    base.diffusion_model = _BridgedNet(desc.model, c, class_label)
    kind = {"epsilon": ms.EPS, "v_prediction": ms.V_PREDICTION, "sample": ms.X0}[facts.schedule.prediction_type]

    class Sampling(ms.ModelSamplingDiscrete, kind):
        pass

    base.model_sampling = Sampling(config)
    base.model_sampling.set_sigmas(sigmas.float())
    mm = _mm()
    return mp.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
