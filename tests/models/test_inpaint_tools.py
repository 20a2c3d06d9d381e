"""Crop and stitch, pre-fill and colour match: unmasked pixels bit-exact, no seam outside the blend band, OpenCV's
inpaint as the reference for Telea/Navier-Stokes, scikit-image's Lab for the colour match."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atelier.models import masks as M
from atelier.models.errors import InputError
from atelier.models.inpaint.prefill import colour_match, prefill
from atelier.models.inpaint.stitch import crop_for_inpaint, stitch


def _img(b=2, h=100, w=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, h // 10, w // 10, generator=g)
    return F.interpolate(base, size=(h, w), mode="bilinear").clamp(0, 1)


def _mask(b=1, h=100, w=160):
    m = torch.zeros(b, h, w)
    m[:, 40:60, 70:100] = 1
    return m


def test_crop_box_sizes_and_stitch_is_exact_outside_the_mask():
    img, m = _img(), _mask()
    info = crop_for_inpaint(img, m, context=1.5, padding=8, mode="size", size=64, multiple=8)
    y0, y1, x0, x1 = info.box
    assert y0 <= 40 and y1 >= 60 and x0 <= 70 and x1 >= 100  # the hole is inside the box
    h, w = info.crop_size
    assert h % 8 == 0 and w % 8 == 0 and max(h, w) == 64
    assert info.image.shape == (2, 3, h, w) and info.crop_mask.shape == (2, h, w)
    fake = torch.rand(2, 3, h, w)  # an "inpainter" that changes every pixel (a VAE round trip does)
    out = stitch(info, fake, blend=4)
    outside = m[0] == 0
    assert torch.equal(out[:, :, outside], img[:, :, outside])
    # deep inside the mask (beyond the blend band) the result is the inpainted crop, resized back
    back = F.interpolate(fake, size=(y1 - y0, x1 - x0), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    deep = M.distance_inside(m, 8)[0] >= 4
    full = img.clone()
    full[..., y0:y1, x0:x1] = back
    assert (out[:, :, deep] - full[:, :, deep]).abs().max() < 1e-6
    # in the band: between the two, weights rising with the distance
    band = (m[0] > 0) & ~deep
    lo = torch.minimum(img, full)[:, :, band] - 1e-6
    hi = torch.maximum(img, full)[:, :, band] + 1e-6
    assert ((out[:, :, band] >= lo) & (out[:, :, band] <= hi)).all()


def test_native_crop_stitched_back_unchanged_is_the_original():
    img, m = _img(1), _mask()
    info = crop_for_inpaint(img, m, mode="native", multiple=8)
    assert info.crop_size == (info.box[1] - info.box[0], info.box[3] - info.box[2])
    out = stitch(info, info.image, blend=6)
    assert (out - img).abs().max() < 1e-6  # no seam: pasting the crop's own pixels changes nothing


def test_stitch_keeps_alpha_and_accepts_grey_results():
    img = torch.cat([_img(1), torch.rand(1, 1, 100, 160)], 1)
    info = crop_for_inpaint(img, _mask(), mode="native")
    out = stitch(info, torch.rand(1, 1, *info.crop_size), blend=0)
    assert torch.equal(out[:, 3], img[:, 3])
    with pytest.raises(InputError, match="batch of 1 or 1"):
        stitch(info, torch.rand(3, 3, 8, 8))
    with pytest.raises(InputError, match="mask: expected 160x100"):
        crop_for_inpaint(img, torch.ones(1, 10, 10))


@pytest.mark.parametrize("method", ["telea", "navier-stokes"])
def test_prefill_opencv_equals_cv2_inpaint(method):
    cv2 = pytest.importorskip("cv2")
    img, m = _img(1), _mask()
    out = prefill(img, m, method, radius=5)
    u8 = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ref = cv2.inpaint(u8, (m[0].numpy() * 255).astype(np.uint8), 5.0,
                      cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS)
    ref = torch.from_numpy(ref).permute(2, 0, 1).float() / 255
    hole = m[0] > 0
    assert (out[0][:, hole] - ref[:, hole]).abs().max() < 1e-6
    assert torch.equal(out[0][:, ~hole], img[0][:, ~hole])


def test_prefill_neutral_and_blur():
    img, m = _img(1), _mask()
    hole = m[0] > 0
    grey = prefill(img, m, "neutral")
    assert torch.all(grey[0][:, hole] == 0.5) and torch.equal(grey[0][:, ~hole], img[0][:, ~hole])
    flat = torch.full_like(img, 0.3)
    assert torch.allclose(prefill(flat, m, "blur", radius=3), flat, atol=1e-6)  # constants stay constant
    b = prefill(img, m, "blur", radius=3)
    lo, hi = img[0][:, ~hole].amin(1), img[0][:, ~hole].amax(1)
    assert (b[0][:, hole] >= lo[:, None] - 1e-6).all() and (b[0][:, hole] <= hi[:, None] + 1e-6).all()
    with pytest.raises(InputError, match="method"):
        prefill(img, m, "magic")


def test_colour_match_moves_the_fill_to_its_surroundings():
    skc = pytest.importorskip("skimage.color")
    img, m = _img(1, seed=3), _mask()
    hole = m[0] > 0
    shifted = img.clone()
    shifted[0, 0] = (shifted[0, 0] + 0.25).clamp(0, 1)  # a fill with a red cast
    out = colour_match(shifted, img, m, "reinhard", ring=16)
    assert torch.equal(out[0][:, ~hole], img[0][:, ~hole])
    ring = (M.grow(m, 16)[0] > 0) & ~hole
    lab_out = skc.rgb2lab(out[0].permute(1, 2, 0).double().numpy())
    lab_ref = skc.rgb2lab(img[0].permute(1, 2, 0).double().numpy())
    lab_before = skc.rgb2lab(shifted[0].permute(1, 2, 0).double().numpy())
    err_after = np.abs(lab_out[hole.numpy()].mean(0) - lab_ref[ring.numpy()].mean(0)).max()
    err_before = np.abs(lab_before[hole.numpy()].mean(0) - lab_ref[ring.numpy()].mean(0)).max()
    assert err_after < 1.0 < err_before  # Lab units: under one just-noticeable difference after
