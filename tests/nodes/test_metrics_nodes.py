"""Metric nodes: Image Quality against scikit-image, the feature-extractor loader, FID / KID on MNIST digits with
the LeNet-5 features (report names the extractor; values equal the engine's), and the bad inputs."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from atelier.models import metrics
from atelier.models.errors import InputError, WrongFamilyError
from atelier.nodes.metrics import AtelierFeatureExtractorLoader, AtelierFIDKID, AtelierImageQuality

skm = pytest.importorskip("skimage.metrics")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def extractors(manager, models_root, shared_dir):
    folder = models_root / "feature_extractors"
    folder.mkdir(exist_ok=True)
    shutil.copy(shared_dir / "weights" / "mnist" / "lenet_classifier.pth", folder / "lenet_classifier.pth")
    return folder


def _image(b: int, h: int, w: int, seed: int) -> torch.Tensor:  # IMAGE [B,H,W,3]
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_image_quality_equals_scikit_image_and_shows_the_report():
    ref = _image(2, 48, 40, 1)
    img = (ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    res = AtelierImageQuality().compare(ref, img)
    psnr, ssim, ms, text = res["result"]
    want_p = sum(skm.peak_signal_noise_ratio(ref[i].double().numpy(), img[i].double().numpy(), data_range=1.0)
                 for i in range(2)) / 2
    want_s = sum(skm.structural_similarity(ref[i].double().numpy(), img[i].double().numpy(), data_range=1.0,
                                           channel_axis=2, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False) for i in range(2)) / 2
    assert abs(psnr - want_p) < 1e-4 and abs(ssim - want_s) < 1e-4
    assert math.isnan(ms) and "MS-SSIM n/a: needs sides of 176 px or more (5 scales), got 48x40" in text
    assert res["ui"]["text"] == [text] and f"PSNR {want_p:.2f} dB" in text and "mean of 2 pairs" in text


def test_image_quality_ms_ssim_on_large_images_one_against_many():
    ref = _image(1, 180, 180, 3)
    img = torch.cat([ref, (ref * 0.8 + 0.1)])
    psnr, ssim, ms, text = AtelierImageQuality().compare(ref, img)["result"]
    per = metrics.ms_ssim(ref.movedim(-1, 1), img.movedim(-1, 1))
    assert float(per[0]) == pytest.approx(1.0, abs=1e-12) and float(per[1]) < 0.999
    assert ms == pytest.approx(float(per.mean()), abs=1e-12) and math.isinf(psnr)  # one identical pair
    assert "0: PSNR inf dB" in text and "n/a" not in text


def test_image_quality_refuses_mismatched_images_by_name():
    with pytest.raises(InputError, match=r"image: expected images like reference \(3 channels, 32x32\), got 3 "
                                         r"channels, 32x30"):
        AtelierImageQuality().compare(_image(1, 32, 32, 0), _image(1, 32, 30, 0))
    with pytest.raises(InputError, match=r"reference: expected 1 image or 3"):
        AtelierImageQuality().compare(_image(2, 32, 32, 0), _image(3, 32, 32, 0))


def test_loader_lists_the_folder_and_refuses_other_families(extractors, shared_dir):
    names = AtelierFeatureExtractorLoader.INPUT_TYPES()["required"]["extractor_name"][0]
    assert names == ["lenet_classifier.pth"]
    desc = AtelierFeatureExtractorLoader().load("lenet_classifier.pth")[0]
    assert (desc.family, desc.architecture, desc.extra.dim) == ("features", "LeNet-5", 84)
    shutil.copy(shared_dir / "weights" / "mnist" / "vae_fc.pth", extractors / "vae_fc.pth")
    with pytest.raises(WrongFamilyError, match="is a vae model .* needs a features model"):
        AtelierFeatureExtractorLoader().load("vae_fc.pth")


def test_fid_kid_node_on_digits_names_the_extractor_and_equals_the_engine(extractors, shared_dir):
    from helpers_mnist import load_mnist_test

    digits, _ = load_mnist_test(shared_dir, 400)
    as_image = digits.movedim(1, -1).expand(-1, -1, -1, 3)  # IMAGE [B,28,28,3]: grey digits as RGB
    desc = AtelierFeatureExtractorLoader().load("lenet_classifier.pth")[0]
    res = AtelierFIDKID().score(desc, as_image[:200], as_image[200:], subset_size=1000, subsets=10, seed=0)
    fid, kid, kid_std, text = res["result"]
    fa, fb = metrics.features(desc, digits[:200]), metrics.features(desc, digits[200:])
    assert fid == pytest.approx(metrics.fid(fa, fb), rel=1e-4)
    assert (kid, kid_std) == pytest.approx(metrics.kid(fa, fb, subset_size=200, subsets=10, seed=0)[:2], rel=1e-3)
    assert text.startswith("FID (LeNet-5 f6, 84-d, lenet_classifier.pth) = ")
    assert "not comparable with Inception" in text and "10 subsets of 200" in text and res["ui"]["text"] == [text]
    noise = torch.rand(200, 28, 28, 3, generator=torch.Generator().manual_seed(1))
    fid_noise = AtelierFIDKID().score(desc, as_image[:200], noise, subset_size=100, subsets=10, seed=0)["result"][0]
    assert fid < 0.05 * fid_noise


def test_fid_kid_node_bad_inputs(extractors):
    desc = AtelierFeatureExtractorLoader().load("lenet_classifier.pth")[0]
    with pytest.raises(InputError, match=r"generated: expected 2 images or more .* got 1"):
        AtelierFIDKID().score(desc, _image(4, 28, 28, 0), _image(1, 28, 28, 1), 100, 10, 0)
    with pytest.raises(InputError, match="extractor: expected an ATELIER_FEATURES .* got str"):
        AtelierFIDKID().score("lenet", _image(4, 28, 28, 0), _image(4, 28, 28, 1), 100, 10, 0)
