"""The convolutional VAE (models/vae/conv.py) on tiny random configs: equality with a functional re-statement of the
documented architecture written here, save -> manager load round trips (with and without metadata), detection,
config errors, shapes, and the VAE nodes driving it (encode, decode, prior samples, interpolation)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from harness import check_roundtrip, load_file
from atelier.models.errors import InputError, ModelLoadError
from atelier.models.loading import read_state_dict
from atelier.models.registry import detect as registry_detect
from atelier.models.vae import codec, conv, fc, kl, taesd
from atelier.nodes.vae import (AtelierLatentInterpolate, AtelierLoadVAE, AtelierVAEDecode, AtelierVAEEncode,
                               AtelierVAESample)

FLAT = {"channels": [8, 16, 16], "res_blocks": [0, 1, 2], "resolution": 12, "latent_dim": 5, "groups": 4}
SPATIAL = {"channels": [8, 16], "res_blocks": 2, "resolution": 8, "latent_dim": None, "latent_channels": 3,
           "in_channels": 3}


def _model(cfg: dict, seed: int = 0) -> conv.ConvVAE:
    torch.manual_seed(seed)
    m = conv.ConvVAE(cfg)
    with torch.no_grad():  # GroupNorm starts at 1/0: perturb it so that a wrong group count or order shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


# ------------------------------------------------------------------------ the architecture, restated functionally
def _res(sd: dict, p: str, h: torch.Tensor, g: int) -> torch.Tensor:
    y = F.conv2d(F.silu(F.group_norm(h, g, sd[p + "norm1.weight"], sd[p + "norm1.bias"])),
                 sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
    y = F.conv2d(F.silu(F.group_norm(y, g, sd[p + "norm2.weight"], sd[p + "norm2.bias"])),
                 sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)
    return h + y


def _reference(sd: dict, cfg: dict, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder moments [B,2d] and decoder logits for z, from the state dict and the module docstring alone."""
    L, g = len(cfg["channels"]), cfg["groups"]
    rb = cfg["res_blocks"]
    n = list(rb) if isinstance(rb, list) else [rb] * L  # per level, shallowest first
    h = F.conv2d(x, sd["enc.stem.weight"], sd["enc.stem.bias"], padding=1)
    for i in range(L):
        for j in range(n[i]):
            h = _res(sd, f"enc.levels.{i}.blocks.{j}.", h, g)
        if i < L - 1:
            h = F.silu(F.group_norm(h, g, sd[f"enc.levels.{i}.norm.weight"], sd[f"enc.levels.{i}.norm.bias"]))
            h = F.conv2d(h, sd[f"enc.levels.{i}.resample.weight"], sd[f"enc.levels.{i}.resample.bias"], stride=2,
                         padding=1)
    h = F.silu(F.group_norm(h, g, sd["enc.norm.weight"], sd["enc.norm.bias"]))
    moments = F.linear(h.flatten(1), sd["enc.to_moments.weight"], sd["enc.to_moments.bias"])
    side = cfg["resolution"] // 2 ** (L - 1)
    h = F.linear(z, sd["dec.from_latent.weight"], sd["dec.from_latent.bias"]).reshape(len(z), -1, side, side)
    for i in range(L):
        for j in range(n[L - 1 - i]):
            h = _res(sd, f"dec.levels.{i}.blocks.{j}.", h, g)
        if i < L - 1:
            h = F.silu(F.group_norm(h, g, sd[f"dec.levels.{i}.norm.weight"], sd[f"dec.levels.{i}.norm.bias"]))
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = F.conv2d(h, sd[f"dec.levels.{i}.resample.weight"], sd[f"dec.levels.{i}.resample.bias"], padding=1)
    h = F.silu(F.group_norm(h, g, sd["dec.norm.weight"], sd["dec.norm.bias"]))
    return moments, F.conv2d(h, sd["dec.to_image.weight"], sd["dec.to_image.bias"], padding=1)


