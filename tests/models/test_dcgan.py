"""DCGAN generators: equal to the packages' own model classes on their real weights; shapes read from any layout.

Also the precision matrix for the three GAN detectors of this family (dcgan, mlp, pix2pix): each claims exactly its
own state dicts and none of the others' (StyleGAN, spandrel upscalers, TAESD, MNIST VAE/classifier/discriminator).
"""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch
from torch import nn

from atelier.models.errors import InputError
from atelier.models.gan import dcgan, mlp, pix2pix
from atelier.models.loading import read_state_dict
from atelier.models.registry import detect
from harness import check_roundtrip, load_file  # tests/ is on pytest's pythonpath
from helpers_packages import package_file, package_module

TOL = 1e-5


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so eval-mode normalisation is actually exercised."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------------------------------
# real weights


def test_faces_dcgan_equals_package_model():
    models = pytest.importorskip("gan_face_generate.models")
    sd, meta = read_state_dict(package_file("gan_face_generate", "weights.tar"))
    desc = detect(sd, meta, "weights.tar")
    assert (desc.architecture, desc.family, desc.purpose) == ("DCGAN", "gan", "Generator")
    g = desc.model
    assert (g.z_dim, g.c_dim, g.img_resolution, g.img_channels) == (100, 0, 64, 3)
    assert (g.w_dim, g.num_ws, g.output_range) == (None, 0, (-1.0, 1.0))
    ref = models.Generator(ngpu=0, nc=3, nz=100, ngf=64)
    ref.load_state_dict(sd)
    ref.eval()
    z = torch.randn(16, 100)
    with torch.no_grad():
        ours, theirs = g(z), ref(z[:, :, None, None])
    assert ours.shape == (16, 3, 64, 64)
    diff = (ours - theirs).abs().max().item()
    print(f"faces DCGAN max abs diff vs gan_face_generate: {diff:.3g}")
    assert diff <= TOL
    assert ours.std() > 0.1  # a real image, not a constant


def test_eyes_conditional_dcgan_equals_package_model():
    ref_mod = package_module("omniart_eye_generator", "generator.py")
    sd, meta = read_state_dict(package_file("omniart_eye_generator", "generator_model_state.pth"))
    desc = detect(sd, meta, "generator_model_state.pth")
    g = desc.model
    assert (g.z_dim, g.c_dim, g.img_resolution, g.img_channels) == (100, 8, 128, 3)
    assert desc.config["conditioning"] == "onehot"
    ref = ref_mod.Generator()
    ref.load_state_dict(sd)
    ref.eval()
    z = torch.randn(8, 100)
    c = torch.eye(8)  # every class once
    with torch.no_grad():
        ours, theirs = g(z, c), ref(z[:, :, None, None], c)
    diff = (ours - theirs).abs().max().item()
    print(f"eyes cDCGAN max abs diff vs omniart_eye_generator: {diff:.3g}")
    assert diff <= TOL
    with torch.no_grad():  # the label matters: same z, another class, another image
        assert (g(z, c.roll(1, 0)) - ours).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# random configurations against reference classes built here


class TutorialGenerator(nn.Module):
    """The PyTorch DCGAN tutorial generator, parameterised by depth (4 * 2**(n_up) pixels)."""

    def __init__(self, nz: int, ngf: int, nc: int, n_up: int, bias: bool = False) -> None:
        super().__init__()
        ch = [ngf * 2 ** (n_up - 1 - i) for i in range(n_up)]
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, ch[0], 4, 1, 0, bias=bias), nn.BatchNorm2d(ch[0]),
                                   nn.ReLU(True)]
        for a, b in zip(ch, ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=bias), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ch[-1], nc, 4, 2, 1, bias=bias), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z[:, :, None, None])


class EmbeddingGenerator(nn.Module):
    """A conditional DCGAN with a label embedding and nested blocks (`net.<i>.<j>` keys), noise before label."""

    def __init__(self, nz: int, classes: int, embed: int, ngf: int, nc: int) -> None:
        super().__init__()
        self.label_emb = nn.Embedding(classes, embed)

        def block(a: int, b: int, k: int, s: int, p: int) -> nn.Sequential:
            return nn.Sequential(nn.ConvTranspose2d(a, b, k, s, p, bias=False), nn.BatchNorm2d(b), nn.ReLU())

        self.net = nn.Sequential(block(nz + embed, ngf * 4, 4, 1, 0), block(ngf * 4, ngf * 2, 4, 2, 1),
                                 block(ngf * 2, ngf, 4, 2, 1), nn.ConvTranspose2d(ngf, nc, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.label_emb(labels)], dim=1)
        return self.net(x[:, :, None, None])


