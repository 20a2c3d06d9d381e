"""Safe reader of the weights in a TorchScript archive (`torch.jit.save`, e.g. LaMa's `big-lama.pt`).

TorchScript's own loader (`torch.jit`) compiles and runs the TorchScript code stored in the archive (`code/`), and unpickles its
`data.pkl` with the full unpickler. This reader never does either. It reads the archive's zip entries as bytes; its
Unpickler's `find_class` answers only the names below, each with an inert stand-in written here, and raises
`UnsafeFileError` naming any other global before anything of it is imported or called:

    __torch__.<dotted path> <Class>          -> a plain record class (the module tree: its attributes only)
    torch._utils._rebuild_tensor_v2 / _rebuild_parameter  -> bounds-checked views of the storages in data/
    torch.<X>Storage                         -> a dtype tag for the persistent storage ids
    collections.OrderedDict                  -> dict
    torch.jit._pickle.restore_type_tag / build_intlist / build_floatlist / build_boollist / build_doublelist
    / build_tensorlist                       -> identity (typed list and dict attributes)

Which tensor attributes are parameters or buffers (what `state_dict()` returns) is read as text from the
`__parameters__ = [...]` and `__buffers__ = [...]` lines of each class in `code/` (never compiled or run); plain
tensor attributes outside those lists are left out. `constants.pkl` goes through the same unpickler (so a payload
there is refused too) and is otherwise ignored.
"""
from __future__ import annotations

import ast
import io
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Callable

import torch

from .errors import ModelLoadError, UnsafeFileError

