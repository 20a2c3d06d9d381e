"""GAN latents and sampling (models/gan/sampling.py): against NVIDIA's golden StyleGAN2 tensors, the registry
packages' own DCGAN/CycleGAN classes on their real weights, and properties (seeds, interpolation, tiling, chunks)."""
from __future__ import annotations

import math
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from atelier.models.errors import InputError
from atelier.models.gan import sampling as S
from atelier.models.gan.sampling import GANLatent
from helpers_packages import package_file, package_module  # tests/ is on pytest's pythonpath

TOL = 1e-5


def add_model(manager, src: pathlib.Path, name: str):
    """Copy a weights file into the manager's gans folder (a copy: links out of the folder are refused) and load it."""
    shutil.copy(src, pathlib.Path(manager.models_root) / "gans" / name)
    return manager.load(name, "gans", family="gan")


@pytest.fixture
def faces(manager):
    return add_model(manager, package_file("gan_face_generate", "weights.tar"), "faces.tar")


def golden(shared_dir: pathlib.Path, name: str) -> tuple[pathlib.Path, dict[str, torch.Tensor]]:
    d = shared_dir / "golden" / "stylegan"
    if not (d / f"{name}.safetensors").is_file():
        pytest.skip(f"golden StyleGAN data {name} not in {d}")
    return d / f"{name}.safetensors", load_file(str(d / f"{name}.expected.safetensors"))


