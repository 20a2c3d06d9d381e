"""KL autoencoders against diffusers' AutoencoderKL on the same random weights, in both key layouts."""
from __future__ import annotations

import json

import pytest
import torch

from atelier.models.errors import InputError
from atelier.models.registry import detect as registry_detect
from atelier.models.vae import kl, taesd
from harness import check_roundtrip  # tests/ is on pytest's pythonpath

diffusers = pytest.importorskip("diffusers")

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
FLUX_LIKE = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32, latent_channels=16,
                 use_quant_conv=False, use_post_quant_conv=False)
TOL = 1e-4


def _diffusers_vae(cfg: dict, sd: dict | None = None) -> torch.nn.Module:
    n = len(cfg["block_out_channels"])
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval()
    if sd is not None:
        vae.load_state_dict(sd, strict=True)
    else:
        with torch.no_grad():  # default init leaves GroupNorm at identity and biases at zero: stir everything
            for p in vae.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return vae


def _compvis_state_dict(cfg: dict, prefix: str) -> dict[str, torch.Tensor]:
    """A random state dict in the CompVis layout: our module's own names (hyper-parameters as diffusers' cfg)."""
    ch = cfg["block_out_channels"][0]
    quant = cfg.get("use_quant_conv", True)
    model = kl.AutoencoderKL(ch=ch, ch_mult=[c // ch for c in cfg["block_out_channels"]],
                             num_res_blocks=cfg["layers_per_block"], z_channels=cfg["latent_channels"],
                             latent_channels=cfg["latent_channels"], groups=cfg["norm_num_groups"], quant_conv=quant)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {prefix + k: v for k, v in model.state_dict().items()}


def _roundtrip(tmp_path, sd: dict, ref: torch.nn.Module, cfg: dict, facts: dict) -> None:
    """The shared round trip (a file, a fresh manager) against diffusers: encoder means and decoded images."""
    x = torch.rand(2, 3, 32, 48)  # [B,3,H,W] in [0,1]
    z = torch.randn(2, cfg["latent_channels"], 8, 12)
    with torch.no_grad():
        enc_ref = ref.encode(x * 2 - 1).latent_dist.mean
        dec_ref = ((ref.decode(z).sample + 1) / 2).clamp(0, 1)
    assert dec_ref.std() > 0.05 and enc_ref.std() > 0.05  # a non-trivial comparison
    check_roundtrip(  # norm_num_groups has no shape: the file's metadata says it (safetensors only)
        tmp_path, sd, metadata={"config": json.dumps({"norm_num_groups": cfg["norm_num_groups"]})},
        formats=["safetensors"], folder="vae", family="vae", tol=TOL,
        run=lambda m: torch.cat([m.encode(x).flatten(), m.decode(z).flatten()]),
        expected=torch.cat([enc_ref.flatten(), dec_ref.flatten()]),
        facts={"family": "vae", "model.latent_channels": cfg["latent_channels"],
               "config.quant_conv": cfg.get("use_quant_conv", True), **facts})


@pytest.mark.parametrize("cfg", [SMALL, FLUX_LIKE], ids=["kl4", "kl16_noquant"])
def test_diffusers_layout_matches_diffusers(cfg, tmp_path):
    ref = _diffusers_vae(cfg)
    sd = ref.state_dict()
    assert kl.detect(sd, {}) and not taesd.detect(sd, {})
    _roundtrip(tmp_path, sd, ref, cfg, {"config.layout": "diffusers"})


@pytest.mark.parametrize("cfg", [SMALL, FLUX_LIKE], ids=["kl4", "kl16_noquant"])
@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_compvis_layout_matches_diffusers(cfg, prefix, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = _compvis_state_dict(cfg, prefix)
    n = len(cfg["block_out_channels"])
    converted = convert_ldm_vae_checkpoint(  # diffusers' own converter is the independent reading of the layout
        sd, {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n})
    ref = _diffusers_vae(cfg, converted)
    if prefix:  # a full checkpoint: the rest of the model must be ignored
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    _roundtrip(tmp_path, sd, ref, cfg, {"config.layout": "compvis"})


def test_sampling_matches_diffusers_posterior():
    ref = _diffusers_vae(SMALL)
    model = kl.load(ref.state_dict(), {"config": {"norm_num_groups": 8}}).model
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = ref.encode(x * 2 - 1).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        got = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        mean = model.encode(x)
    assert (got - want).abs().max().item() < TOL
    assert (got - mean).abs().max().item() > 1e-3  # a draw, not the mean


def test_registry_picks_kl_and_records_known_scales():
    sd = _compvis_state_dict(dict(SMALL, norm_num_groups=32), "")
    desc = registry_detect(sd, {}, source="vae.safetensors")
    assert desc.architecture == "KL-f2" and desc.model.downscale == 2
    assert desc.config["known_latent_formats"]["sdxl"]["scale"] == pytest.approx(0.13025)
    assert desc.config["latent_scaling_applied"] is False
    assert desc.model.has_encoder and desc.model.has_decoder


def test_decoder_only_file_and_bad_inputs():
    sd = {k: v for k, v in _compvis_state_dict(SMALL, "").items() if k.startswith(("decoder.", "post_quant"))}
    model = kl.load(sd, {"config": {"norm_num_groups": 8}}).model
    assert model.has_decoder and not model.has_encoder
    assert model.decode(torch.randn(1, 4, 4, 4)).shape == (1, 3, 8, 8)
    with pytest.raises(InputError, match="only a decoder"):
        model.encode(torch.rand(1, 3, 8, 8))
    with pytest.raises(InputError, match=r"latent: expected \[B,4,h,w\]"):
        model.decode(torch.randn(1, 16, 4, 4))
    full = kl.load(_compvis_state_dict(SMALL, ""), {"config": {"norm_num_groups": 8}}).model
    with pytest.raises(InputError, match="multiples of 2"):
        full.encode(torch.rand(1, 3, 9, 8))


# ---------------------------------------------------------------------------------------------------------------
# GroupNorm with fixed statistics (what kl_bands sets; kl_bands itself is tested in test_vae_codec.py)
# ---------------------------------------------------------------------------------------------------------------
def test_groupnorm_with_fixed_statistics():
    gn = kl.GroupNorm(4, 16)
    with torch.no_grad():
        gn.weight.copy_(torch.linspace(0.5, 2, 16))
        gn.bias.copy_(torch.linspace(-1, 1, 16))
    x = torch.randn(2, 16, 8, 12) * torch.linspace(0.5, 2, 12) + torch.linspace(-1, 1, 12)
    ref = torch.nn.functional.group_norm(x, 4, gn.weight, gn.bias, gn.eps)
    assert torch.equal(gn(x), ref)
    var, mean = torch.var_mean(x.reshape(2, 4, -1), dim=-1, correction=0)  # [B,G]: the input's own statistics
    gn.fixed_stats = (mean, var)
    assert torch.allclose(gn(x), ref, atol=1e-5)
    gn.fixed_stats = (mean[1:], var[1:])  # one image's statistics applied to both: image 0 now differs
    y = gn(x)
    assert torch.allclose(y[1], ref[1], atol=1e-5) and not torch.allclose(y[0], ref[0], atol=1e-2)
    gn.fixed_stats = (mean, var)
    with pytest.raises(InputError, match="expected a batch of 1 or 2, got a batch of 3"):
        gn(torch.randn(3, 16, 4, 4))


@pytest.mark.parametrize("name,cfg,latent,quant", [
    ("sd", dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4), 4, True),
    ("flux", dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                  use_quant_conv=False, use_post_quant_conv=False), 16, False),
])
def test_full_size_configs_map_key_for_key(name, cfg, latent, quant):
    """The real SD / Flux VAE layouts, built on the meta device (no memory): names and shapes map one to one."""
    n = len(cfg["block_out_channels"])
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                      up_block_types=("UpDecoderBlock2D",) * n, **cfg)
    converted = kl.convert_diffusers_keys(ref.state_dict())
    read = kl._read_config(converted, {})
    assert (read["ch"], read["ch_mult"], read["num_res_blocks"]) == (128, [1, 2, 4, 4], 2)
    assert (read["latent_channels"], read["quant_conv"], read["mid_attention"]) == (latent, quant, True)
    with torch.device("meta"):
        ours = kl.AutoencoderKL(**read).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in converted.items()}
