"""StyleGAN2 against NVIDIA's own outputs (shared/golden/stylegan, made with NVlabs/stylegan3 reference ops), the
pure-PyTorch ops against their definitions, and rosinality checkpoints against the same golden tensors."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from atelier.models import loading, registry
from atelier.models.errors import InputError
from atelier.models.gan import ops
from atelier.models.gan.latent import style_mix, truncate
from harness import check_roundtrip  # tests/ is on pytest's pythonpath

SG2 = ["sg2_skip_32", "sg2_cond_16", "sg2_resnet_16", "sg2_orig_16", "sg2_clamp_16"]
TOL = 1e-4  # max abs, the goal for every golden tensor


pytestmark = pytest.mark.usefixtures("one_thread")


def load_golden(golden, name):
    sd, meta = loading.read_state_dict(golden / f"{name}.safetensors")
    desc = registry.detect(sd, meta, f"{name}.safetensors")
    exp = load_file(str(golden / f"{name}.expected.safetensors"))
    with safe_open(str(golden / f"{name}.expected.safetensors"), "pt") as f:
        emeta = f.metadata()
    return desc, exp, emeta, meta


def cond(exp):
    return exp["c"] if exp["c"].numel() else None


def maxabs(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
def check_golden_outputs(desc, exp, emeta) -> dict[str, float]:
    """Every tensor of the README's recipe but img_full (check_roundtrip compares it), through the public interface."""
    g = desc.model
    c = cond(exp)
    k = int(emeta["mix_k"])
    out = {
        "w_psi1": g.mapping(exp["z"], c, truncation_psi=1.0),
        "w_psi07": g.mapping(exp["z"], c, truncation_psi=0.7, truncation_cutoff=None),
        "w_cut": g.mapping(exp["z"], c, truncation_psi=0.5, truncation_cutoff=2),
        "w2": g.mapping(exp["z2"], c, truncation_psi=1.0),
        "img_const": g.synthesis(exp["w_psi07"], noise_mode="const"),
        "img_none": g.synthesis(exp["w_psi1"], noise_mode="none"),
        "img_psi1_const": g.synthesis(exp["w_psi1"], noise_mode="const"),
        "img_cut": g.synthesis(exp["w_cut"], noise_mode="const"),
        "img_mix": g.synthesis(style_mix(exp["w_psi1"], exp["w2"], range(k, g.num_ws)), noise_mode="const"),
    }  # img_full (the whole generator) was compared by check_roundtrip
    errs = {key: maxabs(v, exp[key]) for key, v in out.items()}
    bad = {key: e for key, e in errs.items() if e > TOL}
    assert not bad, f"max abs errors above {TOL}: {bad}"
    return errs


@pytest.mark.parametrize("name", SG2)
def test_golden(golden, name, tmp_path):
    """The golden file written again and loaded through a fresh manager (the shared round trip), then every tensor."""
    sd = load_file(str(golden / f"{name}.safetensors"))
    with safe_open(str(golden / f"{name}.safetensors"), "pt") as f:
        raw_meta = f.metadata()
    exp = load_file(str(golden / f"{name}.expected.safetensors"))
    with safe_open(str(golden / f"{name}.expected.safetensors"), "pt") as f:
        emeta = f.metadata()
    kw = json.loads(raw_meta["init_kwargs"])
    desc = check_roundtrip(
        tmp_path, sd, metadata=raw_meta, formats=["safetensors"], folder="gans", family="gan", tol=TOL,
        run=lambda g: g(exp["z"], cond(exp), truncation_psi=0.7, noise_mode="const"), expected=exp["img_full"],
        facts={"family": "gan", "architecture": "StyleGAN2", "purpose": "Generator", "model.z_dim": kw["z_dim"],
               "model.c_dim": kw["c_dim"], "model.w_dim": kw["w_dim"], "model.img_resolution": kw["img_resolution"],
               "model.img_channels": kw["img_channels"], "model.num_ws": int(emeta["num_ws"]),
               "model.output_range": (-1.0, 1.0), "config.architecture": kw.get("architecture", "skip")})
    assert desc.model.w_avg.shape == (desc.model.w_dim,)
    check_golden_outputs(desc, exp, emeta)


