"""The few ComfyUI core nodes the embedded runner provides: LoadImage, SaveImage, PreviewImage.

They behave as ComfyUI's do (same inputs, outputs, file names and PNG metadata) with one difference: images are
paths. LoadImage's ``image`` is a file path, absolute or relative to the input folder (default: the workflow's
folder), a plain name not found there being looked up among the pack's example inputs (workflows/input/);
SaveImage writes into the run's staging folder, moved into ``--output`` when the whole run succeeded.
The runner gives each instance its folders through the ``io`` attribute before calling it.
"""
from __future__ import annotations

import hashlib
import os
import random
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.errors import InputError
from . import outputs


@dataclass
class IOFolders:
    """Where the core I/O nodes read and write during one run."""

    input_dir: str
    output_dir: str  # the final --output folder (counters account for what is already there)
    staging_dir: str  # where SaveImage writes during the run
    preview_dir: str  # where PreviewImage writes (temporary, never moved into output)


_ANNOTATIONS = (" [input]", " [output]", " [temp]")
# The pack's example input images: what its example workflows load by plain name. Inside ComfyUI the pack copies them
# into the input folder at start-up (models/host.provide_example_inputs); here a name not in the input folder is
# looked up there, so the same workflow file runs unchanged in both.
EXAMPLE_INPUTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "input")


def resolve_image_path(image: str, io: IOFolders) -> str:
    """A LoadImage value -> an existing file: absolute, or relative to the input folder (ComfyUI's ``name [output]``
    annotations pick the output or preview folder); a plain name missing there may be one of the pack's example
    inputs (EXAMPLE_INPUTS)."""
    if not isinstance(image, str) or not image.strip():
        raise InputError(f"image: expected a path to an image file, got {image!r}")
    base = io.input_dir
    for ann, folder in zip(_ANNOTATIONS, (io.input_dir, io.output_dir, io.preview_dir)):
        if image.endswith(ann):
            image, base = image[: -len(ann)], folder
    path = os.path.expanduser(image)
    if not os.path.isabs(path):
        path = os.path.join(base, path)
        example = os.path.join(EXAMPLE_INPUTS, image)
        if not os.path.isfile(path) and os.path.basename(image) == image and os.path.isfile(example):
            path = example  # an example input the pack ships (and copies into ComfyUI's input folder)
    if not os.path.isfile(path):
        raise InputError(f"image: no file {image!r} (looked for {os.path.abspath(path)}); give a path absolute or "
                         f"relative to the input folder {os.path.abspath(base)} (--input)")
    return os.path.abspath(path)


class LoadImage:
    """ComfyUI's LoadImage with a path: IMAGE [B,H,W,3] float 0..1 and MASK [B,H,W] = 1 - alpha (64x64 zeros without alpha)."""

    ATELIER_IO = True
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    DESCRIPTION = "Loads an image file (a path, absolute or relative to the input folder)."

    io: IOFolders

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": ([], {"image_upload": True, "tooltip": "Path of the image file."})}}

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image, ImageOps, ImageSequence

        path = resolve_image_path(image, self.io)
        try:
            img = Image.open(path)
        except OSError as e:
            raise InputError(f"image: {path} is not an image Pillow can read ({e})") from None
        frames: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        size = None
        with img:
            for frame in ImageSequence.Iterator(img):
                frame = ImageOps.exif_transpose(frame)
                if frame.mode == "I":
                    frame = frame.point(lambda v: v * (1 / 255))
                rgb = frame.convert("RGB")
                if size is None:
                    size = rgb.size
                if rgb.size != size:
                    continue  # like ComfyUI: frames of another size are skipped
                frames.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None])  # [1,H,W,3]
                if "A" in frame.getbands():
                    alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
                    masks.append(1.0 - torch.from_numpy(alpha)[None])  # [1,H,W]
                elif frame.mode == "P" and "transparency" in frame.info:
                    alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
                    masks.append(1.0 - torch.from_numpy(alpha)[None])
                else:
                    masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))
            fmt = img.format
        if len(frames) > 1 and fmt != "MPO":
            return torch.cat(frames, 0), torch.cat(masks, 0)
        return frames[0], masks[0]

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:
        return image  # the runner hashes the file itself (see file_digest)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_pil(image: torch.Tensor) -> Any:
    from PIL import Image

    arr = np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)  # [H,W,C]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


class SaveImage:
    """ComfyUI's SaveImage: ``<prefix>_<counter:05>_.png`` with the ``prompt`` and ``workflow`` text chunks."""

    ATELIER_IO = True
    CATEGORY = "image"
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    DESCRIPTION = "Saves the input images to the output folder."

    kind = "output"
    compress_level = 4
    io: IOFolders

    def __init__(self) -> None:
        self.prefix_append = ""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def _folders(self) -> tuple[str, list[str]]:
        """(folder written to, folders whose files the counter must pass)."""
        return self.io.staging_dir, [self.io.staging_dir, self.io.output_dir]

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: dict[str, Any] | None = None) -> dict[str, Any]:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise InputError(f"images: expected an IMAGE [B,H,W,C], got {getattr(images, 'shape', type(images).__name__)}")
        write_dir, count_dirs = self._folders()
        sub, base = outputs.split_prefix(filename_prefix + self.prefix_append, write_dir,
                                         int(images.shape[2]), int(images.shape[1]))
        counter = outputs.next_counter([os.path.join(d, sub) for d in count_dirs], base)
        folder = os.path.join(write_dir, sub)
        os.makedirs(folder, exist_ok=True)
        meta = outputs.png_info(prompt, extra_pnginfo)
        results = []
        for batch_number, image in enumerate(images):  # image: [H,W,C]
            name = f"{base.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            _to_pil(image).save(os.path.join(folder, name), pnginfo=meta, compress_level=self.compress_level)
            results.append({"filename": name, "subfolder": sub, "type": self.kind})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """ComfyUI's PreviewImage: like SaveImage into the temporary preview folder (not a result of the run)."""

    kind = "temp"
    compress_level = 1
    DESCRIPTION = "Saves the input images to the temporary preview folder."

    def __init__(self) -> None:
        super().__init__()
        self.prefix_append = "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def _folders(self) -> tuple[str, list[str]]:
        return self.io.preview_dir, [self.io.preview_dir]

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: dict[str, Any] | None = None) -> dict[str, Any]:
        return super().save_images(images, filename_prefix, prompt, extra_pnginfo)


CORE_NODES: dict[str, type] = {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage}
