"""VAE codec: tiled equals untiled (TAESD family with random weights and real TAEF2 within 2/255; KL autoencoders,
whose GroupNorm and attention see the whole image, within 3/255 mean and 12/255 max, where independent tiles as core
cuts them are measured worse), padding, bad latents, the fp16 fallback, prior draws and interpolation."""
from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from atelier.models.errors import InputError
from atelier.models.tiling import tiled_apply
from atelier.models.vae import codec, kl, kl_bands, taesd

L255 = 1 / 255


def _astronaut(h: int, w: int) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(skimage_data.astronaut())).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(img, size=(h, w), mode="area")  # [1,3,h,w]


@pytest.fixture
def spy(monkeypatch):
    """Records the tile side of every tiled_apply call the codec makes (to know that tiling really happened)."""
    calls: list[tuple[int, tuple[int, ...]]] = []

    def wrapped(fn, x, **kw):
        calls.append((kw.get("tile"), tuple(x.shape)))
        return tiled_apply(fn, x, **kw)

    for module in (taesd, kl_bands):  # the architectures' own strategies call the tiling engine
        monkeypatch.setattr(module, "tiled_apply", wrapped)
    return calls


def _save(path, sd: dict) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@functools.lru_cache(maxsize=None)
def _random_taesd(pool: bool, latent: int) -> dict:
    torch.manual_seed(1)
    enc, dec = taesd.Encoder(latent, pool), taesd.Decoder(latent, pool)
    with torch.no_grad():  # default init barely draws anything: stir it (as tests/models/test_taesd.py does)
        for p in [*enc.parameters(), *dec.parameters()]:
            p.mul_(1.5).add_(torch.randn_like(p) * 0.02)
        dec[-1].bias.fill_(0.5)
    return taesd.merge_state_dicts(enc.state_dict(), dec.state_dict())


