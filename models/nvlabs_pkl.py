"""Safe reader for NVIDIA StyleGAN2-ADA / StyleGAN3 network pickles (`network-snapshot-*.pkl`), and a converter to
safetensors so that a user converts once.

NVIDIA's own loader runs Python source shipped inside the file (`module_src`, exec'd by
`torch_utils.persistence._reconstruct_persistent_obj`) and nested unrestricted unpickles of every tensor blob
(`torch.storage._load_from_bytes`). This reader never does either. Its Unpickler's `find_class` answers only the
exact (module, name) pairs below, each with an inert stand-in written here, and raises `UnsafeFileError` naming any
other global before anything of it is imported or called:

    torch_utils.persistence._reconstruct_persistent_obj -> a record (class name, state, source fingerprint)
    torch.storage._load_from_bytes                      -> our parser of the legacy torch.save blob (a second
                                                           restricted Unpickler: torch.<X>Storage names only)
    torch._utils._rebuild_tensor_v2 / _rebuild_parameter(_with_state) -> bounds-checked as_strided views
    collections.OrderedDict                             -> dict;    builtins.set / __builtin__.set -> set
    dnnlib.util.EasyDict                                -> a dict subclass (no other dnnlib name)
    numpy.dtype, numpy[._]core.multiarray.scalar/_reconstruct, numpy.ndarray, numpy[._]core.numeric._frombuffer
                                                        -> decoders of plain numeric data (object dtype refused)
    _codecs.encode                                      -> latin-1 str -> bytes only (protocol 2)

The outer stream has no persistent ids (a PERSID opcode is refused). See
`shared/golden/stylegan/NVLABS_PKL_FORMAT.md` for the format.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import struct
from typing import Any, Callable

import numpy as np
import torch

from .errors import InputError, ModelLoadError, UnsafeFileError

log = logging.getLogger(__name__)

PERSISTENCE_VERSION = 6
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# numpy dtype codes we decode (no object, no structured, no strings).
_NP_CODES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1", "c8", "c16"}


class _Refuse:
    """Base of the stand-ins: the stream may not set attributes or state on them (BUILD is refused)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeFileError(f"pickle tried to set state on {type(self).__name__}; refused")

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafeFileError(f"pickle tried to set attribute {key!r} on {type(self).__name__}; refused")


class _Stub(_Refuse):
    """A callable stand-in for an allowed global."""

    __slots__ = ("_fn", "_label")

    def __init__(self, fn: Callable[..., Any], label: str) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_label", label)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<stand-in for {self._label}>"


class Record:
    """What an NVIDIA persistent object becomes here: its class name, its `__dict__` state and a source fingerprint."""

    __slots__ = ("class_name", "state", "module_src_sha256")

    def __init__(self, class_name: str, state: dict, module_src_sha256: str) -> None:
        self.class_name, self.state, self.module_src_sha256 = class_name, state, module_src_sha256

    def __setstate__(self, state: Any) -> None:
        raise UnsafeFileError("pickle tried to set state on a network record; refused")

    def __repr__(self) -> str:
        return f"Record({self.class_name})"


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict: a plain dict (no attribute access, no state)."""

    __slots__ = ()


class _NDArrayType(_Refuse):
    __slots__ = ()


_NDARRAY = _NDArrayType()


class _NpDtype(_Refuse):
    """numpy.dtype('f8'|'b1'|'i8'|..., False, True) followed by BUILD (3, byteorder, ...)."""

    __slots__ = ("code", "order")

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(code, str) or code not in _NP_CODES:
            raise UnsafeFileError(f"numpy dtype {code!r} in the pickle is not a plain numeric type; refused")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "order", "=")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise ModelLoadError(f"unexpected numpy dtype state {state!r}")
        if any(s is not None for s in state[2:5]):  # subarray / names / fields: structured dtypes
            raise UnsafeFileError("structured numpy dtype in the pickle; refused")
        object.__setattr__(self, "order", state[1])

    def np(self) -> np.dtype:
        return np.dtype(("" if self.order in ("|", "=") else self.order) + self.code)


class _NpArray(_Refuse):
    """numpy _reconstruct(ndarray, (0,), b'b') followed by BUILD (version, shape, dtype, fortran, raw bytes)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        object.__setattr__(self, "value", None)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise ModelLoadError("unexpected numpy array state in the pickle")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _NpDtype) or not isinstance(raw, (bytes, bytearray)):
            raise UnsafeFileError("numpy array in the pickle holds non-numeric data; refused")
        if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ModelLoadError(f"bad numpy array shape {shape!r} in the pickle")
        arr = np.frombuffer(bytes(raw), dtype=dtype.np())
        if arr.size != int(np.prod(shape)):
            raise ModelLoadError("numpy array in the pickle has the wrong number of elements")
        object.__setattr__(self, "value", arr.reshape(shape, order="F" if fortran else "C").tolist())


