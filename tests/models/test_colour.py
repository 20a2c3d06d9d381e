"""models/colour.py against scikit-image: rgb2lab/lab2rgb, match_histograms, and a numpy Reinhard written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

skimage = pytest.importorskip("skimage")
from skimage import color, data, exposure, transform  # noqa: E402

from atelier.models import colour  # noqa: E402
from atelier.models.errors import InputError  # noqa: E402


def _img(name: str, size: tuple[int, int]) -> np.ndarray:  # [H,W,3] float64, 8-bit values
    a = transform.resize(getattr(data, name)(), size, anti_aliasing=True)
    return np.round(a * 255) / 255


def _t(a: np.ndarray, dtype=torch.float64) -> torch.Tensor:  # [H,W,3] -> [1,3,H,W]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].to(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).double().numpy()


def _reinhard_np(src: np.ndarray, ref: np.ndarray, sel: np.ndarray | None = None, ref_sel=None) -> np.ndarray:
    """Reinhard in Lab with skimage's conversion: per-channel mean/std of the selected pixels moved."""
    ls, lt = color.rgb2lab(src), color.rgb2lab(ref)
    ps = ls[sel] if sel is not None else ls.reshape(-1, 3)
    pt = lt[ref_sel] if ref_sel is not None else lt.reshape(-1, 3)
    moved = (ls - ps.mean(0)) / ps.std(0) * pt.std(0) + pt.mean(0)
    return color.lab2rgb(moved)


def test_rgb_to_lab_matches_skimage():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.random((16, 16, 3)), _img("astronaut", (16, 16))], 0)
    a[0, 0] = 0.0  # black and white and the dark linear segment
    a[0, 1] = 1.0
    a[0, 2] = 0.01
    ref = color.rgb2lab(a)
    np.testing.assert_allclose(_np(colour.rgb_to_lab(_t(a))), ref, atol=1e-9)
    np.testing.assert_allclose(_np(colour.rgb_to_lab(_t(a, torch.float32))), ref, atol=2e-3)


def test_lab_to_rgb_matches_skimage_inside_and_outside_gamut():
    rng = np.random.default_rng(1)
    lab = np.stack([rng.uniform(0, 100, (20, 20)), rng.uniform(-90, 90, (20, 20)), rng.uniform(-90, 90, (20, 20))], -1)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = color.lab2rgb(lab)  # clips negative Z and the result, as ours does
    np.testing.assert_allclose(_np(colour.lab_to_rgb(_t(lab))), ref, atol=1e-9)
    a = _img("coffee", (24, 32))
    np.testing.assert_allclose(_np(colour.lab_to_rgb(colour.rgb_to_lab(_t(a)))), a, atol=1e-9)


def test_histogram_matches_skimage_match_histograms():
    src, ref = _img("astronaut", (40, 48)), _img("coffee", (30, 45))
    expect = exposure.match_histograms(src.astype(np.float32), ref.astype(np.float32), channel_axis=-1)
    got = colour.colour_transfer(_t(src, torch.float32), _t(ref, torch.float32), "histogram")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(_np(got), expect, atol=1e-6)


def test_histogram_inside_masks_matches_skimage_on_the_selected_pixels():
    src, ref = _img("astronaut", (40, 48)), _img("coffee", (30, 45))
    mask = np.zeros((40, 48), bool)
    mask[5:30, 10:40] = True
    ref_mask = np.zeros((30, 45), bool)
    ref_mask[:, :20] = True
    expect = exposure.match_histograms(src[mask].astype(np.float32), ref[ref_mask].astype(np.float32), channel_axis=-1)
    got = _np(colour.colour_transfer(_t(src, torch.float32), _t(ref, torch.float32), "histogram",
                                     mask=torch.from_numpy(mask)[None].float(),
                                     ref_mask=torch.from_numpy(ref_mask)[None].float()))
    np.testing.assert_allclose(got[mask], expect, atol=1e-6)
    np.testing.assert_allclose(got[~mask], src[~mask], atol=1e-7)  # outside the mask nothing moves


