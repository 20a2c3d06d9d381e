"""models/image.py: the image helpers every family shares, against independent references (numpy, PIL)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.models import image
from atelier.models.errors import InputError


def test_split_alpha_and_channels():
    rgba = torch.rand(2, 4, 5, 6)
    rgb, a = image.split_alpha(rgba)
    assert torch.equal(rgb, rgba[:, :3]) and torch.equal(a, rgba[:, 3:])
    assert image.split_alpha(rgb)[1] is None
    grey = image.match_channels(rgb, 1)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # ITU-R BT.601
    torch.testing.assert_close(grey[:, 0], luma)
    assert torch.equal(image.match_channels(grey, 3), grey.expand(-1, 3, -1, -1))
    with pytest.raises(InputError, match="2"):
        image.match_channels(torch.rand(1, 2, 4, 4), 3)


def test_pad_reflects_then_replicates():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    y = image.pad_to(x, 5, 6)
    ref = np.pad(x[0, 0].numpy(), ((0, 2), (0, 2)), mode="reflect")
    np.testing.assert_array_equal(y[0, 0].numpy(), ref)
    small = torch.arange(4.0).view(1, 1, 2, 2)  # too small to reflect 3 rows: replicate
    np.testing.assert_array_equal(image.pad_to(small, 5, 2)[0, 0].numpy(),
                                  np.pad(small[0, 0].numpy(), ((0, 3), (0, 0)), mode="edge"))
    assert image.pad_multiple(torch.rand(1, 3, 9, 16), 8).shape[-2:] == (16, 16)
    with pytest.raises(ValueError):
        image.pad_to(x, 2, 4)


def test_resize_against_pil_bicubic():
    rng = np.random.default_rng(0)
    arr = (rng.random((64, 48)) * 255).astype(np.uint8)
    x = torch.from_numpy(arr).float().div(255)[None, None]
    ours = image.resize(x, 32, 24)[0, 0].numpy() * 255  # antialiased shrink
    ref = np.asarray(Image.fromarray(arr).resize((24, 32), Image.BICUBIC), dtype=np.float32)
    assert np.abs(ours - ref).mean() < 1.5  # PIL's antialiased bicubic; rounding and kernel edge handling differ
    assert image.resize(x, 64, 48) is x


def test_crop_paste_and_ranges():
    dst = torch.zeros(1, 3, 8, 8)
    src = torch.ones(1, 3, 2, 3)
    image.paste(dst, src, (1, 2, 2, 3))
    assert dst.sum() == 18 and torch.equal(image.crop(dst, (1, 2, 2, 3)), src)
    w = torch.full((1, 1, 2, 3), 0.25)
    image.paste(dst, torch.zeros(1, 3, 2, 3), (1, 2, 2, 3), weight=w)
    torch.testing.assert_close(image.crop(dst, (1, 2, 2, 3)), torch.full((1, 3, 2, 3), 0.75))
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(image.to_unit(image.to_range(x, (-1, 1)), (-1, 1)), x)
    assert image.to_unit(torch.tensor([-3.0, 3.0]), (-1, 1)).tolist() == [0.0, 1.0]
