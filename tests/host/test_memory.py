"""Issue 3: a model this pack loaded sits in ComfyUI's own memory manager, and the real /free evicts it.

There is no HTTP endpoint listing loaded models, so the evidence is ComfyUI's log, printed by
comfy.model_management itself (not by the pack):
  load_models_gpu:  "Requested to load <module class>"  (INFO, only when the patcher is not already loaded)
  free_memory:      "Unloading <module class>"          (DEBUG; the server runs with --verbose DEBUG)
The module class is found independently, by loading the same file with atelier's ModelManager in this process.

  run 1                  -> "Requested to load X"   (ours went through load_models_gpu)
  run 2, other input     -> no new request           (still in ComfyUI's loaded list: it was really registered)
  POST /free             -> "Unloading X"            (ComfyUI's unload_all_models evicted it)
  run 3 (= run 2)        -> "Requested to load X"   (it had left the loaded list, so it is loaded again)
                            and the same pixels as run 2

The graph is built from the server's /object_info: our loader node offering one of PREFERRED_FILES, then the node
that consumes its output and gives an IMAGE (other inputs at their defaults, or fed by our other nodes / LoadImage).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

pytestmark = pytest.mark.host

# Tried in order: an upscaler, the TAEF2 decoder, the MNIST GAN. Model folders as ComfyUI names them.
PREFERRED_FILES = ("realesr-animevideov3.pth", "taef2_decoder.pth", "taef2_encoder.pth", "gan_mlp_G.ckpt")
OUR_MODEL_FOLDERS = ("upscale_models", "vae_approx", "vae", "gans")
# Consumers tried first / last (name fragments): quick one-pass nodes before optimisation loops.
PREFER = ("Upscale", "Decode", "Sample")
AVOID = ("Project", "Info", "Interpolate", "StyleMix")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SIDE = 48  # input image side: small, the models run on a CPU


# ---------------------------------------------------------------------------------------------- graph building
def _type(spec) -> str:
    if isinstance(spec, (list, tuple)) and spec:
        return "COMBO" if isinstance(spec[0], list) else str(spec[0])
    return str(spec)


def _combo_options(spec) -> list:
    """Options of a combo input in /object_info (V1 `[[...], {...}]` or V3 `["COMBO", {"options": [...]}]`)."""
    if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], list):
        return spec[0]
    if _type(spec) == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options", []))
    return []


def _default(spec):
    """A widget's value when the user changes nothing: its default, else the first option / 0 / "" / False."""
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    return {"COMBO": (_combo_options(spec) or [None])[0], "INT": opts.get("min", 0), "FLOAT": opts.get("min", 0.0),
            "STRING": "", "BOOLEAN": False}[_type(spec)]


def _rank(name: str) -> tuple[int, str]:
    if any(a in name for a in AVOID):
        return 2, name
    return (0 if any(p in name for p in PREFER) else 1), name


class _Graph:
    """An API prompt under construction: our loader, then whatever its consumer needs."""

    def __init__(self, info: dict, ours: dict, loader: str, widget: str, fname: str, mtype: str, image: str):
        self.info, self.ours, self.mtype, self.image = info, ours, mtype, image
        req = ours[loader]["input"].get("required", {})
        self.nodes: dict[str, dict] = {}
        self.loader_id = self.add(loader, {w: (fname if w == widget else _default(s)) for w, s in req.items()})

    def add(self, ctype: str, inputs: dict) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": ctype, "inputs": inputs}
        return nid

    def source(self, typ: str, depth: int, avoid: set) -> list | None:
        """A link giving `typ`: the loader, LoadImage, or one of our nodes whose own inputs can be met."""
        if typ == self.mtype:
            return [self.loader_id, 0]
        if typ == "IMAGE":
            nid = next((k for k, n in self.nodes.items() if n["class_type"] == "LoadImage"), None)
            return [nid or self.add("LoadImage", {"image": self.image}), 0]
        if depth <= 0:
            return None
        for name in sorted(self.ours, key=_rank):
            node = self.ours[name]
            if name in avoid or typ not in node.get("output", []) or _rank(name)[0] == 2:
                continue
            inputs = self.fill(name, depth - 1, avoid | {name})
            if inputs is not None:
                return [self.add(name, inputs), node["output"].index(typ)]
        return None

    def fill(self, name: str, depth: int, avoid: set) -> dict | None:
        """Inputs for node `name` (nodes feeding it are added), or None with the graph left as it was."""
        snapshot = copy.deepcopy(self.nodes)
        inputs = {}
        for w, spec in self.info[name]["input"].get("required", {}).items():
            if _type(spec) in WIDGET_TYPES:
                inputs[w] = _default(spec)
                continue
            link = self.source(_type(spec), depth, avoid)
            if link is None:
                self.nodes = snapshot
                return None
            inputs[w] = link
        return inputs


