"""Node interfaces as ComfyUI's ``GET /object_info`` renders them: the pack's own and the core nodes'.

The core interfaces come from ``../shared/data/comfyui-core-object_info.json`` (a snapshot of a ComfyUI with no
custom nodes); where that file is absent a small built-in subset (LoadImage, SaveImage, PreviewImage) keeps the CLI
usable. The pack's interfaces are rendered from ``atelier.nodes.NODE_CLASS_MAPPINGS`` in the same shape.

An interface is a dict with ``input`` ({"required"|"optional"|"hidden": {name: [TYPE, {options}]}}), ``input_order``,
``output`` (list of types), ``output_is_list``, ``output_name``, ``output_node``, ``name``, ``display_name``, ...
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE_SNAPSHOT = "data/comfyui-core-object_info.json"

# Value types the frontend draws as widgets (their values live in the UI node's widgets_values).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Socket types the frontend draws with a widget of its own (their value is stored in widgets_values too).
CUSTOM_WIDGET_TYPES = frozenset({"AUDIO_RECORD", "WEBCAM", "LOAD_3D", "LOAD_3D_ANIMATION"})
# Options of a file combo the frontend pairs with an upload button (files are uploaded, not listed).
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload", "file_upload")
# Those whose button is stored in widgets_values (value "image") after the required widgets.
MEDIA_UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
UPLOAD_BUTTON_VALUE = "image"
# Values of the "control after generate" widget the frontend stores after seed-like widgets.
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
SEED_NAMES = frozenset({"seed", "noise_seed"})

# Interfaces of the few core nodes the embedded runner provides, for users without ../shared (facts of ComfyUI's
# /object_info for these nodes, written out by hand).
BUILTIN_CORE: dict[str, dict[str, Any]] = {
    "LoadImage": {
        "input": {"required": {"image": [[], {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"], "output_is_list": [False, False], "output_name": ["IMAGE", "MASK"],
        "name": "LoadImage", "display_name": "Load Image", "description": "", "python_module": "nodes",
        "category": "image", "output_node": False,
    },
    "SaveImage": {
        "input": {
            "required": {
                "images": ["IMAGE", {"tooltip": "The images to save."}],
                "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."}],
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        },
        "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt", "extra_pnginfo"]},
        "output": [], "output_is_list": [], "output_name": [],
        "name": "SaveImage", "display_name": "Save Image",
        "description": "Saves the input images to your ComfyUI output directory.", "python_module": "nodes",
        "category": "image", "output_node": True,
    },
    "PreviewImage": {
        "input": {"required": {"images": ["IMAGE"]}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        "input_order": {"required": ["images"], "hidden": ["prompt", "extra_pnginfo"]},
        "output": [], "output_is_list": [], "output_name": [],
        "name": "PreviewImage", "display_name": "Preview Image",
        "description": "Saves the input images to your ComfyUI output directory.", "python_module": "nodes",
        "category": "image", "output_node": True,
    },
}


def shared_dir() -> pathlib.Path | None:
    """``$ATELIER_SHARED`` or ``../shared`` beside the repository root, if it exists."""
    env = os.environ.get("ATELIER_SHARED")
    for cand in ([pathlib.Path(env)] if env else []) + [REPO_ROOT.parent / "shared"]:
        if cand.is_dir():
            return cand
    return None


@functools.lru_cache(maxsize=4)
def _read_snapshot(path: str) -> dict[str, dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of node interfaces")
    return data


def core_interfaces(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """The core nodes' interfaces: the snapshot at `path` (default ``<shared>/data/...``), else the built-in subset."""
    if path is None:
        shared = shared_dir()
        cand = shared / CORE_SNAPSHOT if shared is not None else None
        if cand is None or not cand.is_file():
            log.info("core node snapshot not found; using the built-in LoadImage/SaveImage/PreviewImage subset")
            return dict(BUILTIN_CORE)
        path = cand
    return dict(_read_snapshot(str(path)))


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively, so a rendered interface has the shape of the JSON snapshot."""
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def node_info(name: str, cls: type, display_name: str | None = None) -> dict[str, Any]:
    """One node class rendered the way ComfyUI's /object_info renders a V1 node."""
    inputs = cls.INPUT_TYPES()
    returns = list(getattr(cls, "RETURN_TYPES", ()))
    info: dict[str, Any] = {
        "input": _plain(inputs),
        "input_order": {cat: list(v.keys()) for cat, v in inputs.items()},
        "output": _plain(returns),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(returns))),
        "output_name": list(getattr(cls, "RETURN_NAMES", returns)),
        "name": name,
        "display_name": display_name or name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": "custom_nodes.atelier",
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    if getattr(cls, "DEPRECATED", False):
        info["deprecated"] = True
    if getattr(cls, "EXPERIMENTAL", False):
        info["experimental"] = True
    return info


def pack_classes() -> dict[str, type]:
    """The pack's node classes (``atelier.nodes.NODE_CLASS_MAPPINGS``)."""
    from atelier import nodes

    return dict(getattr(nodes, "NODE_CLASS_MAPPINGS", {}))