def _np_scalar(dtype: Any, raw: Any = None) -> Any:
    if not isinstance(dtype, _NpDtype) or not isinstance(raw, (bytes, bytearray)):
        raise UnsafeFileError("numpy scalar in the pickle is not plain numeric data; refused")
    arr = np.frombuffer(bytes(raw), dtype=dtype.np())
    if arr.size != 1:
        raise ModelLoadError("numpy scalar in the pickle has the wrong size")
    return arr[0].item()


def _np_reconstruct(cls: Any, shape: Any = None, dtype_code: Any = None) -> _NpArray:
    if cls is not _NDARRAY:
        raise UnsafeFileError("numpy _reconstruct in the pickle builds something other than an ndarray; refused")
    return _NpArray()


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> list:
    if not isinstance(dtype, _NpDtype):
        raise UnsafeFileError("numpy buffer in the pickle has a non-numeric dtype; refused")
    raw = bytes(buf.raw() if isinstance(buf, pickle.PickleBuffer) else buf)
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ModelLoadError(f"bad numpy array shape {shape!r} in the pickle")
    return np.frombuffer(raw, dtype=dtype.np()).reshape(shape, order="F" if order == "F" else "C").tolist()


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(obj, str) or encoding != "latin1":
        raise UnsafeFileError("_codecs.encode in the pickle is used for something other than latin-1 bytes; refused")
    return obj.encode("latin1")


def _reconstruct_persistent_obj(meta: Any) -> Record:
    """NVIDIA's persistent object, recorded; its module_src is fingerprinted, never run."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise ModelLoadError("pickle: a persistent object without type 'class'")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise ModelLoadError(f"pickle: persistence version {meta.get('version')!r}, expected {PERSISTENCE_VERSION}")
    name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src", "")
    if not isinstance(name, str) or not isinstance(state, dict):
        raise ModelLoadError("pickle: a persistent object without class_name or state")
    sha = hashlib.sha256(src.encode("utf-8", "replace")).hexdigest() if isinstance(src, str) else ""
    return Record(name, state, sha)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """A bounds-checked view of a decoded storage (torch._utils._rebuild_tensor_v2 without its side doors)."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise UnsafeFileError("pickle: a tensor whose storage was not decoded by the safe reader; refused")
    ok = isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
    ok = ok and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
    if not ok:
        raise ModelLoadError(f"pickle: bad tensor view offset={offset!r} size={size!r} stride={stride!r}")
    if all(size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= storage.numel():
            raise ModelLoadError(f"pickle: tensor view {size} past the end of its storage ({storage.numel()})")
    if not storage.numel():
        return torch.empty(size, dtype=storage.dtype)
    view = torch.as_strided(storage, size, stride, offset)
    n = 1
    for s in size:
        n *= s
    return view if offset == 0 and n == storage.numel() and view.is_contiguous() else view.clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafeFileError("pickle: a parameter whose data is not a decoded tensor; refused")
    return data


# ----------------------------------------------------------------------------------------------------------------
# the storage blob: torch.save(storage, _use_new_zipfile_serialization=False)


class _StorageType(_Refuse):
    __slots__ = ("dtype", "label")

    def __init__(self, dtype: torch.dtype, label: str) -> None:
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "label", label)


