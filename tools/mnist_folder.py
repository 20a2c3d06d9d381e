"""Write MNIST digits of ../shared/data/mnist as PNG files in class folders, the layout the Image Folder Dataset
node and `atelier train` read: OUT/0/00012.png ...

    python tools/mnist_folder.py OUT [--first 8000 | --last 2000] [--shared ../shared]

The pack's shipped MNIST models train on the first 8,000 test digits; the last 2,000 are kept for metrics.
"""
from __future__ import annotations

import argparse
import gzip
import os
import pathlib

import numpy as np
from PIL import Image


def read_mnist(shared: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:  # [N,28,28] uint8, [N] uint8
    root = shared / "data" / "mnist"
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return images, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--first", type=int, default=0, help="only the first N digits")
    ap.add_argument("--last", type=int, default=0, help="only the last N digits")
    ap.add_argument("--shared", default=os.environ.get("ATELIER_SHARED", str(pathlib.Path(__file__).resolve().parents[2] / "shared")))
    a = ap.parse_args()
    images, labels = read_mnist(pathlib.Path(a.shared))
    idx = np.arange(len(images))
    if a.first:
        idx = idx[:a.first]
    if a.last:
        idx = idx[-a.last:]
    for i in idx:
        d = os.path.join(a.out, str(int(labels[i])))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(images[i]).save(os.path.join(d, f"{i:05d}.png"))
    print(f"{len(idx)} digits written to {a.out}")


if __name__ == "__main__":
    main()
