"""The fully connected MNIST VAE: real digits reconstructed from the posterior mean (PSNR and the LeNet classifier),
and equality with the PyTorch-examples VAE written out here."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers_mnist  # tests/ is on pytest's pythonpath
from harness import check_roundtrip
from atelier.models.errors import InputError
from atelier.models.loading import read_state_dict
from atelier.models.registry import detect as registry_detect
from atelier.models.vae import fc, kl, taesd


class ReferenceVAE(nn.Module):
    """The VAE of pytorch/examples (mnist VAE), which these weights were trained with."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))


@pytest.fixture(scope="module")
def vae_file(shared_dir):
    return read_state_dict(shared_dir / "weights" / "mnist" / "vae_fc.pth")


@torch.no_grad()
def test_reconstructs_mnist_digits(vae_file, shared_dir):
    """Reference over the 10k test digits: 20.6 dB, 97.2 % still classified right."""
    helpers = helpers_mnist
    desc = registry_detect(*vae_file, source="vae_fc.pth")
    assert desc.family == "vae" and desc.architecture == "FC-VAE"
    model = desc.model
    assert (model.latent_channels, model.downscale, model.image_channels) == (20, 28, 1)
    images, labels = helpers.load_mnist_test(shared_dir, 1000)  # [1000,1,28,28] in [0,1]
    z = model.encode(images)
    assert z.shape == (1000, 20, 1, 1)
    rec = model.decode(z)
    assert rec.shape == images.shape and rec.min() >= 0 and rec.max() <= 1
    psnr = (10 * torch.log10(1 / ((rec - images) ** 2).mean())).item()
    assert psnr >= 20.0, psnr
    net = helpers.load_lenet(shared_dir)
    accuracy = (helpers.class_probabilities(net, rec).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95, accuracy
    noise_acc = (helpers.class_probabilities(net, model.decode(torch.randn(1000, 20) * 3)).argmax(1) == labels)
    assert noise_acc.float().mean().item() < 0.3  # the metric does tell digits from unrelated ones


@torch.no_grad()
def test_equals_reference_vae_and_samples_the_posterior(vae_file, tmp_path):
    sd, meta = vae_file
    ref = ReferenceVAE().eval()
    ref.load_state_dict(sd)
    x = torch.rand(4, 1, 28, 28)
    z = torch.randn(4, 20)
    mu, logvar = ref.encode(x)
    desc = check_roundtrip(  # the shared round trip: both file formats, a fresh manager, encoder means and decodes
        tmp_path, sd, folder="vae", family="vae", tol=1e-6,
        run=lambda m: torch.cat([m.encode(x).flatten(), m.decode(z[:, :, None, None]).flatten()]),
        expected=torch.cat([mu.flatten(), ref.decode(z).flatten()]),
        facts={"family": "vae", "architecture": "FC-VAE", "model.latent_channels": 20, "model.image_channels": 1})
    model = desc.model
    assert torch.allclose(model.decode(z), model.decode(z[:, :, None, None]))
    draw = model.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(4, 20, 1, 1, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(draw.flatten(1), mu + torch.exp(0.5 * logvar) * eps.flatten(1), atol=1e-6)


def test_detection_and_bad_inputs(vae_file, shared_dir):
    sd, meta = vae_file
    assert fc.detect(sd, meta) and not kl.detect(sd, meta) and not taesd.detect(sd, meta)
    lenet, _ = read_state_dict(shared_dir / "weights" / "mnist" / "lenet_classifier.pth")
    assert not fc.detect(lenet, {})
    assert not fc.detect({k: v for k, v in sd.items() if k != "fc4.bias"}, meta)
    model = fc.load(sd, meta).model
    with pytest.raises(InputError, match=r"image: expected \[B,1,28,28\]"):
        model.encode(torch.rand(1, 3, 28, 28))
    with pytest.raises(InputError, match=r"latent: expected \[B,20,1,1\]"):
        model.decode(torch.rand(1, 20, 2, 2))
