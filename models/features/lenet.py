"""LeNet-5 digit classifier as a feature network: features = f6 after its ReLU (84-d for the classic widths).

The layout of ../shared/weights/mnist/lenet_classifier.pth (csinva/gan-vae-pretrained-pytorch): c1 Conv(1,6,5)
ReLU MaxPool2, c3 Conv(6,16,5) ReLU MaxPool2, c5 Conv(16,120,5) ReLU, f6 Linear(120,84) ReLU, f7 Linear(84,10);
keys `convnet.c1.*` ... `fc.f7.*`. Input: grey [B,1,32,32] in [0,1] (MNIST's 28² digits resized bilinearly, as the
classifier was trained). Widths and kernel sizes are read from the weights; the input side is the one that brings
c5 to 1x1. f7 is loaded (the file must be whole) but only `classify` uses it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..descriptor import ModelDescriptor, SizeRequirements
from ..metrics import FeatureFacts

_CONVS = ("c1", "c3", "c5")
_KEYS = {f"convnet.{n}.{p}" for n in _CONVS for p in ("weight", "bias")} | {
    f"fc.{n}.{p}" for n in ("f6", "f7") for p in ("weight", "bias")}


class LeNetFeatures(nn.Module):
    """LeNet-5 with `forward` giving the f6 features and `classify` the class log-probabilities."""

    def __init__(self, channels: tuple[int, int, int, int], kernels: tuple[int, int, int], hidden: int,
                 classes: int) -> None:
        super().__init__()
        cin, a, b, c = channels  # input, c1, c3, c5 widths
        self.convnet = nn.Sequential()
        self.convnet.add_module("c1", nn.Conv2d(cin, a, kernels[0]))
        self.convnet.add_module("relu1", nn.ReLU())
        self.convnet.add_module("s2", nn.MaxPool2d(2, 2))
        self.convnet.add_module("c3", nn.Conv2d(a, b, kernels[1]))
        self.convnet.add_module("relu3", nn.ReLU())
        self.convnet.add_module("s4", nn.MaxPool2d(2, 2))
        self.convnet.add_module("c5", nn.Conv2d(b, c, kernels[2]))
        self.convnet.add_module("relu5", nn.ReLU())
        self.fc = nn.Sequential()
        self.fc.add_module("f6", nn.Linear(c, hidden))
        self.fc.add_module("relu6", nn.ReLU())
        self.fc.add_module("f7", nn.Linear(hidden, classes))
        k1, k3, k5 = kernels
        self.input_size = 2 * (2 * k5 + k3 - 1) + k1 - 1  # c5's output is 1x1 (32 for 5x5 kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,cin,S,S] in [0,1] -> [B,hidden]
        h = self.convnet(x).flatten(1)  # [B,c]
        return F.relu(self.fc.f6(h))

    def classify(self, x: torch.Tensor) -> torch.Tensor:  # [B,cin,S,S] -> [B,classes] log-probabilities
        return F.log_softmax(self.fc.f7(self(x)), dim=1)


def detect(state_dict: dict, meta: dict) -> bool:
    if set(state_dict) != _KEYS:
        return False
    w = {k: tuple(state_dict[f"{p}.weight"].shape) for k, p in
         (("c1", "convnet.c1"), ("c3", "convnet.c3"), ("c5", "convnet.c5"), ("f6", "fc.f6"), ("f7", "fc.f7"))}
    convs_ok = all(len(w[n]) == 4 and w[n][2] == w[n][3] for n in _CONVS)
    return (convs_ok and w["c3"][1] == w["c1"][0] and w["c5"][1] == w["c3"][0] and len(w["f6"]) == 2
            and w["f6"][1] == w["c5"][0] and len(w["f7"]) == 2 and w["f7"][1] == w["f6"][0])


def load(state_dict: dict, meta: dict) -> ModelDescriptor:
    c1, c3, c5 = (state_dict[f"convnet.{n}.weight"].shape for n in _CONVS)
    f6, f7 = state_dict["fc.f6.weight"].shape, state_dict["fc.f7.weight"].shape
    with torch.device("meta"):  # no random init: the weights come from the file
        model = LeNetFeatures((c1[1], c1[0], c3[0], c5[0]), (c1[2], c3[2], c5[2]), f6[0], f7[0])
    model.load_state_dict({k: v.float().contiguous() for k, v in state_dict.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    s, cin, dim = model.input_size, c1[1], f6[0]
    # activations per input pixel at fp32: input, c1 and its ReLU (the largest maps), the rest is small
    bpp = 4.0 * (2 * cin + 2 * c1[0] * ((s - c1[2] + 1) / s) ** 2 + c3[0])
    return ModelDescriptor(
        family="features",
        architecture="LeNet-5",
        model=model,
        purpose=f"Feature extractor (f6, {dim}-d)",
        scale=1,
        in_channels=cin,
        out_channels=dim,
        supports_half=False,  # scores are compared across runs: float32 everywhere (the network is tiny)
        supports_bfloat16=False,
        size_requirements=SizeRequirements(minimum=s, square=True),
        tiling="none",
        bytes_per_pixel=bpp,
        config={"channels": [cin, c1[0], c3[0], c5[0]], "kernels": [c1[2], c3[2], c5[2]], "hidden": dim,
                "classes": f7[0], "input_size": s, "feature_layer": "f6"},
        extra=FeatureFacts(name="LeNet-5 f6", dim=dim, input_size=s, in_channels=cin),
    )
