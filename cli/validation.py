"""Checking an API-format prompt against node interfaces, without running anything and without a server.

Mirrors the checks ComfyUI's server makes before it queues a prompt (``execution.validate_inputs``): every node type
exists, every required input is there, every link points at an existing node and output index of a matching type,
every constant converts to its type and lies within min/max or among the combo's choices (unless the node's
``VALIDATE_INPUTS`` takes that input over), and the graph has no cycle and at least one output node.
"""
from __future__ import annotations

import heapq
import inspect
import math
import os
from typing import Any, Iterable, Mapping

from ..nodes.common import NO_MODELS
from . import interfaces as _if
from .errors import WorkflowError, id_key as _key, sort_ids, unknown_type_message

# Choices that name files on the user's machine (model and image lists): what a snapshot lists is not what a user has.
FILE_EXTENSIONS = frozenset({
    ".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar", ".onnx", ".gguf",
    ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff",
})


def is_link(value: Any) -> bool:
    """An input value that is a link: ``[source id, output index]``."""
    return isinstance(value, list)


def _is_file_name(value: Any) -> bool:
    return isinstance(value, str) and os.path.splitext(value)[1].lower() in FILE_EXTENSIONS


def _file_combo(choices: list[Any], opts: Mapping[str, Any], value: Any) -> bool:
    """Whether a combo lists files on this machine (so a value missing from it may exist on another)."""
    if not choices or NO_MODELS in choices or _if.has_upload_widget(dict(opts)) or opts.get("remote"):
        return True
    return _is_file_name(value) or any(_is_file_name(c) for c in choices)


def _types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's link rule: equal, ``*`` on either side, or an overlap of comma-separated unions; combos take combos."""
    if received == expected or received == "*" or expected == "*":
        return True
    if isinstance(expected, list) or expected == "COMBO":
        return isinstance(received, list) or received == "COMBO"
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return bool(got & want)


def _type_name(t: Any) -> str:
    return "COMBO" if isinstance(t, list) else str(t)


def check_value(name: str, typ: Any, opts: Mapping[str, Any], val: Any, *, skip_range: bool = False,
                files: str = "lenient") -> tuple[Any, str | None]:
    """(converted value, problem or None) for a constant given to an input of this type and options."""
    if isinstance(val, dict) and "__value__" in val:
        val = val["__value__"]
    if typ == "INT":
        if isinstance(val, bool) or not isinstance(val, (int, float)) or (isinstance(val, float) and not val.is_integer()):
            return val, f"expected an integer, got {val!r}"
        val = int(val)
    elif typ == "FLOAT":
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            return val, f"expected a finite number, got {val!r}"
        val = float(val)
    elif typ == "STRING":
        if isinstance(val, (dict, list)) or val is None:
            return val, f"expected a string, got {type(val).__name__}"
        val = val if isinstance(val, str) else str(val)
    elif typ == "BOOLEAN":
        if not isinstance(val, bool) and val not in (0, 1):
            return val, f"expected true or false, got {val!r}"
        val = bool(val)
    if skip_range:
        return val, None
    if typ in ("INT", "FLOAT"):
        if "min" in opts and opts["min"] is not None and val < opts["min"]:
            return val, f"value {val} is below the minimum {opts['min']}"
        if "max" in opts and opts["max"] is not None and val > opts["max"]:
            return val, f"value {val} is above the maximum {opts['max']}"
    choices = _if.combo_options(typ, dict(opts))
    if choices is not None and not opts.get("multiselect"):
        if _if.has_upload_widget(dict(opts)) or opts.get("remote") or (files == "lenient" and _file_combo(choices, opts, val)):
            # a file name: uploads are checked by the node (LoadImage), file lists differ between machines
            if not isinstance(val, str):
                return val, f"expected a file name, got {val!r}"
        elif val not in choices:
            shown = choices if len(choices) <= 20 else f"{choices[:20]} ... ({len(choices)} choices)"
            if _file_combo(choices, opts, val):
                return val, (f"{val!r} is not among the files found {shown}; is the models folder right "
                             f"(--models DIR or $ATELIER_MODELS)?")
            return val, f"{val!r} is not among the choices {shown}"
    return val, None


