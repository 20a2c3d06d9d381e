"""The one shared model manager: resolve a name to a file, load it safely, detect it, cache it, place it.

    desc = get_manager().load("4x_foo.pth", "upscale_models", family="upscale")
    out = get_manager().run(desc, lambda model: model(x.to(*placement(model))))

Inside ComfyUI every model is wrapped in a ModelPatcher and placed through `load_models_gpu` (see host.py), so
ComfyUI's own memory manager evicts ours when it needs room and "Unload models" frees them. Outside ComfyUI the
manager keeps models on the offload device and moves them to the compute device while used, within a budget,
least recently used evicted first.

The RAM cache follows ComfyUI's decisions. Inside ComfyUI the manager holds a model strongly only while it sits in
ComfyUI's loaded list: a freshly read model is held weakly until a run hands it to `load_models_gpu`, and when
ComfyUI unloads it (making room, or `unload_all_models` from "Unload models" / `POST /free`) the patcher's ON_DETACH
callback tells the manager, which goes back to a weak reference. A weakly held model stays in RAM exactly as long as
something else holds it (a node output kept by ComfyUI's execution cache, as core's own models are kept) and is
reused, not read again, while it does; once nothing does (`/free` with `free_memory` clears that cache), it is
garbage-collected and a later run reads the file again. Chosen over checking `current_loaded_models` at our next call
(which frees nothing until then) and over a ModelPatcher subclass: the callback is ComfyUI's own per-patcher hook, so
nothing of ComfyUI is patched.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import budget, host, registry
from .budget import placement  # noqa: F401 (re-exported: families import it from here)
from .descriptor import ModelDescriptor
from .errors import ModelPathError, WrongFamilyError
from .loading import MODEL_EXTENSIONS, read_state_dict

log = logging.getLogger(__name__)

FOLDERS = ("upscale_models", "vae", "vae_approx", "checkpoints", "diffusion_models", "diffusers", "gans", "inpaint",
           "style", "feature_extractors")
ENV_MODELS = "ATELIER_MODELS"


@dataclass
class _Entry:
    path: str
    dtype: torch.dtype
    desc: ModelDescriptor
    patcher: Any = None  # ComfyUI ModelPatcher, inside ComfyUI
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def on_device(self) -> bool:
        return placement(self.desc.model)[0].type != "cpu"


class ModelManager:
    """Process-wide model cache and placement. Tests make fresh ones; nodes use `get_manager()`."""

    def __init__(
        self,
        models_root: str | None = None,
        *,
        device: torch.device | None = None,
        offload_device: torch.device | None = None,
        budget_bytes: int | None = None,
        ram_cache_bytes: int = 8 << 30,
    ) -> None:
        self.models_root = os.path.abspath(models_root or os.environ.get(ENV_MODELS) or "user_models")
        self._device = device
        self._offload = offload_device
        self.budget_bytes = budget_bytes  # device memory our models may occupy (outside ComfyUI); None: free memory
        self.ram_cache_bytes = ram_cache_bytes  # weights kept in RAM between runs
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # LRU order: oldest first
        # entries ComfyUI unloaded: key -> (weak descriptor, dtype); alive while something else holds the model
        self._released: dict[tuple, tuple[weakref.ref, torch.dtype]] = {}
        self._own_unloads = 0  # >0 while the manager itself unloads a patcher (not ComfyUI's decision)
        self._lock = threading.RLock()

    # ------------------------------------------------------------ devices

    @property
    def compute_device(self) -> torch.device:
        if self._device is None:
            self._device = host.compute_device()
        return self._device

    @property
    def offload_device(self) -> torch.device:
        if self._offload is None:
            self._offload = host.offload_device() if self._device is None else torch.device("cpu")
        return self._offload

    def dtype_for(self, desc: ModelDescriptor) -> torch.dtype:
        """The dtype a model runs in on the compute device (models/budget.py decides)."""
        return budget.dtype_for(desc, self.compute_device)

    # ------------------------------------------------------------ names and files

    def folder_dirs(self, folder: str) -> list[str]:
        dirs = host.folder_dirs(folder)
        if dirs is not None:
            return dirs
        shipped = host.pretrained_dir(folder)  # the pack's own trained models, after the user's folder
        return [os.path.join(self.models_root, folder)] + ([shipped] if shipped else [])

    def list_models(self, folder: str) -> list[str]:
        """Model file names (relative to their folder) a loader node offers."""
        names = host.folder_files(folder)
        if names is None:
            names = []
            for d in self.folder_dirs(folder):
                for base, _dirs, files in os.walk(d, followlinks=True):
                    rel = os.path.relpath(base, d)
                    names += [os.path.normpath(os.path.join(rel, f)) for f in files]
        dirs = [os.path.realpath(d) for d in self.folder_dirs(folder)]
        return sorted(n for n in set(names)
                      if os.path.splitext(n)[1].lower() in MODEL_EXTENSIONS and self._inside(n, dirs))

    @staticmethod
    def _inside(name: str, real_dirs: list[str]) -> bool:
        """The file `name` exists in one of the folders and does not link outside it (what resolve accepts)."""
        for d in real_dirs:
            real = os.path.realpath(os.path.join(d, name))
            if os.path.isfile(real):
                return os.path.commonpath([d, real]) == d
        return False

    def resolve(self, folder: str, name: str) -> str:
        """A model name -> its file. Names that escape their folder (.., absolute, outward links) are refused."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ModelPathError(f"{folder}: expected a model file name, got {name!r}")
        norm = os.path.normpath(name.replace("\\", "/"))
        if os.path.isabs(name) or os.path.isabs(norm) or norm.split(os.sep)[0] == ".." or ":" in norm.split(os.sep)[0]:
            raise ModelPathError(f"{folder}: model name {name!r} escapes the {folder!r} folder; give a name inside it")
        for d in self.folder_dirs(folder):
            cand = os.path.join(d, norm)
            if not os.path.isfile(cand):
                continue
            real_dir, real = os.path.realpath(d), os.path.realpath(cand)
            if os.path.commonpath([real_dir, real]) != real_dir:
                raise ModelPathError(
                    f"{folder}: {name!r} is a link pointing outside the {folder!r} folder ({real}); refused. "
                    f"Copy the file into the folder, or add its folder to extra_model_paths.yaml / link the whole folder"
                )
            return real
        have = self.list_models(folder)
        hint = f"; available: {', '.join(have[:8])}" + (" ..." if len(have) > 8 else "") if have else " (folder is empty)"
        raise ModelPathError(f"{folder}: no model named {name!r} in {self.folder_dirs(folder)}{hint}")

    # ------------------------------------------------------------ loading and cache

    def load(
        self,
        name: str,
        folder: str | None = None,
        *,
        family: str | tuple[str, ...] | None = None,
        dtype: torch.dtype | None = None,
    ) -> ModelDescriptor:
        """Load (or return cached) a model. `folder=None`: `name` is a file path."""
        path = self.resolve(folder, name) if folder else os.path.realpath(name)
        if not os.path.isfile(path):
            raise ModelPathError(f"model file {name!r} not found")
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns, str(dtype) if dtype else "auto")
        with self._lock:
            entry = self._entries.get(key)
            desc = entry.desc if entry is not None else self._released_desc(key)
            if entry is not None:
                self._entries.move_to_end(key)
            elif desc is None:
                self._drop_stale(path, key)
                desc, dtype_used = self._read(path, dtype)
                if host.available():  # held strongly only once handed to ComfyUI's loaded list (_acquire)
                    self._released[key] = (weakref.ref(desc), dtype_used)
                else:
                    self._entries[key] = _Entry(path, dtype_used, desc)
                    self._trim_ram()
        _check_family(desc, family, name)
        return desc

    def _read(self, path: str, dtype: torch.dtype | None) -> tuple[ModelDescriptor, torch.dtype]:
        t0 = time.perf_counter()
        sd, meta = read_state_dict(path)
        desc = registry.detect(sd, meta, source=path)
        del sd
        dtype = dtype or self.dtype_for(desc)
        desc.model.to(device=self.offload_device, dtype=dtype)
        log.info("loaded %s (%s %s, %s) in %.2fs", os.path.basename(path), desc.family, desc.architecture,
                 str(dtype).replace("torch.", ""), time.perf_counter() - t0)
        return desc, dtype

    def _patcher(self, key: tuple, model: torch.nn.Module) -> Any:
        """A ComfyUI patcher (None outside ComfyUI) that tells this manager when ComfyUI unloads it."""
        ref = weakref.ref(self)  # the patcher must hold neither the manager nor the entry

        def on_detach() -> None:
            manager = ref()
            if manager is not None:
                manager._host_released(key)

        return host.make_patcher(model, self.compute_device, self.offload_device, on_detach)

    def _host_released(self, key: tuple) -> None:
        """ComfyUI unloaded the model of `key`: hold it weakly from now on (see the module docstring)."""
        with self._lock:
            entry = self._entries.get(key)
            if self._own_unloads or entry is None or entry.in_use > 0:
                return
            del self._entries[key]
            self._released[key] = (weakref.ref(entry.desc), entry.dtype)
            weakref.finalize(entry.desc.model, _return_heap_later).atexit = False  # nothing to hand back at exit
            log.info("%s unloaded by ComfyUI: kept only while a node output holds it",
                     os.path.basename(entry.path) or entry.desc.architecture)

    def _released_desc(self, key: tuple) -> ModelDescriptor | None:
        for k in [k for k, (r, _) in self._released.items() if r() is None]:
            del self._released[k]
        return self._released[key][0]() if key in self._released else None

    def _revive(self, key: tuple) -> _Entry | None:
        """The released entry of `key` back in the cache when its model is still alive, else None."""
        ref, dtype = self._released.pop(key, (None, None))
        desc = ref() if ref is not None else None
        if desc is None:
            return None
        entry = _Entry(key[0] if key[0] != "adopted" else desc.source, dtype, desc, self._patcher(key, desc.model))
        self._entries[key] = entry
        return entry

    def released(self) -> list[ModelDescriptor]:
        """Models ComfyUI unloaded that something else still holds (they are reused, not read again, if asked)."""
        return [d for d in (r() for r, _ in self._released.values()) if d is not None]

    def _drop_stale(self, path: str, key: tuple) -> None:
        """A changed file (other size or mtime) reloads: forget what was read from its old version."""
        for k in [k for k in self._entries if k[0] == path and k[1:3] != key[1:3]]:
            self._forget(k)
        for k in [k for k in self._released if k[0] == path and k[1:3] != key[1:3]]:
            del self._released[k]

    def _trim_ram(self) -> None:
        total = sum(e.desc.weight_bytes for e in self._entries.values())
        for k in list(self._entries):
            if total <= self.ram_cache_bytes or len(self._entries) <= 1:
                break
            e = self._entries[k]
            if e.in_use == 0:
                total -= e.desc.weight_bytes
                self._forget(k)

    def _forget(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        if entry.patcher is not None:
            self._unload_patcher(entry.patcher)

    def _unload_patcher(self, patcher: Any) -> None:
        """Our own unload (not ComfyUI's decision): the ON_DETACH callback it triggers is ignored."""
        with self._lock:
            self._own_unloads += 1
            try:
                host.unload_patcher(patcher)
            finally:
                self._own_unloads -= 1

    def adopt(self, desc: ModelDescriptor) -> ModelDescriptor:
        """Register a model built elsewhere (e.g. core's UPSCALE_MODEL) so it is placed and evicted like ours."""
        with self._lock:
            if self._entry(desc) is None:
                dtype = placement(desc.model)[1]
                key = ("adopted", id(desc.model), 0, str(dtype))
                self._entries[key] = _Entry(desc.source, dtype, desc, self._patcher(key, desc.model))
                self._trim_ram()
        return desc

    def _entry(self, desc: ModelDescriptor) -> _Entry | None:
        """The cache entry of `desc`'s model (revived if ComfyUI had unloaded it while a node output held it)."""
        with self._lock:
            found = next((e for e in self._entries.values() if e.desc.model is desc.model), None)
            if found is None:
                key = next((k for k, (r, _) in self._released.items()
                            if (d := r()) is not None and d.model is desc.model), None)
                found = self._revive(key) if key is not None else None
            return found

    def cached(self) -> list[ModelDescriptor]:
        return [e.desc for e in self._entries.values()]

    # ------------------------------------------------------------ placement

    @contextmanager
    def use(self, desc: ModelDescriptor, memory_required: int | None = None) -> Iterator[torch.nn.Module]:
        """The module on the compute device for the duration of the block (it stays there, evictable, after)."""
        entry = self._acquire(desc, memory_required)
        try:
            yield desc.model
        finally:
            self._release(entry)

    def _acquire(self, desc: ModelDescriptor, memory_required: int | None) -> _Entry:
        entry = self._entry(desc) or self._entry(self.adopt(desc))
        need = memory_required if memory_required is not None else desc.memory_estimate(dtype=entry.dtype)
        with self._lock:
            entry.in_use += 1
            try:
                if entry.patcher is not None:
                    host.load_patchers([entry.patcher], need)
                else:
                    self._place(entry)
            except BaseException:
                entry.in_use -= 1
                raise
        return entry

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.in_use -= 1
            entry.last_used = time.monotonic()

    def _place(self, entry: _Entry) -> None:
        dev = self.compute_device
        if placement(entry.desc.model)[0] == dev:
            return
        if dev.type != "cpu":
            room = self.budget_bytes if self.budget_bytes is not None else host.free_bytes(dev) + self._resident_bytes()
            resident = sorted((e for e in self._entries.values() if e.on_device and e is not entry), key=lambda e: e.last_used)
            used = sum(e.desc.weight_bytes for e in resident)
            for e in resident:  # least recently used first
                if used + entry.desc.weight_bytes <= room:
                    break
                if e.in_use == 0:
                    e.desc.model.to(self.offload_device)
                    used -= e.desc.weight_bytes
            host.empty_cache()
        entry.desc.model.to(dev)

    def _resident_bytes(self) -> int:
        return sum(e.desc.weight_bytes for e in self._entries.values() if e.on_device)

    def run(self, desc: ModelDescriptor, fn: Callable[[torch.nn.Module], Any], memory_required: int | None = None) -> Any:
        """`fn(model)` on the compute device; a half-precision result with NaN/Inf is recomputed in fp32."""
        entry = self._acquire(desc, memory_required)  # use() inlined: this runs once per node call
        try:
            out = fn(desc.model)
        finally:
            self._release(entry)
        dtype = placement(desc.model)[1]
        if dtype != torch.float32 and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
            log.warning("%s: %s output had NaN/Inf; recomputing in float32", os.path.basename(desc.source),
                        str(dtype).replace("torch.", ""))
            desc32 = self.load(desc.source, dtype=torch.float32) if os.path.isfile(desc.source) else desc
            if desc32 is desc:
                desc.model.float()
            with self.use(desc32, memory_required) as model:
                out = fn(model)
        return out

    def activation_budget(self, desc: ModelDescriptor) -> int:
        """Bytes free for activations on the compute device, after the weights (models/budget.py decides)."""
        return budget.activation_budget(desc, self.compute_device, self.budget_bytes)

    def unload(self, desc: ModelDescriptor | None = None, *, forget: bool = False) -> None:
        """Move one model (or all) off the compute device; `forget=True` also drops it from the RAM cache."""
        with self._lock:
            for key, e in list(self._entries.items()):
                if desc is not None and e.desc.model is not desc.model:
                    continue
                if e.patcher is not None:
                    self._unload_patcher(e.patcher)
                elif e.in_use == 0:
                    e.desc.model.to(self.offload_device)
                if forget and e.in_use == 0:
                    self._entries.pop(key)
            if forget:
                self._released.clear()
            host.empty_cache()


def _return_heap_later(delay_s: float = 1.0) -> None:
    """Once a released model is collected, hand the freed heap back to the system (glibc keeps freed blocks of the
    many mid-sized weight tensors in its arenas: measured, a 307 MB ESRGAN left RSS 312 MB up until `malloc_trim`).
    Deferred: the weakref callback runs before the module's tensors are actually freed."""
    timer = threading.Timer(delay_s, budget.release_cpu_heap)
    timer.daemon = True
    timer.start()


def _check_family(desc: ModelDescriptor, family: str | tuple[str, ...] | None, name: str) -> None:
    if family is None:
        return
    wanted = (family,) if isinstance(family, str) else tuple(family)
    if desc.family not in wanted:
        raise WrongFamilyError(
            f"model {os.path.basename(name)!r} is a {desc.family} model ({desc.architecture}"
            f"{', ' + desc.purpose if desc.purpose else ''}); this node needs a {' or '.join(wanted)} model"
        )


def inspect_file(path: str) -> ModelDescriptor:
    """Read and detect a file without caching or placing it (for `atelier models inspect`)."""
    sd, meta = read_state_dict(path)
    return registry.detect(sd, meta, source=os.path.abspath(path))


_MANAGER: ModelManager | None = None


def get_manager() -> ModelManager:
    """The process-wide manager, created on first use (never at import)."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = ModelManager()
    return _MANAGER


def set_manager(manager: ModelManager | None) -> None:
    """Replace the process-wide manager (tests, the CLI's --models)."""
    global _MANAGER
    _MANAGER = manager
