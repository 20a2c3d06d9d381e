"""Workflows in both of ComfyUI's formats: loading, UI -> API conversion, overrides for sweeps.

    api, ui = load_workflow("workflows/upscale.json")     # ui is None for an API-format file
    validate(api, interfaces())                             # WorkflowError naming node id, type and input

UI format (what the canvas saves): ``nodes`` (id, type, mode, inputs [{name, type, link, widget?}], outputs,
widgets_values), ``links`` ([id, from_node, from_slot, to_node, to_slot, TYPE] or dicts). API format (what ``/prompt``
takes): ``{"<id>": {"class_type": T, "inputs": {name: value | ["<src id>", out_index]}}}``. The conversion follows the
frontend's ``graphToPrompt``: widget values are matched to inputs in the interface's widget order (skipping the
"control after generate" value stored after seed-like widgets and the upload button's value), Reroute nodes are
followed, PrimitiveNode values are inlined, muted nodes (mode 2) are left out and bypassed ones (mode 4) pass their
matching input through. Subgraphs and group nodes are refused with a clear error (save such a workflow in API
format from the canvas instead).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
from typing import Any, Mapping

from . import interfaces as _if
from .errors import WorkflowError, id_key as _id_key, sort_ids, unknown_type_message
from .interfaces import Interfaces, interfaces  # noqa: F401 - re-exported for the CLI and host tests

log = logging.getLogger(__name__)

MODE_MUTED = 2
MODE_BYPASS = 4
VIRTUAL_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})


# ---- formats ---------------------------------------------------------------------------------------------------


def is_ui(data: Any) -> bool:
    """A canvas (UI-format) workflow: a dict with a ``nodes`` list."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def _read_png_text(path: pathlib.Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        return {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}


