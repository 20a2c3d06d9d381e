"""Safe readers for model files. Nothing in a model file is ever run.

- `.safetensors`/`.sft`: safetensors (tensors and string metadata only).
- `.pt/.pth/.ckpt/.bin/.tar`: `torch.load(weights_only=True)`, torch's own allow-listing unpickler.
- TorchScript archives (`torch.jit.save`, e.g. LaMa's `big-lama.pt`): their weights only, through our allow-listing
  reader (`models/torchscript_weights.py`); the archive's code is never compiled or run (TorchScript's own loader is never called).
- `.pkl` (NVIDIA StyleGAN snapshots): our allow-listing unpickler (`models/nvlabs_pkl.py`), which records the
  constructor kwargs and tensors without importing or calling anything outside its list.

`read_state_dict(path)` returns `(state_dict, meta)`: a flat `{name: tensor}` dict, canonicalised (`params_ema`
preferred over `params`, `state_dict`/`module.` unwrapped), and a dict of facts beside it (safetensors metadata,
pickled constructor kwargs, tensors that sat next to the weights such as `latent_avg`).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
import uuid
from typing import Any, Callable

import torch

from .errors import ModelLoadError, UnsafeFileError

log = logging.getLogger(__name__)

SAFETENSORS_EXT = (".safetensors", ".sft")
TORCH_EXT = (".pt", ".pth", ".ckpt", ".bin", ".tar")
PICKLE_EXT = (".pkl",)
MODEL_EXTENSIONS = SAFETENSORS_EXT + TORCH_EXT + PICKLE_EXT

# Wrappers seen around state dicts, in order of preference (EMA weights first).
_WRAPPER_KEYS = ("params_ema", "params", "g_ema", "state_dict", "model_state_dict", "netG_state_dict", "model", "net")
# Plain, data-only classes that checkpoints carry beside their tensors (argparse args in rosinality files).
_EXTRA_SAFE_GLOBALS: list[Any] = []


def _safe_globals() -> list[Any]:
    if not _EXTRA_SAFE_GLOBALS:
        import argparse

        _EXTRA_SAFE_GLOBALS.append(argparse.Namespace)
    return _EXTRA_SAFE_GLOBALS


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model file safely and canonicalise it. Raises UnsafeFileError or ModelLoadError, naming the file."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file {name!r}: not found at {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in MODEL_EXTENSIONS:
        raise ModelLoadError(f"model file {name!r}: unsupported extension {ext!r}; expected one of {MODEL_EXTENSIONS}")
    try:
        if ext in SAFETENSORS_EXT:
            obj, meta = _read_safetensors(path)
        elif ext in TORCH_EXT and _is_torchscript(path):
            from .torchscript_weights import read_torchscript  # weights only: the archive's code is never run

            obj, meta = read_torchscript(path)
        elif ext in TORCH_EXT:
            obj, meta = _read_torch(path), {}
        else:
            from .nvlabs_pkl import read_nvlabs_pkl  # the only pickle format we read ourselves

            obj, meta = read_nvlabs_pkl(path)
    except UnsafeFileError:
        raise
    except Exception as e:  # noqa: BLE001  a damaged file can fail anywhere in an unpickler: name the file
        text = _text_head(path)
        if text is not None:
            raise ModelLoadError(f"model file {name!r} is a text file, not a model (it starts with {text!r}); "
                                 "a download page or a note saved under a model's name?") from None
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"model file {name!r}: corrupted or not a model file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    sd, extra = canonicalise(obj, name)
    meta = {**extra, **diffusers_folder_meta(path), **meta}
    return sd, meta


def diffusers_folder_meta(path: str) -> dict[str, Any]:
    """For a diffusers weights file (`diffusion_pytorch_model.safetensors`/`.bin`): `config.json` beside it as
    meta["config"], and `../scheduler/scheduler_config.json` (or `scheduler_config.json` beside it) as
    meta["scheduler_config"]. Other files: nothing. JSON only; a file that is not a JSON object is an error."""
    folder, name = os.path.split(os.path.abspath(path))
    if not name.startswith("diffusion_pytorch_model"):
        return {}
    out: dict[str, Any] = {}
    cands = {"config": [os.path.join(folder, "config.json")],
             "scheduler_config": [os.path.join(os.path.dirname(folder), "scheduler", "scheduler_config.json"),
                                  os.path.join(folder, "scheduler_config.json")]}
    for key, paths in cands.items():
        found = next((p for p in paths if os.path.isfile(p)), None)
        if found is None:
            continue
        try:
            with open(found, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"model file {name!r}: {os.path.basename(found)} beside it is not readable JSON ({e})") from e
        if not isinstance(value, dict):
            raise ModelLoadError(f"model file {name!r}: {os.path.basename(found)} is not a JSON object")
        out[key] = value
        out[f"{key}_source"] = found
    return out


def _text_head(path: str, n: int = 512) -> str | None:
    """The first line of `path` when its first `n` bytes are printable UTF-8 text (no model format is), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(n)
    except OSError:
        return None
    txt = head.decode("utf-8", errors="ignore")
    if not txt.strip() or len(txt.encode()) < len(head) - 3 or not all(c.isprintable() or c in "\r\n\t" for c in txt):
        return None
    return txt.strip().splitlines()[0][:60]


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
        sd = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"model file {name!r}: not a readable safetensors file ({e})") from e
    for key in ("config", "init_kwargs", "scheduler_config"):  # configs we write into metadata are JSON
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except (TypeError, ValueError):
                pass
    return sd, meta


