"""The shared manager: name resolution and refusal of escapes, caching, reload on change, families, dtype fallback."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from atelier.models import manager as mgr
from atelier.models import registry
from atelier.models.descriptor import ModelDescriptor
from atelier.models.errors import ModelLoadError, ModelPathError, UnknownModelError, WrongFamilyError


@pytest.fixture
def fake_detector(monkeypatch):
    """A detector for state dicts with a `toy.weight` key, counting how often files are detected."""
    mod = types.ModuleType("atelier_test_toy_detector")
    mod.calls = 0

    def detect(sd, meta):
        return "toy.weight" in sd

    def load(sd, meta):
        mod.calls += 1
        model = torch.nn.Sequential()
        model.add_module("toy", torch.nn.Linear(sd["toy.weight"].shape[1], sd["toy.weight"].shape[0]))
        model.load_state_dict(sd)
        fam = meta.get("family", "upscale")
        return ModelDescriptor(family=fam, architecture="Toy", model=model, supports_half=True)

    mod.detect, mod.load = detect, load
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(registry, "DETECTORS", [("Toy", mod.__name__)] + registry.DETECTORS)
    return mod


def _toy(path, out=2, family="upscale"):
    save_file({"toy.weight": torch.randn(out, 3), "toy.bias": torch.randn(out)}, path, metadata={"family": family})


def test_resolve_and_list(manager, models_root):
    (models_root / "upscale_models" / "sub").mkdir()
    _toy(models_root / "upscale_models" / "a.safetensors")
    _toy(models_root / "upscale_models" / "sub" / "b.safetensors")
    (models_root / "upscale_models" / "notes.txt").write_text("not a model")
    assert manager.list_models("upscale_models") == ["a.safetensors", os.path.join("sub", "b.safetensors")]
    assert manager.resolve("upscale_models", "sub/b.safetensors").endswith("b.safetensors")
    with pytest.raises(ModelPathError, match="available: a.safetensors"):
        manager.resolve("upscale_models", "missing.pth")


@pytest.mark.parametrize("name", ["../secret.pth", "sub/../../secret.pth", "/etc/passwd", "..", "", "a\x00b"])
def test_resolve_refuses_escapes(manager, models_root, name):
    (models_root / "secret.pth").write_bytes(b"x")
    with pytest.raises(ModelPathError):
        manager.resolve("upscale_models", name)


def test_link_pointing_outside_is_refused(manager, models_root, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    _toy(outside)
    os.symlink(outside, models_root / "upscale_models" / "link.safetensors")
    with pytest.raises(ModelPathError, match="outside"):
        manager.resolve("upscale_models", "link.safetensors")
    # a linked folder is the folder: files inside it are fine
    (tmp_path / "shared_models").mkdir()
    _toy(tmp_path / "shared_models" / "in.safetensors")
    os.rmdir(models_root / "gans")
    os.symlink(tmp_path / "shared_models", models_root / "gans")
    assert manager.resolve("gans", "in.safetensors").endswith("in.safetensors")


def test_cache_hit_and_reload_on_change(manager, models_root, fake_detector):
    p = models_root / "upscale_models" / "t.safetensors"
    _toy(p)
    d1 = manager.load("t.safetensors", "upscale_models")
    d2 = manager.load("t.safetensors", "upscale_models")
    assert d1 is d2 and fake_detector.calls == 1
    _toy(p, out=5)
    os.utime(p, ns=(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns + 10**9))
    d3 = manager.load("t.safetensors", "upscale_models")
    assert d3 is not d1 and fake_detector.calls == 2 and d3.model.toy.out_features == 5
    assert len(manager.cached()) == 1  # the stale entry was dropped


def test_broken_file_does_not_poison_cache(manager, models_root, fake_detector):
    p = models_root / "upscale_models" / "t.safetensors"
    p.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError):
        manager.load("t.safetensors", "upscale_models")
    assert manager.cached() == []
    _toy(p)
    assert manager.load("t.safetensors", "upscale_models").architecture == "Toy"


def test_wrong_family_names_file_and_kind(manager, models_root, fake_detector):
    _toy(models_root / "vae" / "v.safetensors", family="vae")
    with pytest.raises(WrongFamilyError, match=r"'v.safetensors' is a vae model \(Toy\); this node needs a upscale"):
        manager.load("v.safetensors", "vae", family="upscale")


def test_unknown_model_lists_detectors_and_prefixes(manager, models_root):
    save_file({"mystery.block.weight": torch.zeros(1)}, models_root / "gans" / "m.safetensors")
    with pytest.raises(UnknownModelError, match=r"Tried: .*Key prefixes seen: mystery.block"):
        manager.load("m.safetensors", "gans")


def test_dtype_policy_cpu(manager, fake_detector, models_root):
    _toy(models_root / "upscale_models" / "t.safetensors")
    d = manager.load("t.safetensors", "upscale_models")
    assert manager.dtype_for(d) == torch.float32 and mgr.placement(d.model)[1] == torch.float32


def test_placement_follows_casts_and_swapped_parameters():
    """placement() remembers where to look, not what it saw: casts, moves and replaced parameters are seen."""
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 2))
    assert mgr.placement(model) == (torch.device("cpu"), torch.float32)
    model.to(torch.bfloat16)
    assert mgr.placement(model)[1] == torch.bfloat16
    model[1].weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))  # swapped, not cast in place
    assert mgr.placement(model)[1] == torch.float64
    del model[1].weight  # the remembered parameter is gone: look again (the bias)
    model[1].register_parameter("weight", None)
    assert mgr.placement(model)[1] == torch.bfloat16
    assert mgr.placement(torch.nn.ReLU()) == (torch.device("cpu"), torch.float32)  # no weights at all


def test_half_precision_nan_falls_back_to_fp32(manager, fake_detector, models_root, caplog):
    _toy(models_root / "upscale_models" / "t.safetensors")
    d = manager.load("t.safetensors", "upscale_models", dtype=torch.bfloat16)
    assert mgr.placement(d.model)[1] == torch.bfloat16

    def fn(model):  # stands in for a model that overflows in half precision
        dt = mgr.placement(model)[1]
        return torch.full((2,), float("nan") if dt != torch.float32 else 1.0)

    out = manager.run(d, fn)
    assert torch.equal(out, torch.ones(2))
    assert "recomputing in float32" in caplog.text


def test_use_is_consistent_after_interrupt(manager, fake_detector, models_root):
    _toy(models_root / "upscale_models" / "t.safetensors")
    d = manager.load("t.safetensors", "upscale_models")
    with pytest.raises(KeyboardInterrupt):
        with manager.use(d):
            raise KeyboardInterrupt
    entry = manager._entry(d)
    assert entry.in_use == 0
    with manager.use(d) as m:
        assert m(torch.ones(1, 3)).shape == (1, 2)


def test_ram_cache_evicts_least_recently_used(models_root, fake_detector):
    m = mgr.ModelManager(str(models_root), device=torch.device("cpu"), ram_cache_bytes=1)
    for n in ("a", "b"):
        _toy(models_root / "gans" / f"{n}.safetensors")
    m.load("a.safetensors", "gans")
    m.load("b.safetensors", "gans")
    assert [os.path.basename(d.source) for d in m.cached()] == ["b.safetensors"]
    m.unload(forget=True)
    assert m.cached() == []


def test_process_wide_manager_is_created_on_first_use_and_replaceable(monkeypatch, tmp_path):
    monkeypatch.setattr(mgr, "_MANAGER", None)  # restored afterwards
    monkeypatch.setenv(mgr.ENV_MODELS, str(tmp_path))
    first = mgr.get_manager()
    assert isinstance(first, mgr.ModelManager) and first.models_root == str(tmp_path)
    assert mgr.get_manager() is first
    other = mgr.ModelManager(str(tmp_path / "other"), device=torch.device("cpu"))
    mgr.set_manager(other)
    assert mgr.get_manager() is other
    mgr.set_manager(None)
    fresh = mgr.get_manager()
    assert fresh is not first and fresh is not other


def test_importing_the_pack_creates_no_manager():
    """Nothing at import: the pack (nodes, folder registration) imported in a fresh process leaves no manager."""
    code = ("import torch, atelier, atelier.models.manager as m; "
            "assert m._MANAGER is None, 'a manager was created at import'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_outward_links_are_not_offered(manager, models_root, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    _toy(outside)
    os.symlink(outside, models_root / "upscale_models" / "link.safetensors")
    _toy(models_root / "upscale_models" / "real.safetensors")
    assert manager.list_models("upscale_models") == ["real.safetensors"]


class _FakeComfy:
    """Stands in for ComfyUI's memory manager in models/host.py: patchers with an ON_DETACH hook, a loaded list,
    and `unload_all` doing what comfy.model_management.unload_all_models does to each loaded patcher (detach)."""

    def __init__(self, monkeypatch):
        self.loaded: list = []
        self.made = 0
        monkeypatch.setattr(mgr.host, "available", lambda: True)
        monkeypatch.setattr(mgr.host, "make_patcher", self.make_patcher)
        monkeypatch.setattr(mgr.host, "load_patchers", self.load_patchers)
        monkeypatch.setattr(mgr.host, "unload_patcher", self.unload_patcher)

    def make_patcher(self, module, load_device, offload, on_detach=None):
        self.made += 1
        return types.SimpleNamespace(model=module, detach=on_detach or (lambda: None))

    def load_patchers(self, patchers, memory_required):
        self.loaded += [p for p in patchers if p not in self.loaded]

    def unload_patcher(self, patcher):
        if patcher in self.loaded:
            self.loaded.remove(patcher)
        patcher.detach()

    def unload_all(self):
        while self.loaded:
            self.loaded.pop().detach()


def test_host_unload_releases_the_ram_cache(manager, models_root, fake_detector, monkeypatch):
    """When ComfyUI unloads our patcher ("Unload models"), the manager stops holding the model: with nothing else
    holding it, it is garbage-collected and the next load reads the file again."""
    import gc
    import weakref

    comfy = _FakeComfy(monkeypatch)
    _toy(models_root / "upscale_models" / "t.safetensors")
    desc = manager.load("t.safetensors", "upscale_models")
    manager.run(desc, lambda model: model(torch.zeros(1, 3)))
    assert len(comfy.loaded) == 1
    alive = weakref.ref(desc.model)
    del desc
    comfy.unload_all()
    gc.collect()
    assert alive() is None, "the manager still holds the model ComfyUI unloaded"
    assert manager.cached() == [] and manager.released() == []
    again = manager.load("t.safetensors", "upscale_models")
    assert fake_detector.calls == 2 and again.architecture == "Toy"  # read from disk again


def test_host_unload_keeps_a_model_a_node_output_still_holds(manager, models_root, fake_detector, monkeypatch):
    """A descriptor still held elsewhere (ComfyUI's execution cache) is reused, not read again, and runs again
    through a fresh patcher; our own unload(forget=False) does not count as ComfyUI's decision."""
    comfy = _FakeComfy(monkeypatch)
    _toy(models_root / "upscale_models" / "t.safetensors")
    desc = manager.load("t.safetensors", "upscale_models")
    manager.run(desc, lambda model: model(torch.zeros(1, 3)))
    manager.unload(desc)  # ours: stays cached
    assert manager.cached() == [desc] and comfy.loaded == []
    manager.run(desc, lambda model: model(torch.zeros(1, 3)))
    comfy.unload_all()
    assert manager.cached() == [] and manager.released() == [desc]
    out = manager.run(desc, lambda model: model(torch.zeros(1, 3)))  # the cached node output used again
    assert out.shape == (1, 2) and manager.cached() == [desc] and len(comfy.loaded) == 1
    assert manager.load("t.safetensors", "upscale_models") is desc and fake_detector.calls == 1
    assert comfy.made == 2  # a new patcher for the revived entry


def test_host_model_read_but_never_run_is_not_held(manager, models_root, fake_detector, monkeypatch):
    """Inside ComfyUI a model a loader read but no node ran (a failed consumer) lives only as long as its output."""
    import gc
    import weakref

    _FakeComfy(monkeypatch)
    _toy(models_root / "upscale_models" / "t.safetensors")
    desc = manager.load("t.safetensors", "upscale_models")
    assert manager.load("t.safetensors", "upscale_models") is desc and fake_detector.calls == 1
    alive = weakref.ref(desc.model)
    del desc
    gc.collect()
    assert alive() is None and manager.cached() == []
