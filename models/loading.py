"""Safe readers for model files. Nothing in a model file is ever run.

- `.safetensors`/`.sft`: safetensors (tensors and string metadata only).
- `.pt/.pth/.ckpt/.bin/.tar`: `torch.load(weights_only=True)`, torch's own allow-listing unpickler.
- TorchScript archives (`torch.jit.save`, e.g. LaMa's `big-lama.pt`): their weights only, through our allow-listing
  reader (`models/torchscript_weights.py`); the archive's code is never compiled or run (no `torch.jit.load`).
- `.pkl` (NVIDIA StyleGAN snapshots): our allow-listing unpickler (`models/gan/nvlabs_pkl.py`), which records the
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
from typing import Any

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
    if ext in SAFETENSORS_EXT:
        obj, meta = _read_safetensors(path)
    elif ext in TORCH_EXT and _is_torchscript(path):
        from .torchscript_weights import read_torchscript  # weights only: the archive's code is never run

        obj, meta = read_torchscript(path)
    elif ext in TORCH_EXT:
        obj, meta = _read_torch(path), {}
    elif ext in PICKLE_EXT:
        from .gan.nvlabs_pkl import read_nvlabs_pkl  # the only pickle format we read ourselves

        obj, meta = read_nvlabs_pkl(path)
    else:
        raise ModelLoadError(f"model file {name!r}: unsupported extension {ext!r}; expected one of {MODEL_EXTENSIONS}")
    sd, extra = canonicalise(obj, name)
    meta = {**extra, **meta}
    return sd, meta


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
    for key in ("config", "init_kwargs"):  # configs we write into metadata are JSON
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except (TypeError, ValueError):
                pass
    return sd, meta


def _is_torchscript(path: str) -> bool:
    """A torch.jit.save archive (it carries code: never torch.jit.load'ed; models/torchscript_weights.py reads it)."""
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
