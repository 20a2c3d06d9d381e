"""diffusers UNet2DModel: equal to diffusers' own class on the same weights for every block type and option; every file
format through the manager; bad files give errors naming what is wrong."""
from __future__ import annotations

import json

import pytest
import torch

from atelier.models import cpu_conv
from atelier.models.cpu_conv import NNPACKConv2d, nnpack_usable
from atelier.models.diffusion import unet2d_io
from atelier.models.diffusion.facts import TrainingSchedule
from atelier.models.errors import InputError, ModelLoadError
from harness import check_roundtrip  # tests/ is on pytest's pythonpath

diffusers = pytest.importorskip("diffusers")
TOL = 1e-5

# Tiny configs that together cover every block type and option (diffusers' constructor names).
CONFIGS = {
    "mixed_blocks": dict(  # all three down and up block types; attention in the middle level; head dim 4
        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "scale_shift_classes": dict(  # scale_shift, resnet resamplers in attention blocks, classes, no-default flags
        block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, resnet_time_scale_shift="scale_shift",
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        downsample_type="resnet", upsample_type="resnet", num_class_embeds=5, flip_sin_to_cos=False, freq_shift=1,
        downsample_padding=0, attention_head_dim=None, mid_block_scale_factor=1.414, norm_eps=1e-6),
    "fourier_no_mid_attention": dict(  # Fourier time embedding, mid block without attention, 4 -> 8 channels
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=2, time_embedding_type="fourier",
        add_attention=False, in_channels=4, out_channels=8, time_embedding_dim=24,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    "no_mid_timestep_classes": dict(  # no mid block, class_embed_type "timestep", attention at the top level
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, mid_block_type=None,
        class_embed_type="timestep", center_input_sample=True, attention_head_dim=2,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D")),
    "defaults_inferable": dict(  # only what shapes tell + diffusers defaults: the bare state dict case
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
}


def reference(name: str, seed: int = 0):
    """diffusers' UNet2DModel with random, non-trivial weights (GroupNorm affine perturbed too)."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(sample_size=16, **CONFIGS[name]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def inputs(ref, batch: int = 3):
    cfg = ref.config
    x = torch.randn(batch, cfg.in_channels, 16, 16)
    if cfg.time_embedding_type == "fourier":
        t = torch.tensor([0.01, 1.0, 50.0])[:batch]
    else:
        t = torch.tensor([0.0, 499.5, 999.0])[:batch]
    y = None
    if cfg.num_class_embeds:
        y = torch.tensor([0, 4, 2])[:batch]
    elif cfg.class_embed_type == "timestep":
        y = torch.tensor([1, 7, 3])[:batch]
    return x, t, y


def assert_same(desc, ref, batch: int = 3) -> float:
    x, t, y = inputs(ref, batch)
    with torch.no_grad():
        want = ref(x, t, y).sample
        got = desc.model(x, t, y)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= TOL * max(1.0, want.abs().max().item()), diff
    return diff


def load(manager, rel: str):
    return manager.load(rel, "diffusion_models", family="diffusion")


# ---------------------------------------------------------------------------------------------------------------
# every block type and option, from a diffusers folder (config.json beside the weights)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_folder_safetensors_equals_diffusers(name, manager, models_root, one_thread):
    ref = reference(name)
    ref.save_pretrained(models_root / "diffusion_models" / name / "unet", safe_serialization=True)
    desc = load(manager, f"{name}/unet/diffusion_pytorch_model.safetensors")
    assert (desc.family, desc.architecture) == ("diffusion", "UNet2DModel")
    facts = desc.extra
    assert facts.kind == "UNet2DModel" and facts.in_channels == ref.config.in_channels
    assert facts.size_multiple == 2 ** (len(ref.config.block_out_channels) - 1)
    assert facts.num_classes == (ref.config.num_class_embeds or 0)
    assert facts.time_input == ("sigma" if ref.config.time_embedding_type == "fourier" else "timestep")
    assert desc.config["config_source"].endswith("config.json)")
    assert_same(desc, ref)


def test_folder_bin_with_scheduler(manager, models_root, one_thread):
    ref = reference("scale_shift_classes")
    folder = models_root / "diffusion_models" / "ddpm"
    ref.save_pretrained(folder / "unet", safe_serialization=False)
    sched = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="v_prediction", clip_sample=False)
    sched.save_pretrained(folder / "scheduler")
    desc = load(manager, "ddpm/unet/diffusion_pytorch_model.bin")
    assert_same(desc, ref)
    s = desc.extra.schedule
    assert (s.num_train_timesteps, s.beta_schedule, s.prediction_type, s.clip_sample) == (
        500, "squaredcos_cap_v2", "v_prediction", False)


def test_sibling_scheduler_config_and_learned_range(manager, models_root, one_thread):
    cfg = dict(CONFIGS["defaults_inferable"], out_channels=6)
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**cfg).eval()
    folder = models_root / "diffusion_models" / "lr"
    ref.save_pretrained(folder, safe_serialization=True)
    sc = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 variance_type="learned_range")
    sc.save_config(folder)  # scheduler_config.json beside the weights
    desc = load(manager, "lr/diffusion_pytorch_model.safetensors")
    assert desc.extra.learned_variance and desc.out_channels == 6
    s = desc.extra.schedule
    assert (s.beta_schedule, s.beta_start, s.beta_end) == ("scaled_linear", 0.00085, 0.012)


# ---------------------------------------------------------------------------------------------------------------
# the pack's own single-file format and bare state dicts


def test_single_safetensors_with_metadata_roundtrip(manager, models_root, one_thread):
    ref = reference("scale_shift_classes")
    schedule = TrainingSchedule(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    path = models_root / "diffusion_models" / "mine.safetensors"
    unet2d_io.save_unet(path, ref, dict(ref.config), schedule, latent=False)
    assert not list(path.parent.glob("*.tmp-*"))
    desc = load(manager, "mine.safetensors")
    assert desc.extra.schedule == schedule and desc.extra.latent is False
    assert desc.config["config_source"] == "config (metadata)" and desc.config["guessed"] == []
    assert_same(desc, ref)
    # what we write diffusers reads back too (its config names)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    again = diffusers.UNet2DModel.from_config(json.loads(meta["config"]))
    assert set(again.state_dict()) == set(ref.state_dict())


def test_bare_state_dict_infers_config(tmp_path, one_thread):
    """The shared round trip (safetensors and .pth through a fresh manager): the layout from shapes alone."""
    ref = reference("defaults_inferable")
    x, t, _ = inputs(ref)
    with torch.no_grad():
        want = ref(x, t).sample
    desc = check_roundtrip(tmp_path, ref.state_dict(), run=lambda m: m(x, t), expected=want,
                           folder="diffusion_models", family="diffusion", tol=TOL,
                           facts={"architecture": "UNet2DModel", "config.config_source": "config (inferred from shapes)",
                                  "config.down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                                  "extra.size_multiple": 2, "extra.learned_variance": False})
    assert "flip_sin_to_cos" in desc.config["guessed"]


@pytest.mark.parametrize("name", ["mixed_blocks", "scale_shift_classes", "fourier_no_mid_attention",
                                  "no_mid_timestep_classes"])
def test_bare_state_dict_with_partial_config_override(name, manager, models_root, one_thread):
    """Shapes give the layout; what they cannot tell comes from a partial config in the metadata."""
    from safetensors.torch import save_file

    ref = reference(name)
    not_in_shapes = ("flip_sin_to_cos", "freq_shift", "downsample_padding", "attention_head_dim", "norm_num_groups",
                     "norm_eps", "mid_block_scale_factor", "center_input_sample")
    partial = {k: ref.config[k] for k in not_in_shapes}
    path = models_root / "diffusion_models" / f"{name}.safetensors"
    save_file(ref.state_dict(), str(path), metadata={"config": json.dumps(partial)})
    desc = load(manager, f"{name}.safetensors")
    want = list(ref.config.down_block_types)
    if want[-1] == "ResnetDownsampleBlock2D":  # without a resampler it is DownBlock2D (documented; same maths)
        want[-1] = "DownBlock2D"
    assert desc.config["down_block_types"] == want
    assert desc.config["up_block_types"] == list(ref.config.up_block_types)
    assert_same(desc, ref)


def test_legacy_attention_keys(manager, models_root, one_thread):
    ref = reference("defaults_inferable")
    ren = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, old in ren.items():
            k = k.replace(new, old)
        sd[k] = v
    assert any(".proj_attn." in k for k in sd)
    torch.save(sd, models_root / "diffusion_models" / "legacy.pth")
    assert_same(load(manager, "legacy.pth"), ref)


def test_half_precision_runs(one_thread, tmp_path):
    """fp16/bf16 flags: the model runs in bfloat16 on the CPU close to fp32 (attention softmax in fp32)."""
    ref = reference("mixed_blocks")
    path = tmp_path / "m.safetensors"
    unet2d_io.save_unet(path, ref, dict(ref.config))
    from atelier.models.manager import inspect_file

    desc = inspect_file(str(path))
    assert desc.supports_half and desc.supports_bfloat16 and desc.bytes_per_pixel > 0
    x, t, _ = inputs(ref)
    with torch.no_grad():
        full = desc.model(x, t)
        half = desc.model.to(torch.bfloat16)(x.bfloat16(), t).float()
    assert desc.model.time_proj.freqs.dtype == torch.float32
    assert (half - full).abs().max() < 0.1 * full.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_config_not_matching_weights_is_an_error(manager, models_root):
    ref = reference("mixed_blocks")
    folder = models_root / "diffusion_models" / "bad"
    ref.save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_out_channels"] = [8, 16, 32]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"does not match the weights.*shape differs"):
        load(manager, "bad/diffusion_pytorch_model.safetensors")


def test_unknown_block_type_is_named(manager, models_root):
    ref = reference("mixed_blocks")
    folder = models_root / "diffusion_models" / "cross"
    ref.save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["down_block_types"][1] = "CrossAttnDownBlock2D"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="CrossAttnDownBlock2D"):
        load(manager, "cross/diffusion_pytorch_model.safetensors")


def test_cross_attention_weights_are_named(manager, models_root):
    sd = reference("mixed_blocks").state_dict()
    sd["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(16, 16)
    torch.save(sd, models_root / "diffusion_models" / "sd.pth")
    with pytest.raises(ModelLoadError, match=r"down_blocks\.1 is a CrossAttn"):
        load(manager, "sd.pth")


def test_unsupported_schedule_is_named(manager, models_root):
    ref = reference("defaults_inferable")
    folder = models_root / "diffusion_models" / "sig"
    ref.save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "sigmoid"}))
    with pytest.raises(ModelLoadError, match="sigmoid"):
        load(manager, "sig/diffusion_pytorch_model.safetensors")


def test_class_labels_checked(tmp_path):
    ref = reference("scale_shift_classes")
    desc = unet2d_io.load(ref.state_dict(), {"config": dict(ref.config)})
    x, t, _ = inputs(ref)
    with pytest.raises(InputError, match="class-conditional"):
        desc.model(x, t)
    with pytest.raises(InputError, match=r"labels in \[0,5\)"):
        desc.model(x, t, torch.tensor([0, 5, 1]))
    with pytest.raises(InputError, match="one timestep or 3"):
        desc.model(x, t[:2], torch.tensor([0, 1, 1]))
    plain = reference("defaults_inferable")
    desc = unet2d_io.load(plain.state_dict(), {})
    with pytest.raises(InputError, match="unconditional"):
        desc.model(x, t, torch.tensor([0, 1, 2]))


def test_detector_claims_only_unets():
    assert unet2d_io.detect(reference("mixed_blocks").state_dict(), {})
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).state_dict()
    assert not unet2d_io.detect(vae, {})


def test_gradients_equal_diffusers(one_thread):
    """Trainable as well: the same weight gradients as diffusers' model (in-place ops only without autograd)."""
    ref = reference("scale_shift_classes")
    desc = unet2d_io.load(ref.state_dict(), {"config": dict(ref.config)})
    ours = desc.model.train().requires_grad_(True)
    ref.train()
    x, t, y = inputs(ref)
    (ours(x, t, y) ** 2).mean().backward()
    (ref(x, t, y).sample ** 2).mean().backward()
    theirs = dict(ref.named_parameters())
    # the key bias's true gradient is 0 (softmax ignores a constant added to every key): both hold rounding noise
    worst = max((p.grad - theirs[k].grad).abs().max().item() / (theirs[k].grad.abs().max().item() + 1e-12)
                for k, p in ours.named_parameters()
                if p.requires_grad and theirs[k].requires_grad and not k.endswith("to_k.bias"))
    assert worst < 1e-4


@pytest.mark.skipif(not nnpack_usable(), reason="this PyTorch build has no working NNPACK")
def test_one_cpu_thread_takes_nnpack_and_equals_diffusers(one_thread, monkeypatch):
    """On a one-thread CPU the loader gives the UNet NNPACK layers (cpu_conv.use_nnpack_alone); at 32x32 the top
    level's convolutions run through NNPACK (counted) and the output still equals diffusers' to float rounding."""
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(a[0].shape) or nnpack(*a))
    ref = reference("defaults_inferable")
    desc = unet2d_io.load(ref.state_dict(), {"config": dict(ref.config)})
    assert any(type(m) is NNPACKConv2d for m in desc.model.modules())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10.0, 900.0])
    with torch.inference_mode():
        want = ref(x, t).sample
        got = desc.model(x, t)
    assert calls and all(s[-1] >= cpu_conv.MIN_SIDE and s[0] * s[-2] * s[-1] >= cpu_conv.MIN_CALL_PIXELS
                         for s in calls)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_several_threads_take_winograd_and_equal_diffusers(monkeypatch):
    """With more than one thread NNPACK's pool would fight PyTorch's between layers: no NNPACK layers; the 3x3
    convolutions of at least 64 channels become Winograd layers (cpu_conv.use_winograd, PyTorch's own pool), they run
    on the 16x16 level at batch 4 (counted); inside a node run the 8x8 level's calls, too small for Winograd, take
    oneDNN with packed weights (counted); and the UNet still equals diffusers' to float rounding both ways."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(sample_size=16, block_out_channels=(64, 64), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        desc = unet2d_io.load(ref.state_dict(), {"config": dict(ref.config)})
        calls = []
        orig = cpu_conv.winograd_conv3x3
        monkeypatch.setattr(cpu_conv, "winograd_conv3x3", lambda x, *a: calls.append(x.shape) or orig(x, *a))
        packed = []
        orig_packed = cpu_conv.packed_conv
        monkeypatch.setattr(cpu_conv, "packed_conv", lambda x, *a: packed.append(x.shape) or orig_packed(x, *a))
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([10.0, 300.0, 600.0, 900.0])  # 64 tiles
        with torch.inference_mode():
            want = ref(x, t).sample
            got = desc.model(x, t)
            assert not packed  # outside a run
            with cpu_conv.scratch_released(desc.model):
                for _ in range(2):
                    got_in_run = desc.model(x, t)
    finally:
        torch.set_num_threads(n)
    assert not any(type(m) is NNPACKConv2d for m in desc.model.modules())
    assert sum(type(m) is cpu_conv.WinogradConv2d for m in desc.model.modules()) > 0
    assert calls and all(s[-1] >= cpu_conv.WINOGRAD_MIN_SIDE for s in calls)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert (got_in_run - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    if cpu_conv.packing_usable():
        assert packed and all(s[-1] < cpu_conv.WINOGRAD_MIN_SIDE for s in packed)