def unit(img: torch.Tensor) -> torch.Tensor:
    return ((img + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# seeds and labels


def test_seed_batches_are_per_item_and_reproducible():
    z = S.seeds_to_z(41, 4, 100)
    assert z.shape == (4, 100) and z.dtype == torch.float32
    for i in range(4):  # item i of a batch from seed s is the item made alone from seed s + i
        assert torch.equal(z[i : i + 1], S.seeds_to_z(41 + i, 1, 100))
    assert torch.equal(z[0], torch.randn(100, generator=torch.Generator().manual_seed(41)))
    assert not torch.equal(z[0], z[1])
    assert S.seeds_to_z(2**64 - 1, 2, 8).shape == (2, 8)  # ComfyUI's largest seed wraps instead of failing
    with pytest.raises(InputError, match="batch_size"):
        S.seeds_to_z(0, 0, 8)


def test_class_labels_checked_and_one_hot():
    lab = S.class_labels(8, 3, 0, 2)
    assert torch.equal(lab, torch.nn.functional.one_hot(torch.tensor([3, 3]), 8).float())
    rnd = S.class_labels(8, -1, 5, 6)
    assert rnd.shape == (6, 8) and torch.equal(rnd.sum(1), torch.ones(6))
    assert torch.equal(rnd, S.class_labels(8, -1, 5, 6)) and torch.equal(rnd[2:3], S.class_labels(8, -1, 7, 1))
    assert S.class_labels(0, -1, 0, 3) is None
    with pytest.raises(InputError, match=r"class_label: .*unconditional.*set class_label to -1"):
        S.class_labels(0, 2, 0, 1)
    with pytest.raises(InputError, match=r"class_label: .*8 classes; expected 0..7.*got 8"):
        S.class_labels(8, 8, 0, 1)
    with pytest.raises(InputError, match="class_label"):
        S.class_labels(8, -2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# DCGAN: the packages' own classes on their real weights


def test_faces_samples_equal_package_generator(manager, faces):
    models = package_module("gan_face_generate", "models.py")
    ref = models.Generator(ngpu=0, nc=3, nz=100, ngf=64)
    ref.load_state_dict(torch.load(package_file("gan_face_generate", "weights.tar"), map_location="cpu",
                                   weights_only=True)["netG_state_dict"])
    ref.eval()
    lat = S.make_latent(manager, faces, seed=3, batch_size=5, space="auto")
    assert (lat.space, lat.tensor.shape, lat.labels) == ("z", (5, 100), None)
    with torch.no_grad():
        for psi in (1.0, 0.5, -0.7):  # z-only models truncate by scaling z toward its mean (0)
            ours = S.sample(manager, faces, lat, truncation_psi=psi)
            theirs = unit(ref(psi * lat.tensor[:, :, None, None]))
            assert ours.shape == (5, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
            assert (ours - theirs).abs().max().item() <= TOL
        chunked = S.sample(manager, faces, lat, truncation_psi=0.5, chunk=2)  # batching does not change results
        assert (chunked - S.sample(manager, faces, lat, truncation_psi=0.5)).abs().max().item() <= TOL
    with pytest.raises(InputError, match=r"space: .*has no w space"):
        S.make_latent(manager, faces, 0, 1, space="w")
    with pytest.raises(InputError, match=r"class_label: .*unconditional"):
        S.make_latent(manager, faces, 0, 1, class_label=0)


def test_eyes_class_labels_equal_package_generator(manager):
    ref_mod = package_module("omniart_eye_generator", "generator.py")
    src = package_file("omniart_eye_generator", "generator_model_state.pth")
    eyes = add_model(manager, src, "eyes.pth")
    ref = ref_mod.Generator()
    ref.load_state_dict(torch.load(src, map_location="cpu", weights_only=True))
    ref.eval()
    lat = S.make_latent(manager, eyes, seed=11, batch_size=2, class_label=5)
    assert torch.equal(lat.labels.argmax(1), torch.tensor([5, 5]))
    with torch.no_grad():
        ours = S.sample(manager, eyes, lat, truncation_psi=1.0)
        theirs = unit(ref(lat.tensor[:, :, None, None], lat.labels))
    assert ours.shape == (2, 3, 128, 128) and (ours - theirs).abs().max().item() <= TOL
    with pytest.raises(InputError, match=r"class_label: .*8 classes"):
        S.make_latent(manager, eyes, 0, 1, class_label=9)


# ---------------------------------------------------------------------------------------------------------------
# StyleGAN2: NVIDIA's golden tensors through our latents, truncation, noise modes and mixing


def test_stylegan2_sampling_matches_nvidia_golden(manager, shared_dir):
    path, exp = golden(shared_dir, "sg2_skip_32")
    desc = add_model(manager, path, "sg2_skip_32.safetensors")
    g = desc.model
    z, z2 = exp["z"], exp["z2"]
    mk = lambda t, space: GANLatent(t, space, S.model_identity(desc), S.model_name(desc))  # noqa: E731
    w = S.to_w(manager, desc, mk(z, "z"))
    assert w.space == "w" and (w.tensor - exp["w_psi1"]).abs().max().item() <= TOL
    checks = [
        (mk(z, "z"), {"truncation_psi": 0.7}, "img_const"),  # z path: mapping with truncation
        (w, {"truncation_psi": 0.7}, "img_const"),  # w path: truncation toward w_avg
        (w, {"truncation_psi": 0.5, "truncation_cutoff": 2}, "img_cut"),
        (w, {"truncation_psi": 1.0, "noise_mode": "none"}, "img_none"),
        (w, {"truncation_psi": 1.0}, "img_psi1_const"),
    ]
    for lat, kw, key in checks:
        ours = S.sample(manager, desc, lat, **kw)
        ref = unit(exp[key])
        inside = ((exp[key] > -1) & (exp[key] < 1)).float().mean().item()
        assert inside > 0.1  # enough unclamped pixels for the comparison to mean something
        assert (ours - ref).abs().max().item() <= 1e-4, (kw, key)
    k = g.num_ws // 2
    assert S.layer_groups(g.num_ws) == {"coarse": [0, 1], "middle": [2, 3], "fine": [4, 5, 6, 7]}
    mixed = S.mix_styles(manager, desc, mk(z, "z"), mk(z2, "z"), list(range(k, g.num_ws)))
    assert (mixed.tensor - exp["w_mix"]).abs().max().item() <= TOL
    assert (S.sample(manager, desc, mixed, truncation_psi=1.0) - unit(exp["img_mix"])).abs().max().item() <= 1e-4
    # random noise: reproducible from its seed, different from const
    a = S.sample(manager, desc, w, noise_mode="random", noise_seed=1)
    assert torch.equal(a, S.sample(manager, desc, w, noise_mode="random", noise_seed=1))
    assert not torch.equal(a, S.sample(manager, desc, w, noise_mode="random", noise_seed=2))
    # a latent of another model (same shapes even) is refused, naming the input
    other = add_model(manager, path, "copy_of_sg2.safetensors")
    with pytest.raises(InputError, match=r"latent: this latent belongs to sg2_skip_32.safetensors.*copy_of_sg2"):
        S.sample(manager, other, w)


def test_stylegan2_conditional_latents(manager, shared_dir):
    path, exp = golden(shared_dir, "sg2_cond_16")
    desc = add_model(manager, path, "sg2_cond_16.safetensors")
    lat = GANLatent(exp["z"], "z", S.model_identity(desc), S.model_name(desc), exp["c"])
    assert (S.sample(manager, desc, lat, truncation_psi=0.7) - unit(exp["img_const"])).abs().max().item() <= 1e-4
    made = S.make_latent(manager, desc, seed=4, batch_size=3, space="w", class_label=2)
    assert made.tensor.shape == (3, 6, 64) and torch.equal(made.labels.argmax(1), torch.tensor([2, 2, 2]))
    with pytest.raises(InputError, match=r"class_label: .*4 classes; expected 0..3"):
        S.make_latent(manager, desc, 0, 1, class_label=4)


def test_truncation_and_noise_inputs_checked(manager, faces):
    lat = S.make_latent(manager, faces, 0, 1)
    for psi in (-2.01, 2.5, float("nan")):
        with pytest.raises(InputError, match=r"truncation_psi: expected a value in \[-2, 2\]"):
            S.sample(manager, faces, lat, truncation_psi=psi)
    S.sample(manager, faces, lat, truncation_psi=-2.0)  # the ends are allowed
    with pytest.raises(InputError, match="noise_mode"):
        S.sample(manager, faces, lat, noise_mode="loud")
    with pytest.raises(InputError, match="latent: expected a GAN_LATENT"):
        S.sample(manager, faces, lat.tensor)


# ---------------------------------------------------------------------------------------------------------------
# interpolation, walks, layer groups


def _lat(t: torch.Tensor, space: str = "z", labels=None) -> GANLatent:
    return GANLatent(t, space, "Test:/x", "x", labels)


def test_slerp_and_lerp_properties():
    a, b = torch.zeros(1, 4), torch.zeros(1, 4)
    a[0, 0], b[0, 1] = 1, 1  # orthogonal unit vectors: the midpoint of the great circle is (a + b) / sqrt 2
    mid = S.slerp(a, b, torch.tensor([0.5]))[0, 0]
    assert torch.allclose(mid, (a[0] + b[0]) / math.sqrt(2), atol=1e-6)
    t = torch.linspace(0, 1, 9)
    path = S.slerp(a, b, t)[0]  # stays on the unit sphere, at evenly spaced angles
    assert torch.allclose(path.norm(dim=1), torch.ones(9), atol=1e-6)
    assert torch.allclose(torch.atan2(path[:, 1], path[:, 0]), t * math.pi / 2, atol=1e-6)
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    s = S.slerp(x, y, t)
    assert torch.allclose(s[:, 0], x, atol=1e-5) and torch.allclose(s[:, -1], y, atol=1e-5)
    assert torch.allclose(S.slerp(x, x, t)[:, 4], x, atol=1e-5)  # parallel: no division by sin(0)
    w1, w2 = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert torch.allclose(S.lerp(w1, w2, t)[:, 4], (w1 + w2) / 2, atol=1e-6)


def test_interpolate_and_walk_shapes_and_ends():
    a, b = _lat(torch.randn(2, 8)), _lat(torch.randn(2, 8))
    out = S.interpolate(a, b, 5)
    assert out.tensor.shape == (10, 8)  # item-major: item 0's 5 frames, then item 1's
    assert torch.allclose(out.tensor[0], a.tensor[0]) and torch.allclose(out.tensor[4], b.tensor[0], atol=1e-5)
    assert torch.allclose(out.tensor[5], a.tensor[1]) and torch.allclose(out.tensor[9], b.tensor[1], atol=1e-5)
    w = S.interpolate(_lat(torch.randn(1, 3, 4), "w"), _lat(torch.randn(1, 3, 4), "w"), 3)  # auto: lerp in w
    assert torch.allclose(w.tensor[1], (w.tensor[0] + w.tensor[2]) / 2, atol=1e-6)
    keys = _lat(torch.randn(3, 8), labels=torch.eye(3))
    loop = S.walk(keys, 4, loop=True)
    assert loop.tensor.shape == (12, 8) and torch.equal(loop.tensor[0], keys.tensor[0])
    assert torch.allclose(loop.tensor[4], keys.tensor[1], atol=1e-5) and loop.labels.shape == (12, 3)
    assert torch.allclose(loop.labels[2], torch.tensor([0.5, 0.5, 0.0]))  # labels blend linearly
    open_walk = S.walk(keys, 4, loop=False)
    assert open_walk.tensor.shape == (9, 8) and torch.equal(open_walk.tensor[-1], keys.tensor[-1])
    with pytest.raises(InputError, match="latent_b: .*same space"):
        S.interpolate(a, _lat(torch.randn(2, 3, 4), "w"), 4)
    with pytest.raises(InputError, match="latent_b: belongs to y"):
        S.interpolate(a, GANLatent(torch.randn(2, 8), "z", "Test:/y", "y"), 4)
    with pytest.raises(InputError, match="steps"):
        S.interpolate(a, b, 1)
    with pytest.raises(InputError, match="latent_a: a walk needs at least 2"):
        S.walk(_lat(torch.randn(1, 8)), 4)


def test_layer_groups_follow_nvidia_split():
    assert S.layer_groups(18) == {"coarse": [0, 1, 2, 3], "middle": [4, 5, 6, 7], "fine": list(range(8, 18))}
    for n in (4, 6, 8, 12, 14, 16):
        groups = S.layer_groups(n)
        assert sum(groups.values(), []) == list(range(n)) and all(groups.values())
    assert S.parse_layers("0-2, 5,5", 8) == [0, 1, 2, 5]
    with pytest.raises(InputError, match=r"layers: '9' is outside 0..7"):
        S.parse_layers("9", 8)
    with pytest.raises(InputError, match="layers: expected comma-separated"):
        S.parse_layers("a-b", 8)


# ---------------------------------------------------------------------------------------------------------------
# image to image


def test_cyclegan_translate_equals_package_generator(manager):
    ref_mod = package_module("vintagify", "generator.py")
    src = package_file("vintagify", "resources/G_A2B_epoch33.pth")
    desc = add_model(manager, src, "vintage.pth")
    ref = ref_mod.ResnetGenerator()
    ref.load_state_dict(torch.load(src, map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = S.translate(manager, desc, x)
        theirs = unit(ref(x * 2 - 1))
    assert ours.shape == (1, 3, 64, 96) and (ours - theirs).abs().max().item() <= 1e-4
    odd = S.translate(manager, desc, torch.rand(1, 4, 30, 45))  # padded to multiples of 4, cropped back; alpha kept
    assert odd.shape == (1, 4, 30, 45)
    with pytest.raises(InputError, match=r"gan: .*not an image-to-image GAN"):
        S.translate(manager, add_model(manager, package_file("gan_face_generate", "weights.tar"), "f.tar"), x)
    with pytest.raises(InputError, match=r"gan: vintage.pth is a gan model \(ResnetGenerator, ImageToImage\), "
                                         r"not a latent generator.*use Image-to-Image GAN"):
        S.make_latent(manager, desc, 0, 1)


def test_translate_tiled_equals_untiled_for_batchnorm_resnet(manager, tmp_path):
    from safetensors.torch import save_file

    from atelier.models.gan import pix2pix

    net = pix2pix.ResnetGenerator(pix2pix.ResnetConfig(ngf=4, n_blocks=2, norm="batch", bias=False)).eval()
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "bn.safetensors"))
    desc = add_model(manager, tmp_path / "bn.safetensors", "bn.safetensors")
    x = torch.rand(2, 3, 150, 170, generator=g)
    whole = S.translate(manager, desc, x)
    tiled = S.translate(manager, desc, x, tile=128)
    assert whole.shape == tiled.shape == (2, 3, 150, 170)
    assert (whole - tiled).abs().max().item() <= 1e-4