def test_small_dcgan_32px_greyscale(tmp_path):
    ref = TutorialGenerator(nz=16, ngf=8, nc=1, n_up=3).eval()
    randomise_bn(ref)
    z = torch.randn(5, 16)
    with torch.no_grad():
        expected = ref(z)
    check_roundtrip(tmp_path, ref.state_dict(), run=lambda g: g(z), expected=expected, folder="gans", family="gan",
                    tol=TOL, facts={"architecture": "DCGAN", "model.z_dim": 16, "model.c_dim": 0,
                                    "model.img_resolution": 32, "model.img_channels": 1,
                                    "config.channels": [16, 32, 16, 8, 1]})


def test_dcgan_with_biases_and_rgba(tmp_path):
    ref = TutorialGenerator(nz=20, ngf=4, nc=4, n_up=2, bias=True).eval()
    randomise_bn(ref)
    z = torch.randn(3, 20)
    with torch.no_grad():
        expected = ref(z)
    check_roundtrip(tmp_path, ref.state_dict(), run=lambda g: g(z), expected=expected, tol=TOL,
                    facts={"model.img_resolution": 16, "model.img_channels": 4})


def test_embedding_conditional_dcgan(tmp_path):
    ref = EmbeddingGenerator(nz=12, classes=5, embed=6, ngf=4, nc=3).eval()
    randomise_bn(ref)
    z, labels = torch.randn(10, 12), torch.arange(10) % 5
    with torch.no_grad():
        expected = ref(z, labels)
    check_roundtrip(tmp_path, ref.state_dict(), run=lambda g: g(z, torch.nn.functional.one_hot(labels, 5).float()),
                    expected=expected, tol=TOL, facts={"model.z_dim": 12, "model.c_dim": 5, "model.img_resolution": 32,
                                                       "config.conditioning": "embedding"})


def test_onehot_split_from_metadata_overrides_the_guess(tmp_path):
    """35 input channels: a usual z (32) + 3 classes by guess; the file's metadata says 30 + 5, and wins."""

    class Concat(TutorialGenerator):
        def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(torch.cat([z, c], 1))

    ref = Concat(nz=35, ngf=4, nc=3, n_up=2).eval()
    randomise_bn(ref)
    guessed = load_file(tmp_path, ref.state_dict(), fmt="pth")  # a .pth file carries no metadata
    assert (guessed.model.z_dim, guessed.model.c_dim, guessed.config["c_dim_source"]) == (32, 3, "guessed")
    z, c = torch.randn(5, 30), torch.eye(5)
    with torch.no_grad():
        expected = ref(z, c)
    check_roundtrip(tmp_path, ref.state_dict(), run=lambda g: g(z, c), expected=expected, tol=TOL,
                    formats=["safetensors"], metadata={"config": json.dumps({"z_dim": 30, "c_dim": 5})},
                    facts={"model.z_dim": 30, "model.c_dim": 5, "config.c_dim_source": "metadata"})


def test_truncation_scales_z_and_inputs_are_checked(tmp_path):
    ref = TutorialGenerator(nz=16, ngf=4, nc=3, n_up=2).eval()
    g = load_file(tmp_path, ref.state_dict()).model
    z = torch.randn(4, 16)
    with torch.no_grad():
        assert (g(z, truncation_psi=0.5) - ref(0.5 * z)).abs().max().item() <= TOL
        assert (g(z, truncation_psi=0.0) - ref(torch.zeros_like(z))).abs().max().item() <= TOL
        assert torch.equal(g(z[:, :, None, None]), g(z))  # [B,z,1,1] accepted too
        assert torch.equal(g(z, noise_mode="random", generator=torch.Generator()), g(z))  # StyleGAN's arguments
    with pytest.raises(InputError, match="noise_mode"):
        g(z, noise_mode="bogus")
    with pytest.raises(InputError, match=r"z: expected \[B,16\]"):
        g(torch.randn(4, 15))
    with pytest.raises(InputError, match="unconditional"):
        g(z, torch.eye(4))
    cond = load_file(tmp_path, EmbeddingGenerator(8, 3, 4, 4, 3).state_dict(), name="cond").model
    with pytest.raises(InputError, match="class-conditional"):
        cond(torch.randn(2, 8))
    with pytest.raises(InputError, match=r"c: expected \[2,3\] \(one-hot\)"):
        cond(torch.randn(2, 8), torch.eye(4)[:2])


# ---------------------------------------------------------------------------------------------------------------
# detection precision: each detector claims its own files and nothing else