class _BlobUnpickler(pickle.Unpickler):
    """Only torch.<X>Storage names; the persistent id must be ('storage', type, key, location, numel, None)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name], name)
        raise UnsafeFileError(f"pickle refused: a tensor blob asks for the global {module}.{name}; nothing of it ran")

    def persistent_load(self, pid: Any) -> Any:
        if (not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage" or not isinstance(pid[1], _StorageType)
                or not isinstance(pid[2], str) or not isinstance(pid[4], int) or pid[5] is not None):
            raise ModelLoadError(f"pickle: unexpected storage id {pid!r:.120} in a tensor blob")
        return pid


def _load_from_bytes(blob: Any) -> torch.Tensor:
    """Decode one legacy torch.save storage blob into a 1-D tensor, without torch.load."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafeFileError("pickle: storage blob is not bytes; refused")
    f = io.BytesIO(blob)
    up = _BlobUnpickler(f)
    if up.load() != _LEGACY_MAGIC or up.load() != 1001:
        raise ModelLoadError("pickle: tensor blob is not a legacy torch.save stream")
    info = up.load()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise ModelLoadError("pickle: tensor blob is not little-endian")
    pid = up.load()
    keys = up.load()
    if not isinstance(pid, tuple) or not isinstance(keys, list) or keys != [pid[2]]:
        raise ModelLoadError("pickle: tensor blob holds something other than one storage")
    dtype, numel = pid[1].dtype, pid[4]
    (count,) = struct.unpack("<q", f.read(8))
    if count < 0:
        raise ModelLoadError("pickle: tensor blob has a negative element count")
    nbytes = count * dtype.itemsize
    data = f.read(nbytes)
    if count != numel or len(data) != nbytes:
        raise ModelLoadError("pickle: tensor blob is truncated")
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# the outer stream

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Stub(_reconstruct_persistent_obj, "persistence"),
    ("torch.storage", "_load_from_bytes"): _Stub(_load_from_bytes, "torch.storage._load_from_bytes"),
    ("torch._utils", "_rebuild_tensor_v2"): _Stub(_rebuild_tensor, "torch._utils._rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"): _Stub(_rebuild_parameter, "torch._utils._rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"): _Stub(_rebuild_parameter, "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"): dict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("numpy", "dtype"): _Stub(_NpDtype, "numpy.dtype"),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy.core.multiarray", "scalar"): _Stub(_np_scalar, "numpy scalar"),
    ("numpy._core.multiarray", "scalar"): _Stub(_np_scalar, "numpy scalar"),
    ("numpy.core.multiarray", "_reconstruct"): _Stub(_np_reconstruct, "numpy _reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _Stub(_np_reconstruct, "numpy _reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): _Stub(_np_frombuffer, "numpy _frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): _Stub(_np_frombuffer, "numpy _frombuffer"),
    ("_codecs", "encode"): _Stub(_codecs_encode, "_codecs.encode"),
}


