"""Inpainters: LaMa (and MAT, slow) with random weights, saved as a state dict or as a TorchScript archive like
big-lama.pt, loaded through the manager; outputs equal spandrel's own call on the same weights within 1e-5, per
strategy; unmasked pixels bit-exact; bad input per the issue."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from atelier.models.errors import InputError, WrongFamilyError
from atelier.models.inpaint import inpaint as ip

spandrel = pytest.importorskip("spandrel")
TOL = 1e-5


def _lama_module():
    from spandrel.architectures.LaMa import LaMa

    torch.manual_seed(3)
    net = LaMa(in_nc=4, out_nc=3).eval()
    g = torch.Generator().manual_seed(4)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


@pytest.fixture(scope="module")
def lama(tmp_path_factory):
    """(state dict, path of a .safetensors in a models root, the models root)."""
    root = tmp_path_factory.mktemp("models")
    (root / "inpaint").mkdir()
    net = _lama_module()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(root / "inpaint" / "lama_random.safetensors"))
    return sd, root, net


@pytest.fixture
def mgr(lama):
    from atelier.models import manager as m

    fresh = m.ModelManager(str(lama[1]), device=torch.device("cpu"))
    m.set_manager(fresh)
    yield fresh
    m.set_manager(None)


def _spandrel(sd):
    return spandrel.ModelLoader().load_from_state_dict(sd).eval()


def _image(h=72, w=100, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, c, h // 8 + 1, w // 8 + 1, generator=g)
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear").clamp(0, 1)


def _mask(h=72, w=100, box=(20, 44, 30, 62)):
    m = torch.zeros(1, h, w)
    y0, y1, x0, x1 = box
    m[:, y0:y1, x0:x1] = 1
    return m


def test_lama_original_equals_spandrel(lama, mgr, one_thread):
    sd = lama[0]
    desc = mgr.load("lama_random.safetensors", "inpaint", family="inpaint")
    assert desc.architecture == "LaMa" and desc.family == "inpaint"
    img, m = _image(), _mask()
    with torch.inference_mode():
        out, note = ip.inpaint(desc, img, m, strategy="original")
        ref = _spandrel(sd)(img, m[:, None])
    assert out.shape == img.shape
    assert (out - ref).abs().max() < TOL
    assert torch.equal(out[:, :, m[0] == 0], img[:, :, m[0] == 0])
    assert note == ""


def test_big_lama_torchscript_archive_loads_without_jit_load(lama, mgr, one_thread, monkeypatch):
    """A traced LaMa saved with torch.jit.save (what big-lama.pt is) loads through the safe reader."""
    sd, root, net = lama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, (torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)), check_trace=False)
    torch.jit.save(traced, str(root / "inpaint" / "big-lama.pt"))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load called"))
    desc = mgr.load("big-lama.pt", "inpaint", family="inpaint")
    assert desc.architecture == "LaMa"
    for k, v in desc.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    img, m = _image(40, 48, seed=2), _mask(40, 48, (10, 30, 12, 30))
    with torch.inference_mode():
        out, _ = ip.inpaint(desc, img, m, strategy="original")
        ref = _spandrel(sd)(img, m[:, None])
    assert (out - ref).abs().max() < TOL


def test_crop_strategy_equals_spandrel_on_each_region(lama, mgr, one_thread):
    """Two holes far apart: each is filled by the model on its own crop (hole box + context, grown to a multiple
    of 8), computed here independently with spandrel, and pasted only inside the hole."""
    sd = lama[0]
    desc = mgr.load("lama_random.safetensors", "inpaint")
    H, W, c = 64, 200, 8
    img = _image(H, W, seed=5)
    m = torch.zeros(1, H, W)
    m[:, 20:30, 10:22] = 1  # region A
    m[:, 30:44, 150:170] = 1  # region B, far from A
    with torch.inference_mode():
        out, _ = ip.inpaint(desc, img, m, strategy="crop", context=c)
        sp = _spandrel(sd)
        expect = img.clone()
        for (y0, y1, x0, x1) in [(20, 30, 10, 22), (30, 44, 150, 170)]:
            by0, by1, bx0, bx1 = max(0, y0 - c), min(H, y1 + c), max(0, x0 - c), min(W, x1 + c)
            # grow to a multiple of 8 from real pixels, centred (as the engine documents)
            def widen(a, b, limit):
                size = -(-(b - a) // 8) * 8
                a2 = max(0, a - (size - (b - a)) // 2)
                b2 = min(limit, a2 + size)
                return max(0, b2 - size), b2
            by0, by1 = widen(by0, by1, H)
            bx0, bx1 = widen(bx0, bx1, W)
            crop_m = m[:, None, by0:by1, bx0:bx1]
            fill = sp(img[..., by0:by1, bx0:bx1], crop_m)
            region = expect[..., by0:by1, bx0:bx1]
            expect[..., by0:by1, bx0:bx1] = torch.where(crop_m > 0, fill, region)
    assert (out - expect).abs().max() < TOL
    assert torch.equal(out[:, :, m[0] == 0], img[:, :, m[0] == 0])


def test_resize_strategy_only_masked_pixels_change(lama, mgr, one_thread):
    desc = mgr.load("lama_random.safetensors", "inpaint")
    img, m = _image(96, 128, seed=6), _mask(96, 128, (30, 60, 40, 90))
    with torch.inference_mode():
        out, note = ip.inpaint(desc, img, m, strategy="resize", max_side=64)
    assert "0.5x" in note
    assert torch.equal(out[:, :, m[0] == 0], img[:, :, m[0] == 0])
    assert (out[:, :, m[0] > 0] - img[:, :, m[0] > 0]).abs().mean() > 1e-3


def test_batches_masks_and_bad_input(lama, mgr, one_thread):
    desc = mgr.load("lama_random.safetensors", "inpaint")
    img = torch.cat([_image(32, 40, seed=s) for s in range(2)])
    m1 = _mask(32, 40, (8, 20, 10, 24))
    with torch.inference_mode():
        one, _ = ip.inpaint(desc, img, m1, strategy="original")  # one mask for all
        each, _ = ip.inpaint(desc, img, m1.expand(2, -1, -1), strategy="original")
        assert torch.equal(one, each)
        # empty mask: untouched; a full mask: the model's own fill, said in the note
        same, note = ip.inpaint(desc, img, torch.zeros(1, 32, 40))
        assert torch.equal(same, img) and "empty mask" in note
        full, note = ip.inpaint(desc, img[:1], torch.ones(1, 32, 40), strategy="original")
        assert "model's own fill" in note
        # RGBA: alpha kept aside and restored; grey: filled as RGB, returned grey
        rgba = torch.cat([img[:1], torch.rand(1, 1, 32, 40)], 1)
        o4, _ = ip.inpaint(desc, rgba, m1, strategy="original")
        assert torch.equal(o4[:, 3], rgba[:, 3]) and torch.allclose(o4[:, :3], one[:1], atol=TOL)
        grey = img[:1, :1]
        og, _ = ip.inpaint(desc, grey, m1, strategy="original")
        assert og.shape == grey.shape and torch.equal(og[:, :, m1[0] == 0], grey[:, :, m1[0] == 0])
        # a 1x1 image (padded to the model's minimum and cropped back)
        o1, _ = ip.inpaint(desc, img[:1, :, :1, :1], torch.ones(1, 1, 1))
        assert o1.shape == (1, 3, 1, 1)
        # a mask of another size: error naming both sizes, or a stated resize
        with pytest.raises(InputError, match=r"expected 40x32.*got 20x16"):
            ip.inpaint(desc, img, torch.ones(1, 16, 20))
        _, note = ip.inpaint(desc, img[:1], torch.ones(1, 16, 20), resize_mask=True, strategy="original")
        assert "resized from 20x16 to 40x32" in note
        with pytest.raises(InputError, match="one per image"):
            ip.inpaint(desc, img, torch.ones(3, 32, 40))
        with pytest.raises(InputError, match="strategy"):
            ip.inpaint(desc, img, m1, strategy="squash")


def test_wrong_family_refused(lama):
    from atelier.models.descriptor import ModelDescriptor

    d = ModelDescriptor(family="upscale", architecture="ESRGAN", model=torch.nn.Identity())
    with pytest.raises(WrongFamilyError, match="inpainting model"):
        ip.inpaint(d, _image(), _mask())


@pytest.mark.slow
def test_mat_equals_spandrel_with_seed(tmp_path):
    """MAT (spandrel_extra_arches) at its 512 px size: ours with a seed equals spandrel's call with the same z."""
    pytest.importorskip("spandrel_extra_arches")
    from spandrel_extra_arches.architectures.MAT import MAT

    from atelier.models import manager as mm
    from atelier.models.latents import seeded_normal

    torch.manual_seed(11)
    sd = {k: v.contiguous() for k, v in MAT().state_dict().items()}
    (tmp_path / "inpaint").mkdir()
    save_file(sd, str(tmp_path / "inpaint" / "mat_random.safetensors"))
    mgr = mm.ModelManager(str(tmp_path), device=torch.device("cpu"))
    desc = mgr.load("mat_random.safetensors", "inpaint", family="inpaint")
    assert desc.architecture == "MAT"
    img, m = _image(500, 512, seed=9), _mask(500, 512, (200, 300, 180, 320))
    with torch.inference_mode():
        out, _ = ip.inpaint(desc, img, m, strategy="original", seed=42, manager=mgr)
        from spandrel_extra_arches import EXTRA_REGISTRY

        reg = spandrel.MAIN_REGISTRY.copy()
        reg.add(*EXTRA_REGISTRY, ignore_duplicates=True)
        sp = spandrel.ModelLoader(registry=reg).load_from_state_dict(sd).eval()
        sp.model.z = seeded_normal((1, 512), 42).to(sp.model.z.dtype)
        torch.manual_seed(42)  # MAT drops out at inference from the global generator
        ref = sp(img, m[:, None])
    ref = torch.where(m[:, None] > 0, ref, img)
    assert (out - ref).abs().max() < TOL
