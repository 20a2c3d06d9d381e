"""Training data (models/train/data.py): a folder of mixed images (modes, sizes, formats, broken files), labels
from sub-folders, IMAGE batches, centre-crop geometry against PIL, seeded random crops and flips."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from atelier.models.errors import InputError
from atelier.models.train.data import from_folder, from_images, shift_margin


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def mixed(tmp_path):
    """a/: an exact 8x8 RGB PNG, a half-transparent RGBA PNG, a WebP, a truncated PNG; b/: an L PNG, a palette PNG,
    a JPEG, a text file named .png, deep/ a 16-bit PNG; plus a text file and a hidden PNG at the root."""
    root = tmp_path / "set"
    (root / "a").mkdir(parents=True)
    (root / "b" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "a" / "rgb.png")
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :6, 3] = 255  # left half opaque red-ish, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "a" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "a" / "pic.webp")
    (root / "a" / "zcorrupt.png").write_bytes(_png_bytes(Image.new("RGB", (32, 32), (1, 2, 3)))[:60])
    Image.fromarray(np.full((10, 8), 77, np.uint8), "L").save(root / "b" / "grey.png")
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "b" / "p.png")
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / "b" / "photo.jpg", quality=90)
    (root / "b" / "notes.png").write_text("not an image")
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(root / "b" / "deep" / "w16.png")
    (root / "readme.txt").write_text("ignored")
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")
    return root


def test_mixed_folder_skips_and_converts(mixed):
    assert Image.open(mixed / "b" / "deep" / "w16.png").mode.startswith("I")  # really a 16-bit file
    ds = from_folder(str(mixed), 8, channels=3)
    assert len(ds) == 7 and ds.images.shape == (7, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert len(ds.skipped) == 2
    assert any("zcorrupt.png" in s for s in ds.skipped) and any("notes.png" in s for s in ds.skipped)
    assert ds.converted == 6  # all but the exact 8x8 RGB file
    assert "7 images" in ds.summary() and "2 skipped" in ds.summary() and "6 converted" in ds.summary()
    # order (each folder's files, then its sub-folders): a/pic.webp, a/rgb.png, a/rgba.png, b/grey.png, b/p.png,
    # b/photo.jpg, b/deep/w16.png
    want_rgb = np.asarray(Image.open(mixed / "a" / "rgb.png")).transpose(2, 0, 1)
    assert np.array_equal(ds.images[1].numpy(), want_rgb)
    rgba = ds.images[2].int()
    assert (rgba[:, :, 6:] == 255).all()  # transparent pixels on white (crop of the 12-wide image at 8x8)
    assert abs(int(rgba[0, 4, 0]) - 200) <= 2 and int(rgba[1, 4, 0]) <= 2
    w16 = ds.images[6].int()
    assert (w16 - 128).abs().max() <= 1  # 16-bit samples scaled to 8 bits, not clipped to white
    assert (ds.images[3].int() - 77).abs().max() <= 1
    assert (ds.images[4, :, 2, 2].int() - torch.tensor([10, 200, 30])).abs().max() <= 2


def test_greyscale_and_labels_from_subfolders(mixed):
    ds = from_folder(str(mixed), 8, channels=1, labels=True)
    assert ds.images.shape == (7, 1, 8, 8) and ds.channels == 1
    assert ds.class_names == ("a", "b") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    want = np.asarray(Image.open(mixed / "a" / "rgb.png").convert("L"))
    assert np.array_equal(ds.images[1, 0].numpy(), want)
    assert (ds.images[6].int() - 128).abs().max() <= 1


def test_not_recursive_and_loose_images_with_labels(mixed):
    ds = from_folder(str(mixed / "b"), 8, recursive=False)
    assert len(ds) == 3 and len(ds.skipped) == 1  # grey, p, photo; notes.png skipped; deep/ not read
    with pytest.raises(InputError, match="directly in"):
        from_folder(str(mixed / "b"), 8, labels=True)  # b/grey.png lies in the root given


def test_empty_unreadable_and_missing_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=f"{empty}.*no PNG/JPEG/WebP"):
        from_folder(str(empty), 8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    with pytest.raises(InputError, match=f"none of the 1 images in .*{bad}"):
        from_folder(str(bad), 8)
    with pytest.raises(InputError, match="not a folder"):
        from_folder(str(tmp_path / "missing"), 8)
    with pytest.raises(InputError, match="not a folder"):
        from_folder(str(bad / "x.png"), 8)
    with pytest.raises(InputError, match="channels"):
        from_folder(str(bad), 8, channels=2)


def test_centre_crop_geometry_against_pil(tmp_path):
    img = np.zeros((32, 96), np.uint8)
    img[:, 32:64] = 255  # the centre square white, the sides black
    Image.fromarray(img, "L").save(tmp_path / "wide.png")
    ds = from_folder(str(tmp_path), 16, channels=1)
    got = ds.images[0, 0].int()
    assert (got[:, 2:-2] >= 250).all() and ds.converted == 1  # the centre, not a side, after halving
    want = np.asarray(ImageOps.fit(Image.fromarray(img, "L"), (16, 16), Image.Resampling.LANCZOS), dtype=np.int64)
    assert np.abs(got.numpy() - want).mean() < 8
    tall = torch.zeros((1, 48, 16, 3))
    tall[:, 16:32] = 1.0
    x = from_images(tall, 16).images  # [1,3,16,16]: no resize, the centre rows
    assert (x == 255).all()


def test_from_images_resizes_converts_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(0)
    rgba = torch.rand((2, 10, 14, 4), generator=g)
    ds = from_images(rgba, 8, channels=1)
    assert ds.images.shape == (2, 1, 8, 8) and ds.converted == 2 and ds.source == ""
    exact = torch.rand((3, 8, 8, 3), generator=g)
    ds3 = from_images(exact, 8)
    assert ds3.converted == 0
    assert torch.equal(ds3.images, (exact.movedim(-1, 1) * 255).round().to(torch.uint8))
    with pytest.raises(InputError, match="IMAGE batch"):
        from_images(torch.rand(8, 8, 3), 8)
    with pytest.raises(InputError, match="resolution"):
        from_images(exact, 2)


def test_random_crop_and_flip_follow_the_generator():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand((4, 16, 16, 3), generator=g)
    ds = from_images(imgs, 8, crop="random", flip=True)
    stored = ds.images.float() / 255  # [4,3,9,9]
    assert stored.shape[-1] == 9
    idx = torch.tensor([0, 1, 2, 3] * 4)
    a = ds.batch(idx, torch.Generator().manual_seed(5))
    b = ds.batch(idx, torch.Generator().manual_seed(5))
    c = ds.batch(idx, torch.Generator().manual_seed(6))
    assert a.shape == (16, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    kinds = set()
    for item, i in zip(a, idx.tolist()):  # every item is an 8x8 window of its image, maybe mirrored
        found = [(top, left, f) for top in range(2) for left in range(2) for f in (False, True)
                 if torch.equal(item, (lambda w: w.flip(-1) if f else w)(stored[i, :, top:top + 8, left:left + 8]))]
        assert found, i
        kinds.update(found)
    assert {f for *_, f in kinds} == {False, True} and len({(t, l) for t, l, _ in kinds}) > 1



def test_shift_crop_translates_at_the_same_scale():
    """crop="shift": each item is the stored image, not rescaled, moved by at most shift_margin px with mirrored
    edges (numpy's reflect padding as the reference); the offsets follow the generator and vary."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand((3, 32, 32, 1), generator=g)
    ds = from_images(imgs, 32, channels=1, crop="shift")
    assert ds.images.shape[-1] == 32 and shift_margin(32) == 2 and shift_margin(8) == 1 and shift_margin(64) == 4
    stored = ds.images.numpy().astype(np.float32) / 255  # [3,1,32,32]
    m = shift_margin(32)
    padded = np.pad(stored, ((0, 0), (0, 0), (m, m), (m, m)), mode="reflect")
    idx = torch.tensor([0, 1, 2] * 6)
    a = ds.batch(idx, torch.Generator().manual_seed(1))
    assert a.shape == (18, 1, 32, 32) and torch.equal(a, ds.batch(idx, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, ds.batch(idx, torch.Generator().manual_seed(2)))
    offsets = set()
    for item, i in zip(a.numpy(), idx.tolist()):
        found = [(t - m, l - m) for t in range(2 * m + 1) for l in range(2 * m + 1)
                 if np.array_equal(item, padded[i, :, t:t + 32, l:l + 32])]
        assert len(found) == 1, (i, found)
        offsets.update(found)
    assert len(offsets) > 3