def _validated_inputs(cls: type | None) -> tuple[set[str], bool]:
    """(inputs named by the class's VALIDATE_INPUTS, whether it takes **kwargs): those skip the built-in checks."""
    fn = getattr(cls, "VALIDATE_INPUTS", None) if cls is not None else None
    if fn is None:
        return set(), False
    spec = inspect.getfullargspec(fn)
    return set(spec.args) | set(spec.kwonlyargs), spec.varkw is not None


def _check_link(api: Mapping[str, Any], ifaces: Mapping[str, Any], val: Any, typ: Any, where: dict) -> WorkflowError | None:
    if len(val) != 2 or not isinstance(val[0], (str, int)) or isinstance(val[1], bool) or not isinstance(val[1], int):
        return WorkflowError(f"malformed link {val!r}; expected [source node id, output index]", **where)
    src_id, idx = str(val[0]), val[1]
    src = api.get(src_id)
    if not isinstance(src, dict):
        return WorkflowError(f"links to node {src_id}, which is not in the workflow", **where)
    src_type = src.get("class_type")
    src_iface = ifaces.get(src_type)
    if src_iface is None:
        return None  # its own problem is reported on that node
    outs = _if.output_types(src_iface)
    if idx < 0 or idx >= len(outs):
        return WorkflowError(f"links to output {idx} of node {src_id} ({src_type}), which has "
                             f"{len(outs)} output{'s' if len(outs) != 1 else ''}", **where)
    if not _types_match(outs[idx], typ):
        return WorkflowError(f"expects {_type_name(typ)}, but node {src_id} ({src_type}) output {idx} gives "
                             f"{_type_name(outs[idx])}", **where)
    return None


def _node_problems(api: Mapping[str, Any], ifaces: Mapping[str, Any], nid: str, classes: Mapping[str, type],
                   files: str, unknown: str) -> list[WorkflowError]:
    node = api[nid]
    if not isinstance(node, dict):
        return [WorkflowError(f"expected an object with 'class_type' and 'inputs', got {type(node).__name__}", node_id=nid)]
    ctype = node.get("class_type")
    if not isinstance(ctype, str) or not ctype:
        return [WorkflowError("the node has no 'class_type'", node_id=nid)]
    inputs = node.get("inputs", {})
    if not isinstance(inputs, dict):
        return [WorkflowError(f"'inputs' must be an object, got {type(inputs).__name__}", node_id=nid, class_type=ctype)]
    iface = ifaces.get(ctype)
    if iface is None:
        broken = getattr(ifaces, "broken", {}).get(ctype)
        if broken:
            return [WorkflowError(f"the node's interface could not be built ({broken})", node_id=nid, class_type=ctype)]
        if unknown == "ignore":
            return []
        return [WorkflowError(unknown_type_message(ifaces), node_id=nid, class_type=ctype)]
    skip, skip_all = _validated_inputs(classes.get(ctype))
    out: list[WorkflowError] = []
    for name in _if.input_names(iface):
        typ, opts, cat = _if.input_spec(iface, name)  # type: ignore[misc]
        where = {"node_id": nid, "class_type": ctype, "input_name": name}
        if name not in inputs:
            if cat == "required":
                out.append(WorkflowError("required input is missing", **where))
            continue
        val = inputs[name]
        if is_link(val):
            err = _check_link(api, ifaces, val, typ, where)
        else:
            if not (isinstance(typ, list) or typ in _if.WIDGET_TYPES or typ in _if.CUSTOM_WIDGET_TYPES or typ == "*"):
                out.append(WorkflowError(f"expects a link from a {_type_name(typ)} output, got the constant {val!r}", **where))
                continue
            _, msg = check_value(name, typ, opts, val, skip_range=skip_all or name in skip, files=files)
            err = WorkflowError(msg, **where) if msg else None
        if err is not None:
            out.append(err)
    return out