def _stylegan2_nvlabs() -> dict:
    t = torch.zeros
    return {"mapping.fc0.weight": t(16, 16), "mapping.fc0.bias": t(16), "mapping.w_avg": t(16),
            "synthesis.b4.const": t(16, 4, 4), "synthesis.b4.conv1.weight": t(16, 16, 3, 3),
            "synthesis.b4.conv1.bias": t(16), "synthesis.b4.conv1.affine.weight": t(16, 16),
            "synthesis.b4.conv1.noise_const": t(4, 4), "synthesis.b4.torgb.weight": t(3, 16, 1, 1)}


def _stylegan_rosinality() -> dict:
    t = torch.zeros
    return {"style.1.weight": t(16, 16), "style.1.bias": t(16), "style.2.weight": t(16, 16), "style.2.bias": t(16),
            "input.input": t(1, 16, 4, 4), "conv1.conv.weight": t(1, 16, 16, 3, 3), "conv1.noise.weight": t(1),
            "to_rgb1.conv.weight": t(1, 3, 16, 1, 1), "noises.noise_0": t(1, 1, 4, 4)}


def _shared_file(shared: pathlib.Path | None, rel: str) -> dict | None:
    if shared is None or not (shared / "weights" / rel).is_file():
        return None
    return read_state_dict(shared / "weights" / rel)[0]


def _candidates(shared: pathlib.Path | None) -> list[tuple[str, dict | None, str | None]]:
    """(name, state dict or None when unavailable, which of dcgan/mlp/pix2pix owns it)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    def installed(package: str, rel: str) -> dict | None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / rel
        return read_state_dict(path)[0] if path.is_file() else None

    tutorial_d = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
                               nn.Conv2d(8, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.LeakyReLU(0.2),
                               nn.Conv2d(16, 1, 4, 1, 0, bias=False))
    resnet = pix2pix.ResnetGenerator(pix2pix.ResnetConfig(ngf=4, n_blocks=2, norm="batch", bias=False))
    unet = pix2pix.UnetGenerator(pix2pix.UnetConfig(channels=(4, 8, 16, 16, 16)))
    return [
        ("dcgan tutorial 32px", TutorialGenerator(16, 8, 3, 3).state_dict(), "dcgan"),
        ("dcgan with embedding", EmbeddingGenerator(8, 3, 4, 4, 3).state_dict(), "dcgan"),
        ("dcgan faces (real)", installed("gan_face_generate", "weights.tar"), "dcgan"),
        ("dcgan eyes (real)", installed("omniart_eye_generator", "generator_model_state.pth"), "dcgan"),
        ("mlp mnist G (real)", _shared_file(shared, "mnist/gan_mlp_G.ckpt"), "mlp"),
        ("mlp rgb", nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3 * 16 * 16)).state_dict(), "mlp"),
        ("resnet batchnorm", resnet.state_dict(), "pix2pix"),
        ("unet 5 downs", unet.state_dict(), "pix2pix"),
        ("cyclegan vintagify (real)", installed("vintagify", "resources/G_A2B_epoch33.pth"), "pix2pix"),
        ("dcgan discriminator", {f"main.{k}": v for k, v in tutorial_d.state_dict().items()}, None),
        ("mlp mnist D (real)", _shared_file(shared, "mnist/gan_mlp_D.ckpt"), None),
        ("mnist fc vae (real)", _shared_file(shared, "mnist/vae_fc.pth"), None),
        ("lenet classifier (real)", _shared_file(shared, "mnist/lenet_classifier.pth"), None),
        ("stylegan2 nvlabs keys", _stylegan2_nvlabs(), None),
        ("stylegan rosinality keys", _stylegan_rosinality(), None),
        ("esrgan (spandrel)", ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4).state_dict(), None),
        ("realesr compact (real)", _shared_file(shared, "realesr-animevideov3/realesr-animevideov3.pth"), None),
        ("dncnn (real)", _shared_file(shared, "dncnn/dncnn_25.pth"), None),
        ("craft (real)", _shared_file(shared, "craft/craft_x4.pth"), None),
        ("taef2 encoder (real)", _shared_file(shared, "taef2/taef2_encoder.pth"), None),
        ("taef2 decoder (real)", _shared_file(shared, "taef2/taef2_decoder.pth"), None),
    ]


def test_gan_detectors_claim_exactly_their_own(shared_dir):
    detectors = {"dcgan": dcgan, "mlp": mlp, "pix2pix": pix2pix}
    checked = 0
    for name, sd, owner in _candidates(shared_dir):
        if sd is None:
            continue
        for det_name, mod in detectors.items():
            assert mod.detect(sd, {}) == (det_name == owner), f"{det_name}.detect on {name}"
        checked += 1
    assert checked >= 14
