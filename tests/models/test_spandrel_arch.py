"""spandrel_arch: detection and loading against spandrel itself (the reference), receptive fields against a
measurement, the UPSCALE_MODEL wrapper, and files that are not upscalers."""
from __future__ import annotations

import shutil

import pytest
import torch

import spandrel  # a runtime dependency of the pack: missing is a failure, not a skip

from atelier.models import registry  # noqa: E402
from atelier.models.errors import ModelLoadError, UnknownModelError, WrongFamilyError  # noqa: E402
from atelier.models.loading import read_state_dict  # noqa: E402
from atelier.models import spandrel_arch as sa  # noqa: E402
from atelier.models import compact_cpu  # noqa: E402
from atelier.models.cpu_conv import NNPACKConv2d, nnpack_usable  # noqa: E402
from atelier.models.progress import add_interrupt_checks  # noqa: E402
from atelier.models.tiling import measure_receptive_field  # noqa: E402
from harness import check_roundtrip  # noqa: E402  (tests/ is on pytest's pythonpath)

REAL = {  # file under ../shared/weights -> (spandrel id, scale, in channels, purpose)
    "realesr-animevideov3/realesr-animevideov3.pth": ("Compact", 4, 3, "SR"),
    "craft/craft_x4.pth": ("CRAFT", 4, 3, "SR"),
    "dctlsa/DCTLSA_X2.pt": ("DCTLSA", 2, 3, "SR"),
    "dncnn/dncnn_25.pth": ("DnCNN", 1, 1, "Restoration"),
}