@torch.no_grad()
def test_style_mix_and_truncation_helpers(golden):
    desc, exp, emeta, _ = load_golden(golden, "sg2_cond_16")
    k = int(emeta["mix_k"])
    assert torch.equal(style_mix(exp["w_psi1"], exp["w2"], range(k, desc.model.num_ws)), exp["w_mix"])
    w_avg = desc.model.w_avg
    assert maxabs(truncate(exp["w_psi1"], w_avg, 0.7), exp["w_psi07"]) < 1e-5
    assert maxabs(truncate(exp["w_psi1"], w_avg, 0.5, 2), exp["w_cut"]) < 1e-5
    with pytest.raises(InputError, match="ws_b"):
        style_mix(exp["w_psi1"], exp["w2"][:, :3], range(2))
    with pytest.raises(InputError, match="layers"):
        style_mix(exp["w_psi1"], exp["w2"], range(4, 99))


@torch.no_grad()
def test_batch_independent_and_noise_modes(golden):
    desc, exp, _, _ = load_golden(golden, "sg2_skip_32")
    g = desc.model
    ws = exp["w_psi07"]
    whole = g.synthesis(ws)  # batch 4: shared-weight (unfused) modulated conv
    for i in range(ws.shape[0]):  # batch 1: grouped (fused) path
        assert maxabs(g.synthesis(ws[i : i + 1]), whole[i : i + 1]) < 1e-5
    r1 = g.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(3))
    r2 = g.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and maxabs(r1, whole) > 1e-3
    with pytest.raises(InputError, match="noise_mode"):
        g.synthesis(ws, noise_mode="fixed")


@torch.no_grad()
def test_bad_inputs_are_named(golden):
    desc, exp, _, _ = load_golden(golden, "sg2_cond_16")
    g = desc.model
    with pytest.raises(InputError, match=r"z: expected \[B,64\]"):
        g.mapping(torch.zeros(2, 63), exp["c"][:2])
    with pytest.raises(InputError, match="c: this generator is class-conditional"):
        g.mapping(exp["z"], None)
    with pytest.raises(InputError, match=r"ws: expected \[B,6,64\]"):
        g.synthesis(torch.zeros(1, 5, 64))
    with pytest.raises(InputError, match="truncation_cutoff"):
        g.mapping(exp["z"], exp["c"], truncation_psi=0.5, truncation_cutoff=7)


@torch.no_grad()
def test_bfloat16_runs_close(golden):
    desc, exp, _, _ = load_golden(golden, "sg2_cond_16")
    g = desc.model.to(torch.bfloat16)
    img = g.synthesis(exp["w_psi07"][:1])
    assert img.dtype == torch.float32
    ref = exp["img_const"][:1]
    assert maxabs(img, ref) < 0.1 * ref.abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# ops against their definitions


