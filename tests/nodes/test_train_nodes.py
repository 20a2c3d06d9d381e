"""Training nodes on real folders and files: the folder dataset (counts, skips, labels, errors, relative paths), an
IMAGE batch as a dataset, and Train Diffusion with a micro UNet inside inference mode (as ComfyUI runs nodes): the
file lands in the diffusion model folder, the model it returns samples through Diffusion Sample, a second Run
continues (3 -> 6 steps) and ends exactly where one uninterrupted 6-step run ends, other settings never overwrite.
References: the pixels written to the files, the training state file read with safetensors, an uninterrupted run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from atelier.models import host
from atelier.models.diffusion import train as dtrain
from atelier.models.errors import InputError
from atelier.models.train.plot import COLOURS, loss_curve, nice_ticks, smooth
from atelier.nodes.diffusion import DIFFUSION, AtelierDiffusionSample
from atelier.nodes.train import (AtelierDatasetImages, AtelierImageFolderDataset, AtelierImagesAsDataset,
                                 AtelierTrainDiffusion, resolve_folder)

pytestmark = pytest.mark.usefixtures("one_thread")
MICRO = ((32, 32), 1, (False, False))  # a two-level UNet without attention: a step takes milliseconds


def _write(path, colour, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _write(root / "a" / "red.png", (255, 0, 0))
    _write(root / "a" / "grey.jpg", 128, mode="L")
    _write(root / "b" / "blue.webp", (0, 0, 255, 255), mode="RGBA", size=(8, 8))
    _write(root / "b" / "deep" / "green.png", (0, 255, 0), size=(20, 30))
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image")
    return root


def _folder_node(path, **kw):
    args = dict(resolution=8, channels="RGB", crop="center", flip=False, labels_from_subfolders=False)
    args.update(kw)
    return AtelierImageFolderDataset().load(str(path), **args)


def test_folder_dataset_counts_skips_and_labels(folder):
    out = _folder_node(folder, labels_from_subfolders=True)
    ds, text = out["result"]
    assert out["ui"]["text"] == [text]
    assert len(ds) == 4 and len(ds.skipped) == 1 and "broken.png" in ds.skipped[0]
    assert "4 images" in text and "1 skipped" in text and "broken.png" in text
    assert ds.class_names == ("a", "b") and ds.labels.tolist() == [0, 0, 1, 1]  # a/grey, a/red | b/blue, b/deep/green
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.uint8
    # the pixels are the files' colours (solid images: any resize and crop keeps them)
    colours = sorted(tuple(ds.images[i, :, 4, 4].tolist()) for i in range(4))
    assert colours == sorted([(255, 0, 0), (128, 128, 128), (0, 0, 255), (0, 255, 0)])
    grey = _folder_node(folder, channels="grey")["result"][0]
    assert grey.images.shape == (4, 1, 8, 8)


def test_folder_dataset_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match="empty"):
        _folder_node(empty)
    with pytest.raises(InputError, match="missing"):
        _folder_node(tmp_path / "missing")
    with pytest.raises(InputError, match="climbs out"):
        resolve_folder("../elsewhere")
    with pytest.raises(InputError, match="folder"):
        resolve_folder("  ")


def test_relative_folder_is_under_the_input_folder(folder, monkeypatch):
    monkeypatch.setattr(host, "input_dir", lambda: str(folder.parent))
    assert resolve_folder("imgs/a") == str(folder / "a")
    ds = _folder_node("imgs/a")["result"][0]
    assert len(ds) == 2
    before = AtelierImageFolderDataset.IS_CHANGED("imgs")
    _write(folder / "a" / "new.png", (1, 2, 3))
    assert AtelierImageFolderDataset.IS_CHANGED("imgs") != before  # a changed folder is read again


def test_relative_folder_falls_back_to_the_packs_example_datasets(folder, tmp_path, monkeypatch):
    """A name the input folder lacks is looked up among the pack's example inputs (workflows/input/): what the
    headless runner, whose input folder is the workflow's, needs for the example training workflows."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    monkeypatch.setattr(host, "input_dir", lambda: str(inputs))
    monkeypatch.setattr(host, "EXAMPLE_INPUTS_DIR", str(tmp_path))
    assert resolve_folder("imgs") == str(folder)  # not in the input folder: the pack's
    (inputs / "imgs").mkdir()
    assert resolve_folder("imgs") == str(inputs / "imgs")  # the user's own folder of that name wins
    assert resolve_folder("nowhere") == str(inputs / "nowhere")  # neither: the input folder's (then 'missing')