def _tiny_models() -> dict[str, torch.nn.Module]:
    """Small random models built with spandrel's own architecture classes."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.DnCNN import DnCNN
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    return {
        "Compact": Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=2),
        "DnCNN": DnCNN(in_nc=1, out_nc=1, nc=16, nb=6),
        "ESRGAN": ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=2, scale=2),
        "SPAN": SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2),
        "SwinIR": SwinIR(img_size=16, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                         mlp_ratio=2.0, upscale=2, upsampler="pixelshuffledirect"),
    }


@pytest.mark.parametrize("arch", ["Compact", "DnCNN", "ESRGAN", "SPAN", "SwinIR"])
def test_tiny_models_match_spandrel(arch, tmp_path):
    net = _tiny_models()[arch]
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    ref = spandrel.ModelLoader().load_from_state_dict(dict(sd)).eval()
    assert sa.detect(sd, {})
    x = torch.rand(1, ref.input_channels, 24, 32)
    with torch.inference_mode():
        expected = ref.model(x)  # the module spandrel built; its call (clamped to [0,1]) is compared below
    desc = check_roundtrip(  # the shared round trip: both formats, a fresh manager, the module spandrel built
        tmp_path, sd, folder="upscale_models", family="upscale", run=lambda m: m(x), expected=expected, tol=1e-3,  # NNPACK layers
        facts={"family": "upscale", "architecture": ref.architecture.id, "scale": ref.scale,
               "in_channels": ref.input_channels, "out_channels": ref.output_channels, "purpose": ref.purpose,
               "size_requirements.multiple_of": ref.size_requirements.multiple_of})
    assert desc.architecture == arch
    assert isinstance(desc.extra.spandrel, spandrel.ImageModelDescriptor) and desc.extra.spandrel.atelier is desc
    assert desc.extra.spandrel.model is desc.model
    with torch.inference_mode():
        assert (desc.extra.spandrel(x) - ref(x)).abs().max().item() < 0.1 / 255  # NNPACK layers: float rounding
    assert desc.bytes_per_pixel > 0 and desc.receptive_field >= 1
    assert desc.extra.align % ref.size_requirements.multiple_of == 0


def test_swinir_tiled_equals_untiled(manager):
    """SwinIR's shifted windows reach beyond its few convolutions, so the convolution bound is no context for it:
    with the descriptor's context, tiles through the upscale engine equal the untiled pass within 1e-3 (float
    rounding of the stirred weights: ~2e-4 measured); with the convolution bound as context they do not."""
    from atelier.models.tiling import tiled_apply
    from atelier.models.upscale.upscale import run_model

    net = _tiny_models()["SwinIR"]
    with torch.no_grad():  # default init keeps attention near uniform: stir it so that windows matter
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    desc = registry.detect(net.state_dict(), {}, source="tiny.pth")
    align, context = desc.extra.align, desc.receptive_field
    assert align % 4 == 0 and context % align == 0  # tiles start on the window grid
    assert not desc.extra.exact and context > desc.extra.conv_bound
    x = torch.rand(1, 3, 32, 320)
    with torch.inference_mode():
        full = desc.extra.spandrel(x)  # [1,3,64,640]
        assert full.std() > 0.1
        tiled = run_model(desc, x, tile=128, manager=manager, progress=None)  # 128 -> the engine's smallest tile
        conv_only = tiled_apply(desc.extra.spandrel, x, scale=2, out_channels=3, tile=64, context=desc.extra.conv_bound,
                                blend=4, align=align, progress=None)
    assert (tiled - full).abs().max().item() < 1e-3
    assert (conv_only - full).abs().max().item() > 0.05  # the property can fail: windows see past the conv bound


@pytest.mark.parametrize("arch", ["Compact", "DnCNN"])
def test_conv_bound_is_a_real_bound(arch):
    """For pure conv stacks the table's context is exact: a perturbation beyond it changes nothing, and the
    measurement (which can fail: it finds no bound for a model that sees the whole image) agrees."""
    net = _tiny_models()[arch]
    desc = registry.detect(net.state_dict(), {}, source="tiny.pth")
    assert desc.extra.exact and desc.receptive_field == sa.conv_bound(desc.model)
    x = torch.rand(1, desc.in_channels, 40, 64)
    measured = measure_receptive_field(desc.extra.spandrel, x, int(desc.scale), tol=1e-6, band=4)
    assert measured is not None and measured <= desc.receptive_field
    with torch.inference_mode():  # one pixel changed just outside the bound: output at distance r unchanged
        r = desc.receptive_field
        y0 = desc.extra.spandrel(x)
        x2 = x.clone()
        x2[..., 20, 40] += 0.5
        y1 = desc.extra.spandrel(x2)
        s = int(desc.scale)
        diff = (y1 - y0).abs()[0].amax(0)  # [H*s,W*s]
        assert diff[:, : (40 - r) * s].max() < 1e-6 and diff[:, (40 - r) * s :].max() > 0


def test_measure_finds_nothing_for_a_global_model():
    """A model with global pooling never becomes exact: the measurement says so (None)."""

    class Global(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x.mean((2, 3), keepdim=True))

    x = torch.rand(1, 3, 32, 64)
    assert measure_receptive_field(Global(), x, 1, tol=1e-6, band=4) is None


@pytest.fixture(scope="module")
def real(shared_dir):
    out = {}
    for rel in REAL:
        sd, meta = read_state_dict(shared_dir / "weights" / rel)
        out[rel] = registry.detect(sd, meta, source=rel)
    return out


@pytest.mark.parametrize("rel", list(REAL))
def test_real_weights_detected_like_spandrel(real, rel):
    arch, scale, cin, purpose = REAL[rel]
    desc = real[rel]
    assert (desc.architecture, desc.scale, desc.in_channels, desc.purpose, desc.family) == (
        arch, scale, cin, purpose, "upscale")
    info = desc.to_json()
    assert info["receptive_field"] == desc.receptive_field and info["tiling"] in ("supported", "discouraged")


@pytest.mark.parametrize("rel,band", [("realesr-animevideov3/realesr-animevideov3.pth", 16),
                                      ("dncnn/dncnn_25.pth", 16)])
def test_table_context_covers_the_measured_field(real, rel, band):
    """On the real weights, the context in the table is at least the measured receptive field at 1/255."""
    from skimage import data

    desc = real[rel]
    img = data.astronaut() if desc.in_channels == 3 else data.camera()[..., None]
    x = torch.from_numpy(img[100:164, 150:246].copy()).float().div(255).permute(2, 0, 1)[None]  # [1,C,64,96]
    measured = measure_receptive_field(desc.extra.spandrel, x, int(desc.scale), step=2, max_context=30, band=band)
    assert measured is not None and 0 < measured <= desc.receptive_field


@pytest.mark.parametrize("rel", ["craft/craft_x4.pth", "dctlsa/DCTLSA_X2.pt"])
def test_global_architectures_are_not_tiled_by_default(real, rel):
    desc = real[rel]
    assert desc.extra.scope == "global" and desc.tiling == "discouraged" and not desc.extra.exact


def test_wrapper_casts_to_the_model_dtype(real):
    """Core's node calls UPSCALE_MODEL with float32 images; a bf16 module still works and returns float32."""
    desc = sa.from_spandrel(spandrel.ModelLoader().load_from_state_dict(
        {k: v.clone() for k, v in real["realesr-animevideov3/realesr-animevideov3.pth"].model.state_dict().items()}))
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        ref = desc.extra.spandrel(x)
        desc.model.to(torch.bfloat16)
        out = desc.extra.spandrel(x)
    assert out.dtype == torch.float32 and (out - ref).abs().mean() < 0.02


def test_core_descriptor_is_adopted_once(real):
    core = spandrel.ModelLoader().load_from_state_dict(
        {k: v.clone() for k, v in real["dncnn/dncnn_25.pth"].model.state_dict().items()})
    d1 = sa.from_spandrel(core, source="core")
    assert sa.from_spandrel(core) is d1 and d1.model is core.model and d1.architecture == "DnCNN"