def pack_interfaces() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(interfaces of the pack's nodes, {node type: why its interface could not be built})."""
    from atelier import nodes

    names = getattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", {})
    out: dict[str, dict[str, Any]] = {}
    broken: dict[str, str] = {}
    for name, cls in pack_classes().items():
        try:
            out[name] = node_info(name, cls, names.get(name))
        except Exception as e:  # noqa: BLE001 - reported when a workflow uses the node, like ComfyUI logs it
            log.error("interface of %s could not be built: %s", name, e)
            broken[name] = f"{type(e).__name__}: {e}"
    return out, broken


class Interfaces(dict):
    """Merged node interfaces ({type: interface}); ``broken`` maps pack node types whose INPUT_TYPES failed,
    ``source`` says where they came from (for messages about unknown types)."""

    broken: dict[str, str]
    source: str

    def __init__(self, data: dict[str, dict[str, Any]] | None = None, broken: dict[str, str] | None = None,
                 source: str = "ComfyUI's core nodes and the pack's") -> None:
        super().__init__(data or {})
        self.broken = dict(broken or {})
        self.source = source


def interfaces(core_path: str | os.PathLike[str] | None = None, *, pack: bool = True) -> Interfaces:
    """Core + pack interfaces. A pack name clashing with a core one is dropped, as ComfyUI drops it."""
    merged = core_interfaces(core_path)
    broken: dict[str, str] = {}
    if pack:
        own, broken = pack_interfaces()
        for name, info in own.items():
            if name in merged:
                log.warning("pack node %s clashes with a core node of that name; ComfyUI ignores it", name)
                continue
            merged[name] = info
    return Interfaces(merged, broken, "ComfyUI's core nodes and the pack's" if pack else "ComfyUI's core nodes")


# ---- reading an interface -------------------------------------------------------------------------------------


def input_spec(iface: dict[str, Any], name: str) -> tuple[Any, dict[str, Any], str] | None:
    """(type, options, category) of input `name`; type is a string or a list of choices. None if not an input."""
    for cat in ("required", "optional", "hidden"):
        group = iface.get("input", {}).get(cat) or {}
        if name in group:
            spec = group[name]
            if cat == "hidden" or isinstance(spec, str):
                return spec, {}, cat
            typ = spec[0] if spec else "*"
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return typ, opts, cat
    return None


def input_names(iface: dict[str, Any], categories: tuple[str, ...] = ("required", "optional")) -> list[str]:
    """Input names in widget order (``input_order`` where present, else declaration order)."""
    order = iface.get("input_order") or {}
    names: list[str] = []
    for cat in categories:
        group = iface.get("input", {}).get(cat) or {}
        listed = [n for n in order.get(cat, []) if n in group]
        names += listed + [n for n in group if n not in listed]
    return names


def combo_options(typ: Any, opts: dict[str, Any]) -> list[Any] | None:
    """The choices of a combo input (V1 list type, or V3 "COMBO" with options), else None."""
    if isinstance(typ, list):
        return typ
    if typ == "COMBO":
        return list(opts.get("options") or [])
    return None


def is_widget(typ: Any, opts: dict[str, Any]) -> bool:
    """Whether the frontend draws this input as a widget (a value in widgets_values) rather than a socket only."""
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES or typ in CUSTOM_WIDGET_TYPES


def has_control_widget(name: str, typ: Any, opts: dict[str, Any]) -> bool:
    """Whether the frontend adds a "control after generate" widget after this one (seed-like widgets)."""
    if opts.get("control_after_generate") is not None:  # an explicit value wins, as in the frontend
        return bool(opts["control_after_generate"])
    return typ == "INT" and name in SEED_NAMES


def is_seed_like(name: str, typ: Any, opts: dict[str, Any]) -> bool:
    """An INT widget the frontend randomises (a seed): the target of ``--batch-seeds``."""
    return typ == "INT" and has_control_widget(name, typ, opts)


def has_upload_widget(opts: dict[str, Any]) -> bool:
    """A combo of files the user uploads (LoadImage's image): its value cannot be checked against a list."""
    return any(opts.get(k) for k in UPLOAD_OPTIONS)


def is_media_upload(typ: Any, opts: dict[str, Any]) -> bool:
    """A combo the frontend gives an image/video upload button (whose value "image" is kept in widgets_values)."""
    return (isinstance(typ, list) or typ == "COMBO") and any(opts.get(k) is True for k in MEDIA_UPLOAD_OPTIONS)


def output_types(iface: dict[str, Any]) -> list[Any]:
    return list(iface.get("output") or [])


def frontend_widgets(iface: dict[str, Any]) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """Every value the canvas (ComfyUI frontend 1.2x) saves in a node's ``widgets_values``, in order, strictly:
    (input name, kind, type, options) with kind ``"value"`` for the input's own widget, ``"control"`` for the
    "control after generate" combo the frontend adds after seed-like widgets (``control_after_generate`` in the
    options, else INT inputs named seed/noise_seed), ``"filter"`` for the filter text a combo with a control also
    gets, and ``"upload"`` for the upload button after the required widgets of an image/video picker (value "image").
    widget_layout (cli.workflow) reads files leniently; this is what a file saved by the canvas holds."""
    out: list[tuple[str, str, Any, dict[str, Any]]] = []
    for cat in ("required", "optional"):
        for name in input_names(iface, (cat,)):
            typ, opts, _cat = input_spec(iface, name)  # type: ignore[misc]
            if not is_widget(typ, opts):
                continue
            out.append((name, "value", typ, opts))
            if has_control_widget(name, typ, opts):
                out.append((name, "control", typ, opts))
                if combo_options(typ, opts) is not None:
                    out.append((name, "filter", typ, opts))
        if cat == "required" and any(is_media_upload(t, o) for _n, k, t, o in out if k == "value"):
            out.append(("", "upload", None, {}))
    return out