def test_dataset_images_gives_the_first_images_back_with_their_labels(folder):
    ds = _folder_node(folder, labels_from_subfolders=True, crop="random")["result"][0]  # stored 9/8 larger
    out = AtelierDatasetImages().images(ds, count=3)
    img, labels = out["result"]
    assert img.shape == (3, 8, 8, 3) and img.dtype == torch.float32
    s = ds.images.shape[-1]
    o = (s - 8) // 2
    want = ds.images[:3, :, o:o + 8, o:o + 8].float().movedim(1, -1) / 255  # the centre squares, as stored
    assert torch.equal(img, want)
    assert labels == "a, a, b" and "3 images 8x8" in out["ui"]["text"][0]
    assert AtelierDatasetImages().images(ds, count=100)["result"][0].shape[0] == 4  # no more than there are
    spread, spread_labels = AtelierDatasetImages().images(ds, count=2, pick="evenly")["result"]
    assert torch.equal(spread[1], AtelierDatasetImages().images(ds, count=4)["result"][0][3])  # first and last
    assert spread_labels == "a, b"
    with pytest.raises(InputError, match="pick"):
        AtelierDatasetImages().images(ds, count=2, pick="random")
    grey = AtelierImagesAsDataset().convert(torch.rand(2, 8, 8, 3), resolution=8, channels="grey", crop="center",
                                            flip=False)["result"][0]
    g_img, g_labels = AtelierDatasetImages().images(grey, count=2)["result"]
    assert g_img.shape == (2, 8, 8, 3) and torch.equal(g_img[..., 0], g_img[..., 2]) and g_labels == ""
    with pytest.raises(InputError, match="dataset"):
        AtelierDatasetImages().images(torch.zeros(1, 8, 8, 3), count=1)


def test_images_as_dataset():
    img = torch.zeros(2, 12, 16, 3)
    img[0] = torch.tensor([1.0, 0.5, 0.0])
    with torch.inference_mode():
        out = AtelierImagesAsDataset().convert(img, resolution=8, channels="grey", crop="center", flip=True)
    ds, text = out["result"]
    assert ds.images.shape == (2, 1, 8, 8) and not ds.images.is_inference()
    want = round((0.299 + 0.587 * 0.5) * 255)  # ITU-R 601 luma of the first image's colour
    assert abs(int(ds.images[0, 0, 3, 3]) - want) <= 1 and int(ds.images[1].max()) == 0
    assert "2 images" in text
    with pytest.raises(InputError, match="images"):
        AtelierImagesAsDataset().convert("nope", resolution=8, channels="RGB", crop="center", flip=False)


# ---------------------------------------------------------------- Train Diffusion


@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(dtrain.SIZES, "tiny", MICRO)


def _train_args(**kw):
    args = dict(name="digits", steps=3, model_size="tiny", schedule="linear", prediction="epsilon", batch_size=4,
                learning_rate=1e-3, warmup=0, ema=0.9, seed=7, save_every=2, preview_every=0)
    args.update(kw)
    cont = args.pop("continue", True)
    return {**args, "continue": cont}


def _train(ds, **kw):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return AtelierTrainDiffusion().train(ds, **_train_args(**kw))


def _header(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["atelier_train_state"])


@pytest.fixture
def dataset(folder):
    return _folder_node(folder)["result"][0]


