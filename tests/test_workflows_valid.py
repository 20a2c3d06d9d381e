"""Every shipped workflow checks out, without a server, against the pack's node interfaces and ComfyUI's core ones
(the /object_info snapshot), and follows the conventions of workflows/README.md.

workflows/*.json is ComfyUI's template folder: canvas (UI-format) files only, each with its thumbnail <name>.jpg;
their API-format twins live in workflows/api/<name>.api.json (a folder the template listing does not read); the
pack's example input images in workflows/input/. Generic: a workflow added later (any family) is checked the same way.
"""
from __future__ import annotations

import json
import pathlib

import pytest

from atelier.cli.interfaces import (
    CONTROL_VALUES,
    Interfaces,
    combo_options,
    frontend_widgets,
    input_spec,
    interfaces,
    output_types,
    pack_classes,
    SEED_NAMES,
)
from atelier.cli.workflow import is_ui, load_workflow, to_api, validate

WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"
CANVAS = sorted(WORKFLOWS.glob("*.json"))
API = sorted((WORKFLOWS / "api").glob("*.json"))
EXAMPLE_INPUTS = WORKFLOWS / "input"
STOCK_INPUTS = {"example.png"}  # what a fresh ComfyUI has in its input folder
NOTES = {"Note", "MarkdownNote"}
VIRTUAL = {"Reroute", "PrimitiveNode"} | NOTES
MODEL_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar", ".onnx", ".gguf")
IMAGE_NODES = {"SaveImage", "PreviewImage"}  # show their results inside the node
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its pos


@pytest.fixture(scope="module")
def ifaces(shared_dir) -> Interfaces:
    found = interfaces(shared_dir / "data" / "comfyui-core-object_info.json")
    assert not found.broken, f"pack nodes whose INPUT_TYPES fails: {found.broken}"
    return found


def _id(p: pathlib.Path) -> str:
    return p.name


def _twin(canvas: pathlib.Path) -> pathlib.Path:
    return WORKFLOWS / "api" / f"{canvas.stem}.api.json"


