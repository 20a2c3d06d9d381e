"""Style nodes: load, stylise (strength, colours, batches, alpha), colour transfer, and the bad inputs of issue #15."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from atelier.models.errors import InputError, UnknownModelError, WrongFamilyError
from atelier.nodes.style import AtelierColourTransfer, AtelierLoadStyleModel, AtelierStyleTransfer

PART = "decoder_iter_160000.pth.tar"


@pytest.fixture
def style_dir(models_root, shared_dir):
    src = shared_dir / "weights" / "microast"
    if not (src / PART).is_file():
        pytest.skip("shared/weights/microast missing")
    d = models_root / "style"
    d.mkdir()
    for f in src.glob("*_iter_160000.pth.tar"):
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture
def microast(manager, style_dir):
    return AtelierLoadStyleModel().load(PART)[0]


def _photo(h: int, w: int, name: str = "astronaut") -> torch.Tensor:  # IMAGE [1,H,W,3]
    from skimage import data, transform

    a = transform.resize(getattr(data, name)(), (h, w), anti_aliasing=True)
    return torch.from_numpy(a).float()[None]


def _run(model, content, style=None, **kw):
    args = dict(strength=1.0, style_size=64, preserve_colours=False)
    args.update(kw)
    res = AtelierStyleTransfer().apply(model, content, style=style, **args)
    return res["result"]


def test_loader_lists_the_folder_and_loads(microast, style_dir):
    names = AtelierLoadStyleModel.INPUT_TYPES()["required"]["style_name"][0]
    assert PART in names
    assert microast.architecture == "MicroAST"


def test_stylise_batch_with_one_style_equals_one_by_one(microast, one_thread):
    a, b = _photo(40, 52), _photo(40, 52, "chelsea")
    style = _photo(48, 64, "coffee")
    both, notes = _run(microast, torch.cat([a, b]), style)
    assert both.shape == (2, 40, 52, 3) and notes == ""
    torch.testing.assert_close(both[1:], _run(microast, b, style)[0], atol=1e-5, rtol=0)
    # the style's palette arrives: mean colour much closer to the coffee's than the content's was
    d_before = (a.mean((0, 1, 2)) - style.mean((0, 1, 2))).abs().sum()
    d_after = (both[0].mean((0, 1)) - style.mean((0, 1, 2))).abs().sum()
    assert d_after < 0.5 * d_before


def test_strength_blends_in_pixel_space(microast, one_thread):
    c, s = _photo(32, 40), _photo(32, 32, "coffee")
    full = _run(microast, c, s)[0]
    half = _run(microast, c, s, strength=0.5)[0]
    torch.testing.assert_close(half, (full + c) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(_run(microast, c, s, strength=0.0)[0], c, atol=1e-6, rtol=0)


def test_preserve_colours_keeps_content_chroma(microast, one_thread):
    from skimage import color

    c, s = _photo(32, 40), _photo(32, 32, "coffee")
    plain = _run(microast, c, s)[0][0].numpy()
    kept = _run(microast, c, s, preserve_colours=True)[0][0].numpy()
    ab = lambda im: color.rgb2lab(im)[..., 1:]  # noqa: E731
    assert np.abs(ab(kept) - ab(c[0].numpy())).mean() < 0.3 * np.abs(ab(plain) - ab(c[0].numpy())).mean()
    assert np.abs(color.rgb2lab(kept)[..., 0] - color.rgb2lab(plain)[..., 0]).mean() < 2.0  # lightness stylised


def test_alpha_is_kept_aside(microast, one_thread):
    c = torch.cat([_photo(24, 28), torch.rand(1, 24, 28, 1)], -1)
    out = _run(microast, c, _photo(32, 32, "coffee"))[0]
    assert out.shape == c.shape
    torch.testing.assert_close(out[..., 3], c[..., 3])


def test_pairs_of_styles(microast, one_thread):
    c = torch.cat([_photo(24, 28), _photo(24, 28, "chelsea")])
    s = torch.cat([_photo(32, 32, "coffee"), _photo(32, 32, "chelsea")])
    out = _run(microast, c, s)[0]
    torch.testing.assert_close(out[1:], _run(microast, c[1:], s[1:])[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input


def test_arbitrary_model_without_style_image(microast):
    with pytest.raises(InputError, match="style: .*MicroAST.*connect one"):
        _run(microast, _photo(24, 24))


def test_batch_mismatch_is_named(microast):
    with pytest.raises(InputError, match="style: expected 1 style image .* or 3 .* got a batch of 2"):
        _run(microast, torch.rand(3, 24, 24, 3), torch.rand(2, 24, 24, 3))


@pytest.mark.parametrize("style", [torch.full((1, 1, 1, 3), 0.4), torch.full((1, 40, 40, 3), 0.7)],
                         ids=["1x1", "single-colour"])
def test_degenerate_style_gives_a_guarded_result(microast, style):
    out, notes = _run(microast, _photo(24, 28), style)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if style.shape[1] == 1:
        assert "tiny" in notes


def test_file_of_another_family(manager, style_dir, shared_dir):
    src = shared_dir / "weights" / "dncnn" / "dncnn_25.pth"
    if not src.is_file():
        pytest.skip("dncnn weights missing")
    shutil.copy(src, style_dir / "dncnn_25.pth")
    with pytest.raises((WrongFamilyError, UnknownModelError), match="dncnn_25"):
        AtelierLoadStyleModel().load("dncnn_25.pth")


def test_style_model_socket_checked(manager):
    with pytest.raises(InputError, match="style_model: expected an ATELIER_STYLE"):
        _run("not a model", _photo(16, 16))


# ---------------------------------------------------------------- colour transfer


def test_colour_transfer_node_mask_and_alpha():
    img = torch.cat([_photo(32, 32), torch.rand(1, 32, 32, 1)], -1)
    ref = _photo(20, 30, "coffee")
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    (out,) = AtelierColourTransfer().apply(img, ref, "reinhard", 1.0, mask=mask)
    assert out.shape == img.shape
    torch.testing.assert_close(out[..., 3], img[..., 3])
    outside = mask[0] == 0
    torch.testing.assert_close(out[0][outside], img[0][outside])
    assert (out[0][~outside][:, :3] - img[0][~outside][:, :3]).abs().mean() > 0.02
    (hist,) = AtelierColourTransfer().apply(img[..., :3], ref, "histogram", 1.0)
    assert hist.shape == (1, 32, 32, 3)


def test_colour_transfer_node_bad_mask():
    with pytest.raises(InputError, match="mask: expected"):
        AtelierColourTransfer().apply(torch.rand(1, 16, 16, 3), torch.rand(1, 8, 8, 3), "reinhard", 1.0,
                                      mask=torch.ones(1, 8, 8))
