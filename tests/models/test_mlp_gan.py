"""MLP GAN generators: real MNIST digits judged by the LeNet classifier; random layouts equal a reference built here."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from atelier.models.errors import InputError
from atelier.models.gan.mlp import MLPGenerator
from atelier.models.loading import read_state_dict
from atelier.models.registry import detect

import helpers_mnist  # tests/ is on pytest's pythonpath
from harness import check_roundtrip

TOL = 1e-5
CONFIDENCE_GOAL = 0.95  # reference implementation: 0.979 on 1000 samples


def test_mnist_mlp_digits_are_classified_confidently(shared_dir):
    net = helpers_mnist.load_lenet(shared_dir)
    images, labels = helpers_mnist.load_mnist_test(shared_dir, 1000)  # the metric itself works on real digits
    accuracy = (helpers_mnist.class_probabilities(net, images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.98

    sd, meta = read_state_dict(shared_dir / "weights" / "mnist" / "gan_mlp_G.ckpt")
    desc = detect(sd, meta, "gan_mlp_G.ckpt")
    g = desc.model
    assert (desc.architecture, desc.family, desc.purpose) == ("MLP GAN", "gan", "Generator")
    assert (g.z_dim, g.c_dim, g.img_resolution, g.img_channels, g.output_range) == (64, 0, 28, 1, (-1.0, 1.0))
    assert desc.config["layers"] == [64, 256, 256, 784]
    z = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        digits = g(z)  # [1000,1,28,28] in [-1,1]
    assert digits.shape == (1000, 1, 28, 28)
    confidence = helpers_mnist.class_probabilities(net, (digits + 1) / 2).max(1).values.mean().item()
    print(f"MLP GAN digits: LeNet mean confidence {confidence:.4f} (goal >= {CONFIDENCE_GOAL}, reference 0.979)")
    assert confidence >= CONFIDENCE_GOAL

    untrained = MLPGenerator([("0", 64, 256, True), ("2", 256, 256, True), ("4", 256, 784, True)], 64, 0, 1, 28)
    with torch.no_grad():
        noise = untrained(z)
    control = helpers_mnist.class_probabilities(net, (noise + 1) / 2).max(1).values.mean().item()
    assert control < 0.5  # the metric separates digits from an untrained generator's output


def test_rgb_mlp_with_prefix_equals_reference(tmp_path):
    side = 16
    ref = nn.Module()
    ref.main = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 3 * side * side),
                             nn.Tanh())
    z = torch.randn(7, 16)
    with torch.no_grad():
        want = ref.main(z).view(7, 3, side, side)
    desc = check_roundtrip(tmp_path, ref.state_dict(), run=lambda g: g(z), expected=want, family="gan", tol=TOL,
                           facts={"architecture": "MLP GAN", "model.z_dim": 16, "model.img_channels": 3,
                                  "model.img_resolution": side})
    g = desc.model
    with torch.no_grad():
        assert (g(z, truncation_psi=0.7) - ref.main(0.7 * z).view(7, 3, side, side)).abs().max().item() <= TOL
        assert (g(z, unit=True) - (want + 1) / 2).abs().max().item() <= TOL  # the head's sigmoid(2x) mapping


def test_metadata_conditioning_and_sigmoid_output(tmp_path):
    ref = nn.Sequential(nn.Linear(14, 40), nn.ReLU(), nn.Linear(40, 100, bias=False), nn.Sigmoid())
    meta = {"config": json.dumps({"z_dim": 10, "c_dim": 4, "output_activation": "sigmoid"})}
    z, c = torch.randn(4, 10), torch.eye(4)
    with torch.no_grad():
        expected = ref(torch.cat([z, c], 1)).view(4, 1, 10, 10)
    desc = check_roundtrip(tmp_path, ref.state_dict(), run=lambda g: g(z, c), expected=expected, tol=TOL,
                           formats=["safetensors"], metadata=meta,
                           facts={"model.z_dim": 10, "model.c_dim": 4, "model.img_resolution": 10,
                                  "model.output_range": (0.0, 1.0)})
    g = desc.model
    with torch.no_grad():
        assert torch.equal(g(z, c, unit=True), g(z, c))  # a sigmoid head is in [0,1] already
    with pytest.raises(InputError, match="class-conditional"):
        g(z)


def test_not_an_image_generator_is_refused(tmp_path):
    """A classifier-shaped MLP (narrowing to 10) and a discriminator are not generators."""
    from atelier.models.gan import mlp

    assert not mlp.detect(nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).state_dict(), {})
    assert not mlp.detect(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1)).state_dict(), {})
    assert not mlp.detect(nn.Sequential(nn.Linear(8, 30), nn.ReLU(), nn.Linear(30, 50)).state_dict(), {})  # not square