@pytest.mark.skipif(not nnpack_usable(), reason="this PyTorch build has no working NNPACK")
def test_nnpack_convolutions_match_pytorch(real, monkeypatch):
    """Compact at load: its convolutions are NNPACK layers with the same keys, and its UPSCALE_MODEL takes the
    Compact CPU path; both equal spandrel's own module (PyTorch convolutions) within float rounding."""
    desc = real["realesr-animevideov3/realesr-animevideov3.pth"]
    ref = spandrel.ModelLoader().load_from_state_dict(
        {k: v.clone() for k, v in desc.model.state_dict().items()}).eval()
    assert sum(type(m) is NNPACKConv2d for m in desc.model.modules()) == 18  # 16 body convs, first and last
    assert not any(type(m) is NNPACKConv2d for m in ref.model.modules())
    assert list(desc.model.state_dict()) == list(ref.model.state_dict())
    calls = []
    fwd = compact_cpu.cpu_forward
    monkeypatch.setattr(compact_cpu, "cpu_forward", lambda m, x: calls.append(tuple(x.shape)) or fwd(m, x))
    x = torch.rand(1, 3, 37, 45)
    with torch.inference_mode():
        want = ref(x)
        out = desc.extra.spandrel(x)  # the Compact CPU path
        layers = type(ref.model).forward(desc.model, x).clamp_(0, 1)  # the NNPACK layers, spandrel's forward
    assert calls == [(1, 3, 37, 45)] and type(desc.model).__name__ == type(ref.model).__name__
    assert (out - want).abs().max().item() < 1e-3 / 255 * 10
    assert out.movedim(1, -1).is_contiguous()  # written channels last: the node's IMAGE is a view of it
    assert (layers - want).abs().max().item() < 1e-3 / 255 * 10


def test_compact_prelu_stays_exact():
    """The in-place, calling-thread PReLU equals torch's PReLU, also when a channel spans several pieces."""
    x = torch.randn(1, 3, 300, 250)
    w = torch.tensor([0.1, -0.2, 0.3])
    assert torch.equal(compact_cpu.prelu_(x.clone(), w.tolist()), torch.nn.functional.prelu(x, w))


def test_no_thread_count_change(monkeypatch, real):
    """A CPU pass leaves the process's thread count alone (no per-pass thread decisions)."""
    from atelier.models.upscale import upscale as up

    def refuse(n):
        raise AssertionError(f"torch.set_num_threads({n}) called during an upscale")

    n = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", refuse)
    out = up.upscale(real["realesr-animevideov3/realesr-animevideov3.pth"], torch.rand(1, 3, 24, 20))
    assert out.shape == (1, 3, 96, 80) and torch.get_num_threads() == n


# ---------------------------------------------------------------- files that are not upscalers


def test_vae_file_is_not_an_upscaler(shared_dir, manager, models_root):
    shutil.copy(shared_dir / "weights" / "taef2" / "taef2_decoder.pth", models_root / "upscale_models" / "vae.pth")
    sd, meta = read_state_dict(models_root / "upscale_models" / "vae.pth")
    assert not sa.detect(sd, meta)
    with pytest.raises((WrongFamilyError, UnknownModelError), match="vae.pth"):
        manager.load("vae.pth", "upscale_models", family="upscale")


def test_inpainter_is_refused_by_family(manager, models_root):
    from spandrel.architectures.LaMa import LaMa

    sd = {k: v.half() if v.is_floating_point() else v for k, v in LaMa().state_dict().items()}
    torch.save(sd, models_root / "upscale_models" / "lama.pth")
    desc = manager.load("lama.pth", "upscale_models")
    assert desc.family == "inpaint" and desc.purpose == "Inpainting"
    with pytest.raises(WrongFamilyError, match="lama.pth.*inpaint"):
        manager.load("lama.pth", "upscale_models", family="upscale")


def test_broken_weights_name_the_file(manager, models_root, real):
    sd = {k: v.clone() for k, v in real["realesr-animevideov3/realesr-animevideov3.pth"].model.state_dict().items()}
    sd["body.2.weight"] = torch.zeros(64, 32, 3, 3)  # wrong shape for the detected config
    torch.save(sd, models_root / "upscale_models" / "broken.pth")
    with pytest.raises(ModelLoadError, match="broken.pth"):
        manager.load("broken.pth", "upscale_models")


def test_cancel_is_checked_inside_one_call(monkeypatch):
    """Cancel takes effect inside a model call (before a block), not only between tiles: one untiled call of a
    tiny DnCNN stops at the third check."""
    from atelier.models import host

    net = _tiny_models()["DnCNN"]
    desc = registry.detect({k: v.clone() for k, v in net.state_dict().items()}, {}, source="tiny.pth")
    checks = []

    class Stop(Exception):
        pass

    def check():
        checks.append(1)
        if len(checks) == 3:
            raise Stop

    monkeypatch.setattr(host, "throw_if_interrupted", check)
    assert add_interrupt_checks(desc.model, sa.INTERRUPT_DEPTH) >= 3  # once per module: a second call adds nothing
    with torch.inference_mode(), pytest.raises(Stop):
        desc.extra.spandrel(torch.rand(1, 1, 16, 16))
    assert len(checks) == 3
