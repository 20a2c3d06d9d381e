"""The safe NVIDIA network-pickle importer: crafted NVIDIA-shaped pickles (stand-in classes of our own, written as
NVIDIA's persistence writes them, see shared/golden/stylegan/NVLABS_PKL_FORMAT.md) load and reproduce the golden
outputs; malicious pickles are refused naming the global, and their payload never runs."""
from __future__ import annotations

import builtins
import collections
import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from atelier.models import loading, registry
from atelier.models.errors import InputError, ModelLoadError, UnsafeFileError
from atelier.models.nvlabs_pkl import export_safetensors, read_nvlabs_pkl

TOL = 1e-4
BUFFERS = {"w_avg", "resample_filter", "noise_const", "magnitude_ema", "up_filter", "down_filter", "transform",
           "freqs", "phases"}
HOOKS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
         "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
         "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# writing NVIDIA-shaped pickles with stand-ins of our own


def _never_called(meta):  # pickled by reference only
    raise AssertionError("the stand-in reconstruct function must never be called")


class EasyDict(dict):
    """Our stand-in for dnnlib.util.EasyDict (pickled under that name)."""


@pytest.fixture
def nvidia_names(monkeypatch):
    """Fake modules so that pickle writes our stand-ins under NVIDIA's global names (dump time only)."""
    tu, tup = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dn, dnu = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    _never_called.__module__, _never_called.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    tup._reconstruct_persistent_obj = _never_called
    EasyDict.__module__ = "dnnlib.util"
    dnu.EasyDict = EasyDict
    for m in (tu, tup, dn, dnu):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    yield


class Persistent:
    """Pickles exactly like an instance of an NVIDIA @persistent_class: REDUCE(_reconstruct_persistent_obj, (meta,))."""

    def __init__(self, class_name, state, module_src):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return (_never_called, (meta,))


def _class_name(path: str) -> str:
    last = path.split(".")[-1] if path else ""
    if not path:
        return "Generator"
    if path in ("mapping", "synthesis"):
        return {"mapping": "MappingNetwork", "synthesis": "SynthesisNetwork"}[path]
    if last == "input":
        return "SynthesisInput"
    if last.startswith("b") and last[1:].isdigit():
        return "SynthesisBlock"
    if last in ("conv0", "conv1") or last.startswith("L"):
        return "SynthesisLayer"
    return {"torgb": "ToRGBLayer", "skip": "Conv2dLayer"}.get(last, "FullyConnectedLayer")


def module_tree(sd: dict, init_kwargs: dict, module_src: str, none_buffers: dict | None = None) -> Persistent:
    """NVIDIA-shaped records from a flat state dict: torch Module __dict__ layout, hook dicts, numpy attributes."""
    states: dict[str, dict] = {}

    def state(path: str) -> dict:
        if path not in states:
            st = {"training": False, "_parameters": {}, "_buffers": {}, "_non_persistent_buffers_set": set()}
            st.update({h: collections.OrderedDict() for h in HOOKS[:2]})
            st["_is_full_backward_hook"] = None
            st.update({h: collections.OrderedDict() for h in HOOKS[2:]})
            st["_modules"] = {}
            states[path] = st
            if path:
                parent, _, name = path.rpartition(".")
                state(parent)["_modules"][name] = path  # replaced by the record below
        return states[path]

    for key, t in sd.items():
        path, _, leaf = key.rpartition(".")
        st = state(path)
        if leaf in BUFFERS:
            st["_buffers"][leaf] = t.clone()
        else:
            st["_parameters"][leaf] = torch.nn.Parameter(t.clone(), requires_grad=False)
    for path, names in (none_buffers or {}).items():
        for n in names:
            state(path)["_buffers"][n] = None
    records: dict[str, Persistent] = {}
    for path in sorted(states, key=lambda p: -p.count(".") if p else 1):  # children first
        st = states[path]
        st["_modules"] = {n: records[p] for n, p in st["_modules"].items()}
        name = _class_name(path)
        if name == "FullyConnectedLayer":
            st["weight_gain"] = np.float64(0.125)  # numpy scalars, as in real snapshots
        if name == "SynthesisLayer" and path.startswith("synthesis.L"):
            size = int(path.split("_")[1])
            st["in_size"], st["use_fp16"] = np.array([size, size]), np.bool_(False)
        st["_init_args"] = ()
        st["_init_kwargs"] = init_kwargs if not path else {}
        records[path] = Persistent(name, st, module_src)
    return records[""]


