"""Upscale nodes on the real shared weights: spandrel as the reference, PSNR against the README's figures, tiled
against untiled, target sizes, alpha, channel adaptation, progress and interruption, and bad input."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spandrel  # a runtime dependency of the pack: missing is a failure, not a skip

from atelier.models import compact_cpu, cpu_conv, host  # noqa: E402
from atelier.models.errors import AtelierError, InputError, UnknownModelError, WrongFamilyError  # noqa: E402
from atelier.models.loading import read_state_dict  # noqa: E402
from atelier.models.upscale import upscale as up  # noqa: E402
from atelier.nodes.upscale import AtelierLoadUpscaler, AtelierUpscaleImage  # noqa: E402

FILES = {
    "compact.pth": "realesr-animevideov3/realesr-animevideov3.pth",
    "craft_x4.pth": "craft/craft_x4.pth",
    "DCTLSA_X2.pt": "dctlsa/DCTLSA_X2.pt",
    "dncnn_25.pth": "dncnn/dncnn_25.pth",
}
SEAM_TOL = 1 / 255


@pytest.fixture
def models(shared_dir, manager, models_root):
    for name, rel in FILES.items():
        shutil.copy(shared_dir / "weights" / rel, models_root / "upscale_models" / name)
    return manager


def _load(name: str):
    return AtelierLoadUpscaler().load(name)[0]


def _reference(shared_dir, name: str):
    """spandrel's own descriptor for the same file (state dict read by our safe reader: spandrel never opens it)."""
    sd, _ = read_state_dict(shared_dir / "weights" / FILES[name])
    return spandrel.ModelLoader().load_from_state_dict(sd).eval()


def _run(model, image, **kw):
    return AtelierUpscaleImage().upscale(model, image, **kw)[0]


def _astronaut(size: int = 240) -> torch.Tensor:  # [1,3,size,size], the centre crop of the README figures
    from skimage import data

    o = (512 - size) // 2
    return torch.from_numpy(data.astronaut()[o : o + size, o : o + size].copy()).float().div(255).permute(2, 0, 1)[None]