def build_graph(info: dict, image: str) -> tuple[dict, str] | None:
    """(API prompt loading one of PREFERRED_FILES with our loader and saving an IMAGE computed by our node, file)."""
    ours = {k: v for k, v in info.items() if k.startswith("Atelier")}
    for fname in PREFERRED_FILES:
        for loader in sorted(ours):
            req = ours[loader]["input"].get("required", {})
            widget = next((w for w, s in req.items() if fname in _combo_options(s)), None)
            outs = ours[loader].get("output", [])
            if widget is None or loader == "AtelierModelInfo" or not outs:
                continue
            mtype = outs[0]
            if mtype == "IMAGE":  # a node taking the file name itself and giving the image
                candidates = [loader]
            else:
                candidates = [n for n in sorted(ours, key=_rank)
                              if _rank(n)[0] < 2 and "IMAGE" in ours[n].get("output", [])
                              and mtype in [_type(s) for s in ours[n]["input"].get("required", {}).values()]]
            for consumer in candidates:
                g = _Graph(info, ours, loader, widget, fname, mtype, image)
                if consumer == loader:
                    inputs = g.fill(loader, 2, {loader})
                    if inputs is None:
                        continue
                    inputs[widget] = fname
                    g.nodes[g.loader_id]["inputs"] = inputs
                    out_id = g.loader_id
                else:
                    inputs = g.fill(consumer, 2, {loader, consumer})
                    if inputs is None:
                        continue
                    out_id = g.add(consumer, inputs)
                g.add("SaveImage", {"images": [out_id, info[consumer]["output"].index("IMAGE")],
                                    "filename_prefix": "atelier_mem"})
                return g.nodes, fname
    return None


def vary(prompt: dict, other_image: str) -> dict:
    """The same graph on other data (so our model node runs again): the other image, or every seed + 1."""
    p = copy.deepcopy(prompt)
    changed = False
    for node in p.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = other_image
            changed = True
    if not changed:
        for node in p.values():
            for k, v in node["inputs"].items():
                if "seed" in k and isinstance(v, int):
                    node["inputs"][k] = v + 1
                    changed = True
    if not changed:
        pytest.skip(f"cannot make the graph run again without /free (no LoadImage, no seed): {p}")
    return p


# ---------------------------------------------------------------------------------------------- the test
def _module_class(models_root, fname: str) -> str:
    """The class name of the module atelier builds for `fname` (what ComfyUI names in its log)."""
    from atelier.models.manager import ModelManager

    mgr = ModelManager(str(models_root))
    for folder in OUR_MODEL_FOLDERS:
        if (models_root / folder / fname).exists():
            return type(mgr.load(fname, folder).model).__name__
    raise AssertionError(f"{fname} is in none of {OUR_MODEL_FOLDERS} under {models_root}")


def _run_logged(comfy, prompt: dict) -> tuple[str, list]:
    off = comfy.log_size()
    entry = comfy.run(prompt)
    return comfy.log_since(off), comfy.image_arrays(entry)


def test_free_unloads_a_model_the_pack_loaded(comfy):
    info = comfy.get_json("/object_info")
    rng = np.random.default_rng(0)
    img_a = (rng.random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
    comfy.put_input("mem_a.png", img_a)
    comfy.put_input("mem_b.png", np.ascontiguousarray(img_a[::-1]))
    built = build_graph(info, "mem_a.png")
    if built is None:
        pytest.skip("no Atelier loader node offering one of " + ", ".join(PREFERRED_FILES)
                    + " with an Atelier node turning its output into an IMAGE, in /object_info")
    prompt, fname = built
    cls = _module_class(comfy.models_root, fname)
    request = f"Requested to load {cls}"
    comfy.free()  # start clean: other tests of the session may have loaded this model already
    where = f"graph {prompt}"

    log1, out1 = _run_logged(comfy, prompt)
    assert out1, f"the graph saved no image; {where}"
    assert request in log1, (f"running {fname} did not go through ComfyUI's load_models_gpu "
                             f"(no {request!r} in the log); {where}:\n{log1[-3000:]}")

    prompt2 = vary(prompt, "mem_b.png")
    log2, out2 = _run_logged(comfy, prompt2)
    assert out2 and "Prompt executed" in log2
    assert any(a.shape != b.shape or not np.array_equal(a, b) for (_, a), (_, b) in zip(out1, out2)), \
        "the second run gave the first run's pixels: our node was not run again, so it proves nothing"
    assert request not in log2, ("the second run requested the model again without /free: the pack does not keep one "
                                 "registered ModelPatcher per model, so eviction cannot be observed:\n" + log2[-3000:])

    off = comfy.log_size()
    comfy.free(unload_models=True, free_memory=True)  # what the frontend's "Unload models" button sends
    freed = comfy.log_since(off)
    assert f"Unloading {cls}" in freed, f"/free did not unload {cls}:\n{freed[-3000:]}"

    log3, out3 = _run_logged(comfy, prompt2)
    assert request in log3, f"after /free the model was not loaded again, so it had not been evicted:\n{log3[-3000:]}"
    assert [k for k, _ in out3] == [k for k, _ in out2]
    for (key, a), (_, b) in zip(out2, out3):  # the reloaded model computes what the resident one did
        assert a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1, key
