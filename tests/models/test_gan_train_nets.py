"""Trainable DCGAN networks and GAN losses.

- G written by save_dcgan loads through the manager (dcgan.py's detector) and gives the images of G.eval() for the
  same z and labels, through the sampler too; class names travel in the metadata.
- G/D shapes at every valid resolution (and the loader reads the same resolution); other sides are refused.
- D has no cross-sample coupling (what the per-sample gradient penalty needs).
- Losses against their formulas (BCE-with-logits forms, hand-computed values); the gradient penalty against closed forms
  (a linear D with a unit-norm weight gives 0; a quadratic D gives (||x_hat|| - 1)^2 at known interpolants).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atelier.models.errors import InputError
from atelier.models.gan import dcgan
from atelier.models.gan import sampling as S
from atelier.models.gan.losses import LOSSES, d_loss, g_loss, gradient_penalty
from atelier.models.gan.train_nets import RESOLUTIONS, build_dcgan, save_dcgan
from atelier.models.registry import detect

TOL = 1e-5


def trained_bn(G: nn.Module, labels: bool) -> None:
    """Wider weights than DCGAN's init (images with contrast) and a few train-mode passes: BatchNorm running
    statistics move away from (0, 1), so eval mode is exercised."""
    g = torch.Generator().manual_seed(3)
    for m in G.modules():
        if isinstance(m, (nn.ConvTranspose2d, nn.Embedding)):
            m.weight.data.normal_(0, 0.3, generator=g)
    G.train()
    with torch.no_grad():
        for _ in range(3):
            z = torch.randn(16, G.z_dim, generator=g) * 2
            G(z, torch.randint(G.num_classes, (16,), generator=g) if labels else None)
    G.eval()


@pytest.mark.parametrize("num_classes", [0, 5])
def test_saved_generator_loads_through_manager_and_samples_the_same(manager, tmp_path, num_classes):
    G, _ = build_dcgan(16, 3, z_dim=12, base_width=8, num_classes=num_classes)
    trained_bn(G, bool(num_classes))
    names = [f"class {i}" for i in range(num_classes)]
    save_dcgan(manager.folder_dirs("gans")[0] + "/tiny.safetensors", G, {"class_names": names, "loss": "hinge"})
    desc = manager.load("tiny.safetensors", "gans", family="gan")
    assert (desc.architecture, desc.config["img_resolution"], desc.config["img_channels"]) == ("DCGAN", 16, 3)
    assert (desc.model.z_dim, desc.model.c_dim, desc.config["class_names"]) == (12, num_classes, names)

    z = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % num_classes if num_classes else None
    c = F.one_hot(y, num_classes).float() if num_classes else None
    with torch.no_grad():
        ref = G(z, y)  # [6,3,16,16] in [-1,1]
        ours = desc.model(z, c)
    assert ref.std() > 0.1  # not a constant image
    assert (ours - ref).abs().max().item() <= TOL

    lat = S.make_latent(manager, desc, seed=4, batch_size=3, class_label=1 if num_classes else -1)
    with torch.no_grad():
        expect = (G(lat.tensor, torch.full((3,), 1) if num_classes else None) + 1) / 2
    assert (S.sample(manager, desc, lat) - expect).abs().max().item() <= TOL
    if num_classes:  # the label matters
        with torch.no_grad():
            assert (desc.model(z, c.roll(1, 0)) - ours).abs().max() > 1e-3


def test_save_refuses_wrong_class_names(tmp_path):
    G, _ = build_dcgan(8, 1, z_dim=4, base_width=4, num_classes=3)
    with pytest.raises(InputError, match="class_names"):
        save_dcgan(tmp_path / "g.safetensors", G, {"class_names": ["a", "b"]})
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("channels,num_classes", [(1, 0), (3, 4)])
def test_shapes_at_every_resolution(resolution, channels, num_classes):
    G, D = build_dcgan(resolution, channels, z_dim=8, base_width=2, num_classes=num_classes)
    z = torch.randn(2, 8)
    y = torch.tensor([0, 3]) if num_classes else None
    img = G(z, y)
    assert img.shape == (2, channels, resolution, resolution)
    assert img.abs().max() <= 1
    assert D(img, y).shape == (2,)
    convs = [m for m in G.main if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == math.log2(resolution // 4) + 1  # 4x4, then one doubling per stage
    desc = detect(G.state_dict(), {"config": {"z_dim": 8, "c_dim": num_classes}}, "g.safetensors")
    assert (desc.config["img_resolution"], desc.config["img_channels"], desc.model.c_dim) == (
        resolution, channels, num_classes)


@pytest.mark.parametrize("bad", [4, 28, 48, 100, 512, 0, -8, 32.0, "32", True])
def test_invalid_resolutions_are_refused(bad):
    with pytest.raises(InputError, match=r"resolution.*\[8, 16, 32, 64, 128, 256\]") as e:
        build_dcgan(bad, 1)
    assert repr(bad) in str(e.value)


def test_invalid_sizes_and_labels_are_refused():
    with pytest.raises(InputError, match="channels"):
        build_dcgan(32, 2)
    with pytest.raises(InputError, match="base_width"):
        build_dcgan(32, 1, base_width=0)
    G, D = build_dcgan(8, 1, z_dim=4, base_width=2, num_classes=3)
    with pytest.raises(InputError, match="labels"):
        G(torch.randn(2, 4))  # conditional without labels
    with pytest.raises(InputError, match="labels"):
        D(torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match="images"):
        D(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("d_norm", ["none", "spectral"])
def test_init_and_discriminator_is_per_sample(d_norm):
    G, D = build_dcgan(64, 3, base_width=16, num_classes=10, d_norm=d_norm)
    w = G.main[3].weight
    assert abs(w.mean().item()) < 2e-3 and abs(w.std().item() - 0.02) < 2e-3  # DCGAN's N(0, 0.02)
    e = G.label_emb.weight
    assert abs(e.std().item() - 1.0) < 0.15  # the label rows on z's scale
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in D.modules())
    x, y = torch.randn(5, 3, 64, 64), torch.arange(5)
    D.train(d_norm == "none")  # spectral norm's power iteration steps on every training-mode call
    with torch.no_grad():  # a sample's logit does not depend on the rest of its batch
        assert (D(x, y)[:2] - D(x[:2], y[:2])).abs().max().item() <= TOL
        assert (D(x, y) - D(x, y.roll(1))).abs().max() > 0  # the projection uses the label


def test_spectral_norm_bounds_each_layer():
    _, D = build_dcgan(16, 1, base_width=8, d_norm="spectral")
    D.train()
    with torch.no_grad():
        for _ in range(20):  # power iterations converge
            D(torch.randn(2, 1, 16, 16))
    D.eval()
    for conv in [*D.features[::2], D.head]:
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item()  # of the reshaped kernel, as SN uses
        assert sigma == pytest.approx(1.0, rel=1e-2)
    with pytest.raises(InputError, match="norm"):
        build_dcgan(16, 1, d_norm="batch")


# ---------------------------------------------------------------------------------------------------------------
# losses


def logits():
    g = torch.Generator().manual_seed(5)
    return torch.randn(64, generator=g, dtype=torch.float64) * 3, torch.randn(64, generator=g, dtype=torch.float64) * 3


def test_non_saturating_is_binary_cross_entropy():
    r, f = logits()
    bce = F.binary_cross_entropy_with_logits
    want_d = bce(r, torch.ones_like(r)) + bce(f, torch.zeros_like(f))  # -log s(r) - log(1 - s(f))
    assert torch.allclose(d_loss("non_saturating", r, f), want_d, atol=1e-12)
    assert torch.allclose(g_loss("non_saturating", f), -torch.log(torch.sigmoid(f)).mean(), atol=1e-10)


def test_hinge_and_wgan_by_hand():
    r = torch.tensor([2.0, 0.5, -1.0])
    f = torch.tensor([-2.0, 0.0, 1.5])
    # hinge D: relu(1 - r) = [0, .5, 2] -> 2.5/3 ; relu(1 + f) = [0, 1, 2.5] -> 3.5/3
    assert d_loss("hinge", r, f).item() == pytest.approx(6.0 / 3)
    assert g_loss("hinge", f).item() == pytest.approx(0.5 / 3)  # -mean(f) = -(-0.5/3)
    assert d_loss("wgan_gp", r, f).item() == pytest.approx(-0.5 / 3 - 1.5 / 3)  # mean(f) - mean(r)
    assert g_loss("wgan_gp", f).item() == pytest.approx(0.5 / 3)


def test_unknown_loss_refused():
    r, f = logits()
    for fn in (lambda: d_loss("lsgan", r, f), lambda: g_loss("wgan", f)):
        with pytest.raises(InputError, match="non_saturating"):
            fn()
    assert LOSSES == ("non_saturating", "hinge", "wgan_gp")


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1)


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.a * x.flatten(1).pow(2).sum(1)  # gradient 2a x


def test_gradient_penalty_closed_forms():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    w = torch.randn(1, 4, 4, generator=g)
    unit = Linear(w / w.norm())
    assert gradient_penalty(unit, real, fake).item() == pytest.approx(0.0, abs=1e-10)
    three = Linear(3 * w / w.norm())  # ||grad|| = 3 everywhere: weight * (3 - 1)^2
    assert gradient_penalty(three, real, fake, weight=10).item() == pytest.approx(40.0, rel=1e-5)

    quad = Quadratic()  # ||grad|| = ||x_hat|| at the interpolants of the same seeded weights
    got = gradient_penalty(quad, real, fake, labels=torch.zeros(8, dtype=torch.long), weight=2.0,
                           generator=torch.Generator().manual_seed(9))
    eps = torch.rand((8, 1, 1, 1), generator=torch.Generator().manual_seed(9))
    x_hat = eps * real + (1 - eps) * fake
    want = 2.0 * ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()  # create_graph: the penalty trains D; d/da of 2 * mean((2a ||x|| - 1)^2) at a = 0.5
    n = x_hat.flatten(1).norm(dim=1)
    assert quad.a.grad.item() == pytest.approx((2.0 * 2 * (n - 1) * 2 * n).mean().item(), rel=1e-4)


@pytest.mark.parametrize("d_norm", ["none", "spectral"])
def test_gradient_penalty_trains_a_real_discriminator_and_checks_shapes(d_norm):
    _, D = build_dcgan(8, 1, base_width=4, num_classes=3, d_norm=d_norm)
    real, fake, y = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    D.eval()  # (spectral norm would step its power iteration between the two calls)
    a = gradient_penalty(D, real, fake, y, generator=torch.Generator().manual_seed(1))
    b = gradient_penalty(D, real, fake, y, generator=torch.Generator().manual_seed(1))
    assert a.item() == b.item() and a.item() > 0  # reproducible from the passed generator
    D.train()
    a = gradient_penalty(D, real, fake, y, generator=torch.Generator().manual_seed(1))
    a.backward()
    assert all(p.grad is not None for p in D.features.parameters())
    with pytest.raises(InputError, match="fake"):
        gradient_penalty(D, real, fake[:2], y)


def test_loader_plan_unchanged_for_training_layout():
    """The generator's state dict is exactly the loader's plan: convs, BatchNorms, embedding; nothing else."""
    G, _ = build_dcgan(32, 1, z_dim=10, base_width=4, num_classes=10, embed_dim=6)
    plan = dcgan._plan(G.state_dict())
    assert plan is not None and plan.embed == "label_emb" and plan.embed_shape == (10, 6)
    assert [s.in_ch for s in plan.stages] == [16, 16, 8, 4]
