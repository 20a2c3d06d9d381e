"""Inpaint nodes end to end on ComfyUI's types (IMAGE [B,H,W,C], MASK [B,H,W]): loader -> Inpaint equals spandrel,
another pack's spandrel descriptor accepted, mask tools, crop -> (a fake VAE round trip) -> stitch with unmasked
pixels bit-exact, pre-fill, colour match, bad input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from atelier.models.errors import InputError
from atelier.nodes import inpaint as N

spandrel = pytest.importorskip("spandrel")


@pytest.fixture(scope="module")
def lama_sd():
    from spandrel.architectures.LaMa import LaMa

    torch.manual_seed(5)
    return {k: v.contiguous() for k, v in LaMa(in_nc=4, out_nc=3).eval().state_dict().items()}


def _image(b=1, h=48, w=64):
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.interpolate(torch.rand(b, 3, 7, 9, generator=g), size=(h, w),
                                           mode="bilinear").movedim(1, -1).contiguous()


def _mask(h=48, w=64):
    m = torch.zeros(1, h, w)
    m[:, 14:30, 20:44] = 1
    return m


def test_load_and_inpaint_node_equals_spandrel(manager, models_root, lama_sd, one_thread):
    save_file(lama_sd, str(models_root / "inpaint" / "lama.safetensors"))
    assert "lama.safetensors" in N.AtelierLoadInpaintModel.INPUT_TYPES()["required"]["model_name"][0]
    (model,) = N.AtelierLoadInpaintModel().load("lama.safetensors")
    img, m = _image(), _mask()
    out, note = N.AtelierInpaint().inpaint(model, img, m, strategy="original")
    sp = spandrel.ModelLoader().load_from_state_dict(lama_sd).eval()
    with torch.inference_mode():
        ref = sp(img.movedim(-1, 1), m[:, None]).movedim(1, -1)
    assert out.shape == img.shape and (out - ref).abs().max() < 1e-5
    # another pack's loader output (a bare spandrel descriptor) works the same
    out2, _ = N.AtelierInpaint().inpaint(sp, img, m, strategy="original")
    assert (out2 - ref).abs().max() < 1e-5
    with pytest.raises(InputError, match="INPAINT_MODEL"):
        N.AtelierInpaint().inpaint("lama.safetensors", img, m)


def test_mask_tool_nodes():
    m = _mask()
    (g,) = N.AtelierMaskGrow().run(m, 3, 0)
    assert g.sum() == (16 + 6) * (24 + 6) - 4 * 5  # grown by a radius-3 disk: 5 of 9 pixels cut per corner
    (s,) = N.AtelierMaskGrow().run(m, -3, 0)
    assert s.sum() == (16 - 6) * (24 - 6)
    (f,) = N.AtelierMaskGrow().run(m, 0, 8)
    assert 0 < f[0, 14, 32] < 1 and f[0, 22, 32] == pytest.approx(1, abs=1e-3)
    ring = 1 - m
    ring[:, 18:26, 26:38] = 1
    (filled,) = N.AtelierMaskFillHoles().run(1 - ring)
    assert torch.equal(filled, m)
    (st,) = N.AtelierMaskThreshold().run(m * 0.9999, "stabilise", 0.001)
    assert torch.equal(st, m)
    (inv,) = N.AtelierMaskInvert().run(m)
    assert torch.equal(inv, 1 - m)
    rgba = torch.cat([_image(), 1 - m[..., None]], -1)
    (fa,) = N.AtelierMaskFromAlpha().run(rgba, False)
    assert torch.equal(fa, m)
    (box,) = N.AtelierMaskBox().run(m, 2)
    assert box.sum() == 20 * 28


def test_crop_stitch_nodes_around_a_lossy_inpainter():
    img, m = _image(2, 96, 128), _mask(96, 128)
    crop, cmask, info = N.AtelierInpaintCrop().crop(img, m, 1.5, 16, "size", 64, 8)
    assert crop.shape[1] % 8 == 0 and crop.shape[2] % 8 == 0 and max(crop.shape[1:3]) == 64
    assert cmask.shape == crop.shape[:3]
    lossy = (crop + 0.05 * torch.randn_like(crop)).clamp(0, 1)  # a VAE round trip changes every pixel
    (out,) = N.AtelierInpaintStitch().stitch(info, lossy, 8)
    keep = m[0] == 0
    assert torch.equal(out[:, keep], img[:, keep])
    with pytest.raises(InputError, match="Inpaint Crop"):
        N.AtelierInpaintStitch().stitch({"box": 1}, lossy, 8)


def test_prefill_and_colour_match_nodes():
    img, m = _image(), _mask()
    (p,) = N.AtelierInpaintPrefill().prefill(img, m, "neutral", 5.0)
    assert torch.all(p[0][m[0] > 0] == 0.5) and torch.equal(p[0][m[0] == 0], img[0][m[0] == 0])
    (c,) = N.AtelierColourMatch().match(p, img, m, "reinhard", 8, 1.0)
    assert torch.equal(c[0][m[0] == 0], img[0][m[0] == 0])
    with pytest.raises(InputError, match="original's size"):
        N.AtelierColourMatch().match(p[:, :10], img, m, "reinhard", 8, 1.0)
