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
PACK_FOLDERS = ("gans", "inpaint", "style")
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


def throw_if_interrupted() -> None:
    mm = _mm()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
