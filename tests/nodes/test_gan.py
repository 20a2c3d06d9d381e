"""The GAN nodes, run through their FUNCTION methods on a models root holding copies of the real weights: outputs
in ComfyUI's formats, results equal to the packages' own generators, and every bad input refused by name."""
from __future__ import annotations

import importlib.util
import pathlib
import shutil

import pytest
import torch

from atelier.models.errors import InputError, WrongFamilyError
from atelier.models.gan.sampling import to_w
from atelier.models.loading import read_state_dict
from atelier.models.manager import get_manager
from atelier.nodes import NODE_CLASS_MAPPINGS
from atelier.nodes import gan as N
from helpers_packages import package_file, package_module  # tests/ is on pytest's pythonpath


def run(node_cls, **kwargs):
    node = node_cls()
    out = getattr(node, node_cls.FUNCTION)(**kwargs)
    return out["result"] if isinstance(out, dict) else out


@pytest.fixture
def gans(manager, shared_dir):
    """The models root's gans folder with copies of the files .ci/models puts there (plus a golden StyleGAN2)."""
    folder = pathlib.Path(manager.models_root) / "gans"
    files = {
        "dcgan_faces_64.tar": package_file("gan_face_generate", "weights.tar"),
        "dcgan_eyes_128.pth": package_file("omniart_eye_generator", "generator_model_state.pth"),
        "cyclegan_vintage.pth": package_file("vintagify", "resources/G_A2B_epoch33.pth"),
        "gan_mlp_G.ckpt": shared_dir / "weights" / "mnist" / "gan_mlp_G.ckpt",
        "stylegan2_tiny.safetensors": shared_dir / "golden" / "stylegan" / "sg2_skip_32.safetensors",
    }
    for name, src in files.items():
        if src.is_file():
            shutil.copy(src, folder / name)
    return folder


def load(name: str):
    return run(N.AtelierLoadGAN, gan_name=name)[0]


def test_nodes_registered_with_their_ids():
    ids = {"AtelierLoadGAN", "AtelierGANLatent", "AtelierGANSample", "AtelierGANInterpolate", "AtelierGANStyleMix",
           "AtelierGANProject", "AtelierImageToImageGAN"}
    assert ids <= set(NODE_CLASS_MAPPINGS)
    assert all(NODE_CLASS_MAPPINGS[i].CATEGORY == "atelier/gan" for i in ids)


def test_loader_lists_the_folder_and_loads(gans, shared_dir):
    choices = N.AtelierLoadGAN.INPUT_TYPES()["required"]["gan_name"][0]
    assert {"dcgan_faces_64.tar", "cyclegan_vintage.pth", "gan_mlp_G.ckpt"} <= set(choices)
    gan = load("dcgan_faces_64.tar")
    assert (gan.family, gan.architecture, gan.purpose) == ("gan", "DCGAN", "Generator")
    shutil.copy(shared_dir / "weights" / "mnist" / "vae_fc.pth", gans / "vae_fc.pth")
    with pytest.raises(WrongFamilyError, match=r"vae_fc.pth.* is a vae model.*needs a gan model"):
        load("vae_fc.pth")


