"""Training nodes: Image Folder Dataset, Images As Dataset, Dataset Images (back to an IMAGE batch), and one
trainer per family (Train Diffusion, Train GAN).

Socket type ATELIER_DATASET: a `models.train.data.ImageDataset` (uint8 images decoded once, the crop and flip
applied per batch). A trainer trains `steps` more steps per Run into a file of its family's model folder, continuing
the run already at that name (same architecture) or starting a new file beside it, and returns the model loaded from
that file, so a graph can train and then sample in one go. The work is in models/train/ (jobs.py: the table of
families; loop.py: the loop); these classes only declare inputs and convert. A family's trainer node is a subclass
of `TrainNode` naming its `KIND` (a key of `models.train.jobs.KINDS`) and its model socket type.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from ..models import host
from ..models.errors import InputError
from ..models.manager import get_manager
from ..models.train import data as _data
from ..models.train import jobs as _jobs
from ..models.train.plot import loss_curve
from .common import bchw_to_image, seed_input
from .diffusion import DIFFUSION
from .gan import GAN
from .vae import VAE_TYPE as VAE

CATEGORY = "atelier/train"
DATASET = "ATELIER_DATASET"
CHANNELS = {"RGB": 3, "grey": 1}
PICKS = ("first", "evenly")  # which images Dataset Images takes
RESOLUTION_TIP = ("Training size in pixels: images are resized so the short side fits and cropped square. Small "
                  "sizes train fast (28-64 for a first model).")


def _image_options() -> dict:
    return {
        "resolution": ("INT", {"default": 32, "min": 4, "max": 4096, "step": 4, "tooltip": RESOLUTION_TIP}),
        "channels": (list(CHANNELS), {"default": "RGB", "tooltip": "RGB, or grey (one channel: digits, sketches)."}),
        "crop": (list(_data.CROPS), {"default": "center", "tooltip": "center: the middle square of every image; "
                 "random: a new random square per step from the image resized to 9/8 of the size (augmentation); "
                 "shift: the middle square moved by up to 1/16 of the size each step, same scale (augmentation that "
                 "curbs memorising a small dataset: digits, icons)."}),
        "flip": ("BOOLEAN", {"default": False, "tooltip": "Mirror images left-right at random (augmentation; "
                 "leave off for digits and text)."}),
    }


def _channels(value: str) -> int:
    if value not in CHANNELS:
        raise InputError(f"channels: expected one of {', '.join(CHANNELS)}, got {value!r}")
    return CHANNELS[value]


def resolve_folder(folder: str, base: str | None = None) -> str:
    """A folder input -> a path: absolute as given; relative under ComfyUI's input folder (outside ComfyUI:
    `base`, else the working folder). A relative path may not climb out of it ('..')."""
    text = str(folder or "").strip()
    if not text:
        raise InputError("folder: expected a folder of images (a path, relative to the input folder or absolute), "
                         "got an empty string")
    path = os.path.expanduser(text)
    if os.path.isabs(path):
        return os.path.normpath(path)
    norm = os.path.normpath(path)
    if norm == ".." or norm.startswith(".." + os.sep) or "\x00" in norm:
        raise InputError(f"folder: {text!r} climbs out of the input folder; give a folder inside it or an "
                         f"absolute path")
    path = os.path.join(host.input_dir() or base or os.getcwd(), norm)
    if not os.path.exists(path):  # the pack's example datasets (workflows/input/), e.g. for the headless runner
        path = host.example_input(norm) or path
    return path


def _folder_signature(path: str) -> str:
    """A digest of the image files under `path` (names, sizes, times): the node re-reads a folder that changed."""
    h = hashlib.sha256(path.encode())
    for f in _data.list_images(path) if os.path.isdir(path) else []:
        try:
            st = os.stat(f)
        except OSError:
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _summary(ds: _data.ImageDataset) -> str:
    text = ds.summary()
    if ds.class_names:
        shown = ", ".join(ds.class_names[:20]) + (" ..." if ds.num_classes > 20 else "")
        text += f"\nclasses: {shown}"
    if ds.skipped:
        text += "\nskipped: " + "; ".join(ds.skipped[:3]) + (" ..." if len(ds.skipped) > 3 else "")
    return text


class AtelierImageFolderDataset:
    DESCRIPTION = ("Reads a folder of PNG/JPEG/WebP images (sub-folders too) as training data: converted to RGB or "
                   "greyscale, resized and cropped square to the training size. Unreadable files are skipped and "
                   "counted, never fatal. With labels, each first-level sub-folder is a class (digits/3/x.png is "
                   "class 3) and the trainers learn a class-conditional model.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The images, for a trainer node.", "Images read, skipped and converted, and the classes.")
    FUNCTION = "load"
    ATELIER_IO = True  # the headless runner gives `io` (its --input folder) for relative paths

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "dataset", "tooltip": "The folder: relative to ComfyUI's input "
                       "folder (e.g. 'digits' for input/digits), or an absolute path."}),
            **_image_options(),
            "labels_from_subfolders": ("BOOLEAN", {"default": False, "tooltip": "Class labels from the first "
                                       "sub-folder names (at least two classes; every image inside one)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder: str, **_: Any) -> str:
        try:
            return _folder_signature(resolve_folder(folder))
        except InputError:
            return ""

    def _base(self) -> str | None:
        io = getattr(self, "io", None)
        return getattr(io, "input_dir", None)

    def load(self, folder: str, resolution: int, channels: str, crop: str, flip: bool, labels_from_subfolders: bool):
        path = resolve_folder(folder, self._base())
        with torch.inference_mode(False):  # plain tensors: the training loop runs outside inference mode
            ds = _data.from_folder(path, int(resolution), channels=_channels(channels), crop=crop, flip=bool(flip),
                                   labels=bool(labels_from_subfolders))
        text = _summary(ds)
        return {"ui": {"text": [text]}, "result": (ds, text)}


class AtelierImagesAsDataset:
    DESCRIPTION = ("Turns an IMAGE batch into training data (e.g. what a graph generated or loaded), resized and "
                   "cropped square like a folder dataset.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The images, for a trainer node.", "How many images, at what size.")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to train on (any size; alpha is dropped)."}),
            **_image_options(),
        }}

    def convert(self, images, resolution: int, channels: str, crop: str, flip: bool):
        if not isinstance(images, torch.Tensor):
            raise InputError(f"images: expected an IMAGE tensor [B,H,W,C], got {type(images).__name__}")
        with torch.inference_mode(False):
            ds = _data.from_images(images, int(resolution), channels=_channels(channels), crop=crop, flip=bool(flip))
        text = _summary(ds)
        return {"ui": {"text": [text]}, "result": (ds, text)}


class AtelierDatasetImages:
    DESCRIPTION = ("Turns a dataset back into an IMAGE batch: N of its images (the first, or spread evenly) at the "
                   "dataset's size (centre squares, no augmentation), with their class labels as text. For comparing "
                   "a model's samples with held-out data (FID/KID, Image Quality) or seeing what a trainer sees.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "labels")
    OUTPUT_TOOLTIPS = ("The images [N,size,size,3] (grey datasets repeated over RGB).",
                       "The class name of each image, comma-separated (empty for an unlabelled dataset).")
    FUNCTION = "images"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (DATASET, {"tooltip": "From Image Folder Dataset or Images As Dataset."}),
            "count": ("INT", {"default": 64, "min": 1, "max": 1_000_000, "tooltip": "How many images (fewer "
                      "when the dataset is smaller)."}),
            "pick": (list(PICKS), {"default": "first", "tooltip": "first: the first images in the dataset's order "
                     "(folders sorted by name); evenly: images spread evenly over it (every class of a folder "
                     "sorted by class)."}),
        }}

    def images(self, dataset, count: int, pick: str = "first"):
        if not isinstance(dataset, _data.ImageDataset):
            raise InputError(f"dataset: expected an {DATASET} from Image Folder Dataset or Images As Dataset, got "
                             f"{type(dataset).__name__}")
        if pick not in PICKS:
            raise InputError(f"pick: expected one of {', '.join(PICKS)}, got {pick!r}")
        n = min(int(count), len(dataset))
        idx = torch.arange(n) if pick == "first" else torch.linspace(0, len(dataset) - 1, n).round().long()
        x = dataset.images[idx]  # [N,C,S',S'] uint8
        s, side = dataset.size, int(x.shape[-1])
        if side > s:  # stored larger for random crops: the centre square
            o = (side - s) // 2
            x = x[:, :, o:o + s, o:o + s]
        img = bchw_to_image(x.float() / 255.0, rgb=True)  # [N,S,S,3]
        names = ""
        if dataset.labels is not None and dataset.class_names:
            names = ", ".join(dataset.class_names[int(i)] for i in dataset.labels[idx])
        return {"ui": {"text": [f"{n} images {s}x{s}" + (f"; classes: {names}" if names else "")]},
                "result": (img, names)}


# ---------------------------------------------------------------- trainers


def _option_input(o: _jobs.Option) -> tuple:
    if o.choices:
        return (list(o.choices), {"default": o.default, "tooltip": o.help})
    if isinstance(o.default, bool):
        return ("BOOLEAN", {"default": o.default, "tooltip": o.help})
    spec: dict[str, Any] = {"default": o.default, "tooltip": o.help}
    spec.update({k: v for k, v in (("min", o.min), ("max", o.max)) if v is not None})
    if isinstance(o.default, int):
        return ("INT", spec)
    if isinstance(o.default, float):
        return ("FLOAT", {**spec, "step": 0.001})
    return ("STRING", spec)


class TrainNode:
    """The trainer node of one family: subclasses set KIND, RETURN_TYPES (model socket first), DESCRIPTION."""

    KIND = ""
    CATEGORY = CATEGORY
    RETURN_NAMES = ("model", "samples", "loss_curve", "report")
    FUNCTION = "train"

    @classmethod
    def outputs(cls, model_type: str) -> tuple[str, ...]:
        return (model_type, "IMAGE", "IMAGE", "STRING")

    @classmethod
    def INPUT_TYPES(cls):
        kind = _jobs.get_kind(cls.KIND)
        d = _jobs.TrainSettings(**kind.defaults)
        return {"required": {
            "dataset": (DATASET, {"tooltip": "Training images from Image Folder Dataset or Images As Dataset."}),
            "name": ("STRING", {"default": f"my_{kind.name}", "tooltip": f"The model's file name in "
                     f"models/{kind.folder} (.safetensors is added); its Load node lists it. A training state "
                     f"(.train-state) is kept beside it for continuing."}),
            "steps": ("INT", {"default": 500, "min": 1, "max": 10_000_000, "tooltip": "Steps to train in this Run; "
                      "Run again to train as many more."}),
            **{o.name: _option_input(o) for o in kind.options},
            "batch_size": ("INT", {"default": d.batch_size, "min": 1, "max": 4096, "tooltip": "Images per step."}),
            "learning_rate": ("FLOAT", {"default": d.lr, "min": 0.00001, "max": 0.1, "step": 0.00001,
                              "round": 0.000001, "tooltip": "AdamW's learning rate (after warm-up)."}),
            "warmup": ("INT", {"default": d.warmup, "min": 0, "max": 1_000_000, "tooltip": "Steps over which the "
                       "learning rate rises linearly from 0 (steadier starts)."}),
            "ema": ("FLOAT", {"default": d.ema, "min": 0.0, "max": 0.9999, "step": 0.0001, "round": 0.00001,
                    "tooltip": "Decay of the moving average of the weights that is saved (smoother samples); 0: off."}),
            "seed": seed_input("Seed of the run: batches, augmentation and noise. A continued run keeps its own.",
                               control=False),
            "save_every": ("INT", {"default": 500, "min": 0, "max": 10_000_000, "tooltip": "Steps between "
                           "checkpoints (the file is also written at the end and on Cancel); 0: only then."}),
            "preview_every": ("INT", {"default": 100, "min": 0, "max": 10_000_000, "tooltip": "Steps between "
                              "sample previews shown in the node; 0: only at the end."}),
            "continue": ("BOOLEAN", {"default": True, "tooltip": "On: continue the run saved under this name when "
                         "its architecture and data match. Off, or another run there: a new file (name_2, ...); "
                         "nothing is overwritten."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **_: Any) -> float:
        return float("nan")  # every Run trains `steps` more

    def train(self, dataset, name: str, steps: int, batch_size: int, learning_rate: float, warmup: int, ema: float,
              seed: int, save_every: int, preview_every: int, **rest: Any):
        kind = _jobs.get_kind(self.KIND)
        if not isinstance(dataset, _data.ImageDataset):
            raise InputError(f"dataset: expected an {DATASET} from Image Folder Dataset or Images As Dataset, got "
                             f"{type(dataset).__name__}")
        continue_run = bool(rest.pop("continue", True))
        options = {o.name: rest.pop(o.name) for o in kind.options if o.name in rest}
        if rest:
            raise InputError(f"{self.KIND} trainer: unexpected input(s) {', '.join(sorted(rest))}")
        settings = kind.settings(steps=int(steps), batch_size=int(batch_size), lr=float(learning_rate),
                                 warmup=int(warmup), ema=float(ema), seed=int(seed), save_every=int(save_every),
                                 preview_every=int(preview_every))
        folder, path = _jobs.model_path(kind, name)
        result, note = _jobs.run_job(kind, dataset, path, settings, options, continue_run=continue_run)
        rel = os.path.relpath(result.path, folder)
        model = get_manager().load(rel, kind.folder, family=kind.family)
        if result.preview is not None:
            samples = bchw_to_image(result.preview, rgb=True)
        else:
            samples = torch.zeros(1, dataset.size, dataset.size, 3)
        report = f"{result.summary()}\n{note}\ndata: {dataset.summary()}"
        return {"ui": {"text": [report]}, "result": (model, samples, loss_curve(result.history), report)}


class AtelierTrainDiffusion(TrainNode):
    DESCRIPTION = ("Trains a pixel diffusion model (DDPM with the pack's UNet) on a dataset: each Run trains `steps` "
                   "more steps, showing the loss and sample previews, saving to models/diffusion_models, and "
                   "returns the model for Diffusion Sample. A labelled dataset trains a class-conditional model "
                   "(with a null class for guidance).")
    KIND = "diffusion"
    RETURN_TYPES = TrainNode.outputs(DIFFUSION)
    OUTPUT_TOOLTIPS = ("The model as saved (EMA weights), for Diffusion Sample.",
                       "Samples of the last preview (one per class for a labelled dataset).",
                       "The loss per step of the whole run (raw and smoothed).",
                       "Step, speed, last loss, the file written and the data.")


class AtelierTrainGAN(TrainNode):
    DESCRIPTION = ("Trains a DCGAN (generator and discriminator sized from the resolution, 8..256 as 4*2^k) on a "
                   "dataset with the non-saturating, hinge or WGAN-GP loss: each Run trains `steps` more steps, "
                   "showing the losses and sample previews, saving the generator to models/gans, and returns it for "
                   "the GAN samplers. A labelled dataset trains a class-conditional GAN (labels from sub-folders).")
    KIND = "gan"
    RETURN_TYPES = TrainNode.outputs(GAN)
    OUTPUT_TOOLTIPS = ("The generator as saved (EMA weights), for GAN Sample and the other GAN nodes.",
                       "Samples of the last preview (one per class for a labelled dataset).",
                       "The discriminator and generator losses per step (raw and smoothed).",
                       "Step, speed, last losses, the file written and the data.")


class AtelierTrainVAE(TrainNode):
    DESCRIPTION = ("Trains a convolutional VAE with the ELBO (BCE or MSE reconstruction, KL weight beta with a "
                   "warm-up) on a dataset: each Run trains `steps` more steps, showing the losses and prior-sample "
                   "previews, saving to models/vae, and returns it for the VAE encode, decode and sampling nodes.")
    KIND = "vae"
    RETURN_TYPES = TrainNode.outputs(VAE)
    OUTPUT_TOOLTIPS = ("The VAE as saved (EMA weights), for VAE Encode/Decode and sampling from the prior.",
                       "Decoded samples from the prior of the last preview.",
                       "The loss, its reconstruction and KL terms per step (raw and smoothed).",
                       "Step, speed, last losses, the file written and the data.")


NODE_CLASS_MAPPINGS = {
    "AtelierImageFolderDataset": AtelierImageFolderDataset,
    "AtelierImagesAsDataset": AtelierImagesAsDataset,
    "AtelierDatasetImages": AtelierDatasetImages,
    "AtelierTrainDiffusion": AtelierTrainDiffusion,
    "AtelierTrainGAN": AtelierTrainGAN,
    "AtelierTrainVAE": AtelierTrainVAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierImageFolderDataset": "Atelier Image Folder Dataset",
    "AtelierImagesAsDataset": "Atelier Images As Dataset",
    "AtelierDatasetImages": "Atelier Dataset Images",
    "AtelierTrainDiffusion": "Atelier Train Diffusion",
    "AtelierTrainGAN": "Atelier Train GAN",
    "AtelierTrainVAE": "Atelier Train VAE",
}