def _img(x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> IMAGE
    return x.movedim(1, -1).contiguous()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


# ---------------------------------------------------------------- loading


def test_loader_output_is_a_core_upscale_model(models, shared_dir):
    m = _load("compact.pth")
    assert isinstance(m, spandrel.ImageModelDescriptor) and m.scale == 4
    assert _load("compact.pth") is m  # cached by the manager
    x = torch.rand(1, 3, 20, 24)
    with torch.inference_mode():  # the way core's ImageUpscaleWithModel calls it
        # NNPACK's Winograd convolutions on the CPU: equal to PyTorch's within float rounding
        assert (m(x) - _reference(shared_dir, "compact.pth")(x)).abs().max().item() < 0.02 / 255


def test_core_upscale_model_is_adopted(models, shared_dir):
    core = _reference(shared_dir, "dncnn_25.pth")
    x = torch.rand(1, 32, 40, 3)
    out = _run(core, x)
    with torch.inference_mode():  # a grey model on RGB: each channel on its own, as core's object computes it
        want = core(x.movedim(-1, 1).reshape(3, 1, 32, 40)).reshape(1, 3, 32, 40).movedim(1, -1)
    assert out.shape == x.shape and (out - want).abs().max().item() <= 1e-5
    n = len(models.cached())
    _run(core, x)
    assert len(models.cached()) == n and any(d.model is core.model for d in models.cached())


def test_not_an_upscaler_is_a_clear_error(models, shared_dir, models_root):
    shutil.copy(shared_dir / "weights" / "taef2" / "taef2_encoder.pth", models_root / "upscale_models" / "taef2.pth")
    with pytest.raises((WrongFamilyError, UnknownModelError), match="taef2.pth"):
        _load("taef2.pth")
    with pytest.raises(InputError, match="upscale_model"):
        _run("not a model", torch.rand(1, 8, 8, 3))


# ---------------------------------------------------------------- quality (README reference figures)


def test_craft_x4_psnr(models, shared_dir):
    hr = _astronaut()
    lr = F.interpolate(hr, size=(60, 60), mode="bicubic", antialias=True).clamp(0, 1)
    out = _run(_load("craft_x4.pth"), _img(lr)).movedim(-1, 1)
    assert _psnr(out, hr) >= 26.4
    with torch.inference_mode():
        assert (out - _reference(shared_dir, "craft_x4.pth")(lr)).abs().max() <= SEAM_TOL


def test_dctlsa_x2_psnr(models):
    hr = _astronaut()
    lr = F.interpolate(hr, size=(120, 120), mode="bicubic", antialias=True).clamp(0, 1)
    out = _run(_load("DCTLSA_X2.pt"), _img(lr)).movedim(-1, 1)
    assert _psnr(out, hr) >= 32.4


def test_dncnn_psnr_on_noisy_camera(models):
    from skimage import data

    cam = torch.from_numpy(data.camera()).float().div(255)[None, None]  # [1,1,512,512]
    noisy = cam + torch.randn(cam.shape, generator=torch.Generator().manual_seed(0)) * 25 / 255
    out = _run(_load("dncnn_25.pth"), _img(noisy)).movedim(-1, 1)
    assert _psnr(noisy.clamp(0, 1), cam) < 21 and _psnr(out, cam) >= 30.2


# ---------------------------------------------------------------- tiling


@pytest.mark.parametrize("name,tile", [("compact.pth", 64), ("dncnn_25.pth", 48)])
def test_tiled_equals_untiled(models, shared_dir, name, tile):
    ref_model = _reference(shared_dir, name)
    x = _astronaut(160)[..., :, :150]
    if ref_model.input_channels == 1:
        x = x.mean(1, keepdim=True)
    with torch.inference_mode():
        ref = ref_model(x)  # spandrel, whole image, PyTorch's own convolutions
    calls = []
    model = _load(name)
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    out = _run(model, _img(x), tile_size=tile).movedim(-1, 1)
    hook.remove()
    assert len(calls) > 4  # really tiled
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= SEAM_TOL


def test_automatic_cpu_tiles_are_rectangles_and_equal_untiled(models, shared_dir):
    """Above the CPU pixel cap the plan tiles a local model by itself (DnCNN: NNPACK layers in spandrel's forward),
    in rectangles shaped for NNPACK's rows (tiling.plan_tiles: full-width strips here), and the result still equals
    the untiled call."""
    ref_model = _reference(shared_dir, "dncnn_25.pth")
    desc = models.load("dncnn_25.pth", "upscale_models")
    assert desc.extra.scope == "local" and compact_cpu.call_bytes_per_pixel(desc.model) is None
    cap = up.CPU_TILE_PIXELS * 64 / max(1, desc.extra.features)
    x = _astronaut(208).mean(1, keepdim=True)
    x = torch.nn.functional.interpolate(x, size=(int(cap // 400) + 60, 400), mode="bilinear")  # [1,1,~300,400]
    plan = up.tile_plan(desc, x.shape[2], x.shape[3], 1, torch.device("cpu"), torch.float32, None, models)
    if cpu_conv.nnpack_usable():
        assert plan.tile == (plan.tile[0], 400) and plan.tile[0] < x.shape[2]
    with torch.inference_mode():
        ref = ref_model(x)
    calls = []
    hook = desc.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = up.run_model(desc, x, manager=models)
    finally:
        hook.remove()
    assert len(calls) >= 2 and out.shape == ref.shape and (out - ref).abs().max().item() <= SEAM_TOL


@pytest.mark.skipif(not cpu_conv.nnpack_usable(), reason="this PyTorch build has no working NNPACK")
def test_larger_cpu_calls_only_where_the_output_outweighs_them(models, monkeypatch):
    """Automatic CPU tiles stay within the squares' call size while the memory larger calls would add is more than
    half the output; beyond that (large images) calls grow up to CPU_REUSE_PIXELS, never past it, so every 64-channel
    activation stays under glibc's 32 MiB reuse threshold. (A 64-feature x4 local model without Compact's strips:
    Compact with them switched off.)"""
    desc = models.load("compact.pth", "upscale_models")
    monkeypatch.setattr(up, "_strip_bytes_per_pixel", lambda *a: None)
    f = desc.extra.features
    reuse = up.CPU_REUSE_PIXELS * 64 / f
    assert up.CPU_REUSE_PIXELS * 64 * 4 < 32 << 20
    sizes = {}
    for side in (2, 3, 4, 6, 8):  # multiples of the small-call cap's side
        n = int(side * (up.CPU_TILE_PIXELS * 64 / f) ** 0.5)
        plan = up.tile_plan(desc, n, n, 1, torch.device("cpu"), torch.float32, None, models)
        th, tw = plan.tile if isinstance(plan.tile, tuple) else (plan.tile, plan.tile)
        sizes[side] = th * tw
        assert th * tw <= reuse
    assert sizes[2] <= up.CPU_TILE_PIXELS * 64 / f  # 4x the cap: the output is small next to larger calls
    assert sizes[8] > up.CPU_TILE_PIXELS * 64 / f  # 64x: larger calls


@pytest.mark.skipif(not cpu_conv.nnpack_usable(), reason="this PyTorch build has no working NNPACK")
def test_compact_runs_large_images_whole_in_strips(models, shared_dir, monkeypatch):
    """Compact on the CPU: a large image is one call (no tiles, no context recomputed), run in row strips inside
    it (compact_cpu.strip_rows), and equals spandrel's whole-image forward; a pass never plans more than the CPU call
    budget, so a larger image still tiles."""
    from atelier.models import budget

    ref_model = _reference(shared_dir, "compact.pth")
    desc = models.load("compact.pth", "upscale_models")
    per_px = compact_cpu.call_bytes_per_pixel(desc.model)
    assert per_px == 4 * (64 + 3 * 16)
    x = torch.nn.functional.interpolate(_astronaut(240), size=(301, 420), mode="bilinear")  # 126 K px: 4 strips
    rows = compact_cpu.strip_rows(301, 420, desc.extra.features)
    assert rows < 301 and 301 % rows != 0  # the last strip shorter, zero rows beyond the image
    plan = up.tile_plan(desc, 301, 420, 1, torch.device("cpu"), torch.float32, None, models)
    assert plan.tile == 420 and plan.context == 0  # one call
    shapes = []
    conv = compact_cpu.conv3x3
    monkeypatch.setattr(compact_cpu, "conv3x3", lambda t, *a: shapes.append(tuple(t.shape)) or conv(t, *a))
    out = up.run_model(desc, x, manager=models)
    with torch.inference_mode():
        ref = ref_model(x)
    assert set(shapes) == {(1, 3, rows + 2, 420), (1, 64, rows + 2, 420)}
    assert len(shapes) == 18 * math.ceil(301 / rows)
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= 0.05 / 255
    assert out.movedim(1, -1).is_contiguous()  # channels last: the node's IMAGE is a view
    side = math.isqrt(int(budget.call_budget(models.activation_budget(desc), torch.device("cpu")) / per_px)) + 64
    plan = up.tile_plan(desc, side, side, 1, torch.device("cpu"), torch.float32, None, models)
    t = plan.tile if isinstance(plan.tile, int) else max(plan.tile)
    assert t < side and plan.context == desc.receptive_field


def test_compact_strip_rows():
    """Strips: equal heights of about STRIP_PIXELS and about STRIP_MIN_ROWS rows at least where the image allows,
    every strip's activation under glibc's reuse threshold; small images whole."""
    assert compact_cpu.strip_rows(256, 256, 64) == 256
    assert compact_cpu.strip_rows(512, 512, 64) == 64
    assert compact_cpu.strip_rows(1024, 1024, 64) == 64
    assert compact_cpu.strip_rows(512, 512, 32) == 128  # half the features: the same bytes per strip
    for h, w in [(600, 600), (1000, 1000), (140, 900), (720, 1280), (1080, 1920), (100, 4096), (4096, 100)]:
        r = compact_cpu.strip_rows(h, w, 64)
        n = math.ceil(h / r)
        assert 2 <= n and (n - 1) * r < h and r * w <= compact_cpu.STRIP_MAX_PIXELS
        assert r >= 0.75 * compact_cpu.STRIP_MIN_ROWS or r * w > compact_cpu.STRIP_MAX_PIXELS / 2


def test_too_little_context_shows_seams(models, shared_dir):
    """The seam check can fail: the same tiles with the context cut to 2 px differ visibly from untiled."""
    desc = models.load("compact.pth", "upscale_models")
    x = _astronaut(160)
    ref = up.run_model(desc, x, manager=models)
    saved = desc.receptive_field
    desc.receptive_field = 2
    try:
        bad = up.run_model(desc, x, tile=64, manager=models)
    finally:
        desc.receptive_field = saved
    assert (bad - ref).abs().max().item() > 4 * SEAM_TOL


def test_progress_per_tile_and_interruption(models, monkeypatch):
    class Interrupted(Exception):
        pass

    updates: list[int] = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append(value)

    def check():
        if len(updates) >= 3:
            raise Interrupted

    monkeypatch.setattr(host, "progress_bar", lambda total: Bar(total))
    monkeypatch.setattr(host, "throw_if_interrupted", check)
    model = _load("compact.pth")
    calls = []
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(Interrupted):
            _run(model, torch.rand(1, 128, 128, 3), tile_size=48)
    finally:
        hook.remove()
    assert updates == [1, 2, 3] and len(calls) == 3  # stopped between tiles, not at the end


@pytest.mark.skipif(not cpu_conv.nnpack_usable(), reason="this PyTorch build has no working NNPACK")
def test_one_stripped_call_shows_progress_per_layer_and_stops_inside(models, monkeypatch):
    """A large image is one Compact call (strips): the node's bar advances per layer (18), and Cancel stops the call
    between strips, long before its end; with tiles, only the tiles' bar shows (the test above)."""
    class Interrupted(Exception):
        pass

    updates: list[tuple[int, int]] = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, self.total))

    monkeypatch.setattr(host, "progress_bar", lambda total: Bar(total))
    model = _load("compact.pth")
    image = torch.rand(1, 330, 400, 3)  # 132 K px: one call in strips
    rows = compact_cpu.strip_rows(330, 400, 64)
    assert rows < 330
    _run(model, image)
    assert updates == [(k, 18) for k in range(1, 19)]
    checks = []

    def check():
        checks.append(1)
        if len(checks) > 10:
            raise Interrupted

    monkeypatch.setattr(host, "throw_if_interrupted", check)
    convs = []
    conv = compact_cpu.conv3x3
    monkeypatch.setattr(compact_cpu, "conv3x3", lambda t, *a: convs.append(1) or conv(t, *a))
    with pytest.raises(Interrupted):
        _run(model, image)
    assert 0 < len(convs) < 18 * math.ceil(330 / rows) / 2  # stopped within the first layers' strips


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("kw,size", [
    ({}, (96, 128)),
    ({"mode": "factor", "factor": 1.5}, (36, 48)),
    ({"mode": "factor", "factor": 8.0}, (192, 256)),
    ({"mode": "size", "width": 100}, (75, 100)),
    ({"mode": "size", "width": 50, "height": 70}, (70, 50)),
])
def test_target_sizes(models, shared_dir, kw, size):
    """Each mode's content against spandrel's model and PIL's bicubic resize (an independent antialiased resize):
    the model's 4x output resized by PIL to the target; for 8x, PIL shrinks the 4x output to a quarter of the target
    and the model runs again. Within 0.25/255 (measured: 0.01/255; the image resized by PIL without the model is
    200/255 off at worst, so the check can fail)."""
    h, w = size
    x = torch.cat([_astronaut(32)[..., 4:28, :], torch.rand(1, 3, 24, 32)])  # [2,3,24,32]: a real crop and noise
    out = _run(_load("compact.pth"), _img(x), **kw)
    assert out.shape == (2, h, w, 3)
    ref = _reference(shared_dir, "compact.pth")
    with torch.inference_mode():
        want = ref(x)  # [2,3,96,128]
        if h > want.shape[-2]:  # a second pass on the 4x output shrunk to a quarter of the target
            want = ref(_pil_resize(want, math.ceil(h / 4), math.ceil(w / 4)))
    if tuple(want.shape[-2:]) != (h, w):
        want = _pil_resize(want, h, w)
    assert (out.movedim(-1, 1) - want).abs().max().item() <= SEAM_TOL / 4


def _pil_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:  # [B,C,h,w] -> [B,C,height,width]
    """PIL's bicubic resize (antialiased when shrinking), channel by channel in float, clamped to [0,1]."""
    from PIL import Image

    planes = [[np.asarray(Image.fromarray(c.numpy()).resize((width, height), Image.BICUBIC)) for c in b] for b in x]
    return torch.from_numpy(np.array(planes)).clamp(0, 1)


def test_factor_below_the_model_scale_is_a_resized_pass(models, shared_dir):
    x = _astronaut(64)
    out = _run(_load("compact.pth"), _img(x), mode="factor", factor=1.5).movedim(-1, 1)
    with torch.inference_mode():
        full = _reference(shared_dir, "compact.pth")(x)
    ref = F.interpolate(full, size=(96, 96), mode="bicubic", antialias=True).clamp(0, 1)
    assert (out - ref).abs().max() <= SEAM_TOL


def test_factor_8_chains_two_passes(models):
    model = _load("compact.pth")
    calls = []
    hook = model.model.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[-2:])))
    out = _run(model, torch.rand(1, 20, 30, 3), mode="factor", factor=8.0)
    hook.remove()
    assert out.shape == (1, 160, 240, 3) and calls == [(20, 30), (40, 60)]  # shrunk before the last pass


