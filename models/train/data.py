"""Training data: a folder of images (or an IMAGE batch) as a dataset the training loop draws batches from.

Images are decoded once, converted to greyscale or RGB, resized so that the short side is the training size (times
9/8 when random crops are asked for) and centre-cropped to a square, and kept as uint8 `[N,C,S,S]`. `batch` takes
items by index and applies the random crop and the horizontal flip from a torch.Generator the loop seeds per step,
so a run is reproducible and resumable. Labels come from the first sub-folder below the root (`digits/3/x.png` is
class "3"). Unreadable files are skipped and counted, never fatal; an empty folder is an error naming it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..budget import require
from ..errors import InputError

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CROPS = ("center", "random", "shift")
RANDOM_MARGIN = 9 / 8  # random crops take size x size from an image resized to 9/8 of it


def shift_margin(size: int) -> int:
    """The largest translation of `crop="shift"`: 1/16 of the size, at least 1 px (2 px at 28 or 32, 4 at 64)."""
    return max(1, round(size / 16))


@dataclass
class ImageDataset:
    images: torch.Tensor  # [N,C,S',S'] uint8, S' = size (centre and shift crops) or round(size * 9/8) (random crops)
    size: int
    crop: str = "center"
    flip: bool = False
    labels: torch.Tensor | None = None  # [N] long
    class_names: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)  # files that could not be read ("path: why")
    converted: int = 0  # files whose mode or size differed from the training mode and size
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # [B,C,size,size] in 0..1
        """The items at `indices`, randomly cropped (or shifted) and flipped with draws from `generator` (CPU).

        crop "random": a size x size window of the image stored at 9/8 of the size (scale and position vary);
        "shift": the image translated by up to `shift_margin(size)` px each way at its own scale, the edges
        mirrored in (a regulariser for small datasets: the model cannot memorise pixel positions)."""
        x = self.images[indices]
        B, s = x.shape[0], self.size
        if self.crop == "shift":
            m = shift_margin(s)
            x = F.pad(x.float(), (m, m, m, m), mode="reflect")  # [B,C,s+2m,s+2m]
        if self.crop in ("random", "shift") and x.shape[-1] > s:
            span = x.shape[-1] - s + 1
            offs = torch.randint(span, (B, 2), generator=generator)
            x = torch.stack([x[i, :, a:a + s, b:b + s] for i, (a, b) in enumerate(offs.tolist())])
        if self.flip:
            flip = torch.rand(B, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.float().div_(255.0)  # in place on a fresh float copy (uint8 -> float, or the shifted crops)

    def summary(self) -> str:
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return (f"{len(self)} images {self.size}x{self.size} {'RGB' if self.channels == 3 else 'grey'}{classes} "
                f"from {self.source or 'an IMAGE batch'}; {len(self.skipped)} skipped, {self.converted} converted")


def _stored_side(size: int, crop: str) -> int:
    return int(round(size * RANDOM_MARGIN)) if crop == "random" else size


def check_options(size: int, channels: int, crop: str) -> None:
    if not 4 <= size <= 4096:
        raise InputError(f"resolution: expected 4..4096 pixels, got {size}")
    if channels not in (1, 3):
        raise InputError(f"channels: expected 1 (greyscale) or 3 (RGB), got {channels}")
    if crop not in CROPS:
        raise InputError(f"crop: expected one of {', '.join(CROPS)}, got {crop!r}")


def list_images(root: str, recursive: bool = True) -> list[str]:
    """Image files under root (sorted, so the order and the labels do not depend on the file system)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
    return found


def _square(img, side: int):  # PIL image -> PIL image side x side: short side resized, centre crop
    from PIL import Image

    w, h = img.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    left, top = (nw - side) // 2, (nh - side) // 2
    return img.crop((left, top, left + side, top + side))


