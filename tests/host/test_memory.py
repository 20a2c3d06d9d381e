"""Issue 3: a model this pack loaded sits in ComfyUI's own memory manager, and the real /free evicts it.

There is no HTTP endpoint listing loaded models, so the evidence is ComfyUI's log, printed by
comfy.model_management itself (not by the pack):
  load_models_gpu:  "Requested to load <module class>"  (INFO, only when the patcher is not already loaded)
  free_memory:      "Unloading <module class>"          (DEBUG; the server runs with --verbose DEBUG)
The module class is found independently, by loading the same file with atelier's ModelManager in this process.

  run 1                  -> "Requested to load X"   (ours went through load_models_gpu)
  run 2, other input     -> no new request           (still in ComfyUI's loaded list: it was really registered)
  POST /free             -> "Unloading X"            (ComfyUI's unload_all_models evicted it)
  run 3                  -> "Requested to load X"   (it had left the loaded list, so it is loaded again)
"""
from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.host

OUR_MODEL_FOLDERS = ("upscale_models", "vae_approx", "vae")
PREFERRED_FILES = ("realesr-animevideov3.pth", "taef2_decoder.pth", "taef2_encoder.pth")
SIDE = 64  # input image side: small, the models are run on a CPU


def _combo_options(spec) -> list | None:
    """Options of a combo input in /object_info (V1 `[[...], {...}]` or V3 `["COMBO", {"options": [...]}]`)."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options", []))
    return None


def _default_for(spec):
    """A value for a required widget input: its default, else the first combo option; None if there is none."""
    opts = _combo_options(spec)
    if opts:
        return opts[0]
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
        return spec[1]["default"]
    if isinstance(spec, (list, tuple)) and spec and spec[0] == "BOOLEAN":
        return False
    return None


def _build_upscale_graph(info: dict, image_name: str) -> tuple[dict, str] | None:
    """From /object_info alone: LoadImage -> <our node taking IMAGE + a loaded model, giving IMAGE> -> SaveImage,
    the model from <our loader node with a combo listing PREFERRED_FILES>. (prompt, model file name) or None."""
    ours = {k: v for k, v in info.items() if k.startswith("Atelier")}
    for fname in PREFERRED_FILES:
        for lname, lnode in ours.items():
            req = lnode.get("input", {}).get("required", {})
            widget = next((w for w, s in req.items() if fname in (_combo_options(s) or [])), None)
            if widget is None:
                continue
            single = _single_node_graph(lname, lnode, widget, fname, image_name)
            if single is not None:  # one node that takes the file name and the image
                return single, fname
            if len(lnode.get("output", [])) != 1 or lnode["output"][0] in ("IMAGE", "LATENT"):
                continue
            mtype = lnode["output"][0]
            others = {w: _default_for(s) for w, s in req.items() if w != widget}
            if any(v is None for v in others.values()):
                continue
            for cname, cnode in ours.items():
                creq = cnode.get("input", {}).get("required", {})
                types = {w: (s[0] if isinstance(s, (list, tuple)) and s and isinstance(s[0], str) else None)
                         for w, s in creq.items()}
                mw = next((w for w, t in types.items() if t == mtype), None)
                iw = next((w for w, t in types.items() if t == "IMAGE"), None)
                if mw is None or iw is None or "IMAGE" not in cnode.get("output", []):
                    continue
                rest = {w: _default_for(s) for w, s in creq.items() if w not in (mw, iw)}
                if any(v is None for v in rest.values()):
                    continue
                prompt = {
                    "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
                    "2": {"class_type": lname, "inputs": {widget: fname, **others}},
                    "3": {"class_type": cname, "inputs": {mw: ["2", 0], iw: ["1", 0], **rest}},
                    "4": {"class_type": "SaveImage",
                          "inputs": {"images": ["3", cnode["output"].index("IMAGE")], "filename_prefix": "mem"}},
                }
                return prompt, fname
    return None


def _single_node_graph(name: str, node: dict, widget: str, fname: str, image_name: str) -> dict | None:
    req = node.get("input", {}).get("required", {})
    iw = next((w for w, s in req.items() if isinstance(s, (list, tuple)) and s and s[0] == "IMAGE"), None)
    if iw is None or "IMAGE" not in node.get("output", []):
        return None
    rest = {w: _default_for(s) for w, s in req.items() if w not in (widget, iw)}
    if any(v is None for v in rest.values()):
        return None
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": name, "inputs": {widget: fname, iw: ["1", 0], **rest}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", node["output"].index("IMAGE")],
                                                    "filename_prefix": "mem"}},
    }


def _module_class(models_root, fname: str) -> str:
    """The class name of the module atelier builds for `fname` (what ComfyUI will name in its log)."""
    from atelier.models.manager import ModelManager

    mgr = ModelManager(str(models_root))
    for folder in OUR_MODEL_FOLDERS:
        if (models_root / folder / fname).exists():
            return type(mgr.load(fname, folder).model).__name__
    raise AssertionError(f"{fname} is in none of {OUR_MODEL_FOLDERS} under {models_root}")


def _wait_for_log(comfy, offset: int, needle: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = comfy.log_since(offset)
        if needle in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"ComfyUI's log shows no {needle!r} within {timeout:.0f} s after /free:\n"
                         + comfy.log_since(offset)[-3000:])


def _run_logged(comfy, prompt: dict) -> tuple[str, list]:
    off = comfy.log_size()
    entry = comfy.run(prompt)
    time.sleep(0.3)  # the log line and the history entry come from the same thread; give the file a moment
    return comfy.log_since(off), comfy.image_arrays(entry)


def test_free_unloads_a_model_the_pack_loaded(comfy):
    info = comfy.get_json("/object_info")
    rng = np.random.default_rng(0)
    img_a = (rng.random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
    img_b = np.ascontiguousarray(img_a[::-1])  # another input so the model node runs again (not from cache)
    comfy.put_input("mem_a.png", img_a)
    comfy.put_input("mem_b.png", img_b)
    built = _build_upscale_graph(info, "mem_a.png")
    if built is None:
        pytest.skip("no Atelier loader node offering " + ", ".join(PREFERRED_FILES)
                    + " with an Atelier IMAGE node to feed, in /object_info")
    prompt, fname = built
    cls = _module_class(comfy.models_root, fname)
    request = f"Requested to load {cls}"
    comfy.free()  # start clean: other tests of the session may have loaded this model already

    log1, out1 = _run_logged(comfy, prompt)
    assert out1, "the workflow saved no image"
    assert request in log1, (f"running {fname} did not go through ComfyUI's load_models_gpu "
                             f"(no {request!r} in the log):\n{log1[-3000:]}")

    prompt["1"]["inputs"]["image"] = "mem_b.png"
    log2, out2 = _run_logged(comfy, prompt)
    assert "Prompt executed" in log2
    assert request not in log2, ("the second run requested the model again without /free: the pack does not keep "
                                 f"one registered ModelPatcher per model, so eviction cannot be observed:\n{log2[-3000:]}")

    off = comfy.log_size()
    comfy.free(unload_models=True, free_memory=True)  # what the frontend's "Unload models" button sends
    _wait_for_log(comfy, off, f"Unloading {cls}")

    log3, out3 = _run_logged(comfy, prompt)
    assert request in log3, f"after /free the model was not loaded again, so it had not been evicted:\n{log3[-3000:]}"
    assert len(out3) == len(out2) and out3, "no output after reloading"
    for (key, a), (_, b) in zip(out2, out3):  # the reloaded model computes what the resident one did
        assert a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1, key