def golden_kwargs(golden, name) -> dict:
    with safe_open(str(golden / f"{name}.safetensors"), "pt") as f:
        kw = json.loads(f.metadata()["init_kwargs"])
    if "mapping_kwargs" in kw:
        kw["mapping_kwargs"] = EasyDict(kw["mapping_kwargs"])
    return kw


def write_snapshot(path, golden, name, protocol=4, module_src="", kwargs=None, same_object=False):
    sd = load_file(str(golden / f"{name}.safetensors"))
    kw = golden_kwargs(golden, name) if kwargs is None else kwargs
    none = {}
    if name.startswith("sg3"):
        last = max((k.split(".")[1] for k in sd if k.startswith("synthesis.L")), key=lambda n: int(n[1:].split("_")[0]))
        none = {f"synthesis.{last}": ["up_filter", "down_filter"]}
    g_ema = module_tree(sd, kw, module_src, none)
    g = g_ema if same_object else module_tree({k: torch.zeros_like(v) for k, v in sd.items()}, kw, module_src, none)
    data = {"G": g, "D": None, "G_ema": g_ema, "augment_pipe": None,
            "training_set_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "resolution": 32}}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def marker_src(marker) -> str:
    """A module_src that would leave a marker file if anyone executed it."""
    return f"open({str(marker)!r}, 'w').write('module_src ran')\nimport os\nos.system('touch {marker}')\n"


# ----------------------------------------------------------------------------------------------------------------
# benign snapshots


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@torch.no_grad()
def test_crafted_sg2_snapshot_reproduces_golden(golden, tmp_path, nvidia_names, protocol):
    marker = tmp_path / "ran.txt"
    path = write_snapshot(tmp_path / "network-snapshot.pkl", golden, "sg2_cond_16", protocol, marker_src(marker))
    sd, meta = loading.read_state_dict(path)
    assert meta["class_name"] == "training.networks_stylegan2.Generator" and meta["network"] == "G_ema"
    assert meta["init_kwargs"]["mapping_kwargs"] == {"num_layers": 4}
    assert set(sd) == set(load_file(str(golden / "sg2_cond_16.safetensors")))
    desc = registry.detect(sd, meta, path.name)
    exp = load_file(str(golden / "sg2_cond_16.expected.safetensors"))
    assert (desc.model.mapping(exp["z"], exp["c"], truncation_psi=0.7) - exp["w_psi07"]).abs().max() < TOL
    assert (desc.model(exp["z"], exp["c"], truncation_psi=0.7, noise_mode="const") - exp["img_full"]).abs().max() < TOL
    assert not marker.exists()


@pytest.mark.parametrize("name", ["sg3_t_32", "sg3_r_32"])
@torch.no_grad()
def test_crafted_sg3_snapshot_reproduces_golden(golden, tmp_path, nvidia_names, name):
    marker = tmp_path / "ran.txt"
    path = write_snapshot(tmp_path / f"{name}.pkl", golden, name, 4, marker_src(marker))
    sd, meta = loading.read_state_dict(path)
    assert meta["class_name"] == "training.networks_stylegan3.Generator"
    desc = registry.detect(sd, meta, path.name)
    assert desc.architecture == ("StyleGAN3-R" if name == "sg3_r_32" else "StyleGAN3-T")
    exp = load_file(str(golden / f"{name}.expected.safetensors"))
    img = desc.model(exp["z"][:2], None, truncation_psi=0.7, noise_mode="const")
    assert (img - exp["img_full"][:2]).abs().max() < TOL
    assert not marker.exists()


@torch.no_grad()
def test_ada_snapshot_nested_kwargs(golden, tmp_path, nvidia_names):
    """stylegan2-ada-pytorch nests synthesis_kwargs; its defaults (conv_clamp None) apply when one is missing."""
    flat = golden_kwargs(golden, "sg2_resnet_16")
    syn = {k: flat.pop(k) for k in ("channel_base", "channel_max", "num_fp16_res", "conv_clamp", "architecture")}
    path = write_snapshot(tmp_path / "ada.pkl", golden, "sg2_resnet_16", kwargs={**flat, "synthesis_kwargs": EasyDict(syn)})
    sd, meta = loading.read_state_dict(path)
    assert meta["nvidia_repo"] == "stylegan2-ada-pytorch"
    desc = registry.detect(sd, meta, path.name)
    exp = load_file(str(golden / "sg2_resnet_16.expected.safetensors"))
    assert (desc.model(exp["z"], None, truncation_psi=0.7) - exp["img_full"]).abs().max() < TOL
    syn.pop("conv_clamp")
    path2 = write_snapshot(tmp_path / "ada2.pkl", golden, "sg2_resnet_16", kwargs={**flat, "synthesis_kwargs": EasyDict(syn)})
    desc2 = registry.detect(*loading.read_state_dict(path2), path2.name)
    assert desc2.config["init_kwargs"]["conv_clamp"] is None


def test_g_and_g_ema_same_object(golden, tmp_path, nvidia_names):
    path = write_snapshot(tmp_path / "same.pkl", golden, "sg2_orig_16", same_object=True)
    sd, meta = read_nvlabs_pkl(path)
    ref = load_file(str(golden / "sg2_orig_16.safetensors"))
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


@torch.no_grad()
def test_export_safetensors_roundtrip(golden, tmp_path, nvidia_names):
    pkl = write_snapshot(tmp_path / "net.pkl", golden, "sg3_t_cond_clamp_16")
    sd, meta = loading.read_state_dict(pkl)
    desc = registry.detect(sd, meta, pkl.name)
    out = export_safetensors(sd, meta, tmp_path / "net.safetensors")  # straight from the pickle's state dict
    with safe_open(out, "pt") as f:
        md = f.metadata()
    assert md["class_name"] == "training.networks_stylegan3.Generator"
    assert json.loads(md["init_kwargs"])["conv_clamp"] == 0.5
    with pytest.raises(InputError, match="refusing to overwrite"):
        export_safetensors(sd, meta, out)
    out2 = export_safetensors(desc, None, tmp_path / "from_desc.safetensors")  # from a loaded descriptor
    exp = load_file(str(golden / "sg3_t_cond_clamp_16.expected.safetensors"))
    for p in (out, out2):
        d2 = registry.detect(*loading.read_state_dict(p), os.path.basename(p))
        img = d2.model(exp["z"][:2], exp["c"][:2], truncation_psi=0.7)
        assert (img - exp["img_full"][:2]).abs().max() < TOL
    # a StyleGAN2 descriptor (our kwargs: explicit per-resolution channels, conv_clamp 0.5) round-trips too
    sg2 = registry.detect(*loading.read_state_dict(golden / "sg2_clamp_16.safetensors"), "sg2_clamp_16")
    d3 = registry.detect(*loading.read_state_dict(export_safetensors(sg2, None, tmp_path / "sg2.safetensors")), "sg2")
    exp = load_file(str(golden / "sg2_clamp_16.expected.safetensors"))
    assert d3.config["init_kwargs"]["conv_clamp"] == 0.5
    assert (d3.model(exp["z"], None, truncation_psi=0.7) - exp["img_full"]).abs().max() < TOL


# ----------------------------------------------------------------------------------------------------------------
# malicious pickles


class Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def payloads(marker):
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        f"{os.system.__module__}.system": Evil(os.system, (f"touch {marker}",)),
        "builtins.exec": Evil(builtins.exec, (code,)),
        "builtins.eval": Evil(builtins.eval, (code,)),
        "subprocess.Popen": Evil(subprocess.Popen, (["touch", str(marker)],)),
    }