log = logging.getLogger(__name__)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_JIT_PICKLE = {"restore_type_tag", "build_intlist", "build_floatlist", "build_boollist", "build_doublelist",
               "build_tensorlist"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_DEPTH = 64


def is_torchscript(path: str | os.PathLike) -> bool:
    """A zip archive written by torch.jit.save (it has `constants.pkl` or a `code/` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


class ScriptObject:
    """What a `__torch__.*` class becomes: its qualified name and its attribute dict, nothing callable."""

    __slots__ = ("qualname", "attrs")
    QUALNAME = ""

    def __init__(self) -> None:  # NEWOBJ calls __new__ only; attributes arrive through BUILD
        self.qualname = type(self).QUALNAME
        self.attrs: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafeFileError(f"TorchScript object {self.qualname}: state is not an attribute dict; refused")
        self.attrs = state

    def __reduce__(self):  # never pickled again
        raise TypeError("ScriptObject is not picklable")


def _script_class(qualname: str, cache: dict[str, type]) -> type:
    cls = cache.get(qualname)
    if cls is None:

        def _new(c: type, *args: Any, **kwargs: Any) -> ScriptObject:  # NEWOBJ / REDUCE: no arguments taken
            if args or kwargs:
                raise UnsafeFileError(f"TorchScript object {qualname}: constructor arguments; refused")
            obj = object.__new__(c)
            ScriptObject.__init__(obj)
            return obj

        cls = type("ScriptObject", (ScriptObject,), {"QUALNAME": qualname, "__slots__": (), "__new__": staticmethod(_new),
                                                     "__init__": lambda self, *a, **k: None})
        cache[qualname] = cls
    return cls


class _StorageTag:
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, meta])
    as a bounds-checked strided view of the flat storage tensor."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise UnsafeFileError("TorchScript archive: a tensor is rebuilt from something that is not a storage; refused")
    if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))):
        raise UnsafeFileError("TorchScript archive: a tensor with a non-integer size, stride or offset; refused")
    size, stride = tuple(size), tuple(stride)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else offset - 1
    if offset < 0 or len(size) != len(stride) or last >= storage.numel():
        raise ModelLoadError(f"TorchScript archive: tensor of size {size} at offset {offset} runs past its storage "
                             f"({storage.numel()} elements): truncated or corrupted")
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, *rest: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafeFileError("TorchScript archive: a parameter wraps something that is not a tensor; refused")
    return data


def _identity(x: Any, *rest: Any) -> Any:
    return x


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, read_storage: Callable[[str, torch.dtype, int], torch.Tensor], label: str) -> None:
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._label = label
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if (module == "__torch__" or module.startswith("__torch__.")) and _IDENT.match(name) and all(
                _IDENT.match(p) for p in module.split(".")):
            return _script_class(full, self._classes)
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageTag(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module == "torch.jit._pickle" and name in _JIT_PICKLE:
            return _identity
        raise UnsafeFileError(
            f"TorchScript archive {self._label!r} refused: its pickle asks for {full}, which is outside the "
            "allow-list (TorchScript module records, tensors, storages). Nothing in it was run."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageTag)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise UnsafeFileError(f"TorchScript archive {self._label!r}: unexpected persistent id {pid!r:.80}; refused")
        return self._read_storage(pid[2], pid[1].dtype, pid[4])


def _ordered_dict(*args: Any) -> dict:
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
        raise UnsafeFileError("TorchScript archive: OrderedDict built from unexpected arguments; refused")
    return dict(*args)


def read_torchscript(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The parameters and buffers of a TorchScript archive as a flat state dict (the keys `module.state_dict()`
    would have), and facts beside it (`format`, the root class). Raises UnsafeFileError / ModelLoadError."""
    path = os.fspath(path)
    label = os.path.basename(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"model file {label!r}: not a readable TorchScript archive ({e})") from e
    with z:
        names = z.namelist()
        data_pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if data_pkl is None:
            raise ModelLoadError(f"model file {label!r}: a zip archive without data.pkl; not a TorchScript file")
        prefix = data_pkl[: -len("data.pkl")]
        root = _unpickle(z.read(data_pkl), _storage_reader(z, f"{prefix}data/", label), label)
        if f"{prefix}constants.pkl" in names:  # the same checks; its contents (code constants) are not needed
            _unpickle(z.read(f"{prefix}constants.pkl"), _storage_reader(z, f"{prefix}constants/", label), label)
        declared = _declarations(z, prefix, names)
    if not isinstance(root, ScriptObject):
        raise ModelLoadError(f"model file {label!r}: data.pkl holds a {type(root).__name__}, not a module")
    sd: dict[str, torch.Tensor] = {}
    _flatten(root, "", declared, sd, 0)
    if not sd:
        raise ModelLoadError(f"model file {label!r}: the TorchScript module has no parameters or buffers")
    return {k: v.clone() for k, v in sd.items()}, {"format": "torchscript", "root_class": root.qualname}


def _storage_reader(z: zipfile.ZipFile, folder: str, label: str) -> Callable[[str, torch.dtype, int], torch.Tensor]:
    """Storages named by the persistent ids of one pickle: flat tensors read from `folder/<key>`, bounds-checked."""
    cache: dict[str, torch.Tensor] = {}

    def read(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if not _IDENT.match("k" + key.replace(".", "_")):
            raise UnsafeFileError(f"TorchScript archive {label!r}: odd storage key {key!r}; refused")
        if key not in cache:
            entry = folder + key
            try:
                raw = z.read(entry)
            except KeyError:
                raise ModelLoadError(f"model file {label!r}: storage {entry} is missing (truncated?)") from None
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if len(raw) < nbytes or numel < 0:
                raise ModelLoadError(f"model file {label!r}: storage {entry} holds {len(raw)} bytes, {nbytes} "
                                     "expected (truncated?)")
            cache[key] = torch.frombuffer(bytearray(raw[:nbytes]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return cache[key]

    return read


def _unpickle(data: bytes, read_storage: Callable, label: str) -> Any:
    try:
        return _Unpickler(data, read_storage, label).load()
    except (UnsafeFileError, ModelLoadError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ModelLoadError(f"model file {label!r}: unreadable TorchScript pickle ({type(e).__name__}: {e})") from e


def _declarations(z: zipfile.ZipFile, prefix: str, names: list[str]) -> dict[str, set[str]]:
    """{qualified class name: names of its parameters and buffers}, read as text from code/**/*.py."""
    out: dict[str, set[str]] = {}
    code = f"{prefix}code/"
    for n in names:
        if not (n.startswith(code) and n.endswith(".py")):
            continue
        module = n[len(code) : -3].replace("/", ".")
        current = None
        for line in z.read(n).decode("utf-8", "replace").splitlines():
            m = re.match(r"^class (\w+)\(", line)
            if m:
                current = f"{module}.{m.group(1)}"
                out.setdefault(current, set())
                continue
            m = re.match(r"^\s+__(parameters|buffers)__ = (\[.*\])\s*$", line)
            if m and current is not None:
                try:
                    listed = ast.literal_eval(m.group(2))  # a literal list of strings: parsed, never evaluated
                except (ValueError, SyntaxError):
                    continue
                out[current].update(s for s in listed if isinstance(s, str))
    return out


def _flatten(obj: ScriptObject, prefix: str, declared: dict[str, set[str]], sd: dict, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ModelLoadError("TorchScript archive: module tree deeper than 64 levels")
    allowed = declared.get(obj.qualname)
    for k, v in obj.attrs.items():
        if isinstance(v, torch.Tensor):
            if allowed is None or k in allowed:
                sd[prefix + k] = v
        elif isinstance(v, ScriptObject):
            _flatten(v, f"{prefix}{k}.", declared, sd, depth + 1)