class NVLabsUnpickler(pickle.Unpickler):
    """The allow-listing Unpickler of NVIDIA network pickles (see the module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        stand_in = _ALLOWED.get((module, name))
        if stand_in is None:
            hint = ""
            if module.startswith("dnnlib.tflib"):
                hint = " (a TensorFlow-era StyleGAN pickle: convert it with NVIDIA's legacy.py in a sandbox first)"
            raise UnsafeFileError(
                f"pickle refused: it asks to import or call the global {module}.{name}, which is outside the allow-list "
                f"of NVIDIA network pickles{hint}; nothing of it was imported or run")
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError("pickle refused: a persistent id in the outer stream (NVIDIA pickles have none)")


def _plain(obj: Any) -> Any:
    """Records' plain attributes -> JSON-able Python (EasyDict -> dict, tuples -> lists, sets -> sorted lists)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_plain(v) for v in obj)
    if isinstance(obj, _NpArray):
        return obj.value
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def state_dict_of(rec: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """Walk a record tree like torch's state_dict(): parameters, persistent non-None buffers, sub-modules."""
    st = rec.state
    out: dict[str, torch.Tensor] = {}
    skip = st.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        entries = st.get(group) or {}
        if not isinstance(entries, dict):
            raise ModelLoadError(f"pickle: {prefix or 'root'}.{group} is not a dict")
        for name, t in entries.items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise ModelLoadError(f"pickle: {prefix}{name} is not a tensor")
            out[prefix + name] = t
    for name, sub in (st.get("_modules") or {}).items():
        if sub is None:
            continue
        if not isinstance(sub, Record):
            raise ModelLoadError(f"pickle: sub-module {prefix}{name} is not a network object")
        out.update(state_dict_of(sub, f"{prefix}{name}."))
    return out


def _kind(rec: Record) -> str:
    syn = (rec.state.get("_modules") or {}).get("synthesis")
    mods = syn.state.get("_modules") or {} if isinstance(syn, Record) else {}
    return "stylegan3" if "input" in mods else "stylegan2"


def read_nvlabs_pkl(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read G_ema (else G) of an NVIDIA network pickle: (state dict under NVIDIA's keys, meta).

    meta: class_name ('training.networks_stylegan{2,3}.Generator'), init_kwargs (the constructor kwargs, JSON-able),
    nvidia_repo ('stylegan3' | 'stylegan2-ada-pytorch'), network ('G_ema' | 'G'), module_src_sha256,
    training_set_kwargs when present. Raises UnsafeFileError naming any global outside the allow-list.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = NVLabsUnpickler(f).load()
    except UnsafeFileError as e:
        raise UnsafeFileError(f"model file {name!r}: {e}") from None
    except ModelLoadError as e:
        raise ModelLoadError(f"model file {name!r}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            struct.error, MemoryError) as e:
        raise ModelLoadError(f"model file {name!r}: not a readable NVIDIA network pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"model file {name!r}: expected NVIDIA's dict of networks (G, D, G_ema), "
                             f"got a {type(data).__name__}")
    key = "G_ema" if isinstance(data.get("G_ema"), Record) else "G" if isinstance(data.get("G"), Record) else None
    if key is None:
        raise ModelLoadError(f"model file {name!r}: no G_ema or G network in it (keys: {sorted(map(str, data))})")
    rec = data[key]
    if rec.class_name != "Generator":
        raise ModelLoadError(f"model file {name!r}: {key} is a {rec.class_name}, expected a Generator")
    sd = state_dict_of(rec)
    init_kwargs = _plain(rec.state.get("_init_kwargs") or {})
    kind = _kind(rec)
    meta: dict[str, Any] = {
        "class_name": f"training.networks_{kind}.Generator",
        "init_kwargs": init_kwargs,
        "nvidia_repo": "stylegan2-ada-pytorch" if "synthesis_kwargs" in init_kwargs else "stylegan3",
        "network": key,
        "module_src_sha256": rec.module_src_sha256,
    }
    if isinstance(data.get("training_set_kwargs"), dict):
        meta["training_set_kwargs"] = _plain(data["training_set_kwargs"])
    log.info("read %s from %s: %s, %d tensors", key, name, meta["class_name"], len(sd))
    return sd, meta


# ----------------------------------------------------------------------------------------------------------------
# export


def export_safetensors(desc_or_sd: Any, meta: dict[str, Any] | None, out_path: str | os.PathLike) -> str:
    """Write a generator as `.safetensors` with class_name / init_kwargs (JSON) in its metadata; never overwrites.

    desc_or_sd: a ModelDescriptor (its model's state dict and config) or a state dict plus the meta that
    `read_nvlabs_pkl` / `loading.read_state_dict` returned. Returns the path written.
    """
    from safetensors.torch import save_file

    from .descriptor import ModelDescriptor

    out_path = os.fspath(out_path)
    if os.path.exists(out_path):
        raise InputError(f"out_path: {out_path!r} already exists; refusing to overwrite it")
    if not out_path.endswith(".safetensors"):
        raise InputError(f"out_path: expected a name ending in .safetensors, got {os.path.basename(out_path)!r}")
    meta = dict(meta or {})
    if isinstance(desc_or_sd, ModelDescriptor):
        sd = desc_or_sd.model.state_dict()
        meta = {**{k: desc_or_sd.config[k] for k in ("class_name", "init_kwargs") if k in desc_or_sd.config}, **meta}
        meta.setdefault("source", os.path.basename(desc_or_sd.source))
    elif isinstance(desc_or_sd, dict):
        sd = desc_or_sd
    else:
        raise InputError(f"desc_or_sd: expected a ModelDescriptor or a state dict, got {type(desc_or_sd).__name__}")
    if "class_name" not in meta or not isinstance(meta.get("init_kwargs"), dict):
        raise InputError("meta: expected 'class_name' and an 'init_kwargs' dict (as read_nvlabs_pkl returns)")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    md = {"format": "pt", "class_name": str(meta["class_name"]), "init_kwargs": json.dumps(meta["init_kwargs"]),
          "converted_by": "atelier"}
    for k in ("source", "nvidia_repo", "network", "module_src_sha256"):
        if meta.get(k) is not None:
            md[k] = str(meta[k])
    tmp = f"{out_path}.partial-{os.getpid()}"
    save_file(tensors, tmp, metadata=md)
    try:
        os.link(tmp, out_path)  # fails if out_path appeared meanwhile: never overwrite
    except FileExistsError:
        raise InputError(f"out_path: {out_path!r} already exists; refusing to overwrite it") from None
    except OSError:
        if os.path.exists(out_path):
            raise InputError(f"out_path: {out_path!r} already exists; refusing to overwrite it") from None
        os.rename(tmp, out_path)
        return out_path
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path
