"""The one place that talks to ComfyUI. Every other module asks here; nothing else imports `comfy`.

Inside ComfyUI (its `comfy.model_management` is already imported by the time custom nodes load) this module hands
our models to ComfyUI's memory manager as `ModelPatcher`s, uses its devices, progress bars, interruption and folder
lists. Outside ComfyUI every function has a plain-torch fallback, so the engine runs and is tested without it.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from types import ModuleType
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# The pack's own model folders (ComfyUI has the others already).
PACK_FOLDERS = ("gans", "inpaint", "style", "feature_extractors")


def _mm() -> ModuleType | None:
    """comfy.model_management when running inside ComfyUI (already imported by the host), else None."""
    return sys.modules.get("comfy.model_management")


def available() -> bool:
    return _mm() is not None


def _folder_paths() -> ModuleType | None:
    return sys.modules.get("folder_paths") if available() else None


# ---------------------------------------------------------------- folders


# The pack's own trained models ship in pretrained/<folder>/ beside this package; loaders list them out of the box.
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained")


def pretrained_dir(folder: str) -> str | None:
    """The pack's shipped models for a model folder (pretrained/<folder>), or None when it ships none there."""
    d = os.path.join(PRETRAINED_DIR, folder)
    return d if os.path.isdir(d) else None


def register_folders(extensions: tuple[str, ...]) -> None:
    """Register the pack's model folders with folder_paths (merging into any that extra_model_paths.yaml made), and
    the shipped models (pretrained/<folder>) as the last place of their folder, after the user's own."""
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
                exts.update(extensions)
        else:
            fp.folder_names_and_paths[name] = ([default], set(extensions))
    for name in os.listdir(PRETRAINED_DIR) if os.path.isdir(PRETRAINED_DIR) else ():
        d = pretrained_dir(name)
        if d is not None and name in fp.folder_names_and_paths and d not in fp.folder_names_and_paths[name][0]:
            fp.folder_names_and_paths[name][0].append(d)


# The example workflows' inputs (images, and folders of images for the dataset nodes) ship in workflows/input/.
EXAMPLE_INPUTS_DIR = os.path.join(os.path.dirname(PRETRAINED_DIR), "workflows", "input")


def example_input(name: str) -> str | None:
    """The pack's example input of that relative name (a file or a folder under workflows/input/), or None: where a
    node looks a plain name up when the input folder lacks it (the headless runner's input folder is the
    workflow's)."""
    path = os.path.normpath(os.path.join(EXAMPLE_INPUTS_DIR, name))
    inside = path.startswith(os.path.join(EXAMPLE_INPUTS_DIR, ""))
    return path if inside and os.path.exists(path) else None