def test_faces_sample_node_equals_package_generator(gans):
    models_py = package_file("gan_face_generate", "models.py")
    spec = importlib.util.spec_from_file_location("_ref_faces_models", models_py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = mod.Generator(ngpu=0, nc=3, nz=100, ngf=64)
    sd = torch.load(gans / "dcgan_faces_64.tar", map_location="cpu", weights_only=True)["netG_state_dict"]
    ref.load_state_dict(sd)
    ref.eval()
    gan = load("dcgan_faces_64.tar")
    (latent,) = run(N.AtelierGANLatent, gan=gan, seed=12, batch_size=3, space="auto", class_label=-1)
    (images,) = run(N.AtelierGANSample, gan=gan, latent=latent, truncation_psi=0.8, truncation_cutoff=0,
                    noise_mode="const", noise_seed=0)
    assert images.shape == (3, 64, 64, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    with torch.no_grad():
        theirs = ((ref(0.8 * latent.tensor[:, :, None, None]) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert (images - theirs).abs().max().item() <= 1e-5


def test_mlp_digits_come_out_as_rgb_images(gans):
    """Grey digits as RGB IMAGE, equal to the generator the weights README describes (Linear-ReLU x2, Linear-Tanh)."""
    gan = load("gan_mlp_G.ckpt")
    (latent,) = run(N.AtelierGANLatent, gan=gan, seed=0, batch_size=2, space="z", class_label=-1)
    (images,) = run(N.AtelierGANSample, gan=gan, latent=latent, truncation_psi=1.0, truncation_cutoff=0,
                    noise_mode="const", noise_seed=0)
    assert images.shape == (2, 28, 28, 3) and torch.equal(images[..., 0], images[..., 2])
    ref = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 784), torch.nn.Tanh())
    ref.load_state_dict(read_state_dict(gans / "gan_mlp_G.ckpt")[0])
    with torch.no_grad():
        digits = ((ref(latent.tensor) + 1) / 2).view(2, 28, 28)
    assert digits.std() > 0.1 and (images[..., 1] - digits).abs().max().item() <= 1e-5


def test_walk_and_interpolation_nodes(gans):
    gan = load("dcgan_faces_64.tar")
    (keys,) = run(N.AtelierGANLatent, gan=gan, seed=1, batch_size=3, space="z", class_label=-1)
    (walk,) = run(N.AtelierGANInterpolate, latent_a=keys, steps=4, method="auto", loop=True)
    assert len(walk) == 12
    (a,) = run(N.AtelierGANLatent, gan=gan, seed=1, batch_size=1, space="z", class_label=-1)
    (b,) = run(N.AtelierGANLatent, gan=gan, seed=2, batch_size=1, space="z", class_label=-1)
    (ab,) = run(N.AtelierGANInterpolate, latent_a=a, latent_b=b, steps=5, method="slerp", loop=False)
    (frames,) = run(N.AtelierGANSample, gan=gan, latent=ab, truncation_psi=1.0, truncation_cutoff=0,
                    noise_mode="const", noise_seed=0)
    (ends,) = run(N.AtelierGANSample, gan=gan, latent=keys, truncation_psi=1.0, truncation_cutoff=0,
                  noise_mode="const", noise_seed=0)
    assert frames.shape == (5, 64, 64, 3)
    assert (frames[0] - ends[0]).abs().max() <= 1e-5 and (frames[4] - ends[1]).abs().max() <= 1e-4
    steps = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))
    assert (steps > 0.005).all()  # every frame moves


def test_style_mix_node_takes_the_chosen_groups(gans):
    gan = load("stylegan2_tiny.safetensors")
    (base,) = run(N.AtelierGANLatent, gan=gan, seed=3, batch_size=2, space="w", class_label=-1)
    (style,) = run(N.AtelierGANLatent, gan=gan, seed=9, batch_size=1, space="z", class_label=-1)
    kw = dict(gan=gan, latent=base, style_latent=style)
    (fine,) = run(N.AtelierGANStyleMix, coarse=False, middle=False, fine=True, **kw)
    w_style = to_w(get_manager(), gan, style).tensor  # [1,8,64]
    assert torch.equal(fine.tensor[:, :4], base.tensor[:, :4])  # coarse+middle kept (8 rows: 2 + 2 + 4)
    assert torch.equal(fine.tensor[:, 4:], w_style[:, 4:].expand(2, -1, -1))
    (all_rows,) = run(N.AtelierGANStyleMix, coarse=True, middle=True, fine=True, **kw)
    (custom,) = run(N.AtelierGANStyleMix, coarse=False, middle=False, fine=False, layers="0-7", **kw)
    assert torch.equal(all_rows.tensor, custom.tensor) and torch.equal(all_rows.tensor[1], w_style[0])
    with pytest.raises(InputError, match=r"layers: '8' is outside 0..7"):
        run(N.AtelierGANStyleMix, coarse=False, middle=False, fine=False, layers="8", **kw)
    faces = load("dcgan_faces_64.tar")
    (z,) = run(N.AtelierGANLatent, gan=faces, seed=0, batch_size=1, space="z", class_label=-1)
    with pytest.raises(InputError, match=r"gan: dcgan_faces_64.tar \(DCGAN\) has no per-layer styles"):
        run(N.AtelierGANStyleMix, gan=faces, latent=z, style_latent=z, coarse=True, middle=False, fine=False)