@torch.no_grad()
def test_flat_equals_functional_reference_and_round_trips(tmp_path):
    model = _model(FLAT)
    sd = model.state_dict()
    x, z = torch.rand(3, 1, 12, 12), torch.randn(3, 5)
    moments, logits = _reference(sd, conv.full_config(FLAT), x, z)
    mean, logvar = model.encode_stats(x)
    assert torch.allclose(torch.cat([mean, logvar], 1), moments, atol=1e-5)
    assert torch.allclose(model.decode_logits(z), logits, atol=1e-5)
    meta = {"architecture": "ConvVAE", "config": json.dumps(conv.full_config(FLAT))}
    desc = check_roundtrip(  # groups=4 has no shape: the file's config metadata carries it
        tmp_path, sd, folder="vae", family="vae", formats=("safetensors",), metadata=meta, tol=1e-5,
        run=lambda m: torch.cat([m.encode(x).flatten(), m.decode(z[:, :, None, None]).flatten()]),
        expected=torch.cat([moments[:, :5].flatten(), torch.sigmoid(logits).flatten()]),
        facts={"family": "vae", "architecture": "ConvVAE", "model.latent_channels": 5, "model.downscale": 12,
               "extra.fixed_size": 12, "extra.gaussian": True, "config.groups": 4, "config.latent_shape": [5, 1, 1]})
    m = desc.model
    draw = m.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(3, 5, 1, 1, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(draw.flatten(1), mean + torch.exp(0.5 * logvar) * eps.flatten(1), atol=1e-5)


@torch.no_grad()
def test_config_read_from_shapes_without_metadata(tmp_path):
    """A bare .pth (no metadata): widths, blocks, latent and resolution come from the tensor shapes (groups 8)."""
    cfg = {"channels": [8, 16, 16], "res_blocks": [1, 0, 2], "resolution": 16, "latent_dim": 6}
    model = _model(cfg, seed=1)
    x, z = torch.rand(2, 1, 16, 16), torch.randn(2, 6, 1, 1)
    check_roundtrip(tmp_path, model.state_dict(), folder="vae", family="vae", tol=1e-5,
                    run=lambda m: torch.cat([m.encode(x).flatten(), m.decode(z).flatten()]),
                    expected=torch.cat([model.encode(x).flatten(), model.decode(z).flatten()]),
                    facts={"architecture": "ConvVAE", "config.resolution": 16, "config.res_blocks": [1, 0, 2],
                           "config.channels": [8, 16, 16], "config.latent_dim": 6})


@torch.no_grad()
def test_save_conv_vae_spatial_through_the_manager(tmp_path, manager, models_root):
    model = _model(SPATIAL, seed=2)
    path = conv.save_conv_vae(models_root / "vae" / "tiny_conv.safetensors", model, extra_meta={"steps": 7,
                                                                                               "dataset": "mnist"})
    assert not list((models_root / "vae").glob("*.tmp-*"))
    sd, meta = read_state_dict(path)
    assert meta["architecture"] == "ConvVAE" and meta["config"] == conv.full_config(SPATIAL)
    assert meta["steps"] == "7" and meta["dataset"] == "mnist"
    desc = manager.load("tiny_conv.safetensors", "vae", family="vae")
    assert desc.architecture == "ConvVAE" and desc.extra.fixed_size is None and desc.extra.downscale == 2
    assert desc.size_requirements.multiple_of == 2
    x = torch.rand(2, 3, 8, 12)  # fully convolutional: any multiple of 2
    mean, logvar = desc.model.encode_stats(x)
    assert mean.shape == logvar.shape == (2, 3, 4, 6)
    assert torch.allclose(mean, model.encode_stats(x)[0], atol=1e-6)
    out = desc.model.decode(mean)
    assert out.shape == (2, 3, 8, 12) and 0 <= out.min() and out.max() <= 1
    assert torch.allclose(out, model.decode(mean), atol=1e-6)
    with pytest.raises(InputError, match="does not describe the model"):
        conv.save_conv_vae(tmp_path / "x.safetensors", model, {**SPATIAL, "res_blocks": 1})


def test_detection(tmp_path, shared_dir):
    model = _model(FLAT)
    sd = model.state_dict()
    assert conv.detect(sd, {}) and conv.detect({}, {"architecture": "ConvVAE"})
    assert not kl.detect(sd, {}) and not taesd.detect(sd, {}) and not fc.detect(sd, {})
    assert registry_detect(sd, {"config": conv.full_config(FLAT)}).architecture == "ConvVAE"
    assert not conv.detect({**sd, "other.weight": torch.zeros(1)}, {})  # someone else's keys
    assert not conv.detect({k: v for k, v in sd.items() if k != "dec.to_image.weight"}, {})
    fc_sd, fc_meta = read_state_dict(shared_dir / "weights" / "mnist" / "vae_fc.pth")
    assert not conv.detect(fc_sd, fc_meta)
    odd = {**sd, "enc.to_moments.weight": torch.zeros(10, 16 * 3 * 3 + 1)}
    with pytest.raises(ModelLoadError, match="enc.to_moments takes 145 features, not 16 channels of a square map"):
        conv.load(odd, {})
    with pytest.raises(ModelLoadError, match="ConvVAE.*resolution expected a positive multiple of 4"):
        load_file(tmp_path, sd, folder="vae", metadata={"architecture": "ConvVAE",
                                                        "config": json.dumps({**FLAT, "resolution": 14})})


@pytest.mark.parametrize("change, message", [
    ({"resolution": 30}, r"resolution expected a positive multiple of 4 \(2\*\*2 for 3 levels"),
    ({"latent_channels": 4}, "exactly one of latent_dim .* and latent_channels"),
    ({"latent_dim": None}, "exactly one of latent_dim"),
    ({"in_channels": 2}, "in_channels expected 1 or 3, got 2"),
    ({"groups": 3}, r"groups=3 must divide every width in channels \[8, 16, 16\]"),
    ({"channels": []}, "channels expected a non-empty list"),
    ({"res_blocks": -1}, r"res_blocks expected an integer >= 0 or 3 of them \(one per level"),
    ({"res_blocks": [1, 1]}, r"res_blocks expected .*got \[1, 1\]"),
    ({"latent": 4}, r"unknown key\(s\) \['latent'\]"),
])
def test_config_errors_name_the_key(change, message):
    with pytest.raises(InputError, match=message):
        conv.ConvVAE({**FLAT, **change})


def test_shapes_and_bad_inputs():
    flat, spatial = _model(FLAT), _model(SPATIAL)
    x = torch.rand(2, 1, 12, 12)
    logits, mean, logvar = flat(x, generator=torch.Generator().manual_seed(0))  # the trainer's pass
    assert logits.shape == x.shape and mean.shape == logvar.shape == (2, 5)
    assert flat.decode_logits(mean).shape == flat.decode_logits(mean[:, :, None, None]).shape == x.shape
    with pytest.raises(InputError, match=r"image: expected \[B,1,12,12\] in \[0,1\], got \[1, 1, 16, 16\]"):
        flat.encode(torch.rand(1, 1, 16, 16))
    with pytest.raises(InputError, match=r"latent: expected \[B,5,1,1\] or \[B,5\], got \[1, 5, 2, 2\]"):
        flat.decode(torch.rand(1, 5, 2, 2))
    with pytest.raises(InputError, match=r"image: expected \[B,3,H,W\] with H and W multiples of 2"):
        spatial.encode(torch.rand(1, 3, 7, 8))
    with pytest.raises(InputError, match=r"latent: expected \[B,3,h,w\], got \[1, 4, 2, 2\]"):
        spatial.decode(torch.rand(1, 4, 2, 2))


# ------------------------------------------------------------------------ the VAE nodes
@torch.no_grad()
def test_nodes_drive_a_flat_conv_vae(manager, models_root):
    model = _model(FLAT)
    conv.save_conv_vae(models_root / "vae" / "conv_flat.safetensors", model)
    vae = AtelierLoadVAE().load("vae/conv_flat.safetensors")[0]
    assert isinstance(vae, codec.VAE) and vae.fixed_size == 12 and vae.latent_channels == 5
    image = torch.rand(2, 12, 12, 3)  # IMAGE: RGB in, the grey VAE gets luma
    latent = AtelierVAEEncode().encode(vae, image, "mean", 0)[0]
    assert latent["samples"].shape == (2, 5, 1, 1) and "atelier_image_size" not in latent
    grey = codec._image_for(vae, image.movedim(-1, 1))
    assert torch.allclose(latent["samples"], model.encode(grey), atol=1e-5)
    drawn = AtelierVAEEncode().encode(vae, image, "sample", 3)[0]["samples"]
    assert not torch.allclose(drawn, latent["samples"])
    out = AtelierVAEDecode().decode(vae, latent)[0]
    assert out.shape == (2, 12, 12, 3) and torch.allclose(out[..., 0], model.decode(latent["samples"])[:, 0], atol=1e-5)
    prior = AtelierVAESample().sample(vae, 512, 512, 4, seed=11)[0]  # size ignored: one latent size
    assert prior["samples"].shape == (4, 5, 1, 1)
    assert AtelierVAEDecode().decode(vae, prior)[0].shape == (4, 12, 12, 3)
    one = {"samples": prior["samples"][:1]}
    line = AtelierLatentInterpolate().interpolate(one, latent, 3, "slerp")[0]  # a batch of one pairs with each
    assert line["samples"].shape == (6, 5, 1, 1)
    assert torch.allclose(line["samples"][2], latent["samples"][0])
    assert torch.equal(line["samples"][3], one["samples"][0])
    assert AtelierVAEDecode().decode(vae, line)[0].shape == (6, 12, 12, 3)
    with pytest.raises(InputError, match="exactly 12x12"):
        AtelierVAEEncode().encode(vae, torch.rand(1, 16, 16, 3), "mean", 0)


@torch.no_grad()
def test_nodes_drive_a_spatial_conv_vae(manager, models_root):
    model = _model(SPATIAL, seed=3)
    conv.save_conv_vae(models_root / "vae" / "conv_spatial.safetensors", model)
    vae = AtelierLoadVAE().load("vae/conv_spatial.safetensors")[0]
    assert vae.fixed_size is None and vae.downscale == 2 and vae.image_channels == 3
    image = torch.rand(1, 9, 10, 3)  # an odd side: padded to 10x10, cropped back on decode
    latent = AtelierVAEEncode().encode(vae, image, "mean", 0)[0]
    assert latent["samples"].shape == (1, 3, 5, 5) and latent["atelier_image_size"] == [9, 10]
    out = AtelierVAEDecode().decode(vae, latent)[0]
    assert out.shape == (1, 9, 10, 3)
    full = model.decode(latent["samples"]).movedim(1, -1)  # [1,10,10,3]
    assert torch.allclose(out, full[:, :9], atol=1e-5)
    prior = AtelierVAESample().sample(vae, 16, 8, 2, seed=4)[0]  # width 16, height 8
    assert prior["samples"].shape == (2, 3, 4, 8)
    assert AtelierVAEDecode().decode(vae, prior)[0].shape == (2, 8, 16, 3)
    with pytest.raises(InputError, match="samples: has 5 channels"):
        AtelierVAEDecode().decode(vae, {"samples": torch.zeros(1, 5, 4, 4)})