def _copy_entry(src: str, dst: str) -> None:
    """One example input into the input folder: a file through a temporary name; a folder (a dataset of images in
    class sub-folders) copied whole under a temporary name, then renamed, so a half-copied folder never shows."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    if os.path.isdir(src):
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def provide_example_inputs(src_dir: str) -> list[str]:
    """Copy the pack's example inputs (`src_dir`, e.g. workflows/input/) into ComfyUI's input folder so that the
    example workflows' Load Image nodes find the images, and their Image Folder Dataset nodes the folders (copied
    with their sub-folders), as every file a user uploads is found. Only top-level names not there yet are written
    (a user's file or folder is never overwritten or merged into, nothing is deleted), each through a temporary
    name, and what was copied is logged. Outside ComfyUI, or with ATELIER_NO_EXAMPLE_INPUTS=1, nothing. Returns
    the names copied."""
    fp = _folder_paths()
    if fp is None or os.environ.get("ATELIER_NO_EXAMPLE_INPUTS", "") not in ("", "0") or not os.path.isdir(src_dir):
        return []
    dst_dir = fp.get_input_directory()
    copied = []
    for name in sorted(os.listdir(src_dir)):
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if not (os.path.isfile(src) or os.path.isdir(src)) or os.path.islink(src) or os.path.lexists(dst):
            continue
        try:
            os.makedirs(dst_dir, exist_ok=True)
            _copy_entry(src, dst)
            copied.append(name)
        except OSError as e:
            log.warning("Atelier: could not copy the example input %s into %s (%s); the example workflows that "
                        "load it will ask for an image", name, dst_dir, e)
    if copied:
        log.info("Atelier: added the example input image(s) %s to %s for the pack's example workflows "
                 "(existing files are never replaced; set ATELIER_NO_EXAMPLE_INPUTS=1 to skip)", ", ".join(copied), dst_dir)
    return copied


def folder_files(folder: str) -> list[str] | None:
    """Names ComfyUI lists for a model folder, or None outside ComfyUI, for a folder it does not know, or for one it
    lists folders of (`diffusers`: extension "folder"), whose model files the manager finds itself."""
    fp = _folder_paths()
    if fp is None or folder not in fp.folder_names_and_paths:
        return None
    if "folder" in fp.folder_names_and_paths[folder][1]:
        return None
    return list(fp.get_filename_list(folder))


def folder_dirs(folder: str) -> list[str] | None:
    """The directories ComfyUI searches for a model folder, or None outside ComfyUI."""
    fp = _folder_paths()
    if fp is None or folder not in fp.folder_names_and_paths:
        return None
    return list(fp.get_folder_paths(folder))


def input_dir() -> str | None:
    """ComfyUI's input folder (where uploads land), or None outside ComfyUI."""
    fp = _folder_paths()
    return fp.get_input_directory() if fp is not None else None


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


def make_patcher(
    module: torch.nn.Module,
    load_device: torch.device,
    offload: torch.device,
    on_detach: Callable[[], None] | None = None,
) -> Any:
    """Wrap a module so ComfyUI's manager sees it, or None outside ComfyUI.

    `on_detach` is called whenever ComfyUI unloads the patcher (its memory manager making room, `unload_all_models`
    from the "Unload models" button / `POST /free`): ComfyUI's own per-patcher ON_DETACH callback, so nothing of
    ComfyUI is patched. The callback must not hold the module (it lives as long as the patcher).
    """
    if not available():
        return None
    import comfy.model_patcher  # noqa: PLC0415 (inside ComfyUI only)

    patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload)
    if on_detach is not None:
        try:
            from comfy.patcher_extension import CallbacksMP  # noqa: PLC0415

            patcher.add_callback(CallbacksMP.ON_DETACH, lambda _patcher, _unpatch_all: on_detach())
        except (ImportError, AttributeError):  # a ComfyUI older than the patcher callbacks: the cache keeps it
            log.debug("this ComfyUI has no ModelPatcher ON_DETACH callback; unloads are not followed")
    return patcher


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


# ---------------------------------------------------------------- progress and interruption


def progress_bar(total: int) -> Any:
    """ComfyUI's ProgressBar (websocket progress + interruption hook), or None outside ComfyUI."""
    if not available():
        return None
    import comfy.utils  # noqa: PLC0415

    return comfy.utils.ProgressBar(total)


def progress_text(text: str) -> None:
    """Show `text` under the running node (ComfyUI's progress text); nothing outside ComfyUI or on a host without it."""
    if not available():
        return
    try:
        from comfy_execution.utils import get_executing_context  # noqa: PLC0415
        from server import PromptServer  # noqa: PLC0415

        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except (ImportError, AttributeError):  # an older host: the bar alone
        return


def preview_payload(image: torch.Tensor | None, max_size: int = 512) -> Any:
    """A node preview for ProgressBar.update_absolute from [H,W,3] in 0..1 (ComfyUI's ("JPEG", PIL image, size)),
    or None."""
    if image is None:
        return None
    from PIL import Image  # noqa: PLC0415

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return ("JPEG", Image.fromarray(arr), max_size)


# Outside ComfyUI: the one interruption flag (ComfyUI keeps its own). The CLI sets it on SIGINT/SIGTERM; tests set it to
# check that a loop stops at its next unit of work.
_INTERRUPT = threading.Event()


def request_interrupt() -> None:
    """Ask every running loop to stop at its next check (what ComfyUI's Cancel does inside ComfyUI)."""
    mm = _mm()
    if mm is not None:
        mm.interrupt_current_processing(True)
    else:
        _INTERRUPT.set()


def clear_interrupt() -> None:
    _INTERRUPT.clear()


def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException (inside ComfyUI) or `Interrupted` (outside) when asked to stop."""
    mm = _mm()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    elif _INTERRUPT.is_set():
        _INTERRUPT.clear()
        from .errors import Interrupted  # noqa: PLC0415

        raise Interrupted("interrupted")


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