@pytest.mark.parametrize("kw,match", [
    ({"mode": "factor", "factor": 0.0}, "factor"),
    ({"mode": "factor", "factor": float("nan")}, "factor"),
    ({"mode": "size"}, "width/height"),
    ({"mode": "size", "width": 20000}, "16384"),
    ({"mode": "factor", "factor": 64.0}, "16384"),
    ({"mode": "bogus"}, "mode"),
    ({"alpha": "bogus"}, "alpha"),
])
def test_bad_targets(models, kw, match):
    with pytest.raises(InputError, match=match):
        _run(_load("compact.pth"), torch.rand(1, 300, 300, 3), **kw)


# ---------------------------------------------------------------- bad images


@pytest.mark.parametrize("image,match", [
    (torch.rand(0, 16, 16, 3), "empty"),
    (torch.full((1, 16, 16, 3), float("nan")), "NaN"),
    (torch.tensor([[1.0, float("inf")]]).expand(8, 2).reshape(1, 4, 4, 1).repeat(1, 1, 1, 3), "Inf"),
    (torch.rand(1, 16, 16, 5), "channels"),
])
def test_bad_images(models, image, match):
    with pytest.raises(InputError, match=match) as e:
        _run(_load("compact.pth"), image)
    assert "image" in str(e.value)