def _ui(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _working(ui: dict) -> list[dict]:
    return [n for n in ui["nodes"] if n["type"] not in VIRTUAL]


# ---- the template folder ----------------------------------------------------------------------------------------


def test_template_folder_holds_only_canvas_workflows_with_twins_and_thumbnails():
    from PIL import Image

    assert CANVAS, f"no canvas workflow in {WORKFLOWS}: the pack ships its example workflows there"
    for f in CANVAS:
        data = _ui(f)
        assert is_ui(data) and "version" in data, (
            f"workflows/{f.name}: ComfyUI lists every workflows/*.json as a template; this one is not a canvas "
            "(UI-format) workflow with a 'version', so the template browser fails on it. API-format files belong "
            "in workflows/api/")
        assert _twin(f).is_file(), f"workflows/{f.name} has no API twin workflows/api/{f.stem}.api.json " \
                                   f"(write it with `atelier convert workflows/{f.name} -o workflows/api/{f.stem}.api.json`)"
        thumb = f.with_suffix(".jpg")
        assert thumb.is_file(), (f"workflows/{f.name} has no thumbnail {thumb.name}: the template browser shows "
                                 "<name>.jpg beside the file (tests/host/canvas_check.py --thumbnails writes it)")
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and 128 <= min(im.size) and max(im.size) <= 1024, \
                f"{thumb.name}: expected a JPEG of 128..1024 px, got {im.format} {im.size}"
        assert thumb.stat().st_size < 200_000, f"{thumb.name}: {thumb.stat().st_size} bytes; keep thumbnails small"
    for f in API:
        assert f.name.endswith(".api.json"), f"workflows/api/{f.name}: name API files <name>.api.json"
        assert (WORKFLOWS / f"{f.name[:-len('.api.json')]}.json").is_file(), f"workflows/api/{f.name} has no canvas file"


@pytest.mark.parametrize("path", CANVAS + API, ids=_id)
def test_workflow_validates(path, ifaces):
    api, ui = load_workflow(path, ifaces)
    assert (ui is None) == (path.parent.name == "api"), f"{path.name}: wrong format for its folder"
    validate(api, ifaces, classes=pack_classes(), files="lenient")


@pytest.mark.parametrize("path", CANVAS, ids=_id)
def test_canvas_file_links_and_twin(path, ifaces):
    ui = _ui(path)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link in ui.get("links") or []:
        lid, src, slot, _dst, _dslot, typ = link[:6]
        if nodes[src]["type"] in VIRTUAL:
            continue
        outs = output_types(ifaces[nodes[src]["type"]])
        assert slot < len(outs), f"{path.name}: link {lid} leaves output {slot} of node {src}, which has {len(outs)}"
        assert typ in (outs[slot], "*"), f"{path.name}: link {lid} is typed {typ}, node {src} output {slot} gives {outs[slot]}"
    twin = _twin(path)
    if twin.is_file():
        expected = json.loads(twin.read_text(encoding="utf-8"))
        strip = lambda a: {k: (v["class_type"], v["inputs"]) for k, v in a.items()}  # noqa: E731
        assert strip(to_api(ui, ifaces)) == strip(expected), f"{path.name} and api/{twin.name} differ"


# ---- widget values as the canvas saves them ---------------------------------------------------------------------


def _value_problem(name: str, kind: str, typ, opts: dict, value) -> str | None:
    """Why `value` cannot be what the canvas saves for this widget, or None."""
    if kind == "control":
        ok = isinstance(value, str) and value in CONTROL_VALUES
        return None if ok else f"{name}'s control after generate must be one of {sorted(CONTROL_VALUES)}, got {value!r}"
    if kind == "filter":
        return None if isinstance(value, str) else f"{name}'s control filter must be a string, got {value!r}"
    if kind == "upload":
        return None if value == "image" else f"the upload button's value must be 'image', got {value!r}"
    if typ == "INT":
        return None if isinstance(value, int) and not isinstance(value, bool) else f"{name}: INT expected, got {value!r}"
    if typ == "FLOAT":
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{name}: FLOAT expected, got {value!r}"
    if typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: BOOLEAN expected, got {value!r}"
    if typ == "STRING" or combo_options(typ, opts) is not None:
        return None if isinstance(value, str) else f"{name}: a string expected, got {value!r}"
    return None


def _layout_text(slots) -> str:
    return ", ".join(n if k == "value" else f"{n or 'image'} ({k})" for n, k, _t, _o in slots)


@pytest.mark.parametrize("path", CANVAS, ids=_id)
def test_widget_values_match_what_the_canvas_saves(path, ifaces):
    """widgets_values of every node has exactly the frontend's widgets, in order: the node's widget inputs
    (required, then optional), a "control after generate" value after each seed-like one, the upload button's value
    after the required widgets of an image picker. A short list shifts every later value on load (a noise_seed
    without its control value made the canvas randomise it)."""
    ui = _ui(path)
    problems = []
    for n in ui["nodes"]:
        if n["type"] in NOTES:
            vals = n.get("widgets_values")
            if not (isinstance(vals, list) and len(vals) == 1 and isinstance(vals[0], str)):
                problems.append(f"node {n['id']} ({n['type']}): a note saves one text, got {vals!r}")
            continue
        if n["type"] in VIRTUAL:
            continue
        slots = frontend_widgets(ifaces[n["type"]])
        vals = n.get("widgets_values")
        vals = [] if vals is None and not slots else vals
        if not isinstance(vals, list) or len(vals) != len(slots):
            problems.append(f"node {n['id']} ({n['type']}) saves {len(vals) if isinstance(vals, list) else vals!r} "
                            f"widget values {vals!r}; the canvas has {len(slots)} widgets: {_layout_text(slots)}")
            continue
        for (name, kind, typ, opts), value in zip(slots, vals):
            why = _value_problem(name, kind, typ, opts, value)
            if why:
                problems.append(f"node {n['id']} ({n['type']}): {why} (widgets: {_layout_text(slots)})")
    assert not problems, f"workflows/{path.name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", CANVAS, ids=_id)
def test_shipped_seeds_are_fixed(path, ifaces):
    """Examples reproduce what their note promises and their API twin holds: every control is "fixed"."""
    ui = _ui(path)
    moving = []
    for n in _working(ui):
        slots = frontend_widgets(ifaces[n["type"]])
        for (name, kind, _t, _o), value in zip(slots, n.get("widgets_values") or []):
            if kind == "control" and value != "fixed":
                moving.append(f"node {n['id']} ({n['type']}) {name}: {value!r}")
    assert not moving, f"workflows/{path.name}: set these to 'fixed': {moving}"


def test_pack_seed_inputs_declare_control_after_generate():
    """The frontend adds a control widget to any INT named seed/noise_seed unless told otherwise; our nodes say so
    explicitly, so what a workflow saves does not depend on that naming rule."""
    from atelier.cli.interfaces import node_info

    missing = []
    for cls_name, cls in pack_classes().items():
        iface = node_info(cls_name, cls)
        for cat in ("required", "optional"):
            for name in (iface.get("input", {}).get(cat) or {}):
                typ, opts, _cat = input_spec(iface, name)
                if typ == "INT" and ("seed" in name or name in SEED_NAMES) and "control_after_generate" not in opts:
                    missing.append(f"{cls_name}.{name}")
    assert not missing, f"seed inputs without an explicit control_after_generate option: {missing}"


# ---- inputs a stock ComfyUI finds -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CANVAS, ids=_id)
def test_input_images_exist_on_a_stock_install(path, ifaces):
    """A Load Image names a file ComfyUI's input folder has: its own example.png, or one of the pack's example
    inputs (workflows/input/, copied there when the pack loads) — never a path only the headless runner resolves."""
    ui = _ui(path)
    shipped = {p.name for p in EXAMPLE_INPUTS.glob("*") if p.is_file()}
    bad = []
    for n in _working(ui):
        slots = frontend_widgets(ifaces[n["type"]])
        for (name, kind, typ, opts), value in zip(slots, n.get("widgets_values") or []):
            if kind == "value" and (opts.get("image_upload") or opts.get("video_upload")) and isinstance(value, str):
                if value not in shipped | STOCK_INPUTS:
                    bad.append(f"node {n['id']} ({n['type']}) {name}={value!r}")
    assert not bad, (f"workflows/{path.name}: input files a fresh ComfyUI does not have: {bad}; use example.png or "
                     f"a plain file name from workflows/input/ ({sorted(shipped)})")


