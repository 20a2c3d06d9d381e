"""AdaIN and Johnson's TransformerNet against upstream's outputs on seeded random weights (../shared/golden/adain,
../shared/golden/fast_style): forward passes, loading as the files people have, tiled == untiled."""
from __future__ import annotations

import lzma

import pytest
import torch

from atelier.models.errors import ModelLoadError
from atelier.models.style import adain, fast_style, transfer
from helpers_golden import golden_folder  # noqa: E402 (tests/ is on pytest's pythonpath)


def _xz(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    with lzma.open(path) as f:
        return load(f.read())


@pytest.fixture(scope="module")
def adain_gold(shared_dir):
    from safetensors.torch import load_file

    d = golden_folder(shared_dir, "adain")
    return _xz(d / "vgg_relu4_1.safetensors.xz"), _xz(d / "decoder.safetensors.xz"), load_file(str(d / "adain_io.safetensors"))


@pytest.fixture(scope="module")
def fast_gold(shared_dir):
    from safetensors.torch import load_file

    d = golden_folder(shared_dir, "fast_style")
    return _xz(d / "transformer.safetensors.xz"), load_file(str(d / "fast_style_io.safetensors"))


def _save(sd: dict, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.fixture
def adain_files(adain_gold, models_root):
    vgg, dec, _ = adain_gold
    d = models_root / "style"
    d.mkdir()
    # The real vgg_normalised.pth goes on to relu5_4: keys past index 30 must be accepted and ignored.
    extra = {"32.weight": torch.zeros(512, 512, 3, 3), "32.bias": torch.zeros(512)}
    _save({**vgg, **extra}, d / "vgg_normalised.safetensors")
    _save(dec, d / "decoder.safetensors")
    return d


# ---------------------------------------------------------------- AdaIN


@pytest.mark.parametrize("name", ["vgg_normalised.safetensors", "decoder.safetensors"])
def test_adain_either_file_matches_golden(manager, adain_files, adain_gold, name, one_thread):
    io = adain_gold[2]
    desc = manager.load(name, "style", family="style")
    assert desc.architecture == "AdaIN"
    m = desc.model
    with torch.no_grad():
        torch.testing.assert_close(m(io["content"], io["style"]), io["out_alpha1"], atol=1e-4, rtol=0)
        torch.testing.assert_close(m(io["content"], io["style"], 0.6), io["out_alpha06"], atol=1e-4, rtol=0)
        torch.testing.assert_close(m(io["content_odd"], io["style"]), io["out_odd_alpha1"], atol=1e-4, rtol=0)
        st = m.style_code(io["style"])
    torch.testing.assert_close(st.mean, io["style_feat_mean"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(st.std, io["style_feat_std"], atol=1e-4, rtol=1e-5)


def test_adain_half_alone_is_a_clear_error(manager, models_root, adain_gold):
    (models_root / "style").mkdir()
    _save(adain_gold[1], models_root / "style" / "decoder.safetensors")
    with pytest.raises(ModelLoadError, match="vgg_normalised"):
        manager.load("decoder.safetensors", "style")


def test_adain_tiled_equals_untiled(adain_gold, one_thread):
    vgg, dec, io = adain_gold
    m = adain.load({**{f"vgg.{k}": v for k, v in vgg.items()}, **{f"decoder.{k}": v for k, v in dec.items()}},
                   {}).model
    x = torch.nn.functional.interpolate(io["content"], size=(248, 216), mode="bilinear")
    with torch.no_grad():
        code = m.style_code(io["style"])
        whole = m(x, io["style"])
        tiled = adain.stylise(m, x, code, alpha=1.0, tile=200, budget=1 << 30, device=torch.device("cpu"),
                              dtype=torch.float32)
    # random weights give outputs of +-9: 1/255 of the output range
    span = float(whole.max() - whole.min())
    assert (tiled - whole).abs().max() < span / 255


# ---------------------------------------------------------------- TransformerNet


def test_transformer_net_golden_ignoring_running_stats(fast_gold, one_thread):
    sd, io = fast_gold
    legacy = dict(sd)
    for k in [f"in{i}" for i in range(1, 6)] + [f"res{r}.in{i}" for r in range(1, 6) for i in (1, 2)]:
        c = sd[f"{k}.weight"].shape[0]
        legacy[f"{k}.running_mean"], legacy[f"{k}.running_var"] = torch.randn(c), torch.rand(c) + 1
    assert len(legacy) - len(sd) == 30
    assert fast_style.detect(legacy, {}) and not adain.detect(legacy, {})
    m = fast_style.load(legacy, {}).model
    with torch.no_grad():
        for size in ("96x144", "50x75"):
            out = m(io[f"content_{size}"])
            assert out.shape == io[f"output_{size}"].shape
            # outputs are 0..255 (up to 403 here): 1e-4 in image units, as for the other networks
            torch.testing.assert_close(out / 255, io[f"output_{size}"] / 255, atol=1e-4, rtol=0)


def test_transformer_net_tiled_equals_untiled(fast_gold, one_thread):
    sd, io = fast_gold
    m = fast_style.load(sd, {}).model
    x = io["content_96x144"]
    with torch.no_grad():
        whole = m(x)
        tiled = fast_style.stylise(m, x, tile=56, budget=1 << 30, device=torch.device("cpu"), dtype=torch.float32)
    assert (tiled - whole).abs().max() < 1.0  # 1/255 in image units


def test_transformer_net_through_transfer_notes_an_ignored_style(fast_gold, manager, models_root):
    sd, io = fast_gold
    (models_root / "style").mkdir()
    _save(sd, models_root / "style" / "candy_like.safetensors")
    desc = transfer.load_style_model("candy_like.safetensors", manager=manager)
    x = io["content_50x75"] / 255
    out, notes = transfer.stylise(desc, x, torch.rand(1, 3, 40, 40), manager=manager)
    assert out.shape == x.shape and notes and "ignored" in notes[0]
    with torch.no_grad():
        ref = (desc.model(torch.nn.functional.pad(x, (0, 1, 0, 2), mode="reflect") * 255) / 255)[..., :50, :75]
    torch.testing.assert_close(out, ref.clamp(0, 1), atol=1e-4, rtol=0)
