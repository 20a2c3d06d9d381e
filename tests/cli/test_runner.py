"""The embedded runner on core I/O nodes: files, metadata, counters, failures, list semantics, the CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.cli.core_nodes import IOFolders, LoadImage
from atelier.cli.interfaces import BUILTIN_CORE, Interfaces, node_info
from atelier.cli.main import main
from atelier.cli.runner import NodeError, Runner
from atelier.cli.workflow import WorkflowError, to_api


@pytest.fixture
def rgba(tmp_path) -> np.ndarray:
    arr = np.random.RandomState(0).randint(0, 256, (12, 20, 4), dtype=np.uint8)  # [H,W,RGBA]
    Image.fromarray(arr, "RGBA").save(tmp_path / "in.png")
    return arr


def ui_workflow(image="in.png", prefix="res") -> dict:
    return {
        "last_node_id": 2, "last_link_id": 1, "version": 0.4, "groups": [], "config": {}, "extra": {},
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [], "widgets_values": [image, "image"],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}, {"name": "MASK", "type": "MASK", "links": []}]},
            {"id": 2, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
             "outputs": [], "widgets_values": [prefix]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
    }


@pytest.fixture
def core() -> Interfaces:
    return Interfaces(dict(BUILTIN_CORE))


def _files(d) -> list[str]:
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_load_save_roundtrip_with_metadata_and_no_overwrite(tmp_path, rgba, core):
    ui = ui_workflow()
    api = to_api(ui, core)
    out = tmp_path / "out"
    runner = Runner(core, output_dir=str(out), input_dir=str(tmp_path))
    r1 = runner.run(api, ui)
    assert [os.path.basename(f) for f in r1.files] == ["res_00001_.png"]
    with Image.open(r1.files[0]) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), rgba[..., :3])  # pixels of the input, 8-bit exact
        assert json.loads(im.text["prompt"]) == api
        assert json.loads(im.text["workflow"]) == ui
    first = open(r1.files[0], "rb").read()
    r2 = Runner(core, output_dir=str(out), input_dir=str(tmp_path)).run(api, None)  # API input: no workflow chunk
    assert os.path.basename(r2.files[0]) == "res_00002_.png"
    assert open(r1.files[0], "rb").read() == first
    with Image.open(r2.files[0]) as im:
        assert "workflow" not in im.text and json.loads(im.text["prompt"]) == api
    (out / "res_00007_.png").write_bytes(b"someone else's")
    r3 = runner.run(api, ui)
    assert os.path.basename(r3.files[0]) == "res_00008_.png"
    assert r3.ui["2"]["images"] == [{"filename": "res_00008_.png", "subfolder": "", "type": "output"}]
    assert (out / "res_00007_.png").read_bytes() == b"someone else's"
    assert _files(out) == ["res_00001_.png", "res_00002_.png", "res_00007_.png", "res_00008_.png"]
    assert [s.class_type for s in r3.stats] == ["LoadImage", "SaveImage"]


def test_load_image_like_comfyui(tmp_path, rgba):
    io = IOFolders(str(tmp_path), str(tmp_path), str(tmp_path), str(tmp_path))
    node = LoadImage()
    node.io = io
    img, mask = node.load_image("in.png")
    assert img.shape == (1, 12, 20, 3) and img.dtype == torch.float32
    assert torch.allclose(img[0], torch.from_numpy(rgba[..., :3].astype(np.float32) / 255))
    assert torch.allclose(mask[0], 1 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255))
    Image.fromarray(rgba[..., :3], "RGB").save(tmp_path / "rgb.png")
    img, mask = node.load_image(str(tmp_path / "rgb.png"))  # absolute path; no alpha: 64x64 zero mask
    assert img.shape == (1, 12, 20, 3) and mask.shape == (1, 64, 64) and not mask.any()


def test_failing_node_leaves_no_output(tmp_path, rgba, core):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    api = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "good"}},  # runs first
        "3": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},  # then fails
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}},
    }
    out = tmp_path / "out"
    runner = Runner(core, output_dir=str(out), input_dir=str(tmp_path))
    with pytest.raises(NodeError, match=r"node 3 \(LoadImage\) failed: image: .*broken.png"):
        runner.run(api)
    assert _files(out) == []  # neither the good image nor a staging folder is left


def test_errors_before_anything_runs(tmp_path, rgba, core, shared_dir):
    from atelier.cli.interfaces import core_interfaces

    full = Interfaces(core_interfaces(shared_dir / "data" / "comfyui-core-object_info.json"))
    out = tmp_path / "out"
    api = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    with pytest.raises(WorkflowError, match=r"node 2 \(ImageInvert\): .*--server") as ei:
        Runner(full, output_dir=str(out), input_dir=str(tmp_path)).run(api)
    assert ei.value.node_id == "2"
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(WorkflowError, match=r"node 1 \(LoadImage\), input 'image': no file 'missing.png'"):
        Runner(core, output_dir=str(out), input_dir=str(tmp_path)).run(api)
    assert _files(out) == []


# ---- executor semantics with small test nodes -------------------------------------------------------------------


class Counter:
    """Counts its instances and calls; emits 3 items as a list output."""

    instances = 0
    calls = 0
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "go"

    def __init__(self):
        type(self).instances += 1

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {"default": 3, "min": 1, "max": 10})}}

    def go(self, n):
        type(self).calls += 1
        return (list(range(n)),)


class Square:
    RETURN_TYPES = ("INT",)
    FUNCTION = "go"
    calls = 0

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}

    def go(self, x):
        type(self).calls += 1
        return {"result": (x * x,)}


class Collect:
    RETURN_TYPES = ()
    FUNCTION = "go"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    seen: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"xs": ("INT", {"forceInput": True})}, "hidden": {"uid": "UNIQUE_ID"}}

    def go(self, xs, uid):
        type(self).seen.append((list(xs), uid))
        return {"ui": {"values": list(xs)}}


def test_list_semantics_instances_and_cache(tmp_path, core):
    classes = {"Counter": Counter, "Square": Square, "Collect": Collect}
    ifaces = Interfaces({**core, **{k: node_info(k, c) for k, c in classes.items()}})
    runner = Runner(ifaces, output_dir=str(tmp_path / "out"))
    runner.classes.update(classes)
    api = {"1": {"class_type": "Counter", "inputs": {"n": 4}},
           "2": {"class_type": "Square", "inputs": {"x": ["1", 0]}},
           "3": {"class_type": "Collect", "inputs": {"xs": ["2", 0]}}}
    Counter.instances = Counter.calls = Square.calls = 0
    Collect.seen = []
    r = runner.run(api)
    assert Collect.seen == [([0, 1, 4, 9], ["3"])]  # Square ran once per item; Collect got the whole list
    assert Square.calls == 4 and r.ui["3"] == {"values": [0, 1, 4, 9]}
    runner.run(api)  # unchanged: Counter and Square reused, the output node runs again
    assert (Counter.instances, Counter.calls, Square.calls) == (1, 1, 4) and len(Collect.seen) == 2
    api["1"]["inputs"]["n"] = 2
    runner.run(api)
    assert (Counter.instances, Counter.calls, Square.calls) == (1, 2, 6) and Collect.seen[-1][0] == [0, 1]
    api["1"]["inputs"]["n"] = 11
    with pytest.raises(WorkflowError, match=r"node 1 \(Counter\), input 'n': value 11 is above the maximum 10"):
        runner.run(api)


class Loader:
    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (["x4.pth", "sub/x2.safetensors"], {})}}

    def go(self, model):
        return (len(model),)


def test_model_names_are_checked_here_not_in_shipped_files(tmp_path, core):
    from atelier.cli.validation import validate

    classes = {"Loader": Loader, "Collect": Collect}
    ifaces = Interfaces({**core, **{k: node_info(k, c) for k, c in classes.items()}})
    api = {"1": {"class_type": "Loader", "inputs": {"model": "x8.pth"}},
           "2": {"class_type": "Collect", "inputs": {"xs": ["1", 0]}}}
    validate(api, ifaces)  # shipped workflows name models this machine may lack: accepted
    runner = Runner(ifaces, output_dir=str(tmp_path / "out"))
    runner.classes.update(classes)
    with pytest.raises(WorkflowError, match=r"node 1 \(Loader\), input 'model': 'x8.pth' is not among the files found.*--models"):
        runner.run(api)
    api["1"]["inputs"]["model"] = "sub/x2.safetensors"
    assert runner.run(api).ui["2"] == {"values": [len("sub/x2.safetensors")]}


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli_run_and_errors(tmp_path, rgba, capsys):
    (tmp_path / "wf.json").write_text(json.dumps(ui_workflow()))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "wf.json"), "--output", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "res_00001_.png")
    assert "LoadImage" in captured.err and "peak RSS" in captured.err  # the summary table
    bad = ui_workflow(image="nope.png")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["run", str(tmp_path / "bad.json"), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("atelier: error: node 1 (LoadImage), input 'image'")
    assert "Traceback" not in err
    assert _files(out) == ["res_00001_.png"]
    assert main(["models", "inspect", str(tmp_path / "nothing.safetensors")]) == 1
    assert capsys.readouterr().err.startswith("atelier: error:")


def test_example_inputs_resolve_as_in_comfyui(tmp_path):
    """A plain name the input folder lacks is one of the pack's example inputs (workflows/input/), which ComfyUI's
    input folder also has once the pack loaded: the same workflow file runs in both."""
    import os

    from atelier.cli.core_nodes import EXAMPLE_INPUTS, IOFolders, resolve_image_path
    from atelier.models.errors import InputError

    names = sorted(os.listdir(EXAMPLE_INPUTS))
    assert names, "workflows/input/ ships no example input"
    io = IOFolders(str(tmp_path), str(tmp_path / "out"), str(tmp_path / "stage"), str(tmp_path / "prev"))
    assert resolve_image_path(names[0], io) == os.path.join(EXAMPLE_INPUTS, names[0])
    (tmp_path / names[0]).write_bytes(b"the user's file wins")
    assert resolve_image_path(names[0], io) == str(tmp_path / names[0])
    with pytest.raises(InputError, match=r"image: no file 'sub/"):
        resolve_image_path(f"sub/{names[0]}", io)  # only plain names fall back
