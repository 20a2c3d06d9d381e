"""`atelier train`: the trainer nodes' job from the command line on a folder of images (a micro UNet, 2 steps): the
model file loads through the manager as a class-conditional diffusion model, the preview grid and the loss curve are
written beside it, --continue goes on from the saved step, an existing run is never overwritten without it, and
errors print one line."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atelier.cli.main import main
from atelier.models.diffusion import train as dtrain
from atelier.models.train.checkpoint import read_header

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def digits(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8), "L").save(
                tmp_path / "data" / label / f"{i}.png")
    return tmp_path / "data"


def _args(data, out, *extra):
    return ["train", "diffusion", str(data), "--out", str(out), "--resolution", "8", "--channels", "1", "--labels",
            "--size", "tiny", "--steps", "2", "--batch-size", "2", "--preview-every", "1", *extra]


def test_train_diffusion_from_the_command_line(digits, tmp_path, manager, monkeypatch, capsys):
    monkeypatch.setitem(dtrain.SIZES, "tiny", ((32, 32), 1, (False, False)))
    out = tmp_path / "runs" / "digits.safetensors"
    assert main(_args(digits, out)) == 0
    printed = capsys.readouterr().out
    assert "6 images" in printed and "step 2" in printed
    assert read_header(str(out.with_suffix(".train-state")))["step"] == 2
    desc = manager.load(str(out), family="diffusion")
    assert desc.extra.num_classes == 3 and desc.extra.class_names == ("0", "1")  # two classes and the null class
    assert desc.extra.in_channels == 1 and desc.extra.sample_size == 8
    with Image.open(out.with_suffix(".preview.png")) as im:  # a 4x4 grid of 16 8x8 samples, 2-pixel gaps
        assert im.size == (42, 42)
    with Image.open(out.with_suffix(".loss.png")) as im:
        assert im.size == (640, 360)

    assert main(_args(digits, out, "--continue")) == 0
    assert "continued" in capsys.readouterr().out
    assert read_header(str(out.with_suffix(".train-state")))["step"] == 4
    assert main(_args(digits, out)) == 0  # without --continue: a new file beside it
    assert read_header(str(tmp_path / "runs" / "digits_2.train-state"))["step"] == 2
    assert (tmp_path / "runs" / "digits_2.preview.png").is_file()


def test_train_errors_print_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "diffusion", str(tmp_path / "empty"), "--out", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("atelier: error:") and "empty" in err and "\n" not in err
    (tmp_path / "one").mkdir()
    from PIL import Image

    Image.new("L", (28, 28), 128).save(tmp_path / "one" / "a.png")
    assert main(["train", "gan", str(tmp_path / "one"), "--resolution", "28", "--channels", "1",
                 "--out", str(tmp_path / "g.safetensors")]) == 1  # a DCGAN side is 4 * 2**k
    err = capsys.readouterr().err.strip()
    assert err.startswith("atelier: error:") and "resolution" in err and "28" in err and "\n" not in err
    assert not (tmp_path / "g.safetensors").exists()
    assert main(["train", "diffusion", str(tmp_path), "--out", str(tmp_path / "m.pt")]) == 1
    assert "--out" in capsys.readouterr().err