def read_workflow_file(path: str | os.PathLike[str]) -> Any:
    """The raw JSON of a workflow file, or of a PNG's ``prompt``/``workflow`` text chunks (as ``{"prompt", "workflow"}``)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise WorkflowError(f"workflow file {str(p)!r} does not exist")
    if p.suffix.lower() == ".png":
        text = _read_png_text(p)
        if "prompt" not in text and "workflow" not in text:
            raise WorkflowError(f"{p.name}: the PNG carries no ComfyUI workflow (no 'prompt' or 'workflow' text chunk)")
        try:
            return {k: json.loads(text[k]) for k in ("prompt", "workflow") if k in text}
        except json.JSONDecodeError as e:
            raise WorkflowError(f"{p.name}: the PNG's workflow metadata is not valid JSON ({e})") from None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise WorkflowError(f"{p.name}: not a text file; expected a ComfyUI workflow (.json) or a PNG it saved") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{p.name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


# Inputs renamed since a release (class, old name) -> new name: API files that use the old name still run here.
RENAMED_INPUTS = {("AtelierUpscaleImage", "tile"): "tile_size"}


def migrate(api: dict) -> dict:
    """Rename inputs that an older release of the pack called otherwise (in place), logging each."""
    for nid, node in api.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for (cls, old), new in RENAMED_INPUTS.items():
            if node.get("class_type") == cls and old in inputs and new not in inputs:
                inputs[new] = inputs.pop(old)
                log.info("node %s (%s): input %r is now called %r", nid, cls, old, new)
    return api


def split_workflow(data: Any, ifaces: Mapping[str, Any] | None = None, name: str = "workflow") -> tuple[dict, dict | None]:
    """(API prompt, UI workflow or None) from any accepted shape: UI, API, a /prompt body, or PNG metadata."""
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict) and "nodes" not in data:
        ui = data.get("workflow")
        if ui is None:
            ui = ((data.get("extra_data") or {}).get("extra_pnginfo") or {}).get("workflow")
        return migrate(copy.deepcopy(data["prompt"])), ui if is_ui(ui) else None
    if isinstance(data, dict) and "workflow" in data and is_ui(data["workflow"]) and "nodes" not in data:
        data = data["workflow"]
    if is_ui(data):
        return to_api(data, ifaces if ifaces is not None else interfaces()), data
    if isinstance(data, dict) and any(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return migrate(copy.deepcopy(data)), None  # API format; malformed nodes are reported by validate()
    raise WorkflowError(
        f"{name}: not a ComfyUI workflow; expected the canvas format (an object with a 'nodes' list) or the API "
        f"format (an object of node ids to {{'class_type', 'inputs'}}), got {type(data).__name__}"
        + (f" with keys {sorted(data)[:5]}" if isinstance(data, dict) else "")
    )


def load_workflow(path: str | os.PathLike[str], ifaces: Mapping[str, Any] | None = None) -> tuple[dict, dict | None]:
    """(API prompt, UI workflow or None) of a .json workflow in either format, or of a PNG ComfyUI saved."""
    return split_workflow(read_workflow_file(path), ifaces, name=pathlib.Path(path).name)


# ---- UI -> API -------------------------------------------------------------------------------------------------


def widget_layout(iface: Mapping[str, Any], values: list[Any]) -> tuple[dict[str, int], int]:
    """({input name: index in widgets_values}, how many values those widgets use), as the frontend lays them out.

    Widgets come in input order (required, then optional); a seed-like widget is followed by its "control after
    generate" value and, when a required combo takes image/video uploads, the upload button's value ("image") sits
    after the required widgets. Both extra values are taken only when present: hand-written files often leave them
    out (and old frontends stored the control value as a boolean).
    """
    widgets: list[tuple[str, Any, dict[str, Any]]] = []
    for cat in ("required", "optional"):
        for name in _if.input_names(iface, (cat,)):
            typ, opts, _cat = _if.input_spec(iface, name)  # type: ignore[misc]
            if _if.is_widget(typ, opts):
                widgets.append((name, typ, opts))
        if cat == "required" and any(_if.is_media_upload(t, o) for _n, t, o in widgets):
            widgets.append(("", _UPLOAD, {}))
    slots: dict[str, int] = {}
    idx = 0
    for k, (name, typ, opts) in enumerate(widgets):
        nxt = values[idx] if idx < len(values) else None
        if typ is _UPLOAD:
            idx += 1 if nxt == _if.UPLOAD_BUTTON_VALUE else 0
            continue
        slots[name] = idx
        idx += 1
        if _if.has_control_widget(name, typ, opts) and idx < len(values):
            nxt = values[idx]
            next_is_bool = k + 1 < len(widgets) and widgets[k + 1][1] == "BOOLEAN"
            if (isinstance(nxt, str) and nxt in _if.CONTROL_VALUES) or (isinstance(nxt, bool) and not next_is_bool):
                idx += 1
    return slots, idx


_UPLOAD = object()  # the upload button's place among the widgets


def widget_slots(iface: Mapping[str, Any], values: list[Any]) -> dict[str, int]:
    """{input name: index in widgets_values} in the frontend's order (see widget_layout)."""
    return widget_layout(iface, values)[0]


def _default(typ: Any, opts: Mapping[str, Any]) -> tuple[bool, Any]:
    """(has a default, value) as the frontend fills a widget missing from widgets_values."""
    if "default" in opts:
        return True, opts["default"]
    choices = _if.combo_options(typ, dict(opts))
    if choices:
        return True, choices[0]
    return False, None