def _is_torchscript(path: str) -> bool:
    """A torch.jit.save archive (it carries code, so TorchScript's loader never sees it; models/torchscript_weights.py reads it)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _read_torch(path: str) -> Any:
    name = os.path.basename(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "GLOBAL " in msg or "Unsupported global" in msg:
            culprit = _first_unsafe_global(msg)
            raise UnsafeFileError(
                f"model file {name!r} refused: its pickle asks to import or call {culprit}, which is not a "
                "tensor or plain data. Nothing in it was run."
            ) from None
        detail = next((ln.strip() for ln in msg.splitlines()[1:] if ln.strip() and "WeightsUnpickler" not in ln), "")
        raise ModelLoadError(f"model file {name!r}: corrupted or truncated, or not a model file ({detail or 'unreadable pickle'})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError) as e:
        raise ModelLoadError(f"model file {name!r}: could not be read, truncated or corrupted? ({str(e).splitlines()[0]})") from e


def _first_unsafe_global(msg: str) -> str:
    """Pull the offending global's name out of torch's weights_only message."""
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in msg:
            tail = msg.split(marker, 1)[1]
            return tail.split()[0].rstrip(".,:")
    return "something outside the allow-list"


def canonicalise(obj: Any, name: str = "model") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unwrap training wrappers and strip `module.`; tensors beside the weights go into the meta dict."""
    extra: dict[str, Any] = {}
    for _ in range(3):  # wrappers can nest (e.g. {"state_dict": {"params_ema": ...}})
        if not isinstance(obj, dict):
            break
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict) and _has_tensors(obj[k])), None)
        if inner is None:
            break
        extra.update({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
        for k, v in obj.items():
            if k != inner and isinstance(v, dict) and _has_tensors(v):
                extra.setdefault("siblings", {})[k] = v  # e.g. rosinality's "g"/"d" beside "g_ema"
        obj = obj[inner]
    if not isinstance(obj, dict) or not _has_tensors(obj, 0):
        kind = type(obj).__name__
        raise ModelLoadError(f"model file {name!r}: expected a state dict of tensors, got a {kind}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    non_tensor = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if non_tensor:
        extra.setdefault("non_tensor_entries", {}).update(non_tensor)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd, extra


def _has_tensors(d: dict, depth: int = 2) -> bool:
    """Tensors directly in `d`, or in dicts nested up to `depth` levels inside it."""
    return any(isinstance(v, torch.Tensor) or (depth > 0 and isinstance(v, dict) and _has_tensors(v, depth - 1))
               for v in d.values())


def key_prefixes(sd: dict, depth: int = 2, limit: int = 12) -> list[str]:
    """The distinct first `depth` dotted components of the keys, for 'unknown model' messages."""
    seen: list[str] = []
    for k in sd:
        p = ".".join(k.split(".")[:depth])
        if p not in seen:
            seen.append(p)
        if len(seen) >= limit:
            break
    return seen


def owned_float32(sd: dict[str, torch.Tensor], channels_last: bool = False) -> dict[str, torch.Tensor]:
    """float32 copies of `sd`'s tensors that share no memory with the file they were read from; 4-D ones
    channels-last when asked. A safetensors file is read by mapping it, and the whole mapping (with every page read
    so far counted in the process's memory) stays while any tensor still points into it: a model that copies only
    some of its weights, e.g. the 4-D ones to channels-last, would hold those twice (an ADM UNet: 1.2x the peak of
    guided-diffusion's own code, bench/diffusion.py)."""
    return {k: v.to(torch.float32, copy=True, memory_format=torch.channels_last if channels_last and v.ndim == 4
                    else torch.contiguous_format) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """write(tmp) into a temporary file beside `path`, then rename it over `path`: a failed or interrupted write
    never leaves a damaged file at `path`, and the temporary file is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Save tensors (moved to the CPU, contiguous) and string metadata as `.safetensors` through `atomic_write`."""
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata))