def _to_8bit(img):  # PIL image -> the same with 8-bit channels (16-bit and float greyscale scaled, not clipped)
    from PIL import Image

    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
        a = a * (255 / 65535)  # 16-bit samples (PNG 16-bit greyscale opens as I;16 or I)
    elif img.mode == "F" and a.max(initial=0) <= 1.0:
        a = a * 255
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def _decode(path: str, mode: str, size: int, side: int) -> tuple[np.ndarray, bool]:  # [S,S,C] uint8, converted?
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        converted = im.mode != mode or im.size != (size, size)
        im = _to_8bit(im)
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")  # transparent pixels on white, as a viewer shows them
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        im = _square(im.convert(mode), side)
        arr = np.asarray(im, dtype=np.uint8)
    return (arr[..., None] if arr.ndim == 2 else arr), converted


def from_folder(root: str, size: int, *, channels: int = 3, crop: str = "center", flip: bool = False,
                recursive: bool = True, labels: bool = False) -> ImageDataset:
    """Decode every image under `root` (PNG/JPEG/WebP). labels: classes from the first sub-folder names."""
    check_options(size, channels, crop)
    if not os.path.isdir(root):
        raise InputError(f"folder: expected a folder of images, got {root!r} (not a folder)")
    files = list_images(root, recursive)
    if not files:
        raise InputError(f"folder: {root!r} has no PNG/JPEG/WebP images{' (sub-folders included)' if recursive else ''}")
    side = _stored_side(size, crop)
    require(len(files) * channels * side * side, f"the dataset ({len(files)} images of {side}x{side})",
            torch.device("cpu"))
    mode = "RGB" if channels == 3 else "L"
    arrays, names, skipped, converted = [], [], [], 0
    for path in files:
        try:
            arr, conv = _decode(path, mode, size, side)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and counted, never fatal
            skipped.append(f"{os.path.relpath(path, root)}: {type(e).__name__}: {e}")
            continue
        arrays.append(arr)
        names.append(os.path.relpath(path, root))
        converted += conv
    if skipped:
        log.warning("dataset %s: skipped %d unreadable files (first: %s)", root, len(skipped), skipped[0])
    if not arrays:
        raise InputError(f"folder: none of the {len(files)} images in {root!r} could be read (first: {skipped[0]})")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    ds = ImageDataset(images, size, crop, flip, skipped=skipped, converted=converted, source=root)
    if labels:
        ds.labels, ds.class_names = _labels_from_folders(names, root)
    return ds


def _labels_from_folders(names: list[str], root: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    parts = [n.replace("\\", "/").split("/") for n in names]
    loose = [n for n, p in zip(names, parts) if len(p) < 2]
    if loose:
        raise InputError(f"folder: class labels come from sub-folder names, but {len(loose)} images lie directly in "
                         f"{root!r} (first: {loose[0]}); move them into a class folder or turn labels off")
    classes = sorted({p[0] for p in parts}, key=lambda c: (len(c), c) if c.isdigit() else (1 << 30, c))
    if len(classes) < 2:
        raise InputError(f"folder: class labels need at least two class sub-folders in {root!r}, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[p[0]] for p in parts], dtype=torch.long), tuple(classes)


def from_images(images: torch.Tensor, size: int, *, channels: int = 3, crop: str = "center",
                flip: bool = False) -> ImageDataset:
    """An IMAGE batch [B,H,W,C] in 0..1 as a dataset (resized short side, centre-cropped, like a folder)."""
    check_options(size, channels, crop)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] < 1:
        raise InputError(f"images: expected an IMAGE batch [B,H,W,C], got shape {tuple(images.shape)}")
    x = images.detach().float().cpu().movedim(-1, 1)[:, :3]  # [B,C,H,W]
    converted = int(x.shape[1] != channels or x.shape[-1] != x.shape[-2] or x.shape[-1] != size) * x.shape[0]
    if channels == 1 and x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    side = _stored_side(size, crop)
    H, W = x.shape[-2:]
    scale = side / min(H, W)
    nh, nw = max(side, round(H * scale)), max(side, round(W * scale))
    if (nh, nw) != (H, W):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=scale < 1, align_corners=False)
    top, left = (nh - side) // 2, (nw - side) // 2
    x = x[..., top:top + side, left:left + side]
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return ImageDataset(u8, size, crop, flip, converted=converted)