def test_project_node_resizes_with_a_note(gans):
    gan = load("gan_mlp_G.ckpt")  # greyscale 28x28 digits
    photo = torch.rand(1, 100, 80, 3)  # [B,H,W,C] RGB, not the model's size
    out = N.AtelierGANProject().project(gan=gan, image=photo, space="auto", steps=3, learning_rate=0.0,
                                        class_label=-1, seed=0)
    latent, recon, report = out["result"]
    assert latent.space == "z" and latent.tensor.shape == (1, 64) and recon.shape == (1, 28, 28, 3)
    assert "centre-cropped to 80x80" in report and "resized from 80x80 to 28x28" in report and "PSNR" in report
    assert out["ui"]["text"] == [report]


def test_image_to_image_node_equals_the_package_generator(gans):
    """vintagify's own ResnetGenerator on the same weights is the reference, [0,1] -> [-1,1] -> G -> [0,1]. 45x70 is
    no multiple of 4: the node pads by reflection and crops back, so it equals the reference run on torch's
    reflect-padded image (48x72), cropped."""
    weights = package_file("vintagify", "resources/G_A2B_epoch33.pth")
    ref = package_module("vintagify", "generator.py").ResnetGenerator(n_blocks=9)
    ref.load_state_dict(read_state_dict(weights)[0])
    ref.eval()
    gan = load("cyclegan_vintage.pth")
    photo = torch.rand(2, 45, 70, 3)
    (out,) = run(N.AtelierImageToImageGAN, gan=gan, image=photo, tile_size=0)
    assert out.shape == (2, 45, 70, 3)
    x = photo.movedim(-1, 1) * 2 - 1  # [2,3,45,70] in [-1,1]
    with torch.no_grad():
        want = ref(torch.nn.functional.pad(x, (0, 2, 0, 3), mode="reflect"))[..., :45, :70]
    want = ((want + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert want.std() > 0.05 and (want - photo).abs().mean() > 0.01  # a real translation, not the identity
    assert (out - want).abs().max().item() <= 1e-4


def test_bad_inputs_are_refused_by_name(gans):
    faces, eyes, vintage = load("dcgan_faces_64.tar"), load("dcgan_eyes_128.pth"), load("cyclegan_vintage.pth")
    latent_kw = dict(seed=0, batch_size=1, space="auto")
    sample_kw = dict(truncation_cutoff=0, noise_mode="const", noise_seed=0)
    with pytest.raises(InputError, match=r"class_label: dcgan_faces_64.tar \(DCGAN\) is unconditional"):
        run(N.AtelierGANLatent, gan=faces, class_label=2, **latent_kw)
    with pytest.raises(InputError, match=r"class_label: dcgan_eyes_128.pth \(DCGAN\) has 8 classes; expected 0..7"):
        run(N.AtelierGANLatent, gan=eyes, class_label=8, **latent_kw)
    (z_faces,) = run(N.AtelierGANLatent, gan=faces, class_label=-1, **latent_kw)
    for psi in (-2.5, 2.01):
        with pytest.raises(InputError, match=r"truncation_psi: expected a value in \[-2, 2\]"):
            run(N.AtelierGANSample, gan=faces, latent=z_faces, truncation_psi=psi, **sample_kw)
    with pytest.raises(InputError, match=r"latent: this latent belongs to dcgan_faces_64.tar .*dcgan_eyes_128.pth"):
        run(N.AtelierGANSample, gan=eyes, latent=z_faces, truncation_psi=1.0, **sample_kw)
    with pytest.raises(InputError, match=r"gan: cyclegan_vintage.pth .*not a latent generator.*Image-to-Image GAN"):
        run(N.AtelierGANLatent, gan=vintage, class_label=-1, **latent_kw)
    with pytest.raises(InputError, match=r"gan: dcgan_faces_64.tar .*not an image-to-image GAN"):
        run(N.AtelierImageToImageGAN, gan=faces, image=torch.rand(1, 8, 8, 3), tile_size=0)
    with pytest.raises(InputError, match=r"image: the image has NaN"):
        run(N.AtelierImageToImageGAN, gan=vintage, image=torch.full((1, 8, 8, 3), float("nan")), tile_size=0)
    (z_eyes,) = run(N.AtelierGANLatent, gan=eyes, class_label=-1, **latent_kw)
    with pytest.raises(InputError, match="latent_b: belongs to dcgan_eyes_128.pth but latent_a to dcgan_faces_64.tar"):
        run(N.AtelierGANInterpolate, latent_a=z_faces, latent_b=z_eyes, steps=4, method="auto", loop=False)