def test_image_below_the_minimum_size(models, shared_dir):
    """DCTLSA needs 16 px: a 9x11 image is padded, upscaled and cropped back (as spandrel does)."""
    x = torch.rand(1, 3, 9, 11)
    out = _run(_load("DCTLSA_X2.pt"), _img(x)).movedim(-1, 1)
    with torch.inference_mode():
        ref = _reference(shared_dir, "DCTLSA_X2.pt")(x)
    assert out.shape == (1, 3, 18, 22) and (out - ref).abs().max() <= SEAM_TOL


def test_errors_are_atelier_errors_not_torch_traces(models):
    with pytest.raises(AtelierError):
        _run(_load("compact.pth"), torch.rand(1, 16, 16, 3), mode="size", width=-1)


# ---------------------------------------------------------------- channels and alpha


def test_alpha_is_upscaled_separately(models, shared_dir):
    rgb = _astronaut(48)
    a = torch.linspace(0, 1, 48).view(1, 1, 1, 48).expand(1, 1, 48, 48)
    out = _run(_load("compact.pth"), _img(torch.cat([rgb, a], 1))).movedim(-1, 1)
    with torch.inference_mode():
        ref = _reference(shared_dir, "compact.pth")(rgb)
    assert out.shape == (1, 4, 192, 192)
    assert (out[:, :3] - ref).abs().max() <= SEAM_TOL
    ref_a = F.interpolate(a, size=(192, 192), mode="bicubic", antialias=True).clamp(0, 1)
    assert (out[:, 3:] - ref_a).abs().max() < 1e-5
    by_model = _run(_load("compact.pth"), _img(torch.cat([rgb, a], 1)), alpha="model").movedim(-1, 1)
    with torch.inference_mode():
        ref_m = _reference(shared_dir, "compact.pth")(a.expand(-1, 3, -1, -1))
    luma = (ref_m * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert (by_model[:, 3:] - luma).abs().max() <= SEAM_TOL


def test_grey_model_on_rgb_runs_per_channel(models, shared_dir):
    x = _astronaut(64)
    out = _run(_load("dncnn_25.pth"), _img(x)).movedim(-1, 1)
    with torch.inference_mode():
        ref = torch.cat([_reference(shared_dir, "dncnn_25.pth")(x[:, c : c + 1]) for c in range(3)], 1)
    assert out.shape == x.shape and (out - ref).abs().max() <= SEAM_TOL


def test_rgb_model_on_grey_input(models, shared_dir):
    g = _astronaut(32).mean(1, keepdim=True)  # [1,1,32,32]
    out = _run(_load("compact.pth"), _img(g)).movedim(-1, 1)
    with torch.inference_mode():
        ref = _reference(shared_dir, "compact.pth")(g.expand(-1, 3, -1, -1))
    luma = (ref * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert out.shape == (1, 1, 128, 128) and (out - luma).abs().max() <= SEAM_TOL


def test_batched_images_match_one_by_one(models):
    x = torch.rand(3, 24, 20, 3)
    model = _load("compact.pth")
    out = _run(model, x)
    assert (out[1:2] - _run(model, x[1:2])).abs().max().item() < 0.02 / 255  # NNPACK rounding at most


def test_half_precision_module_gives_float32_images(models):
    """bf16 weights (the GPU policy, forced here on the CPU) still give float32 IMAGE close to fp32."""
    desc = models.load("compact.pth", "upscale_models", dtype=torch.bfloat16)
    x = _astronaut(32)
    out = up.upscale(desc, x, manager=models)
    ref = up.upscale(models.load("compact.pth", "upscale_models", dtype=torch.float32), x, manager=models)
    assert out.dtype == torch.float32 and _psnr(out, ref) > 30