def _small_kl(latent: int = 4) -> dict:
    torch.manual_seed(2)
    model = kl.AutoencoderKL(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=latent, latent_channels=latent,
                             groups=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.state_dict()


def _vae(manager, models_root, name: str, sd: dict, folder: str = "vae") -> codec.VAE:
    _save(models_root / folder / name, sd)
    return codec.load_vae(name, folder, manager=manager)


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs()
    return d.mean().item() / L255, d.max().item() / L255


# ---------------------------------------------------------------------------------------------------------------
# Tiled equals untiled
# ---------------------------------------------------------------------------------------------------------------
def test_taesd_random_tiled_equals_untiled(manager, models_root, spy):
    vae = _vae(manager, models_root, "taesd_random.safetensors", _random_taesd(False, 4))
    x = torch.rand(1, 3, 368, 32)  # a strip: two tiles along its length keep the test cheap
    z = codec.encode(vae, x, manager=manager)
    z_tiled = codec.encode(vae, x, tile=64, manager=manager)
    assert (z - z_tiled).abs().max().item() < 1e-3 * max(1.0, z.abs().max().item())
    full = codec.decode(vae, z, manager=manager)
    tiled = codec.decode(vae, z, tile=64, manager=manager)
    assert any(t is not None and t < s[-2] for t, s in spy), spy  # it did tile
    assert full.std() > 0.05  # random weights that still draw something
    mean, worst = _diff(tiled, full)
    assert worst <= 2, (mean, worst)
    ref = vae.decoder.model.decode(z)  # the module's own untiled call
    assert _diff(full, ref)[1] <= 2


def test_taef2_real_tiled_equals_untiled_and_round_trip(manager, models_root, spy, shared_dir):
    for half in ("encoder", "decoder"):
        (models_root / "vae_approx" / f"taef2_{half}.pth").write_bytes(
            (shared_dir / "weights" / "taef2" / f"taef2_{half}.pth").read_bytes())
    vae = codec.load_vae("taef2_decoder.pth", "vae_approx", manager=manager)  # the encoder comes along
    assert vae.encoder is not None and vae.decoder is not None and vae.latent_channels == 32
    x = _astronaut(376, 64)
    z = codec.encode(vae, x, manager=manager)
    z_tiled = codec.encode(vae, x, tile=64, manager=manager)
    assert (z - z_tiled).abs().max().item() < 1e-3 * z.abs().max().item()
    full = codec.decode(vae, z, manager=manager)
    tiled = codec.decode(vae, z, tile=64, manager=manager)
    assert sum(1 for t, s in spy if t is not None and t < s[-2]) >= 2  # encode and decode both tiled
    mean, worst = _diff(tiled, full)
    assert worst <= 2, (mean, worst)
    psnr = (10 * torch.log10(1 / ((full - x) ** 2).mean())).item()
    assert psnr > 25, psnr  # the real model: a faithful reconstruction (31.2 dB on the whole 512x512 astronaut)


def test_kl_banded_equals_untiled_where_independent_tiles_do_not(manager, models_root, caplog):
    vae = _vae(manager, models_root, "kl_small.safetensors", _small_kl())
    model = vae.decoder.model
    with torch.no_grad():
        z = model.encode(_astronaut(256, 192))  # [1,4,64,48]: an image-like latent
        full = model.decode(z)
    caplog.set_level(logging.WARNING)
    banded = codec.decode(vae, z, tile=128, manager=manager)  # bands of about 128x128 pixels' worth of memory
    mean, worst = _diff(banded, full)
    assert mean <= 3 and worst <= 12, (mean, worst)
    assert worst <= 2  # in fact exact up to the float16 rounding of the whole-image maps (measured 0.94)
    assert not caplog.records  # no fallback
    # what independent tiles give on the same weights (core's way; its three offset passes only average this)
    with torch.no_grad():
        tiles = tiled_apply(model.decode, z, scale=4, tile=24, context=8, blend=8, progress=None)
    t_mean, t_worst = _diff(tiles, full)
    assert t_worst > 12, (t_mean, t_worst)
    # encoding in bands: the same posterior
    x = _astronaut(96, 64)
    mean_full, logvar_full = model.moments(x)
    z_banded = codec.encode(vae, x, tile=16, manager=manager)
    scale = mean_full.abs().max().item()
    assert (z_banded - mean_full).abs().max().item() < 3e-3 * scale  # float16 maps: about 1e-3 relative
    draw = codec.encode(vae, x, sample=True, seed=7, tile=16, manager=manager)
    eps = torch.randn(mean_full.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(draw, mean_full + torch.exp(0.5 * logvar_full) * eps, atol=5e-3 * scale)


def test_kl_bands_keep_float32_maps_where_float16_overflows(manager, models_root, caplog):
    sd = _small_kl()
    sd["post_quant_conv.weight"] = sd["post_quant_conv.weight"] * 3e4  # activations past float16's 65504
    vae = _vae(manager, models_root, "hot_bands.safetensors", sd)
    z = torch.randn(1, 4, 40, 32)
    with torch.no_grad():
        full = vae.decoder.model.decode(z)
    caplog.set_level(logging.INFO)
    banded = codec.decode(vae, z, tile=64, manager=manager)
    assert "exceed float16" in caplog.text
    assert _diff(banded, full)[1] <= 0.5


def test_kl_automatic_tiling_and_fallback(models_root, caplog):
    from atelier.models.manager import ModelManager

    vae_file = models_root / "vae" / "kl.safetensors"
    _save(vae_file, _small_kl())
    z = torch.randn(1, 4, 40, 32)
    roomy = ModelManager(str(models_root), device=torch.device("cpu"))
    ref = codec.decode(codec.load_vae("kl.safetensors", manager=roomy), z, manager=roomy)  # fits: one call
    tight = ModelManager(str(models_root), device=torch.device("cpu"))
    tight.activation_budget = lambda desc: 24 << 20  # the memory budget demands tiles, and has room for bands
    got = codec.decode(codec.load_vae("kl.safetensors", manager=tight), z, manager=tight)
    assert _diff(got, ref)[1] <= 2
    tight.activation_budget = lambda desc: 2 << 20  # no room for whole-image maps: independent tiles, said so
    caplog.set_level(logging.WARNING)
    approx = codec.decode(codec.load_vae("kl.safetensors", manager=tight), z, manager=tight)
    assert approx.shape == ref.shape and "independent tiles" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Sizes, bad input, fp16
# ---------------------------------------------------------------------------------------------------------------
def test_odd_sizes_are_padded_and_cropped_back(manager, models_root):
    vae = _vae(manager, models_root, "taesd_odd.safetensors", _random_taesd(False, 4))
    x = torch.rand(2, 3, 37, 50)
    z = codec.encode(vae, x, manager=manager)
    assert z.shape == (2, 4, 5, 7)  # ceil(37/8) x ceil(50/8): nothing cut off
    out = codec.decode(vae, z, size=(37, 50), manager=manager)
    assert out.shape == (2, 3, 37, 50)
    whole = codec.decode(vae, z, manager=manager)
    assert whole.shape == (2, 3, 40, 56) and torch.equal(whole[..., :37, :50], out)
    padded = torch.nn.functional.pad(x, (0, 6, 0, 3), mode="reflect")
    assert torch.allclose(codec.encode(vae, padded, manager=manager), z, atol=1e-5)  # padded by reflection


def test_bad_latents_are_errors(manager, models_root):
    vae = _vae(manager, models_root, "sd_like.safetensors", _small_kl(latent=4))
    with pytest.raises(InputError, match=r"16 channels.*sd_like\.safetensors.*takes 4"):
        codec.decode(vae, torch.randn(1, 16, 8, 8), manager=manager)
    nan = torch.randn(1, 4, 8, 8)
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        codec.decode(vae, nan, manager=manager)
    with pytest.raises(InputError, match=r"latent_b: expected the shape of latent_a"):
        codec.interpolate(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 6), 4)
    enc_only = _vae(manager, models_root, "lonely_encoder.safetensors",
                    {k: v for k, v in _random_taesd(False, 4).items() if k.startswith("encoder.")})
    with pytest.raises(InputError, match="has no decoder"):
        codec.decode(enc_only, torch.randn(1, 4, 2, 2), manager=manager)


def test_fp16_overflow_falls_back_to_fp32(manager, models_root, caplog):
    sd = _small_kl()
    sd["post_quant_conv.weight"] = sd["post_quant_conv.weight"] * 3e4  # activations past fp16's 65504
    _save(models_root / "vae" / "hot.safetensors", sd)
    desc16 = manager.load("hot.safetensors", "vae", dtype=torch.float16)
    vae = codec.VAE("hot.safetensors", desc16, desc16)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        raw = desc16.model.decode(z.half())
    assert not torch.isfinite(raw).all()  # it does overflow in fp16
    caplog.set_level(logging.WARNING)
    out = codec.decode(vae, z, manager=manager)
    assert torch.isfinite(out).all() and "recomputing in float32" in caplog.text
    ref = codec.decode(codec.load_vae("hot.safetensors", manager=manager), z, manager=manager)  # fp32 policy on CPU
    assert torch.allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Prior draws and interpolation
# ---------------------------------------------------------------------------------------------------------------
def test_prior_draws_are_seeded_per_sample(manager, models_root):
    vae = _vae(manager, models_root, "taesd_prior.safetensors", _random_taesd(False, 4))
    a = codec.sample_prior(vae, 3, 60, 64, seed=5)
    assert a.shape == (3, 4, 8, 8)
    assert torch.equal(a[1:2], codec.sample_prior(vae, 1, 60, 64, seed=6))  # sample i uses seed + i
    assert not torch.equal(a[0], a[1])
    big = codec.sample_prior(vae, 64, 256, 256, seed=0, temperature=0.5)
    assert abs(big.std().item() - 0.5) < 0.01 and abs(big.mean().item()) < 0.01


def test_interpolation():
    a, b = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    b = b * a.norm() / b.norm()
    s = codec.interpolate(a, b, 5, "slerp")
    assert s.shape == (5, 4, 6, 6)
    assert torch.allclose(s[0], a[0], atol=1e-6) and torch.allclose(s[-1], b[0], atol=1e-6)
    norms = s.flatten(1).norm(dim=1)
    assert torch.allclose(norms, a.norm().expand(5), rtol=1e-5)  # slerp keeps the norm of equal-norm ends
    cos = torch.nn.functional.cosine_similarity(s[:-1].flatten(1), s[1:].flatten(1))
    assert torch.allclose(cos, cos[:1].expand_as(cos), atol=1e-5)  # equal angular steps
    lin = codec.interpolate(a, b, 3, "lerp")
    assert torch.allclose(lin[1], (a[0] + b[0]) / 2, atol=1e-6)
    assert lin[1].norm() < 0.95 * a.norm()  # the straight line cuts inside the sphere
    pairs = codec.interpolate(torch.randn(2, 4, 6, 6), b, 3)  # a batch of one pairs with each sample
    assert pairs.shape == (6, 4, 6, 6) and torch.allclose(pairs[2], b[0], atol=1e-6)
    assert torch.allclose(codec.interpolate(a, a, 4), a.expand(4, -1, -1, -1), atol=1e-6)  # parallel: no NaN
