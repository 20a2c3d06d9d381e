"""UI -> API conversion and validation, against ComfyUI's own core node interfaces (the /object_info snapshot).

The expected API prompts are written by hand from the frontend's rules (widget order from input_order, the
control-after-generate value after seeds, the upload button's value, reroutes followed, primitives inlined, muted
nodes dropped, bypassed ones passed through); real canvas files from ComfyUI's template package are checked too
where a ComfyUI install is around.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import pathlib

import pytest

from atelier.cli.interfaces import BUILTIN_CORE, Interfaces, core_interfaces
from atelier.cli.main import expand_jobs, parse_seeds, parse_set
from atelier.cli.workflow import (
    WorkflowError,
    load_workflow,
    problems,
    split_workflow,
    to_api,
    topological_order,
    validate,
)


@pytest.fixture(scope="module")
def core(shared_dir) -> Interfaces:
    return Interfaces(core_interfaces(shared_dir / "data" / "comfyui-core-object_info.json"))


def _node(nid, typ, widgets=None, inputs=(), mode=0, outputs=(), title=None):
    n = {"id": nid, "type": typ, "mode": mode, "inputs": [dict(i) for i in inputs],
         "outputs": [dict(o) for o in outputs], "properties": {}}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    return n


def _in(name, typ, link, widget=False):
    d = {"name": name, "type": typ, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def hand_made_ui() -> dict:
    """txt2img + image branch of core nodes, with a reroute, a primitive, a muted and a bypassed node and a note."""
    nodes = [
        _node(1, "LoadImage", ["photo.png", "image"]),
        _node(10, "Reroute", None, [_in("", "*", 1)]),
        _node(11, "PrimitiveNode", [96, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [3],
                                                              "widget": {"name": "width"}}]),
        _node(2, "ImageScale", ["bilinear", 64, 48, "disabled"],
              [_in("image", "IMAGE", 2), _in("width", "INT", 3, widget=True)]),
        _node(3, "ImageInvert", None, [_in("image", "IMAGE", 4)], mode=4,
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [5]}]),
        _node(4, "SaveImage", ["scaled"], [_in("images", "IMAGE", 5)], title="Save scaled"),
        _node(5, "PreviewImage", None, [_in("images", "IMAGE", 6)], mode=2),
        _node(7, "CheckpointLoaderSimple", ["sd15.safetensors"]),
        _node(8, "CLIPTextEncode", ["a cat"], [_in("clip", "CLIP", 7)]),
        _node(9, "CLIPTextEncode", ["blurry"], [_in("clip", "CLIP", 8)]),
        _node(12, "EmptyLatentImage", [512, 384, 2]),
        _node(6, "KSampler", [123, "randomize", 20, 7.5, "euler", "karras", 0.75],
              [_in("model", "MODEL", 9), _in("positive", "CONDITIONING", 10), _in("negative", "CONDITIONING", 11),
               _in("latent_image", "LATENT", 12)]),
        _node(13, "VAEDecode", None, [_in("samples", "LATENT", 13), _in("vae", "VAE", 14)]),
        _node(14, "SaveImage", ["txt2img"], [_in("images", "IMAGE", 15)]),
        _node(15, "Note", ["remember the cat"]),
    ]
    links = [
        [1, 1, 0, 10, 0, "IMAGE"], [2, 10, 0, 2, 0, "IMAGE"], [3, 11, 0, 2, 1, "INT"], [4, 2, 0, 3, 0, "IMAGE"],
        [5, 3, 0, 4, 0, "IMAGE"], [6, 1, 0, 5, 0, "IMAGE"], [7, 7, 1, 8, 0, "CLIP"], [8, 7, 1, 9, 0, "CLIP"],
        [9, 7, 0, 6, 0, "MODEL"], [10, 8, 0, 6, 1, "CONDITIONING"], [11, 9, 0, 6, 2, "CONDITIONING"],
        [12, 12, 0, 6, 3, "LATENT"], [13, 6, 0, 13, 0, "LATENT"], [14, 7, 2, 13, 1, "VAE"], [15, 13, 0, 14, 0, "IMAGE"],
    ]
    return {"last_node_id": 15, "last_link_id": 15, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


EXPECTED = {
    "1": ("LoadImage", {"image": "photo.png"}),
    "2": ("ImageScale", {"upscale_method": "bilinear", "width": 96, "height": 48, "crop": "disabled",
                         "image": ["1", 0]}),
    "4": ("SaveImage", {"filename_prefix": "scaled", "images": ["2", 0]}),
    "7": ("CheckpointLoaderSimple", {"ckpt_name": "sd15.safetensors"}),
    "8": ("CLIPTextEncode", {"text": "a cat", "clip": ["7", 1]}),
    "9": ("CLIPTextEncode", {"text": "blurry", "clip": ["7", 1]}),
    "12": ("EmptyLatentImage", {"width": 512, "height": 384, "batch_size": 2}),
    "6": ("KSampler", {"seed": 123, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "karras",
                       "denoise": 0.75, "model": ["7", 0], "positive": ["8", 0], "negative": ["9", 0],
                       "latent_image": ["12", 0]}),
    "13": ("VAEDecode", {"samples": ["6", 0], "vae": ["7", 2]}),
    "14": ("SaveImage", {"filename_prefix": "txt2img", "images": ["13", 0]}),
}


def test_ui_to_api_follows_the_frontend_rules(core):
    api = to_api(hand_made_ui(), core)
    assert {nid: (n["class_type"], n["inputs"]) for nid, n in api.items()} == EXPECTED
    assert api["4"]["_meta"]["title"] == "Save scaled"
    validate(api, core)  # and ComfyUI's own interfaces accept every value and link of it


def test_seed_without_control_value_and_dict_links(core):
    ui = hand_made_ui()
    for n in ui["nodes"]:
        if n["type"] == "KSampler":
            n["widgets_values"] = [5, 30, 6.0, "dpmpp_2m", "normal", 1.0]  # hand-written: no control value
    ui["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
                   for link in ui["links"]]
    api = to_api(ui, core)
    assert api["6"]["inputs"] == {**EXPECTED["6"][1], "seed": 5, "steps": 30, "cfg": 6.0,
                                         "sampler_name": "dpmpp_2m", "scheduler": "normal", "denoise": 1.0}
    assert api["2"]["inputs"] == EXPECTED["2"][1]


def test_load_workflow_reads_both_formats_and_png(core, tmp_path):
    ui = hand_made_ui()
    (tmp_path / "ui.json").write_text(json.dumps(ui))
    api_ref = to_api(ui, core)
    (tmp_path / "api.json").write_text(json.dumps(api_ref))
    api1, ui1 = load_workflow(tmp_path / "ui.json", core)
    api2, ui2 = load_workflow(tmp_path / "api.json", core)
    assert api1 == api_ref == api2 and ui1 == ui and ui2 is None
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("prompt", json.dumps(api_ref))
    meta.add_text("workflow", json.dumps(ui))
    Image.new("RGB", (4, 4)).save(tmp_path / "r.png", pnginfo=meta)
    api3, ui3 = load_workflow(tmp_path / "r.png", core)
    assert api3 == api_ref and ui3 == ui


def test_builtin_subset_matches_the_snapshot(core):
    for name, iface in BUILTIN_CORE.items():
        for key in ("input_order", "output", "output_node"):
            assert iface[key] == core[name][key], (name, key)
        assert set(iface["input"]["required"]) == set(core[name]["input"]["required"])


# ---- bad input: one error naming node id, type and input ---------------------------------------------------------


def _api():
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                      "width": 64, "height": 64, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }


def _break(path, value):
    api = _api()
    nid, name = path
    if value is KeyError:
        del api[nid]["inputs"][name]
    else:
        api[nid]["inputs"][name] = value
    return api


BAD = [
    ("link to a missing node", ("3", "images"), ["9", 0], "links to node 9"),
    ("missing output index", ("3", "images"), ["1", 5], "output 5 of node 1 (LoadImage)"),
    ("mismatched link type", ("3", "images"), ["1", 1], "gives MASK"),
    ("missing required input", ("3", "images"), KeyError, "required input is missing"),
    ("value above max", ("2", "width"), 99999, "above the maximum 16384"),
    ("value below min", ("2", "height"), -1, "below the minimum 0"),
    ("not among choices", ("2", "upscale_method"), "sharpest", "not among the choices"),
    ("wrong value type", ("2", "width"), "wide", "expected an integer"),
    ("fractional int", ("2", "width"), 64.5, "expected an integer"),
    ("malformed link", ("3", "images"), ["2"], "malformed link"),
    ("constant for a socket", ("3", "images"), "pic.png", "expects a link"),
]


@pytest.mark.parametrize("case,where,value,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_node_type_and_input(core, case, where, value, text):
    api = _break(where, value)
    with pytest.raises(WorkflowError) as ei:
        validate(api, core)
    e = ei.value
    nid, name = where
    assert (e.node_id, e.class_type, e.input_name) == (nid, api[nid]["class_type"], name)
    assert text in str(e) and f"node {nid} ({api[nid]['class_type']})" in str(e) and f"'{name}'" in str(e)


def test_cycle_is_reported_with_the_closing_input(core):
    api = _api()
    api["4"] = {"class_type": "ImageInvert", "inputs": {"image": ["5", 0]}}
    api["5"] = {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}}
    api["3"]["inputs"]["images"] = ["5", 0]
    with pytest.raises(WorkflowError, match="cycle") as ei:
        validate(api, core)
    assert ei.value.node_id in ("4", "5") and ei.value.class_type == "ImageInvert" and ei.value.input_name == "image"
    with pytest.raises(WorkflowError, match="cycle"):
        topological_order(api)


def test_unknown_type_and_malformed_nodes(core):
    api = _api()
    api["2"]["class_type"] = "NoSuchNode"
    with pytest.raises(WorkflowError, match=r"node 2 \(NoSuchNode\): unknown node type"):
        validate(api, core)
    api = _api()
    del api["2"]["class_type"]
    with pytest.raises(WorkflowError, match="node 2: the node has no 'class_type'"):
        validate(api, core)
    assert len(problems({"1": {"class_type": "LoadImage", "inputs": {}}}, core)) == 1


def test_several_problems_are_counted_in_one_error(core):
    api = _break(("2", "width"), 99999)
    api["3"]["inputs"]["images"] = ["9", 0]
    with pytest.raises(WorkflowError, match=r"node 2 \(ImageScale\).*\(and 1 more problem\)"):
        validate(api, core)


def test_malformed_files(core, tmp_path):
    (tmp_path / "bad.json").write_text('{"1": {"class_type": "LoadImage", ')
    with pytest.raises(WorkflowError, match=r"bad.json: not valid JSON \(line 1"):
        load_workflow(tmp_path / "bad.json", core)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        load_workflow(tmp_path / "list.json", core)
    ui = hand_made_ui()
    ui["nodes"][3]["inputs"][0]["link"] = 99
    with pytest.raises(WorkflowError, match=r"node 2 \(ImageScale\), input 'image': link 99 is not in"):
        to_api(ui, core)
    ui = hand_made_ui()
    ui["links"][1][1] = 77  # the reroute's link now comes from a node that does not exist
    with pytest.raises(WorkflowError, match="comes from node 77"):
        to_api(ui, core)
    ui = hand_made_ui()
    ui["nodes"][0]["type"] = "NotANode"
    with pytest.raises(WorkflowError, match=r"node 1 \(NotANode\): unknown node type"):
        to_api(ui, core)


def test_muted_source_leaves_a_required_input_missing(core):
    ui = hand_made_ui()
    for n in ui["nodes"]:
        if n["id"] == 13:
            n["mode"] = 2  # VAEDecode muted: the SaveImage after it has no images
    with pytest.raises(WorkflowError) as ei:
        validate(to_api(ui, core), core)
    assert (ei.value.node_id, ei.value.class_type, ei.value.input_name) == ("14", "SaveImage", "images")


# ---- sweeps ----------------------------------------------------------------------------------------------------


def test_seed_sweep_sets_api_and_ui_widgets(core):
    ui = hand_made_ui()
    api, ui = split_workflow(ui, core)
    jobs = expand_jobs(api, ui, core, parse_seeds("3-5"), ["12.batch_size=1,4"])
    assert [label for label, _, _ in jobs] == [f"seed={s} 12.batch_size={b}" for s in (3, 4, 5) for b in (1, 4)]
    for (label, a, u), (s, b) in zip(jobs, [(s, b) for s in (3, 4, 5) for b in (1, 4)]):
        assert a["6"]["inputs"]["seed"] == s and a["12"]["inputs"]["batch_size"] == b
        back = to_api(u, core)  # the UI copy embedded in outputs restores the same values
        assert back["6"]["inputs"]["seed"] == s and back["12"]["inputs"]["batch_size"] == b
        validate(a, core)
    assert api["6"]["inputs"]["seed"] == 123  # the original is untouched


def test_sweep_through_a_primitive_updates_the_canvas_value(core):
    api, ui = split_workflow(hand_made_ui(), core)
    (_label, a, u), = expand_jobs(api, ui, core, None, ["2.width=128"])
    assert a["2"]["inputs"]["width"] == 128
    prim = next(n for n in u["nodes"] if n["type"] == "PrimitiveNode")
    assert prim["widgets_values"][0] == 128 and to_api(u, core)["2"]["inputs"]["width"] == 128


def test_sweep_arguments():
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    assert parse_set("5.text=[\"a, b\", \"c\"]") == ("5", "text", ["a, b", "c"])
    assert parse_set("Save scaled.filename_prefix=x") == ("Save scaled", "filename_prefix", ["x"])
    for bad in ("1-", "a-b", "5-1"):
        with pytest.raises(WorkflowError, match="--batch-seeds"):
            parse_seeds(bad)
    with pytest.raises(WorkflowError, match="--set"):
        parse_set("steps=20")


def test_no_seed_to_sweep(core):
    with pytest.raises(WorkflowError, match="no seed input"):
        expand_jobs(_api(), None, core, [1, 2], [])


# ---- real canvas files -------------------------------------------------------------------------------------------


def _templates() -> list[pathlib.Path]:
    roots = [os.environ.get("ATELIER_COMFYUI", ""), "/work/comfyui"]
    for root in filter(None, roots):
        found = glob.glob(os.path.join(root, ".venv", "lib", "python3*", "site-packages",
                                       "comfyui_workflow_templates", "templates"))
        if found:
            return [pathlib.Path(found[0]) / n for n in ("default.json", "esrgan_example.json",
                                                         "hiresfix_esrgan_workflow.json")]
    return []


def test_frontend_saved_templates_convert_to_valid_prompts(core):
    """Canvas files saved by ComfyUI's frontend (its template package): every widget lands on a valid input."""
    files = [f for f in _templates() if f.is_file()]
    if not files:
        pytest.skip("ComfyUI's workflow templates not found (set ATELIER_COMFYUI to a ComfyUI with its .venv)")
    for f in files:
        ui = json.loads(f.read_text())
        api = to_api(ui, core)
        validate(api, core)
        ks = [n for n in ui["nodes"] if n["type"] == "KSampler"]
        for n in ks:  # seed, control, steps, cfg, sampler, scheduler, denoise, as the canvas shows them
            vals = n["widgets_values"]
            got = api[str(n["id"])]["inputs"]
            assert [got[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")] == \
                [vals[0]] + vals[2:7], f.name
        assert copy.deepcopy(ui) == ui