def _edges(api: Mapping[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """{node id: [(source id, input name), ...]} over links to nodes that exist."""
    deps: dict[str, list[tuple[str, str]]] = {}
    for nid, node in api.items():
        ins = node.get("inputs") if isinstance(node, dict) else None
        deps[nid] = [(str(v[0]), k) for k, v in (ins or {}).items()
                     if isinstance(ins, dict) and is_link(v) and len(v) == 2 and str(v[0]) in api]
    return deps


def _cycle_error(api: Mapping[str, Any], deps: Mapping[str, list[tuple[str, str]]], left: set[str]) -> WorkflowError:
    start = sort_ids(left)[0]
    path, pos = [start], {start: 0}
    nid = start
    while True:  # every node left has a dependency inside `left`, so this walk closes a loop
        src, inp = next((s, i) for s, i in deps[nid] if s in left)
        if src in pos:
            loop = path[pos[src]:]
            names = " <- ".join(f"{n} ({api[n].get('class_type')})" for n in loop + [src])
            return WorkflowError(f"the workflow has a cycle: {names}", node_id=nid,
                                 class_type=api[nid].get("class_type"), input_name=inp)
        pos[src] = len(path)
        path.append(src)
        nid = src


def topological_order(api: Mapping[str, Any], targets: Iterable[str] | None = None) -> list[str]:
    """Node ids in an order where every node follows its sources (lowest id first among ready ones).

    With `targets`, only those nodes and what they depend on. Raises WorkflowError on a cycle.
    """
    deps = _edges(api)
    keep = set(api)
    if targets is not None:
        keep, stack = set(), list(targets)
        while stack:
            n = stack.pop()
            if n not in keep:
                keep.add(n)
                stack += [s for s, _ in deps.get(n, [])]
    pending = {n: {s for s, _ in deps[n]} for n in keep}
    users: dict[str, list[str]] = {n: [] for n in keep}
    for n, srcs in pending.items():
        for s in srcs:
            users[s].append(n)
    ready = [(_key(n), n) for n, s in pending.items() if not s]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for u in users[n]:
            pending[u].discard(n)
            if not pending[u]:
                heapq.heappush(ready, (_key(u), u))
    if len(order) != len(keep):
        raise _cycle_error(api, deps, keep - set(order))
    return order


def output_nodes(api: Mapping[str, Any], ifaces: Mapping[str, Any]) -> list[str]:
    """Ids of the nodes whose interface marks them as output nodes."""
    return [nid for nid in sort_ids(api)
            if isinstance(api[nid], dict) and (ifaces.get(api[nid].get("class_type")) or {}).get("output_node")]


def problems(api: Any, ifaces: Mapping[str, Any], *, classes: Mapping[str, type] | None = None,
             files: str = "lenient", unknown: str = "error", require_output: bool = True) -> list[WorkflowError]:
    """Every problem found, node by node in id order, then cycles and missing outputs.

    files: "lenient" accepts any file name for combos that list files (model and image lists differ between
    machines), "strict" requires the value among the choices. unknown: "error" or "ignore" (a server may know more).
    """
    if not isinstance(api, dict) or not api:
        return [WorkflowError("the workflow is empty or not an object of nodes")]
    classes = classes or {}
    out: list[WorkflowError] = []
    for nid in sort_ids(api):
        out += _node_problems(api, ifaces, nid, classes, files, unknown)
    if out:
        return out
    try:
        topological_order(api)
    except WorkflowError as e:
        out.append(e)
    if require_output and not output_nodes(api, ifaces) and unknown == "error":
        out.append(WorkflowError("the workflow has no output node (SaveImage, PreviewImage, or a pack node that shows "
                                 "a result), so running it would produce nothing"))
    return out


def validate(api: Any, ifaces: Mapping[str, Any], **kw: Any) -> None:
    """Raise the first problem as a WorkflowError (naming node id, type and input), noting how many more there are."""
    found = problems(api, ifaces, **kw)
    if found:
        first = found[0]
        if len(found) > 1:
            more = len(found) - 1
            first.args = (f"{first.args[0]} (and {more} more problem{'s' if more > 1 else ''})",)
        raise first
