"""StyleGAN3 (T and R) against NVIDIA's own outputs and derived hyper-parameters in shared/golden/stylegan."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from atelier.models import loading, registry
from atelier.models.errors import InputError
from atelier.models.gan import ops
from atelier.models.gan.latent import style_mix
from harness import check_roundtrip  # tests/ is on pytest's pythonpath

SG3 = ["sg3_t_32", "sg3_r_32", "sg3_t_cond_clamp_16"]
TOL = 1e-4  # max abs, the goal for every golden tensor


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def summary(golden):
    return json.loads((golden / "golden_summary.json").read_text())["configs"]


def load(golden, name, meta_override=None):
    sd, meta = loading.read_state_dict(golden / f"{name}.safetensors")
    if meta_override is not None:
        meta = meta_override
    desc = registry.detect(sd, meta, f"{name}.safetensors")
    exp = load_file(str(golden / f"{name}.expected.safetensors"))
    with safe_open(str(golden / f"{name}.expected.safetensors"), "pt") as f:
        emeta = f.metadata()
    return desc, exp, emeta, sd


def maxabs(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", SG3)
@torch.no_grad()
def test_golden(golden, summary, name, tmp_path):
    """The golden file written again and loaded through a fresh manager (the shared round trip), then every tensor."""
    sd = load_file(str(golden / f"{name}.safetensors"))
    with safe_open(str(golden / f"{name}.safetensors"), "pt") as f:
        raw_meta = f.metadata()
    exp = load_file(str(golden / f"{name}.expected.safetensors"))
    with safe_open(str(golden / f"{name}.expected.safetensors"), "pt") as f:
        emeta = f.metadata()
    kw = summary[name]["init_kwargs"]
    radial = kw.get("use_radial_filters", False)
    c = exp["c"] if exp["c"].numel() else None
    desc = check_roundtrip(
        tmp_path, sd, metadata=raw_meta, formats=["safetensors"], folder="gans", family="gan", tol=TOL,
        run=lambda g: g(exp["z"], c, truncation_psi=0.7, noise_mode="const"), expected=exp["img_full"],
        facts={"family": "gan", "purpose": "Generator", "architecture": "StyleGAN3-R" if radial else "StyleGAN3-T",
               "model.z_dim": kw["z_dim"], "model.c_dim": kw["c_dim"], "model.w_dim": kw["w_dim"],
               "model.img_resolution": kw["img_resolution"], "model.img_channels": kw["img_channels"],
               "model.num_ws": summary[name]["num_ws"]})
    g = desc.model
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
    # the user transform of the Fourier input, as gen_images.py sets it
    g.synthesis.input.transform.copy_(exp["input_transform"])
    try:
        out["img_transform"] = g.synthesis(exp["w_psi07"], noise_mode="const")
    finally:
        g.synthesis.input.transform.copy_(torch.eye(3))
    errs = {key: maxabs(v, exp[key]) for key, v in out.items()}
    bad = {key: e for key, e in errs.items() if e > TOL}
    assert not bad, f"max abs errors above {TOL}: {bad}"


def test_layer_plan_matches_nvidia(golden, summary):
    """Sizes, rates, up/down factors and (negative) paddings recomputed from init_kwargs equal NVIDIA's."""
    for name in SG3:
        desc, _, _, _ = load(golden, name)
        syn = desc.model.synthesis
        want = summary[name]["sg3_layers"]
        assert syn.layer_names == list(want)
        for layer_name, facts in want.items():
            layer = getattr(syn, layer_name)
            got = {"padding": layer.padding, "up_factor": layer.up_factor, "down_factor": layer.down_factor,
                   "in_size": [layer.in_size] * 2, "out_size": [layer.out_size] * 2, "down_radial": layer.down_radial}
            assert got == {k: facts[k] for k in got}, layer_name
        inp = summary[name]["sg3_input"]
        assert (syn.input.channels, list(syn.input.size), syn.input.sampling_rate, syn.input.bandwidth) == (
            inp["channels"], inp["size"], inp["sampling_rate"], inp["bandwidth"])


def test_filter_design_matches_stored_filters(golden, summary):
    """Our Kaiser sinc / jinc design (no scipy) reproduces the filters NVIDIA's scipy code stored."""
    for name in ("sg3_t_32", "sg3_r_32"):
        sd = load_file(str(golden / f"{name}.safetensors"))
        for layer_name, f in summary[name]["sg3_layers"].items():
            if f["up_taps"] > 1:
                up = ops.design_lowpass_filter(f["up_taps"], f["in_cutoff"], f["in_half_width"] * 2, f["tmp_sampling_rate"])
                assert (up - sd[f"synthesis.{layer_name}.up_filter"]).abs().max() < 1e-7
            if f["down_taps"] > 1:
                down = ops.design_lowpass_filter(f["down_taps"], f["out_cutoff"], f["out_half_width"] * 2,
                                                 f["tmp_sampling_rate"], radial=f["down_radial"])
                assert (down - sd[f"synthesis.{layer_name}.down_filter"]).abs().max() < 1e-7


@torch.no_grad()
def test_loads_without_init_kwargs(golden):
    """A bare state dict (no metadata): the structure comes from keys and shapes, NVIDIA's defaults fill the rest."""
    desc, exp, _, _ = load(golden, "sg3_r_32", meta_override={})
    assert desc.architecture == "StyleGAN3-R"
    assert maxabs(desc.model(exp["z"][:2], None, truncation_psi=0.7), exp["img_full"][:2]) < TOL


@torch.no_grad()
def test_batch_independent(golden):
    desc, exp, _, _ = load(golden, "sg3_t_cond_clamp_16")
    g = desc.model
    whole = g.synthesis(exp["w_psi07"])
    g.synthesis.cpu_chunk_bytes = 1 << 40  # one chunk: the shared-weight (unfused) path at batch 4
    try:
        assert maxabs(g.synthesis(exp["w_psi07"]), whole) < 1e-6
    finally:
        del g.synthesis.cpu_chunk_bytes
    for i in range(2):
        assert maxabs(g.synthesis(exp["w_psi07"][i : i + 1]), whole[i : i + 1]) < 1e-6


@torch.no_grad()
def test_bad_inputs_are_named(golden):
    desc, exp, _, _ = load(golden, "sg3_t_cond_clamp_16")
    g = desc.model
    with pytest.raises(InputError, match=r"c: expected \[4,4\]"):
        g.mapping(exp["z"], exp["c"][:, :3])
    with pytest.raises(InputError, match=r"ws: expected \[B,16,64\]"):
        g.synthesis(exp["w_psi07"][:, :15])