def _links(ui: Mapping[str, Any]) -> dict[int, tuple[str, int, str, int, Any]]:
    """{link id: (origin id, origin slot, target id, target slot, type)} from either link encoding."""
    out: dict[int, tuple[str, int, str, int, Any]] = {}
    for link in ui.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            lid, o, os_, t, ts = link[:5]
            typ = link[5] if len(link) > 5 else None
        elif isinstance(link, dict):
            lid, o, os_, t, ts = (link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot"))
            typ = link.get("type")
        else:
            raise WorkflowError(f"malformed link {link!r}; expected [id, from_node, from_slot, to_node, to_slot, type]")
        try:
            out[int(lid)] = (str(o), int(os_), str(t), int(ts), typ)
        except (TypeError, ValueError):
            raise WorkflowError(f"malformed link {link!r}; ids and slots must be integers") from None
    return out


class _Converter:
    def __init__(self, ui: Mapping[str, Any], ifaces: Mapping[str, Any]) -> None:
        if not is_ui(ui):
            raise WorkflowError("not a UI-format workflow (expected an object with a 'nodes' list)")
        self.ifaces = ifaces
        self.nodes: dict[str, dict] = {}
        subgraphs = {sg.get("id") for sg in ((ui.get("definitions") or {}).get("subgraphs") or []) if isinstance(sg, dict)}
        for n in ui["nodes"]:
            if not isinstance(n, dict) or "id" not in n or not isinstance(n.get("type"), str):
                raise WorkflowError(f"malformed node {str(n)[:80]!r}; every node needs an 'id' and a 'type'")
            if n["type"] in subgraphs or n["type"].startswith(("workflow>", "workflow/")):
                raise WorkflowError("subgraph and group nodes are not supported by the converter; unpack them on "
                                    "the canvas or save the workflow in API format", node_id=n["id"], class_type=n["type"])
            if str(n["id"]) in self.nodes:
                raise WorkflowError("two nodes share this id", node_id=n["id"], class_type=n["type"])
            self.nodes[str(n["id"])] = n
        self.links = _links(ui)

    def active(self, n: Mapping[str, Any]) -> bool:
        return n.get("mode", 0) not in (MODE_MUTED, MODE_BYPASS) and n["type"] not in VIRTUAL_TYPES

    def resolve(self, link_id: int, where: dict[str, Any], seen: frozenset[int] = frozenset()) -> tuple[str, Any] | None:
        """Follow a link upstream through reroutes and bypassed nodes: ("link", [id, slot]), ("value", v) or None."""
        if link_id in seen:
            raise WorkflowError(f"link {link_id} loops through reroute or bypassed nodes", **where)
        link = self.links.get(int(link_id))
        if link is None:
            raise WorkflowError(f"link {link_id} is not in the workflow's links table", **where)
        origin_id, slot, _t, _ts, typ = link
        src = self.nodes.get(origin_id)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from node {origin_id}, which is not in the workflow", **where)
        seen = seen | {int(link_id)}
        if src["type"] == "PrimitiveNode":
            vals = src.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if src["type"] == "Reroute":
            ins = [i for i in src.get("inputs") or [] if i.get("link") is not None]
            return self.resolve(ins[0]["link"], where, seen) if ins else None
        if src.get("mode", 0) == MODE_MUTED:
            return None
        if src.get("mode", 0) == MODE_BYPASS:
            out_type = typ
            outs = src.get("outputs") or []
            if slot < len(outs):
                out_type = outs[slot].get("type", typ)
            ins = src.get("inputs") or []
            order = ([ins[slot]] if slot < len(ins) else []) + list(ins)
            for cand in order:
                if cand.get("link") is not None and cand.get("type") in (out_type, "*"):
                    return self.resolve(cand["link"], where, seen)
            return None
        return "link", [origin_id, slot]

    def node(self, nid: str, n: dict) -> dict[str, Any]:
        typ = n["type"]
        where = {"node_id": nid, "class_type": typ}
        iface = self.ifaces.get(typ)
        if iface is None:
            broken = getattr(self.ifaces, "broken", {}).get(typ)
            if broken:
                raise WorkflowError(f"the node's interface could not be built ({broken})", **where)
            raise WorkflowError(unknown_type_message(self.ifaces), **where)
        values = n.get("widgets_values")
        inputs: dict[str, Any] = {}
        if isinstance(values, dict):  # some frontends store widgets by name
            named = values
        else:
            values = list(values or [])
            named = {name: values[i] for name, i in widget_slots(iface, values).items() if i < len(values)}
        for name in _if.input_names(iface):
            typ_, opts, _cat = _if.input_spec(iface, name)  # type: ignore[misc]
            if not _if.is_widget(typ_, opts):
                continue
            if name in named:
                val = named[name]
            else:
                ok, val = _default(typ_, opts)
                if not ok:
                    continue
            inputs[name] = {"__value__": val} if isinstance(val, list) else val
        for slot in n.get("inputs") or []:
            if not isinstance(slot, dict) or slot.get("link") is None:
                continue
            name = (slot.get("widget") or {}).get("name") or slot.get("name")
            got = self.resolve(slot["link"], {**where, "input_name": name})
            if got is None:
                if not (_if.input_spec(iface, name) and _if.is_widget(*_if.input_spec(iface, name)[:2])):
                    inputs.pop(name, None)
                continue
            kind, val = got
            inputs[name] = ({"__value__": val} if isinstance(val, list) else val) if kind == "value" else val
        title = n.get("title") or iface.get("display_name") or typ
        return {"inputs": inputs, "class_type": typ, "_meta": {"title": title}}

    def convert(self) -> dict[str, dict[str, Any]]:
        return {nid: self.node(nid, n) for nid, n in self.nodes.items() if self.active(n)}


def to_api(ui: Mapping[str, Any], ifaces: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A UI-format workflow -> the API prompt the frontend would queue, using the node interfaces for widget order."""
    return _Converter(ui, ifaces).convert()


# ---- overrides (sweeps) ----------------------------------------------------------------------------------------


def find_node(api: Mapping[str, Any], ref: str) -> str:
    """A node id from an id or a title (``_meta.title``) or a class type that occurs once."""
    if ref in api:
        return ref
    for key in ("title", "class_type"):
        hits = [nid for nid, n in api.items()
                if (n.get("_meta", {}).get("title") if key == "title" else n.get("class_type")) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"{ref!r} names several nodes ({', '.join(hits)}); use a node id")
    raise WorkflowError(f"no node {ref!r} in the workflow (ids: {', '.join(sorted(api, key=_id_key)[:20])})")


def seed_inputs(api: Mapping[str, Any], ifaces: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(node id, input) of every constant seed-like INT input (``seed``, ``noise_seed``, control_after_generate)."""
    found = []
    for nid in sort_ids(api):
        iface = ifaces.get(api[nid].get("class_type"))
        if iface is None:
            continue
        for name, val in (api[nid].get("inputs") or {}).items():
            spec = _if.input_spec(iface, name)
            if spec and _if.is_seed_like(name, spec[0], spec[1]) and not isinstance(val, list):
                found.append((nid, name))
    return found


def set_input(
    api: dict[str, Any], ui: dict[str, Any] | None, nid: str, name: str, value: Any, ifaces: Mapping[str, Any]
) -> None:
    """Set a constant input in the API prompt and, when there is one, the matching widget of the UI workflow."""
    node = api[nid]
    node.setdefault("inputs", {})[name] = {"__value__": value} if isinstance(value, list) else value
    if ui is None:
        return
    iface = ifaces.get(node.get("class_type"))
    for n in ui.get("nodes") or []:
        if str(n.get("id")) != str(nid) or iface is None:
            continue
        vals = n.get("widgets_values")
        if isinstance(vals, dict):
            vals[name] = value
        elif isinstance(vals, list):
            slot = widget_slots(iface, vals).get(name)
            if slot is not None and slot < len(vals):
                vals[slot] = value
        _set_primitive(ui, n, name, value)


def _set_primitive(ui: dict[str, Any], node: Mapping[str, Any], name: str, value: Any) -> None:
    """A PrimitiveNode feeding widget `name` of `node` shows the value too (the canvas shows the primitive's)."""
    links = _links(ui)
    by_id = {str(n.get("id")): n for n in ui.get("nodes") or []}
    for slot in node.get("inputs") or []:
        if ((slot.get("widget") or {}).get("name") or slot.get("name")) != name or slot.get("link") is None:
            continue
        link = links.get(int(slot["link"]))
        src = by_id.get(link[0]) if link else None
        if src is not None and src.get("type") == "PrimitiveNode" and src.get("widgets_values"):
            src["widgets_values"][0] = value


# Validation lives in its own module; re-exported here so `atelier.cli.workflow` is the one import for tools.
from .validation import output_nodes, problems, topological_order, validate  # noqa: E402,F401