# ---- a workflow that teaches ------------------------------------------------------------------------------------


def _model_files(ui: dict) -> set[str]:
    return {v.rsplit("/", 1)[-1] for n in _working(ui) for v in n.get("widgets_values") or []
            if isinstance(v, str) and v.lower().endswith(MODEL_EXTENSIONS)}


@pytest.mark.parametrize("path", CANVAS, ids=_id)
def test_workflow_has_a_note_naming_its_models(path):
    ui = _ui(path)
    notes = [n for n in ui["nodes"] if n["type"] in NOTES]
    assert notes, f"workflows/{path.name}: add a Note or MarkdownNote: what it does, its models and folders, what to try"
    text = "\n".join(str(v) for n in notes for v in n.get("widgets_values") or [])
    assert len(text) >= 200, f"workflows/{path.name}: the note is {len(text)} characters; say what it does, " \
                             "which models it needs and where they go, and which widgets to play with"
    unnamed = sorted(m for m in _model_files(ui) if m not in text)
    assert not unnamed, f"workflows/{path.name}: the note does not name the model file(s) {unnamed}"
    assert "models/" in text, f"workflows/{path.name}: the note does not say which models/ folder the files go in"


def _box(n: dict) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a node with its title bar."""
    (x, y), (w, h) = n["pos"], n["size"]
    return x, y - TITLE_H, x + w, y + h


def _min_size(n: dict, iface: dict | None) -> tuple[float, float]:
    """What LGraphNode.computeSize() asks for (frontend 1.27: slots 20 px, widgets 24 px), and a width that does
    not cut the title."""
    slots = max(len(n.get("inputs") or []), len(n.get("outputs") or []))
    widgets = len(frontend_widgets(iface)) if iface is not None else 0
    h = 20 * slots + (24 * widgets + 8 if widgets else 0) + 6
    if iface is not None and any(o.get("image_upload") for _n, k, _t, o in frontend_widgets(iface) if k == "value"):
        h = max(h, 326)  # the picked image's preview
    if n["type"] in IMAGE_NODES:
        h = max(h, 250)  # room for the results without the node jumping on the first Run
    title = n.get("title") or (iface or {}).get("display_name") or n["type"]
    # the canvas cuts a title wider than the node less ~64 px (14px Arial: ~7 px a character, 7.2 to be safe)
    return max(210.0, 7.2 * len(title) + 64), h


@pytest.mark.parametrize("path", CANVAS, ids=_id)
def test_layout_fits_and_flows_left_to_right(path, ifaces):
    ui = _ui(path)
    extra = ui.get("extra") or {}
    assert "ds" not in extra, f"workflows/{path.name}: remove extra.ds (a saved view); without it the canvas fits " \
                              "the graph on open"
    nodes = {n["id"]: n for n in ui["nodes"]}
    problems = []
    for n in _working(ui):
        need_w, need_h = _min_size(n, ifaces.get(n["type"]))
        if n["size"][0] < need_w or n["size"][1] < need_h:
            problems.append(f"node {n['id']} ({n['type']}) is {n['size']}, its widgets need at least "
                            f"[{need_w:.0f}, {need_h:.0f}]")
    for link in ui.get("links") or []:
        _lid, src, _s, dst, _d = link[:5]
        a, b = _box(nodes[src]), _box(nodes[dst])
        if not a[2] <= b[0]:
            problems.append(f"link {link[0]} runs right to left: node {src} ends at x={a[2]:.0f}, node {dst} "
                            f"starts at x={b[0]:.0f}")
    boxes = [(n["id"], _box(n)) for n in ui["nodes"]]
    for i, (ia, a) in enumerate(boxes):
        for ib, b in boxes[i + 1:]:
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                problems.append(f"nodes {ia} and {ib} overlap")
    work = _working(ui)
    groups = ui.get("groups") or []
    if len(work) >= 3:
        if not groups:
            problems.append("no groups: frame the stages (input, model, output...) in titled groups")
        for n in work:
            x0, y0, x1, y1 = _box(n)
            inside = [g for g in groups if g["bounding"][0] <= x0 and g["bounding"][1] <= y0
                      and x1 <= g["bounding"][0] + g["bounding"][2] and y1 <= g["bounding"][1] + g["bounding"][3]]
            if groups and len(inside) != 1:
                problems.append(f"node {n['id']} ({n['type']}) lies in {len(inside)} groups; put it inside one")
    for g in groups:
        if not str(g.get("title", "")).strip():
            problems.append(f"group {g.get('id')} has no title")
    assert not problems, f"workflows/{path.name}:\n  " + "\n  ".join(problems)
