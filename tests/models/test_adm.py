"""OpenAI guided-diffusion UNetModel (ADM): equal to the reference's golden outputs (../shared/golden/adm, README
inside) for every config there; config inferred from the weights alone; head settings from metadata, an override,
the released-checkpoint table or the documented defaults."""
from __future__ import annotations

import json
import lzma
import pathlib

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from atelier.models.diffusion import adm, unet2d_io
from atelier.models.errors import InputError, ModelLoadError
from helpers_golden import golden_folder  # noqa: E402 (tests/ is on pytest's pythonpath)

TOL = 1e-4  # the README's suggested single-forward tolerance
NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def golden_adm(shared_dir) -> pathlib.Path:
    d = golden_folder(shared_dir, "adm")
    return d


def weights_file(golden_adm: pathlib.Path, name: str, dest: pathlib.Path) -> pathlib.Path:
    """The golden weights as a plain safetensors file in `dest` (b, c, d are stored xz-compressed)."""
    src = golden_adm / f"adm_{name}.safetensors"
    out = dest / f"adm_{name}.safetensors"
    if src.is_file():
        out.write_bytes(src.read_bytes())
    else:
        with lzma.open(str(src) + ".xz") as f:
            out.write_bytes(f.read())
    return out


def io(golden_adm: pathlib.Path, name: str) -> dict[str, torch.Tensor]:
    return st_load((golden_adm / f"adm_{name}.io.safetensors").read_bytes())


def reference_kwargs(golden_adm: pathlib.Path, name: str) -> dict:
    return json.loads((golden_adm / f"adm_{name}.json").read_text())["unet_model_kwargs"]


def run(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(data["x"], data["t"].float(), data.get("y"))


@pytest.mark.parametrize("name", NAMES)
def test_golden_forward_through_the_manager(name, golden_adm, manager, models_root, one_thread):
    weights_file(golden_adm, name, models_root / "diffusion_models")
    desc = manager.load(f"adm_{name}.safetensors", "diffusion_models", family="diffusion")
    assert desc.architecture == "ADM" and desc.config["heads_source"] == "file metadata / config"
    data = io(golden_adm, name)
    out = run(desc.model, data)
    assert out.shape == data["out"].shape
    diff = (out - data["out"]).abs().max().item()
    print(f"adm_{name}: max abs diff vs guided-diffusion {diff:.3g}")
    assert diff <= TOL
    ref = reference_kwargs(golden_adm, name)
    facts = desc.extra
    assert facts.kind == "ADM" and facts.learned_variance == (ref["out_channels"] == 6)
    assert facts.num_classes == (ref["num_classes"] or 0)
    assert facts.size_multiple == 2 ** (len(ref["channel_mult"]) - 1) and facts.sample_size == ref["image_size"]
    assert facts.schedule.beta_schedule == "linear" and facts.schedule.num_train_timesteps == 1000


@pytest.mark.parametrize("name", NAMES)
def test_config_inferred_from_weights_alone(name, golden_adm, tmp_path):
    sd = st_load(weights_file(golden_adm, name, tmp_path).read_bytes())
    ref = reference_kwargs(golden_adm, name)
    got = adm.infer_config(sd)
    for key in ("in_channels", "model_channels", "out_channels", "num_res_blocks", "num_classes",
                "use_scale_shift_norm", "channel_mult"):
        assert got[key] == ref[key], key
    if len(ref["channel_mult"]) > 1:  # one level: no resamplers, resblock_updown has no trace (and no effect)
        assert got["resblock_updown"] == ref["resblock_updown"]
    assert got["attention_resolutions"] == sorted(ref["attention_resolutions"])  # both as downsampling factors


def test_heads_not_in_weights_default_then_override(golden_adm, manager, models_root, one_thread):
    """adm_d uses num_head_channels=32 and the new order: a bare file gets the defaults (and differs); a partial
    config in its metadata overrides them (and matches)."""
    sd = st_load(weights_file(golden_adm, "d", models_root).read_bytes())
    data = io(golden_adm, "d")
    save_file(sd, str(models_root / "diffusion_models" / "bare.safetensors"))
    bare = manager.load("bare.safetensors", "diffusion_models")
    assert bare.config["heads_source"] == "guided-diffusion defaults" and bare.config["num_heads"] == 4
    assert (run(bare.model, data) - data["out"]).abs().max() > 1e-2  # heads matter: the defaults are wrong here
    cfg = {"num_head_channels": 32, "use_new_attention_order": True}
    save_file(sd, str(models_root / "diffusion_models" / "given.safetensors"), metadata={"config": json.dumps(cfg)})
    given = manager.load("given.safetensors", "diffusion_models")
    assert (run(given.model, data) - data["out"]).abs().max() <= TOL


def test_released_checkpoint_table_supplies_heads():
    """RePaint's 256x256 models: num_head_channels=64, legacy order (shapes only: built on the meta device)."""
    cfg = {"in_channels": 3, "model_channels": 256, "out_channels": 6, "num_res_blocks": 2,
           "attention_resolutions": [8, 16, 32], "channel_mult": [1, 1, 2, 2, 4, 4], "num_classes": None,
           "use_scale_shift_norm": True, "resblock_updown": True, "num_heads": 4, "num_head_channels": 64}
    with torch.device("meta"):
        sd = adm.ADMUNet(cfg).state_dict()
    got, source, known = adm.resolve_config(sd, {})
    assert known == "256x256_diffusion" and source.startswith("released checkpoint table")
    assert (got["num_head_channels"], got["use_new_attention_order"], got["image_size"]) == (64, False, 256)
    assert got["attention_resolutions"] == [8, 16, 32] and got["channel_mult"] == [1, 1, 2, 2, 4, 4]


def test_class_labels_and_detection(golden_adm, tmp_path):
    sd = st_load(weights_file(golden_adm, "b", tmp_path).read_bytes())
    desc = adm.load(sd, {})
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 500.0])
    with pytest.raises(InputError, match="class-conditional"):
        desc.model(x, t)
    with pytest.raises(InputError, match=r"labels in \[0,10\)"):
        desc.model(x, t, torch.tensor([3, 10]))
    assert adm.detect(sd, {}) and not unet2d_io.detect(sd, {})
    import diffusers

    u = diffusers.UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                              up_block_types=("UpBlock2D",) * 2).state_dict()
    assert unet2d_io.detect(u, {}) and not adm.detect(u, {})


def test_weights_not_matching_their_layout(golden_adm, tmp_path):
    sd = st_load(weights_file(golden_adm, "a", tmp_path).read_bytes())
    sd["middle_block.1.proj_out.weight"] = torch.zeros(8, 8, 1)
    with pytest.raises(ModelLoadError, match=r"middle_block\.1\.proj_out\.weight"):
        adm.load(sd, {})
    sd2 = {k: v for k, v in st_load(weights_file(golden_adm, "a", tmp_path).read_bytes()).items()}
    sd2["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(4, 4)
    with pytest.raises(ModelLoadError, match="SpatialTransformer"):
        adm.load(sd2, {})
