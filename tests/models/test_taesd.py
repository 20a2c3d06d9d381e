"""TAESD family: the real TAEF2 round trip (PSNR), diffusers' AutoencoderTiny on random weights, every file layout,
ComfyUI's latent scale convention and FLUX.2 latent packing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from atelier.models.errors import InputError
from atelier.models.loading import read_state_dict
from atelier.models.registry import detect as registry_detect
from atelier.models.vae import kl, taesd
from harness import check_roundtrip  # tests/ is on pytest's pythonpath


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()


@pytest.fixture(scope="module")
def taef2_files(shared_dir):
    enc, _ = read_state_dict(shared_dir / "weights" / "taef2" / "taef2_encoder.pth")
    dec, _ = read_state_dict(shared_dir / "weights" / "taef2" / "taef2_decoder.pth")
    return enc, dec


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    img = np.ascontiguousarray(skimage_data.astronaut())  # 512x512x3 uint8
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255  # [1,3,512,512]


def test_taef2_round_trip_psnr(taef2_files, astronaut):
    """Reference 31.2 dB (madebyollin's taesd.py on the same weights); random weights give about 5 dB."""
    enc, dec = taef2_files
    desc = registry_detect(taesd.merge_state_dicts(enc, dec), {}, source="taef2.pth")
    model = desc.model
    assert desc.architecture == "TAESD" and model.variant == "taef2" and model.latent_channels == 32
    assert model.has_encoder and model.has_decoder and model.downscale == 8
    with torch.no_grad():
        z = model.encode(astronaut)  # [1,32,64,64]
        out = model.decode(z)
    assert z.shape == (1, 32, 64, 64) and out.shape == astronaut.shape
    psnr = _psnr(out, astronaut)
    assert psnr >= 31.0, psnr


def test_taef2_files_detected_separately(taef2_files, shared_dir):
    enc, dec = taef2_files
    e = registry_detect(enc, {}, source="taef2_encoder.pth")
    d = registry_detect(dec, {}, source="taef2_decoder.pth")
    assert e.model.has_encoder and not e.model.has_decoder and e.config["midblock_groupnorm"]
    assert d.model.has_decoder and not d.model.has_encoder and d.out_channels == 3
    with pytest.raises(InputError, match="only an encoder"):
        e.model.decode(torch.zeros(1, 32, 2, 2))
    with pytest.raises(InputError, match="only a decoder"):
        d.model.encode(torch.zeros(1, 3, 16, 16))
    # the 32x Sana encoder in the same folder
    sana = registry_detect(read_state_dict(shared_dir / "weights" / "taef2" / "taesana_encoder.pth")[0], {})
    assert sana.model.downscale == 32 and sana.model.variant == "taesana"
    assert sana.model.encode(torch.rand(1, 3, 64, 64)).shape == (1, 32, 2, 2)


def test_taef2_packed_latents(taef2_files):
    enc, dec = taef2_files
    model = taesd.load(taesd.merge_state_dicts(enc, dec), {"variant": "taef2"}).model
    z = torch.randn(1, 32, 6, 8)
    packed = taesd.pack_latents(z)
    # ComfyUI/FLUX.2 order: packed channel c*4 + dy*2 + dx holds z[c, 2i+dy, 2j+dx]
    assert packed.shape == (1, 128, 3, 4)
    assert torch.equal(packed[0, 5 * 4 + 1 * 2 + 0, 2, 3], z[0, 5, 2 * 2 + 1, 2 * 3 + 0])
    assert torch.equal(taesd.unpack_latents(packed), z)
    with torch.no_grad():
        assert torch.equal(model.decode(packed), model.decode(z))
        x = torch.rand(1, 3, 32, 48)
        plain = model.encode(x)
        model.pack_latents = True
        assert torch.equal(model.encode(x), taesd.pack_latents(plain))
        with pytest.raises(InputError, match="multiples of 16"):
            model.encode(torch.rand(1, 3, 24, 48))


# ---------------------------------------------------------------------------------------------------------------
# Against diffusers' AutoencoderTiny (random weights)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderTiny(latent_channels=4).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(1.5).add_(torch.randn_like(p) * 0.02)
    return ref


def _bare(ref: torch.nn.Module) -> tuple[dict, dict]:
    """madebyollin's file layout: the decoder Sequential starts with a parameterless Clamp at index 0."""
    sd = ref.state_dict()
    enc = {k[len("encoder.layers."):]: v for k, v in sd.items() if k.startswith("encoder.layers.")}
    dec = {}
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers."):].split(".", 1)
            dec[f"{int(i) + 1}.{rest}"] = v
    return enc, dec


@pytest.mark.parametrize("layout", ["diffusers", "encoder.", "taesd_encoder.", "separate"])
def test_matches_diffusers_autoencoder_tiny(tiny, layout, tmp_path):
    """Every file layout through the shared round trip (a file named as users name them, a fresh manager)."""
    enc, dec = _bare(tiny)
    x = torch.rand(2, 3, 32, 48)
    z_raw = torch.randn(2, 4, 4, 6) * 2
    with torch.no_grad():
        ref_z = tiny.encode(x * 2 - 1).latents  # diffusers: raw TAESD latents (the diffusion model's scaled space)
        ref_x = (tiny.decode(z_raw).sample + 1) / 2
    assert ref_z.std() > 0.05 and ref_x.std() > 0.05
    # ComfyUI convention: a LATENT holds unscaled latents, latent = raw / vae_scale + vae_shift
    want_z, want_x = ref_z / 0.13025, ref_x.clamp(0, 1)
    facts = {"family": "vae", "architecture": "TAESD", "model.variant": "taesdxl",
             "model.vae_scale": pytest.approx(0.13025), "model.vae_shift": 0.0}
    # each layout in the format it is published in (madebyollin's .pth pairs, safetensors otherwise): one load each
    common = dict(folder="vae_approx", family="vae", facts=facts,
                  formats=["pth"] if layout == "separate" else ["safetensors"])
    if layout == "separate":
        check_roundtrip(tmp_path, enc, name="taesdxl_encoder", run=lambda m: m.encode(x), expected=want_z, tol=1e-4,
                        **common)
        check_roundtrip(tmp_path, dec, name="taesdxl_decoder", run=lambda m: m.decode(z_raw / 0.13025),
                        expected=want_x, tol=1e-5, **common)
        return
    if layout == "diffusers":
        sd, name = tiny.state_dict(), "taesdxl"
    else:
        d_prefix = layout.replace("encoder", "decoder")
        sd = {**{layout + k: v for k, v in enc.items()}, **{d_prefix + k: v for k, v in dec.items()}}
        name = "taesdxl"  # the variant named by the file ...
        if layout == "taesd_encoder.":  # ... or by the scale ComfyUI's combined TAESD carries
            sd.update(vae_scale=torch.tensor(0.13025), vae_shift=torch.tensor(0.0))
            name = "tiny"
        assert taesd.detect(sd, {}) and not kl.detect(sd, {})
    check_roundtrip(tmp_path, sd, name=name, expected=torch.cat([want_z.flatten(), want_x.flatten()]), tol=1e-4,
                    run=lambda m: torch.cat([m.encode(x).flatten(), m.decode(z_raw / 0.13025).flatten()]), **common)


def test_variant_scale_and_shift_conventions(tiny):
    enc, dec = _bare(tiny)
    sd = taesd.merge_state_dicts(enc, dec)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        raw = tiny.encode(x * 2 - 1).latents
        for variant, (scale, shift) in {"taesd": (0.18215, 0.0), "taesd3": (1.5305, 0.0609)}.items():
            model = taesd.load(sd, {"source": f"{variant}_decoder.pth"}).model
            assert model.variant == variant
            assert torch.allclose(model.encode(x), raw / scale + shift, atol=1e-5)
    guessed = taesd.load(sd, {})
    assert guessed.config["variant"] == "taesd" and guessed.config["variant_guessed"]
    with torch.no_grad():
        assert torch.allclose(guessed.model.encode(x), raw / 0.18215, atol=1e-5)


def test_rejects_non_taesd_state_dicts(taef2_files):
    enc, dec = taef2_files
    assert not taesd.detect({"0.weight": torch.zeros(64, 3, 3, 3), "0.bias": torch.zeros(64)}, {})
    broken = dict(dec)
    broken.pop("3.pool.1.weight")  # a pool layer half there: neither layout
    assert not taesd.detect(broken, {})
    mixed = taesd.merge_state_dicts(enc, {k: v for k, v in dec.items() if ".pool." not in k})
    assert taesd.detect(mixed, {})
    with pytest.raises(Exception, match="different kinds"):
        taesd.load(mixed, {})
    with pytest.raises(InputError, match=r"latent: expected \[B,32,h,w\]"):
        taesd.load(dec, {}).model.decode(torch.zeros(1, 16, 4, 4))
