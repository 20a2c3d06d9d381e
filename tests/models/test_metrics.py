"""Metrics: PSNR/SSIM against scikit-image, MS-SSIM against torchmetrics' terms and scikit-image, FID against the
scipy.linalg.sqrtm formula and its properties, KID against torchmetrics' MMD, the LeNet-5 feature network against
the reference classifier of tests/helpers_mnist.py, and the bad inputs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atelier.models import metrics
from atelier.models.errors import InputError

skm = pytest.importorskip("skimage.metrics")
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread fan-out only costs on a busy machine


def _sk_ssim(a: torch.Tensor, b: torch.Tensor) -> float:  # [C,H,W] each
    return float(skm.structural_similarity(a.double().numpy(), b.double().numpy(), data_range=1.0, channel_axis=0,
                                           gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def _photo(h: int, w: int, name: str = "astronaut", grey: bool = False) -> torch.Tensor:  # [1,C,h,w] in [0,1]
    from skimage import data

    a = torch.from_numpy(getattr(data, name)().astype(np.float32) / 255)
    a = a[None, None] if a.ndim == 2 else a.permute(2, 0, 1)[None]
    a = F.interpolate(a, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return a.mean(1, keepdim=True) if grey else a


def _degraded(x: torch.Tensor, noise: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blur = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return (blur + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)


# ---------------------------------------------------------------- PSNR, SSIM


@pytest.mark.parametrize("kind", ["random", "photo", "grey"])
def test_psnr_and_ssim_equal_scikit_image(kind):
    if kind == "random":
        a = torch.rand(3, 3, 40, 57)
    else:
        a = torch.cat([_photo(64, 80, "astronaut", grey=kind == "grey"), _photo(64, 80, "chelsea", grey=kind == "grey")])
    b = _degraded(a, 0.05)
    p, s = metrics.psnr(a, b), metrics.ssim(a, b)
    assert p.shape == s.shape == (a.shape[0],)
    for i in range(a.shape[0]):
        ref_p = skm.peak_signal_noise_ratio(a[i].double().numpy(), b[i].double().numpy(), data_range=1.0)
        assert abs(float(p[i]) - ref_p) < 1e-4
        assert abs(float(s[i]) - _sk_ssim(a[i], b[i])) < 1e-4
    assert 0.1 < float(s.min()) and float(s.max()) < 0.99  # a real comparison, not a trivial 1 or 0


def test_one_against_many_equals_pairs_and_identical_images_are_perfect():
    a, b = torch.rand(1, 3, 32, 32), torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(metrics.ssim(a, b), metrics.ssim(a.expand(4, -1, -1, -1), b))
    torch.testing.assert_close(metrics.psnr(b, a), metrics.psnr(b, a.expand(4, -1, -1, -1)))
    assert torch.isinf(metrics.psnr(b, b)).all()
    torch.testing.assert_close(metrics.ssim(b, b), torch.ones(4, dtype=torch.float64))


def test_psnr_data_range_scales_as_the_formula():
    a, b = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(metrics.psnr(a, b, data_range=2.0) - metrics.psnr(a, b),
                               torch.full((2,), 20 * np.log10(2.0), dtype=torch.float64))


def test_ssim_in_bands_of_rows_equals_the_whole_image(monkeypatch):
    a = torch.rand(2, 3, 190, 200)
    b = _degraded(a, 0.1)
    whole_s, whole_m = metrics.ssim(a, b), metrics.ms_ssim(a, b)
    monkeypatch.setattr(metrics.budget, "CPU_CACHE_BYTES", 64 << 10)  # a few rows per band
    torch.testing.assert_close(metrics.ssim(a, b), whole_s, atol=1e-12, rtol=0)
    torch.testing.assert_close(metrics.ms_ssim(a, b), whole_m, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- MS-SSIM


def _ms_ssim_reference(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Contrast-structure at scales 1-4 from torchmetrics (its cropped terms), SSIM at scale 5 from scikit-image,
    combined with Wang 2003's weights (negative terms clipped as torchmetrics' default does)."""
    from torchmetrics.functional.image.ssim import _ssim_update

    x, y = a.double(), b.double()
    terms = []
    for _ in range(4):
        _sim, cs = _ssim_update(x, y, True, 1.5, 11, 1.0, 0.01, 0.03, return_contrast_sensitivity=True)
        terms.append(cs.clamp(min=0))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    terms.append(torch.tensor([max(_sk_ssim(x[i], y[i]), 0.0) for i in range(len(x))], dtype=torch.float64))
    w = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    return [float(np.prod([t[i] ** wk for t, wk in zip(terms, w)])) for i in range(len(a))]