def naive_upfirdn2d(x, f, up, down, pad, gain):
    """The definition (NVIDIA's docstring): zero-insert, pad/crop, convolve with f (true convolution), decimate."""
    b, c, h, w = x.shape
    if f.ndim == 1:
        f = torch.outer(f, f)
    u = torch.zeros(b, c, h * up, w * up, dtype=torch.float64)
    u[:, :, ::up, ::up] = x.double()
    x0, x1, y0, y1 = pad
    u = F.pad(u, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    u = u[:, :, max(-y0, 0) : u.shape[2] - max(-y1, 0), max(-x0, 0) : u.shape[3] - max(-x1, 0)]
    k = (f.double() * gain).flip([0, 1])[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(u, k, groups=c)[:, :, ::down, ::down].float()


@pytest.mark.parametrize("seed", range(40))
def test_upfirdn2d_matches_definition(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    up, down = [1, 1, 2, 3, 4][r(0, 4)], [1, 1, 2, 3][r(0, 3)]
    kind = r(0, 2)
    f = torch.randn(r(1, 12), generator=g) if kind == 0 else (
        torch.outer(torch.rand(r(1, 6), generator=g) + 0.1, torch.rand(r(1, 6), generator=g) + 0.1) if kind == 1
        else torch.randn(r(1, 5), r(1, 5), generator=g))
    fh, fw = (f.shape[0], f.shape[-1])
    while True:  # redraw until the padded, upsampled image is at least as large as the filter
        x = torch.randn(2, 3, r(6, 12), r(6, 12), generator=g)
        pad = [r(-2, 6) for _ in range(4)]
        if x.shape[3] * up + pad[0] + pad[1] >= fw and x.shape[2] * up + pad[2] + pad[3] >= fh:
            break
    gain = [1.0, 4.0, 2.5][r(0, 2)]
    want = naive_upfirdn2d(x, f, up, down, pad, gain)
    got = ops.upfirdn2d(x, f, up=up, down=down, padding=pad, gain=gain)
    assert got.shape == want.shape
    assert maxabs(got, want) < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("up", [1, 2])
def test_modulated_conv_fused_equals_unfused(up):
    g = torch.Generator().manual_seed(up)
    x = torch.randn(3, 8, 7, 7, generator=g)
    w = torch.randn(5, 8, 3, 3, generator=g)
    s = torch.randn(3, 8, generator=g)
    noise = torch.randn(3, 1, 7 * up, 7 * up, generator=g)
    f = ops.setup_filter([1, 3, 3, 1])
    a = ops.modulated_conv2d(x, w, s, noise=noise, up=up, padding=1, resample_filter=f, fused=True)
    b = ops.modulated_conv2d(x, w, s, noise=noise, up=up, padding=1, resample_filter=f, fused=False)
    # the definition, per sample: modulate, demodulate, correlate (up=1) / transposed conv + blur (up=2)
    for i in range(3):
        wi = w * s[i][None, :, None, None]
        wi = wi * (wi.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).rsqrt()
        if up == 1:
            ref = F.conv2d(x[i : i + 1], wi, padding=1)
        else:
            ref = F.conv_transpose2d(x[i : i + 1], wi.transpose(0, 1), stride=2)
            ref = naive_upfirdn2d(ref, f, 1, 1, [1, 1, 1, 1], 4.0)
        ref = ref + noise[i : i + 1]
        assert maxabs(a[i : i + 1], ref) < 1e-4 and maxabs(b[i : i + 1], ref) < 1e-4


def test_bias_act_order():
    x = torch.linspace(-3, 3, 13).reshape(1, 13)
    b = torch.full([13], 0.5)
    want = (F.leaky_relu(x + 0.5, 0.2) * math.sqrt(2)).clamp(-1, 1)
    assert torch.allclose(ops.bias_act(x, b, act="lrelu", clamp=1.0, dim=1), want)
    y = x.clone()
    assert torch.allclose(ops.bias_act(y, b, act="lrelu", clamp=1.0, inplace=True), want) and torch.equal(y, want)


# ----------------------------------------------------------------------------------------------------------------
# rosinality/stylegan2-pytorch checkpoints


def nvidia_to_rosinality(sd: dict) -> dict:
    """Write a NVIDIA skip-architecture G as rosinality's model.py Generator would hold it (its keys and shapes:
    weights [1,O,I,k,k], noise weight [1], ToRGB bias [1,3,1,1], Blur/Upsample kernels = filter x 4, noises)."""
    out = {}
    n_fc = len([k for k in sd if k.startswith("mapping.fc") and k.endswith(".weight")])
    for i in range(n_fc):
        out[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]
    out["input.input"] = sd["synthesis.b4.const"][None]
    res = sorted(int(k.split(".")[1][1:]) for k in sd if k.endswith(".conv1.weight"))
    layers = [("conv1", "synthesis.b4.conv1")]
    for j, r in enumerate(res[1:]):
        layers += [(f"convs.{2 * j}", f"synthesis.b{r}.conv0"), (f"convs.{2 * j + 1}", f"synthesis.b{r}.conv1")]
    for n, (ros, nv) in enumerate(layers):
        out[f"{ros}.conv.weight"] = sd[f"{nv}.weight"][None]
        out[f"{ros}.conv.modulation.weight"] = sd[f"{nv}.affine.weight"]
        out[f"{ros}.conv.modulation.bias"] = sd[f"{nv}.affine.bias"]
        out[f"{ros}.noise.weight"] = sd[f"{nv}.noise_strength"].reshape(1)
        out[f"{ros}.activate.bias"] = sd[f"{nv}.bias"]
        out[f"noises.noise_{n}"] = sd[f"{nv}.noise_const"][None, None]
        if nv.endswith("conv0"):
            out[f"{ros}.conv.blur.kernel"] = sd[f"{nv}.resample_filter"] * 4
    rgbs = [("to_rgb1", "synthesis.b4.torgb")] + [(f"to_rgbs.{j}", f"synthesis.b{r}.torgb") for j, r in enumerate(res[1:])]
    for ros, nv in rgbs:
        out[f"{ros}.conv.weight"] = sd[f"{nv}.weight"][None]
        out[f"{ros}.conv.modulation.weight"] = sd[f"{nv}.affine.weight"]
        out[f"{ros}.conv.modulation.bias"] = sd[f"{nv}.affine.bias"]
        out[f"{ros}.bias"] = sd[f"{nv}.bias"].reshape(1, 3, 1, 1)
        if ros != "to_rgb1":
            out[f"{ros}.upsample.kernel"] = sd[f"synthesis.b4.resample_filter"] * 4
    return {k: v.clone() for k, v in out.items()}


@torch.no_grad()
def test_rosinality_checkpoint(golden, tmp_path):
    name = "sg2_skip_32"
    sd = load_file(str(golden / f"{name}.safetensors"))
    exp = load_file(str(golden / f"{name}.expected.safetensors"))
    inter = load_file(str(golden / f"{name}.intermediates.safetensors"))
    # rosinality has no conv clamp; the golden G's clamp (256) never acts on these values:
    assert max(v.abs().max().item() for v in inter.values()) < 256
    ros = nvidia_to_rosinality(sd)
    desc = check_roundtrip(  # rosinality's train.py checkpoint: a .pt with g_ema and latent_avg
        tmp_path, ros, pth_object={"g_ema": ros, "latent_avg": sd["mapping.w_avg"].clone()}, formats=["pth"],
        run=lambda g: g(exp["z"], None, truncation_psi=0.7, noise_mode="const"), expected=exp["img_full"], tol=TOL,
        facts={"architecture": "StyleGAN2", "config.source_format": "rosinality"})
    g = desc.model
    assert maxabs(g.mapping(exp["z"], None, truncation_psi=0.7), exp["w_psi07"]) < 1e-5
    assert maxabs(g.synthesis(exp["w_psi1"], noise_mode="none"), exp["img_none"]) < TOL


@torch.no_grad()
def test_rosinality_training_checkpoint_without_latent_avg(golden, tmp_path):
    name = "sg2_skip_32"
    sd = load_file(str(golden / f"{name}.safetensors"))
    exp = load_file(str(golden / f"{name}.expected.safetensors"))
    ros = nvidia_to_rosinality(sd)
    path = tmp_path / "train.pt"
    torch.save({"g": ros, "d": {"convs.0.0.weight": torch.zeros(1)}, "g_ema": ros,
                "args": argparse.Namespace(size=32, n_mlp=4, latent=64)}, path)
    sd2, meta = loading.read_state_dict(path)
    desc = registry.detect(sd2, meta, path.name)
    assert desc.config["w_avg_source"] == "estimated"
    g = desc.model
    assert maxabs(g.synthesis(exp["w_psi1"], noise_mode="const"), exp["img_psi1_const"]) < TOL
    # the estimate is the mean mapped w, close to the trained average (which was set off it on purpose)
    assert torch.isfinite(g.w_avg).all() and g.w_avg.shape == (64,)


def test_init_kwargs_conflict_uses_shapes(golden, caplog):
    sd, meta = loading.read_state_dict(golden / "sg2_resnet_16.safetensors")
    meta = {**meta, "init_kwargs": {**meta["init_kwargs"], "architecture": "skip"}}
    desc = registry.detect(sd, meta, "x")
    assert desc.config["architecture"] == "resnet"
    assert "using the weights" in caplog.text
    assert json.dumps(desc.config)  # JSON-serialisable
