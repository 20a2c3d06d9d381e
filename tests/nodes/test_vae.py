"""VAE nodes on the real shared weights: TAEF2 (encoder and decoder files paired by the loader) round trip through
the nodes, odd sizes cropped back, the MNIST VAE as a generator judged by the LeNet classifier, interpolation
batches, and errors that name what is wrong."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import helpers_mnist  # tests/ is on pytest's pythonpath
from atelier.models.errors import InputError
from atelier.models.vae import codec
from atelier.nodes.common import latent_out
from atelier.nodes.vae import (AtelierLatentInterpolate, AtelierLoadVAE, AtelierVAEDecode, AtelierVAEEncode,
                               AtelierVAESample)


@pytest.fixture
def models(shared_dir, manager, models_root):
    for half in ("encoder", "decoder"):
        shutil.copy(shared_dir / "weights" / "taef2" / f"taef2_{half}.pth", models_root / "vae_approx")
    shutil.copy(shared_dir / "weights" / "taef2" / "taesana_encoder.pth", models_root / "vae_approx")
    shutil.copy(shared_dir / "weights" / "mnist" / "vae_fc.pth", models_root / "vae")
    return manager


def _image(h: int, w: int) -> torch.Tensor:  # IMAGE [1,h,w,3]
    skimage_data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(np.ascontiguousarray(skimage_data.astronaut())).float().div(255)
    return x[100 : 100 + h, 150 : 150 + w][None].contiguous()


def test_loader_lists_both_folders_and_pairs_taef2(models):
    choices = AtelierLoadVAE.INPUT_TYPES()["required"]["vae_name"][0]
    assert {"vae_approx/taef2_encoder.pth", "vae_approx/taef2_decoder.pth", "vae/vae_fc.pth"} <= set(choices)
    for name in ("vae_approx/taef2_encoder.pth", "vae_approx/taef2_decoder.pth"):
        vae = AtelierLoadVAE().load(name)[0]
        assert isinstance(vae, codec.VAE) and vae.encoder is not None and vae.decoder is not None
        assert vae.encoder.source.endswith("taef2_encoder.pth") and vae.decoder.source.endswith("taef2_decoder.pth")
    sana = AtelierLoadVAE().load("vae_approx/taesana_encoder.pth")[0]  # no decoder published: encoder only
    assert sana.decoder is None and sana.downscale == 32
    with pytest.raises(InputError, match="has no decoder"):
        AtelierVAEDecode().decode(sana, {"samples": torch.zeros(1, 32, 2, 2)})
    with pytest.raises(InputError, match="vae_name: expected 'vae/<file>'"):
        AtelierLoadVAE().load("checkpoints/x.safetensors")


def test_taef2_round_trip_through_the_nodes_keeps_odd_sizes(models):
    vae = AtelierLoadVAE().load("vae_approx/taef2_decoder.pth")[0]
    image = _image(100, 75)  # not multiples of 8
    latent = AtelierVAEEncode().encode(vae, image, "mean", 0)[0]
    assert latent["samples"].shape == (1, 32, 13, 10) and latent["atelier_image_size"] == [100, 75]
    strided = torch.randn(1, 13, 10, 32).permute(0, 3, 1, 2)  # channels last, as the tiling engine accumulates
    assert latent_out(strided)["samples"].is_contiguous() and torch.equal(latent_out(strided)["samples"], strided)
    out = AtelierVAEDecode().decode(vae, latent)[0]
    assert out.shape == image.shape and out.dtype == torch.float32
    psnr = (10 * torch.log10(1 / ((out - image) ** 2).mean())).item()
    assert psnr > 24, psnr  # a faithful reconstruction of a small detailed crop (random weights: ~5 dB)
    plain = AtelierVAEDecode().decode(vae, {"samples": latent["samples"]})[0]  # without the key: the padded size
    assert plain.shape == (1, 104, 80, 3) and torch.allclose(plain[:, :100, :75], out)
    again = AtelierVAEEncode().encode(vae, image, "sample", 3)[0]  # TAESD has no posterior: same latent
    assert torch.equal(again["samples"], latent["samples"])


def test_mnist_vae_as_a_generator(models, shared_dir):
    vae = AtelierLoadVAE().load("vae/vae_fc.pth")[0]
    latent = AtelierVAESample().sample(vae, 512, 512, 200, seed=11)[0]  # size ignored: the VAE has one
    assert latent["samples"].shape == (200, 20, 1, 1) and "atelier_image_size" not in latent
    images = AtelierVAEDecode().decode(vae, latent)[0]
    assert images.shape == (200, 28, 28, 3)  # greyscale VAE, RGB IMAGE
    helpers = helpers_mnist
    net = helpers.load_lenet(shared_dir)
    conf = helpers.class_probabilities(net, images[..., :1].movedim(-1, 1)).amax(1).mean().item()
    noise = helpers.class_probabilities(net, torch.rand(200, 1, 28, 28)).amax(1).mean().item()
    assert conf > 0.8 and conf > noise + 0.2, (conf, noise)  # prior draws look like digits
    same = AtelierVAESample().sample(vae, 512, 512, 1, seed=12)[0]["samples"]
    assert torch.equal(same[0], latent["samples"][1])  # sample i of a batch uses seed + i
    digits, _ = helpers.load_mnist_test(shared_dir, 2)
    enc = AtelierVAEEncode().encode(vae, digits.movedim(1, -1).expand(-1, -1, -1, 3), "mean", 0)[0]
    assert enc["samples"].shape == (2, 20, 1, 1)  # RGB in, the grey VAE gets luma
    with pytest.raises(InputError, match="exactly 28x28"):
        AtelierVAEEncode().encode(vae, torch.rand(1, 32, 32, 3), "mean", 0)


def test_latent_interpolate_node(models):
    vae = AtelierLoadVAE().load("vae/vae_fc.pth")[0]
    a = AtelierVAESample().sample(vae, 8, 8, 1, seed=1)[0]
    b = AtelierVAESample().sample(vae, 8, 8, 1, seed=2)[0]
    out = AtelierLatentInterpolate().interpolate(a, b, 6, "slerp")[0]
    assert out["samples"].shape == (6, 20, 1, 1)
    assert torch.allclose(out["samples"][0], a["samples"][0]) and torch.allclose(out["samples"][-1], b["samples"][0])
    assert AtelierVAEDecode().decode(vae, out)[0].shape == (6, 28, 28, 3)


def test_bad_input_names_what_is_wrong(models):
    vae = AtelierLoadVAE().load("vae_approx/taef2_encoder.pth")[0]
    with pytest.raises(InputError, match=r"samples: has 16 channels.*taef2_encoder\.pth.*takes 32 \(or 128 packed\)"):
        AtelierVAEDecode().decode(vae, {"samples": torch.zeros(1, 16, 8, 8)})
    with pytest.raises(InputError, match="NaN"):
        AtelierVAEDecode().decode(vae, {"samples": torch.full((1, 32, 4, 4), float("nan"))})
    with pytest.raises(InputError, match="expected an ATELIER_VAE"):
        AtelierVAEDecode().decode(object(), {"samples": torch.zeros(1, 32, 4, 4)})
    with pytest.raises(InputError, match="samples: expected a LATENT"):
        AtelierVAEDecode().decode(vae, torch.zeros(1, 32, 4, 4))
    packed = AtelierVAEDecode().decode(vae, {"samples": torch.zeros(1, 128, 2, 2)})[0]  # FLUX.2's packed layout
    assert packed.shape == (1, 32, 32, 3)