def test_ms_ssim_equals_reference_terms():
    pytest.importorskip("torchmetrics")
    a = torch.cat([_photo(180, 200, "astronaut"), _photo(180, 200, "coffee")])
    b = _degraded(a, 0.08)
    got = metrics.ms_ssim(a, b)
    ref = _ms_ssim_reference(a, b)
    assert all(abs(float(g) - r) < 1e-4 for g, r in zip(got, ref)), (got, ref)
    assert float(got.min()) < 0.98 and float(metrics.ms_ssim(a[:1], a[:1])) == pytest.approx(1.0, abs=1e-12)
    # noisier copies score lower: the metric orders degradations
    assert (metrics.ms_ssim(a, _degraded(a, 0.2)) < got).all()


def test_ms_ssim_needs_176_pixels_and_says_so():
    a = torch.rand(1, 1, 176, 190)
    assert metrics.ms_ssim(a, a).shape == (1,)
    with pytest.raises(InputError, match=r"a: MS-SSIM needs images of at least 176x176 .* got 175x190"):
        metrics.ms_ssim(a[:, :, :175], a[:, :, :175])


# ---------------------------------------------------------------- bad image inputs


def test_mismatched_images_are_refused_by_name():
    a = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputError, match=r"b: expected images like a \(3 channels, 32x32\), got 1 channels"):
        metrics.ssim(a, torch.rand(2, 1, 32, 32))
    with pytest.raises(InputError, match=r"target: expected images like ref .* got 3 channels, 32x30"):
        metrics.psnr(a, torch.rand(2, 3, 32, 30), names=("ref", "target"))
    with pytest.raises(InputError, match=r"a: expected 1 image or 3 .* got a batch of 2"):
        metrics.ssim(a, torch.rand(3, 3, 32, 32))
    with pytest.raises(InputError, match=r"a: SSIM needs images of at least 11x11"):
        metrics.ssim(a[..., :10, :10], a[..., :10, :10])
    with pytest.raises(InputError, match=r"b: expected an image batch \[B,C,H,W\]"):
        metrics.psnr(a, torch.rand(3, 32, 32))


# ---------------------------------------------------------------- FID


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_fid_equals_the_sqrtm_formula():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(3)
    f1 = torch.randn(300, 12, generator=g, dtype=torch.float64)
    f2 = torch.randn(250, 12, generator=g, dtype=torch.float64) @ (torch.eye(12, dtype=torch.float64) * 1.3
                                                                   + 0.1 * torch.randn(12, 12, generator=g,
                                                                                       dtype=torch.float64)) + 0.4
    ref = _scipy_fid(f1.numpy(), f2.numpy())
    assert ref > 1.0
    assert metrics.fid(f1, f2) == pytest.approx(ref, rel=1e-8)
    assert metrics.fid(f1.float(), f2.float()) == pytest.approx(ref, rel=1e-5)  # float32 input is fitted in float64


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_squared_length():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(64, 84, generator=g, dtype=torch.float64).abs()  # fewer samples than dimensions: rank-deficient
    trace = float(torch.cov(f.T).trace())
    assert abs(metrics.fid(f, f)) < 1e-6 * trace  # square roots of the null space's rounding noise: ~1e-8 each
    delta = torch.randn(84, generator=g, dtype=torch.float64)
    assert metrics.fid(f, f + delta) == pytest.approx(float(delta.pow(2).sum()), abs=1e-6 * trace)


def test_fid_needs_two_samples_and_equal_dimensions():
    f = torch.randn(10, 4)
    with pytest.raises(InputError, match=r"generated: expected at least 2 images .* got 1"):
        metrics.fid(f, f[:1])
    with pytest.raises(InputError, match=r"generated: expected 4-d features like real, got 3-d"):
        metrics.fid(f, f[:, :3])


# ---------------------------------------------------------------- KID


def test_kid_on_whole_sets_equals_torchmetrics_mmd():
    kid_mod = pytest.importorskip("torchmetrics.image.kid")
    g = torch.Generator().manual_seed(5)
    f1 = torch.randn(80, 16, generator=g, dtype=torch.float64)
    f2 = torch.randn(80, 16, generator=g, dtype=torch.float64) * 1.2 + 0.3
    ref = float(kid_mod.poly_mmd(f1, f2))
    mean, std, m = metrics.kid(f1, f2, subset_size=80, subsets=3)
    assert m == 80 and mean == pytest.approx(ref, rel=1e-10) and std < 1e-12 * abs(ref)  # every subset is the set
    assert metrics.mmd2_unbiased(f1, f2) == pytest.approx(ref, rel=1e-10)


