"""MicroAST against the authors' outputs on the real weights (../shared/golden/microast), loading of its four parts,
the packed export, and tiled == untiled."""
from __future__ import annotations

import shutil

import pytest
import torch

from atelier.models.errors import InputError, ModelLoadError, WrongFamilyError
from atelier.models.loading import read_state_dict
from atelier.models.style import microast, transfer

PART_FILES = [f"{p}_iter_160000.pth.tar" for p in microast.PARTS]


@pytest.fixture(scope="module")
def weights(shared_dir):
    d = shared_dir / "weights" / "microast"
    if not (d / PART_FILES[0]).is_file():
        pytest.skip("shared/weights/microast missing")
    return d


@pytest.fixture(scope="module")
def gold(shared_dir):
    from safetensors.torch import load_file

    f = shared_dir / "golden" / "microast" / "microast_golden.safetensors"
    if not f.is_file():
        pytest.skip("shared/golden/microast missing")
    return load_file(str(f))


@pytest.fixture(scope="module")
def model(weights):
    path = str(weights / "decoder_iter_160000.pth.tar")
    sd, meta = read_state_dict(path)
    return microast.load(sd, {**meta, "source": path}).model


@pytest.fixture
def style_root(models_root, weights):
    (models_root / "style").mkdir()
    for f in PART_FILES:
        shutil.copy(weights / f, models_root / "style" / f)
    return models_root / "style"


def test_golden_outputs_real_weights(model, gold, one_thread):
    with torch.no_grad():
        code = model.style_code(gold["style"])
        for ours, key in zip([code.w[0], code.w[1], code.b[0], code.b[1]], ["mod_w1", "mod_w2", "mod_b1", "mod_b2"]):
            torch.testing.assert_close(ours, gold[key], atol=1e-5, rtol=0)
        for size in ("256", "128x192", "50x75"):
            out = model(gold[f"content_{size}"], gold["style"])
            assert out.shape == gold[f"out_{size}"].shape
            torch.testing.assert_close(out, gold[f"out_{size}"], atol=1e-4, rtol=0)
        out = model(gold["content_50x75"], gold["style"], alpha=0.5)  # upstream's feature alpha, pinned
        torch.testing.assert_close(out, gold["out_50x75_alpha05"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", PART_FILES)
def test_any_part_brings_its_companions(manager, style_root, gold, name):
    desc = manager.load(name, "style", family="style")
    assert desc.architecture == "MicroAST" and desc.parameters == 471_987
    with torch.no_grad():
        out = desc.model(gold["content_50x75"], gold["style"])
    torch.testing.assert_close(out, gold["out_50x75"], atol=1e-4, rtol=0)


def test_packed_export_round_trip(manager, style_root, gold, tmp_path):
    out = microast.export_packed(style_root / PART_FILES[2], tmp_path / "microast.safetensors")
    assert not list(tmp_path.glob("*.partial-*"))
    alone = tmp_path / "packed"
    alone.mkdir()
    shutil.move(out, alone / "microast.safetensors")  # alone in its folder: needs no companions
    desc = manager.load(str(alone / "microast.safetensors"))
    assert desc.architecture == "MicroAST"
    with torch.no_grad():
        torch.testing.assert_close(desc.model(gold["content_50x75"], gold["style"]), gold["out_50x75"], atol=1e-4,
                                   rtol=0)
    with pytest.raises(InputError, match="already exists"):
        microast.export_packed(style_root / PART_FILES[0], alone / "microast.safetensors")


def test_a_lone_part_says_what_is_missing(manager, models_root, weights):
    (models_root / "style").mkdir()
    shutil.copy(weights / PART_FILES[3], models_root / "style" / PART_FILES[3])
    with pytest.raises(ModelLoadError, match="companion files .*content_encoder_"):
        manager.load(PART_FILES[3], "style")


def test_wrong_family_is_named(manager, style_root):
    with pytest.raises(WrongFamilyError, match="style model"):
        manager.load(PART_FILES[0], "style", family="upscale")


def test_tiled_equals_untiled(model, gold, one_thread):
    """Whole-image statistics held while tiles run: forced small tiles match the untiled network within 1/255."""
    content = gold["content_256"][..., :, :192]
    with torch.no_grad():
        code = model.style_code(gold["style"])
        whole = model(content, gold["style"])
        tiled = microast.stylise(model, content, code, tile=128, budget=1 << 30, device=torch.device("cpu"),
                                 dtype=torch.float32)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() < 1 / 255


def test_transfer_pads_odd_sizes_and_tiles_agree(manager, style_root, gold, one_thread):
    desc = manager.load(PART_FILES[0], "style")
    content = gold["content_128x192"][..., :126, :181]  # not multiples of 4
    untiled, _ = transfer.stylise(desc, content, gold["style"], style_size=0, manager=manager)
    tiled, _ = transfer.stylise(desc, content, gold["style"], style_size=0, tile=120, manager=manager)
    assert untiled.shape == content.shape
    assert (tiled - untiled).abs().max() < 1 / 255
    # and the stylisation is the real one: colours move to the style's (README: mean RGB ~ the style's)
    assert (untiled.mean((0, 2, 3)) - gold["style"].mean((0, 2, 3))).abs().max() < 0.06