def test_reinhard_matches_numpy_reference():
    src, ref = _img("astronaut", (32, 32)), _img("coffee", (24, 36))
    got = colour.colour_transfer(_t(src), _t(ref), "reinhard")
    np.testing.assert_allclose(_np(got), _reinhard_np(src, ref), atol=1e-9)
    lab = color.rgb2lab(_np(got))  # and the point of it: Lab statistics now close to the reference's (gamut clip aside)
    np.testing.assert_allclose(lab.reshape(-1, 3).mean(0), color.rgb2lab(ref).reshape(-1, 3).mean(0), atol=2.0)


def test_reinhard_inpaint_use_hole_takes_surrounding_colours():
    """The inpainting family's call: same picture as reference, statistics from outside the hole."""
    img = _img("astronaut", (32, 32))
    hole = np.zeros((32, 32), bool)
    hole[8:20, 10:24] = True
    img[hole] = img[hole] * 0.5 + np.array([0.4, 0.0, 0.0])  # a reddish, darker fill
    m = torch.from_numpy(hole)[None].double()
    got = _np(colour.colour_transfer(_t(img), _t(img), mask=m, ref_mask=1 - m))
    expect = _reinhard_np(img, img, hole, ~hole)
    np.testing.assert_allclose(got[hole], expect[hole], atol=1e-9)
    np.testing.assert_array_equal(got[~hole], img[~hole])


def test_strength_and_soft_mask_blend_linearly():
    src, ref = _t(_img("astronaut", (16, 16))), _t(_img("coffee", (16, 16)))
    full = colour.colour_transfer(src, ref)
    half = colour.colour_transfer(src, ref, strength=0.5)
    torch.testing.assert_close(half, (src + full) / 2, atol=1e-9, rtol=0)
    torch.testing.assert_close(colour.colour_transfer(src, ref, strength=0.0), src)


def test_batches_pair_or_share_the_reference():
    a, b = _t(_img("astronaut", (16, 16))), _t(_img("chelsea", (16, 16)))
    ref = _t(_img("coffee", (16, 16)))
    both = colour.colour_transfer(torch.cat([a, b]), ref)
    torch.testing.assert_close(both[1:], colour.colour_transfer(b, ref))
    pairs = colour.colour_transfer(torch.cat([a, b]), torch.cat([ref, a]))
    torch.testing.assert_close(pairs[1:], colour.colour_transfer(b, a))


@pytest.mark.parametrize("method", colour.METHODS)
def test_constant_images_give_no_nan(method):
    flat = torch.full((1, 3, 8, 8), 0.3)
    one = torch.rand(1, 3, 1, 1)
    pic = torch.rand(1, 3, 8, 8)
    for img, ref in ((flat, pic), (pic, flat), (flat, one), (pic, one)):
        out = colour.colour_transfer(img, ref, method)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    moved = colour.colour_transfer(flat, one, "reinhard")  # a constant image moves to the reference's colour
    torch.testing.assert_close(moved, one.expand_as(flat), atol=2e-3, rtol=0)


def test_luminance_transfer_keeps_content_chroma():
    sty, con = _img("coffee", (16, 24)), _img("chelsea", (16, 24))
    ls, lc = color.rgb2lab(sty), color.rgb2lab(con)
    expect = color.lab2rgb(np.concatenate([ls[..., :1], lc[..., 1:]], -1))
    np.testing.assert_allclose(_np(colour.luminance_transfer(_t(sty), _t(con))), expect, atol=1e-9)


def test_bad_input_is_named():
    img, ref = torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)
    with pytest.raises(InputError, match="reference: expected a batch of 1"):
        colour.colour_transfer(img, ref)
    with pytest.raises(InputError, match="mask: expected"):
        colour.colour_transfer(img, ref[:1], mask=torch.ones(1, 4, 4))
    with pytest.raises(InputError, match="ref_mask: the mask selects no pixels"):
        colour.colour_transfer(img, ref[:1], ref_mask=torch.zeros(1, 8, 8))
    with pytest.raises(InputError, match="method"):
        colour.colour_transfer(img, ref[:1], method="lut")
    with pytest.raises(InputError, match="image: expected an RGB"):
        colour.colour_transfer(torch.rand(1, 4, 8, 8), ref[:1])