def test_kid_is_unbiased_for_one_distribution():
    """Over independent pairs of sets from one distribution the unbiased MMD² averages 0 (within 4 standard errors),
    where the biased (V-statistic) estimator sits far above."""
    vals, biased = [], []
    for k in range(40):
        g = torch.Generator().manual_seed(100 + k)
        x, y = (torch.randn(50, 8, generator=g, dtype=torch.float64) for _ in range(2))
        vals.append(metrics.mmd2_unbiased(x, y))
        kxx, kyy, kxy = ((a @ b.T / 8 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(float(kxx.mean() + kyy.mean() - 2 * kxy.mean()))
    se = np.std(vals) / np.sqrt(len(vals))
    assert abs(np.mean(vals)) < 4 * se and np.mean(biased) > 10 * se


def test_kid_subsets_are_seeded_and_a_shift_shows():
    g = torch.Generator().manual_seed(6)
    f1, f2 = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, same_std, m = metrics.kid(f1, f2, subset_size=100, subsets=50, seed=1)
    other, _, _ = metrics.kid(f1, f2 + 0.5, subset_size=100, subsets=50, seed=1)
    assert m == 100 and abs(same) < same_std and other > 10 * same_std
    assert metrics.kid(f1, f2, subset_size=100, subsets=50, seed=1) == (same, same_std, m)
    assert metrics.kid(f1, f2, subset_size=100, subsets=50, seed=2)[0] != same


def test_kid_caps_the_subset_at_the_smaller_set():
    f1, f2 = torch.randn(30, 4), torch.randn(50, 4)
    assert metrics.kid(f1, f2, subset_size=1000, subsets=2)[2] == 30
    with pytest.raises(InputError, match="subset_size >= 2"):
        metrics.kid(f1, f2, subset_size=1)


# ---------------------------------------------------------------- the LeNet-5 feature network


@pytest.fixture
def lenet(manager, models_root, shared_dir):
    folder = models_root / "feature_extractors"
    folder.mkdir(exist_ok=True)
    shutil.copy(shared_dir / "weights" / "mnist" / "lenet_classifier.pth", folder / "lenet_classifier.pth")
    return manager.load("lenet_classifier.pth", "feature_extractors", family="features")


def test_lenet_features_equal_the_reference_classifier(lenet, shared_dir, one_thread):
    from helpers_mnist import class_probabilities, load_lenet, load_mnist_test

    assert (lenet.family, lenet.architecture, lenet.extra.dim, lenet.extra.input_size) == ("features", "LeNet-5", 84, 32)
    ref = load_lenet(shared_dir)
    images, labels = load_mnist_test(shared_dir, 300)
    feats = metrics.features(lenet, images)  # [300,84]
    x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = F.relu(ref.fc.f6(ref.convnet(x).flatten(1)))
        probs = class_probabilities(ref, images)
    assert feats.shape == (300, 84) and feats.dtype == torch.float64
    torch.testing.assert_close(feats.float(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lenet.model.classify(x).exp(), probs, atol=1e-6, rtol=1e-5)
    assert (probs.argmax(1) == labels).float().mean() > 0.97
    # RGB IMAGE input (grey repeated) gives the same features
    torch.testing.assert_close(metrics.features(lenet, images[:20].expand(-1, 3, -1, -1)), feats[:20], atol=1e-5,
                               rtol=1e-4)


def test_lenet_fid_of_two_halves_of_mnist_is_far_below_digits_against_noise(lenet, shared_dir, one_thread):
    from helpers_mnist import load_mnist_test

    images, _ = load_mnist_test(shared_dir, 1000)
    noise = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    fa, fb, fn = (metrics.features(lenet, x) for x in (images[:500], images[500:], noise))
    halves, against_noise = metrics.fid(fa, fb), metrics.fid(fa, fn)
    assert halves < 0.05 * against_noise, (halves, against_noise)
    k_halves = metrics.kid(fa, fb, subset_size=250, subsets=20)
    k_noise = metrics.kid(fa, fn, subset_size=250, subsets=20)
    assert abs(k_halves[0]) < 0.02 * k_noise[0], (k_halves, k_noise)
    assert metrics.extractor_label(lenet) == "LeNet-5 f6, 84-d, lenet_classifier.pth"


def test_features_refuse_a_model_of_another_family(manager, models_root, shared_dir):
    folder = models_root / "feature_extractors"
    folder.mkdir(exist_ok=True)
    shutil.copy(shared_dir / "weights" / "mnist" / "vae_fc.pth", folder / "vae_fc.pth")
    vae = manager.load("vae_fc.pth", "feature_extractors")
    with pytest.raises(InputError, match="expected a feature extractor, got a vae model"):
        metrics.features(vae, torch.rand(2, 1, 28, 28))


def test_cancel_stops_the_image_metrics(lenet):
    from atelier.models import host
    from atelier.models.errors import Interrupted

    a = torch.rand(1, 1, 200, 200)
    for fn in (metrics.ssim, metrics.ms_ssim):
        host.request_interrupt()
        try:
            with pytest.raises(Interrupted):
                fn(a, a)
        finally:
            host.clear_interrupt()
    host.request_interrupt()
    try:
        with pytest.raises(Interrupted):
            metrics.features(lenet, torch.rand(4, 1, 28, 28))
    finally:
        host.clear_interrupt()
