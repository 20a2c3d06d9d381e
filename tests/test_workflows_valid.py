"""Every shipped workflow (workflows/*.json, canvas format, and its API twin *.api.json) checks out against the
pack's node interfaces and ComfyUI's core interfaces (the /object_info snapshot), without a server: every node type
exists, every link joins matching types, every widget value is in range or among the choices, widget lists have the
length the frontend writes, and each canvas file converts to exactly its API twin."""
from __future__ import annotations

import json
import pathlib

import pytest

from atelier.cli.interfaces import Interfaces, interfaces, output_types, pack_classes
from atelier.cli.workflow import is_ui, load_workflow, to_api, validate, widget_layout

WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"
FILES = sorted(WORKFLOWS.glob("*.json"))
CANVAS = [f for f in FILES if not f.name.endswith(".api.json")]
VIRTUAL = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}


@pytest.fixture(scope="module")
def ifaces(shared_dir) -> Interfaces:
    found = interfaces(shared_dir / "data" / "comfyui-core-object_info.json")
    assert not found.broken, f"pack nodes whose INPUT_TYPES fails: {found.broken}"
    return found


def _id(p: pathlib.Path) -> str:
    return p.name


def test_workflows_are_shipped_in_pairs():
    assert FILES, f"no workflow found in {WORKFLOWS}: the pack ships its example workflows there"
    assert CANVAS, "workflows/ holds API files only; ship the canvas (UI) file beside each *.api.json"
    for f in FILES:
        if f.name.endswith(".api.json"):
            assert f.with_name(f.name[: -len(".api.json")] + ".json").is_file(), f"{f.name} has no canvas file"
        else:
            assert f.with_name(f.stem + ".api.json").is_file(), f"{f.name} has no API twin {f.stem}.api.json"


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_workflow_validates(path, ifaces):
    api, ui = load_workflow(path, ifaces)
    assert (ui is None) == path.name.endswith(".api.json"), f"{path.name}: wrong format for its name"
    validate(api, ifaces, classes=pack_classes(), files="lenient")


@pytest.mark.parametrize("path", CANVAS, ids=_id)
def test_canvas_file_matches_interfaces_and_twin(path, ifaces):
    ui = json.loads(path.read_text(encoding="utf-8"))
    assert is_ui(ui), f"{path.name}: not a canvas (UI-format) workflow"
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        if n["type"] in VIRTUAL or not isinstance(n.get("widgets_values"), list):
            continue
        slots, used = widget_layout(ifaces[n["type"]], n["widgets_values"])
        assert used == len(n["widgets_values"]), (
            f"{path.name}: node {n['id']} ({n['type']}) has {len(n['widgets_values'])} widget values; its "
            f"interface has {len(slots)} widgets (+ control/upload values)")
    for link in ui.get("links") or []:
        lid, src, slot, _dst, _dslot, typ = link[:6]
        if nodes[src]["type"] in VIRTUAL:
            continue
        outs = output_types(ifaces[nodes[src]["type"]])
        assert slot < len(outs), f"{path.name}: link {lid} leaves output {slot} of node {src}, which has {len(outs)}"
        assert typ in (outs[slot], "*"), f"{path.name}: link {lid} is typed {typ}, node {src} output {slot} gives {outs[slot]}"
    twin = path.with_name(path.stem + ".api.json")
    if twin.is_file():
        expected = json.loads(twin.read_text(encoding="utf-8"))
        got = to_api(ui, ifaces)
        strip = lambda a: {k: (v["class_type"], v["inputs"]) for k, v in a.items()}  # noqa: E731
        assert strip(got) == strip(expected), f"{path.name} and {twin.name} differ"