def test_train_diffusion_writes_samples_and_continues(micro, manager, models_root, dataset):
    assert AtelierTrainDiffusion.RETURN_TYPES[0] == DIFFUSION  # Diffusion Sample's model socket
    assert AtelierTrainDiffusion.IS_CHANGED(name="digits") != AtelierTrainDiffusion.IS_CHANGED(name="digits")
    out = _train(dataset)
    model, samples, curve, report = out["result"]
    file = models_root / "diffusion_models" / "digits.safetensors"
    state = models_root / "diffusion_models" / "digits.train-state"
    assert file.is_file() and state.is_file() and out["ui"]["text"] == [report]
    assert _header(state)["step"] == 3 and "step 3" in report
    assert model.family == "diffusion" and model.extra.sample_size == 8 and model.extra.in_channels == 3
    # the model returned is the file's EMA weights, as the state file holds them
    ema = {k[len("ema.unet."):]: v for k, v in load_file(str(state)).items() if k.startswith("ema.unet.")}
    got = model.model.state_dict()
    common = [k for k in ema if k in got]
    assert len(common) > 10
    assert all(torch.equal(got[k].float(), ema[k].float()) for k in common)
    assert samples.shape == (16, 8, 8, 3) and 0 <= samples.min() and samples.max() <= 1
    assert curve.shape == (1, 360, 640, 3)
    image, _ = AtelierDiffusionSample().sample(model, seed=1, batch_size=2, width=0, height=0, steps=3,
                                               sampler="ddim", spacing="trailing", eta=0.0, class_label=-1,
                                               guidance=1.0, clip="auto")
    assert image.shape == (2, 8, 8, 3) and torch.isfinite(image).all()

    again = _train(dataset)["result"]  # a second Run: three more steps of the same run
    head = _header(state)
    assert head["step"] == 6 and len(load_file(str(state))["loss.loss"]) == 6 and "continued" in again[3]
    assert again[0] is not model  # the file changed: the manager read the new one

    # one uninterrupted run of six steps ends exactly where 3 + 3 did
    _train(dataset, name="straight", steps=6)
    a, b = load_file(str(state)), load_file(str(models_root / "diffusion_models" / "straight.train-state"))
    for k in (k for k in a if k.startswith(("net.", "ema."))):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_train_never_overwrites_another_run(micro, manager, models_root, dataset):
    _train(dataset, steps=1)
    report = _train(dataset, steps=1, schedule="cosine")["result"][3]  # another architecture: a new file
    assert (models_root / "diffusion_models" / "digits_2.safetensors").is_file() and "digits_2" in report
    _train(dataset, steps=1, **{"continue": False})  # continue off: a new file again
    assert (models_root / "diffusion_models" / "digits_3.safetensors").is_file()
    assert _header(models_root / "diffusion_models" / "digits.train-state")["step"] == 1
    with pytest.raises(InputError, match="name"):
        _train(dataset, name="../outside")
    with pytest.raises(InputError, match="dataset"):
        _train("not a dataset")


# ---------------------------------------------------------------- the loss curve


def test_loss_curve_draws_each_loss_falling_left_to_right():
    steps = np.arange(200)
    history = {"loss": list(np.exp(-steps / 40) + 0.01), "other": list(0.5 + 0 * steps)}
    img = (loss_curve(history, 400, 240)[0].numpy() * 255).round().astype(int)  # [H,W,3]
    assert img.shape == (240, 400, 3)
    for colour in COLOURS[:2]:  # the bold smoothed curve of each loss is drawn in its colour
        assert (np.abs(img - np.array(colour)).sum(-1) < 10).sum() > 50
    mask = np.abs(img - np.array(COLOURS[0])).sum(-1) < 10
    ys, xs = np.nonzero(mask[:, :-160])  # left of the legend
    left, right = ys[xs < xs.min() + 40].mean(), ys[xs > xs.max() - 40].mean()
    assert left < right - 50  # a falling loss: high (small y) on the left, low on the right
    assert loss_curve({}, 200, 120).shape == (1, 120, 200, 3)


def test_plot_helpers():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(1, 200)[:2] == [50.0, 100.0]
    s = smooth([1.0] * 5 + [3.0] * 5, beta=0.5)
    assert s[0] == 1.0 and s[4] == pytest.approx(1.0) and 1.0 < s[5] < 3.0 and s[-1] < 3.0