def test_controls_payloads_are_live(tmp_path):
    """Controls: the payloads and the module_src used below really act when run (so 'no marker' means 'not run')."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(payloads(marker)["builtins.exec"]))  # a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    exec(marker_src(marker), {})  # noqa: S102 - what NVIDIA's loader does with module_src
    assert marker.exists()


def craft_call(module: str, name: str, args: tuple, protocol: int = 2) -> bytes:
    """PROTO, GLOBAL module.name, the args tuple, REDUCE, STOP: a call of any global, written by hand."""
    body = pickle.dumps(args, protocol=protocol)[2:-1]  # strip PROTO and STOP
    return b"\x80" + bytes([protocol]) + f"c{module}\n{name}\n".encode() + body + b"R."


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("idx", range(4))
def test_malicious_reduce_refused(golden, tmp_path, nvidia_names, where, idx):
    marker = tmp_path / "pwned"
    qualname, evil = list(payloads(marker).items())[idx]
    path = tmp_path / "evil.pkl"
    if where == "top":
        obj = evil
    else:  # deep inside an otherwise genuine-looking G_ema
        sd = load_file(str(golden / "sg2_orig_16.safetensors"))
        g = module_tree(sd, {**golden_kwargs(golden, "sg2_orig_16"), "mapping_kwargs": EasyDict(evil=evil)}, "")
        obj = {"G": None, "D": None, "G_ema": g}
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(UnsafeFileError, match=qualname.replace(".", r"\.")):
        loading.read_state_dict(path)
    assert not marker.exists()


def test_unknown_module_never_imported(tmp_path, monkeypatch):
    """A global from a module that exists on sys.path: refused before the import, so its top level never runs."""
    marker = tmp_path / "imported"
    (tmp_path / "atelier_evil_mod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\ndef run(*a): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "evil.pkl"
    path.write_bytes(craft_call("atelier_evil_mod", "run", ("x",)))
    with pytest.raises(UnsafeFileError, match=r"atelier_evil_mod\.run"):
        loading.read_state_dict(path)
    assert not marker.exists() and "atelier_evil_mod" not in sys.modules


@pytest.mark.parametrize("module,name", [
    ("torch._utils", "_rebuild_from_type_v2"), ("dnnlib.util", "call_func_by_name"),
    ("dnnlib.util", "construct_class_by_name"), ("copyreg", "_reconstructor"), ("torch", "load"),
    ("numpy", "load"), ("torch_utils.persistence", "persistent_class"), ("training.networks_stylegan2", "Generator"),
    ("dnnlib.tflib.network", "Network"), ("builtins", "getattr"), ("functools", "partial"),
])
def test_other_globals_refused(tmp_path, module, name):
    path = tmp_path / "evil.pkl"
    path.write_bytes(craft_call(module, name, ()))
    with pytest.raises(UnsafeFileError, match=f"{module}.{name}".replace(".", r"\.")):
        read_nvlabs_pkl(path)


def test_malicious_storage_blob_refused(tmp_path):
    """The inner torch.save blob is parsed by a second restricted unpickler, not torch.load(weights_only=False)."""
    marker = tmp_path / "pwned"
    blob = craft_call(os.system.__module__, "system", (f"touch {marker}",))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil(torch.storage._load_from_bytes, (blob,)), protocol=4))
    with pytest.raises(UnsafeFileError, match=rf"{os.system.__module__}\.system"):
        read_nvlabs_pkl(path)
    assert not marker.exists()


def test_object_arrays_and_stand_in_state_refused(tmp_path):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps({"G_ema": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises(UnsafeFileError, match="numpy dtype 'O"):
        read_nvlabs_pkl(path)
    # BUILD on an allowed stand-in (to overwrite its attributes) is refused
    path.write_bytes(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}(X\x08\x00\x00\x00__code__K\x01ub.")
    with pytest.raises(UnsafeFileError, match="set state"):
        read_nvlabs_pkl(path)
    # a persistent id in the outer stream
    path.write_bytes(b"\x80\x02X\x01\x00\x00\x00xQ.")
    with pytest.raises(UnsafeFileError, match="persistent id"):
        read_nvlabs_pkl(path)


def test_broken_files_are_load_errors(golden, tmp_path, nvidia_names):
    good = write_snapshot(tmp_path / "good.pkl", golden, "sg2_orig_16")
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cut.pkl"):
        loading.read_state_dict(cut)
    lst = tmp_path / "list.pkl"
    lst.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ModelLoadError, match="expected NVIDIA's dict"):
        loading.read_state_dict(lst)
    nog = tmp_path / "nog.pkl"
    nog.write_bytes(pickle.dumps({"D": None}))
    with pytest.raises(ModelLoadError, match="no G_ema or G"):
        loading.read_state_dict(nog)
