"""Mask helpers against independent references: scipy.ndimage (grey morphology with a disk footprint, Gaussian
filter, exact Euclidean distance transform, hole filling) and OpenCV (dilation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atelier.models import masks
from atelier.models.errors import InputError

ndi = pytest.importorskip("scipy.ndimage")


def disk(r: int) -> np.ndarray:
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y <= r * r)


def blobs(seed: int = 0, shape=(2, 37, 53), soft: bool = True) -> torch.Tensor:
    """Random shapes with soft values (grey morphology must hold for non-binary masks too)."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(shape, generator=g) > 0.93).float()
    m = torch.nn.functional.max_pool2d(m.unsqueeze(1), 5, 1, 2)[:, 0]
    if soft:
        m = m * torch.rand(shape, generator=g).clamp(0.3, 1)
    return m


@pytest.mark.parametrize("r", [1, 2, 5, 9])
def test_grow_shrink_equal_scipy_grey_morphology_with_disk(r):
    m = blobs(r)
    for i in range(m.shape[0]):
        ref_d = ndi.grey_dilation(m[i].numpy(), footprint=disk(r), mode="nearest")
        ref_e = ndi.grey_erosion(m[i].numpy(), footprint=disk(r), mode="nearest")
        assert np.array_equal(masks.grow(m, r)[i].numpy(), ref_d)
        assert np.array_equal(masks.shrink(m, r)[i].numpy(), ref_e)
    assert torch.equal(masks.grow(m, -r), masks.shrink(m, r))


def test_grow_equals_opencv_dilate():
    cv2 = pytest.importorskip("cv2")
    m = blobs(3, (1, 64, 48))
    ref = cv2.dilate(m[0].numpy(), disk(6).astype(np.uint8), borderType=cv2.BORDER_REPLICATE)
    assert np.array_equal(masks.grow(m, 6)[0].numpy(), ref)


@pytest.mark.parametrize("sigma,shape", [(1.5, (2, 40, 33)), (4.0, (1, 64, 64)), (3.0, (1, 5, 40))])
def test_blur_equals_scipy_gaussian_filter(sigma, shape):
    m = blobs(1, shape)
    out = masks.blur(m, sigma)
    for i in range(m.shape[0]):
        ref = ndi.gaussian_filter(m[i].double().numpy(), sigma, mode="mirror", truncate=4.0)
        assert np.abs(out[i].double().numpy() - ref).max() < 1e-5
    feathered = masks.feather(m, 8)
    assert torch.allclose(feathered, masks.blur(m, 2.0))


def test_distance_inside_equals_scipy_edt_within_limit():
    m = blobs(5, (2, 45, 61), soft=False)
    m[1, 10:40, 5:55] = 1  # a large region: distances up to the limit
    limit = 12
    out = masks.distance_inside(m, limit)
    for i in range(2):
        padded = np.pad(m[i].numpy() > 0.5, 1, constant_values=True)  # beyond the border counts as masked
        ref = ndi.distance_transform_edt(padded)[1:-1, 1:-1]
        ref = np.minimum(ref, limit)
        assert np.abs(out[i].numpy() - ref).max() < 1e-5


def test_edge_blend_zero_outside_ramp_inside():
    m = torch.zeros(1, 40, 40)
    m[0, 10:30, 10:30] = 1
    w = masks.edge_blend(m, 4)
    assert torch.all(w[m == 0] == 0)
    assert w[0, 20, 20] == 1 and w[0, 10, 20] == pytest.approx(0.25) and w[0, 13, 20] == 1


def test_fill_holes_equals_scipy():
    g = torch.Generator().manual_seed(7)
    m = (torch.rand(3, 50, 70, generator=g) > 0.55).float()  # a maze of holes and channels
    m[2] = 0
    m[2, 5:45, 5:65] = 1
    m[2, 20:30, 20:30] = 0  # an enclosed hole
    m[2, 10:15, 0:40] = 0  # a channel reaching the border: not a hole
    out = masks.fill_holes(m)
    for i in range(3):
        ref = ndi.binary_fill_holes(m[i].numpy() > 0.5)
        assert np.array_equal(out[i].numpy() > 0.5, ref)


def test_threshold_stabilise_invert_alpha_bbox():
    m = torch.tensor([[[0.0, 0.0004, 0.3, 0.9996, 1.0]]])
    assert torch.equal(masks.stabilise(m, 1e-3), torch.tensor([[[0.0, 0.0, 0.3, 1.0, 1.0]]]))
    assert masks.threshold(m, 0.5).tolist() == [[[0.0, 0.0, 0.0, 1.0, 1.0]]]
    assert torch.equal(masks.invert(m), 1 - m)
    assert torch.equal(masks.from_alpha(torch.ones(1, 3, 3)), torch.zeros(1, 3, 3))
    b = torch.zeros(2, 10, 12)
    b[0, 2:5, 3:9] = 0.5
    assert masks.bbox(b, 1) == [(1, 6, 2, 10), None]
    bm = masks.bbox_mask(b)
    assert bm[0].sum() == 18 and bm[1].sum() == 0
    with pytest.raises(InputError, match="eps"):
        masks.stabilise(m, 0.7)
    with pytest.raises(InputError, match="mask"):
        masks.grow(torch.zeros(2, 0, 3), 2)
