"""MNIST quality metric for tests: the LeNet-5 classifier in ../shared/weights/mnist and the MNIST test set.

The classifier is a metric, not a product model, so it lives here. Its weights are read through the pack's safe
reader. Input: [B,1,28,28] in [0,1]; it is resized to 32x32 bilinearly as in training.
"""
from __future__ import annotations

import gzip
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    """c1 Conv(1,6,5) ReLU MaxPool2, c3 Conv(6,16,5) ReLU MaxPool2, c5 Conv(16,120,5) ReLU, f6 (120,84) ReLU, f7."""

    def __init__(self) -> None:
        super().__init__()
        self.convnet = nn.Sequential()
        self.convnet.add_module("c1", nn.Conv2d(1, 6, 5))
        self.convnet.add_module("relu1", nn.ReLU())
        self.convnet.add_module("s2", nn.MaxPool2d(2, 2))
        self.convnet.add_module("c3", nn.Conv2d(6, 16, 5))
        self.convnet.add_module("relu3", nn.ReLU())
        self.convnet.add_module("s4", nn.MaxPool2d(2, 2))
        self.convnet.add_module("c5", nn.Conv2d(16, 120, 5))
        self.convnet.add_module("relu5", nn.ReLU())
        self.fc = nn.Sequential()
        self.fc.add_module("f6", nn.Linear(120, 84))
        self.fc.add_module("relu6", nn.ReLU())
        self.fc.add_module("f7", nn.Linear(84, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,1,32,32] in [0,1] -> [B,10] log-probabilities
        return F.log_softmax(self.fc(self.convnet(x).flatten(1)), dim=1)


def load_lenet(shared_dir: pathlib.Path) -> LeNet5:
    from atelier.models.loading import read_state_dict

    sd, _ = read_state_dict(shared_dir / "weights" / "mnist" / "lenet_classifier.pth")
    net = LeNet5()
    net.load_state_dict(sd, strict=True)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def class_probabilities(net: LeNet5, images: torch.Tensor) -> torch.Tensor:
    """images [B,1,28,28] in [0,1] -> [B,10] class probabilities."""
    x = F.interpolate(images.float().clamp(0, 1), size=(32, 32), mode="bilinear", align_corners=False)
    return net(x).exp()


def load_mnist_test(shared_dir: pathlib.Path, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set: images [N,1,28,28] in [0,1], labels [N] int64."""
    root = shared_dir / "data" / "mnist"
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    images = torch.from_numpy(raw.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return (images[:n], labels_t[:n]) if n else (images, labels_t)
