"""REFERENCE implementations for bench/style.py: not used by the pack, independent of its code.

A transcription of the upstream modules in their own layout (nn.Module classes with ReflectionPad2d + Conv2d inside
ConvLayer, nn.ReLU/nn.Upsample as modules, upstream's calc_mean_std / adaptive_instance_normalization), written from
the descriptions in ../shared/golden/{microast,adain}/README.md of
- MicroAST: EndyWon/MicroAST @ 5a6c905 `net_microAST.py` (Encoder, Modulator, Decoder, TestNet), `function.py`;
- AdaIN: naoto0804/pytorch-AdaIN @ 47950d0 `net.py` (vgg, decoder), `function.py`, `test.py` style_transfer.
They reproduce the golden outputs (tests/models/test_microast.py and test_style_nets.py test the pack's own code;
`python bench/style_reference.py` checks these against the same golden files). Untiled, as upstream runs them.
"""
from __future__ import annotations

import torch
import torch.nn as nn


# ------------------------------------------------------------------ function.py (both repositories)
def calc_mean_std(feat: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    N, C = feat.size()[:2]
    feat_var = feat.view(N, C, -1).var(dim=2) + eps
    feat_std = feat_var.sqrt().view(N, C, 1, 1)
    feat_mean = feat.view(N, C, -1).mean(dim=2).view(N, C, 1, 1)
    return feat_mean, feat_std


def adaptive_instance_normalization(content_feat: torch.Tensor, style_feat: torch.Tensor) -> torch.Tensor:
    size = content_feat.size()
    style_mean, style_std = calc_mean_std(style_feat)
    content_mean, content_std = calc_mean_std(content_feat)
    normalized_feat = (content_feat - content_mean.expand(size)) / content_std.expand(size)
    return normalized_feat * style_std.expand(size) + style_mean.expand(size)


# ------------------------------------------------------------------ MicroAST net_microAST.py
class ConvLayer(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1):
        super().__init__()
        self.reflection_pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv_layer = nn.Conv2d(in_channels, out_channels, kernel_size, stride, groups=groups)

    def forward(self, x):
        return self.conv_layer(self.reflection_pad(x))


class ResidualLayer(nn.Module):
    def __init__(self, channels=64, kernel_size=3):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, kernel_size)
        self.relu = nn.ReLU()
        self.conv2 = ConvLayer(channels, channels, kernel_size)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


class FilterModulatedResidualLayer(ResidualLayer):
    def forward(self, x, weight, bias):
        h1 = self.conv1(x)
        h2 = weight * h1 + bias * x
        h3 = self.relu(h2)
        h4 = self.conv2(h3)
        return x + (weight * h4 + bias * h3)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(
            ConvLayer(3, 16, 9), nn.ReLU(), ConvLayer(16, 32, 3, 2, groups=16), nn.ReLU(), ConvLayer(32, 32, 1),
            nn.ReLU(), ConvLayer(32, 64, 3, 2, groups=32), nn.ReLU(), ConvLayer(64, 64, 1), nn.ReLU(),
            ResidualLayer(64))
        self.enc2 = nn.Sequential(ResidualLayer(64))

    def forward(self, x):
        x1 = self.enc1(x)
        x2 = self.enc2(x1)
        return [x1, x2]


class Modulator(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight1 = nn.Sequential(ConvLayer(64, 64, 3, groups=64), nn.AdaptiveAvgPool2d((1, 1)))
        self.bias1 = nn.Sequential(ConvLayer(64, 64, 3, groups=64), nn.AdaptiveAvgPool2d((1, 1)))
        self.weight2 = nn.Sequential(ConvLayer(64, 64, 3, groups=64), nn.AdaptiveAvgPool2d((1, 1)))
        self.bias2 = nn.Sequential(ConvLayer(64, 64, 3, groups=64), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return [self.weight1(x[0]), self.weight2(x[1])], [self.bias1(x[0]), self.bias2(x[1])]


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec1 = FilterModulatedResidualLayer(64)
        self.dec2 = FilterModulatedResidualLayer(64)
        self.dec3 = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"), ConvLayer(64, 32, 3, groups=32), nn.ReLU(),
            ConvLayer(32, 32, 1), nn.ReLU(), nn.Upsample(scale_factor=2, mode="bilinear"),
            ConvLayer(32, 16, 3, groups=16), nn.ReLU(), ConvLayer(16, 16, 1), nn.ReLU(), ConvLayer(16, 3, 9))

    def forward(self, x, s, w, b, alpha):
        y = adaptive_instance_normalization(x[1], s[1])
        y = alpha * y + (1 - alpha) * x[1]
        y = self.dec1(y, w[1], b[1])
        y2 = adaptive_instance_normalization(y, s[0])
        y = alpha * y2 + (1 - alpha) * y
        y = self.dec2(y, w[0], b[0])
        return self.dec3(y)


class TestNet(nn.Module):
    def __init__(self, content_encoder, style_encoder, modulator, decoder):
        super().__init__()
        self.content_encoder, self.style_encoder = content_encoder, style_encoder
        self.modulator, self.decoder = modulator, decoder

    def forward(self, content, style, alpha=1.0):
        style_feats = self.style_encoder(style)
        filter_weights, filter_biases = self.modulator(style_feats)
        content_feats = self.content_encoder(content)
        return self.decoder(content_feats, style_feats, filter_weights, filter_biases, alpha)


def microast_testnet(folder: str) -> TestNet:
    """As test_microAST.py: four modules, four torch.load calls (weights only)."""
    import os

    parts = {"content_encoder": Encoder(), "style_encoder": Encoder(), "modulator": Modulator(), "decoder": Decoder()}
    for name, module in parts.items():
        module.eval()
        sd = torch.load(os.path.join(folder, f"{name}_iter_160000.pth.tar"), map_location="cpu", weights_only=True)
        module.load_state_dict(sd)
    return TestNet(**parts).eval()


# ------------------------------------------------------------------ pytorch-AdaIN net.py / test.py
def adain_decoder() -> nn.Sequential:
    return nn.Sequential(
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(512, 256, (3, 3)), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(256, 256, (3, 3)), nn.ReLU(),
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(256, 256, (3, 3)), nn.ReLU(),
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(256, 256, (3, 3)), nn.ReLU(),
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(256, 128, (3, 3)), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(128, 128, (3, 3)), nn.ReLU(),
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(128, 64, (3, 3)), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(64, 64, (3, 3)), nn.ReLU(),
        nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(64, 3, (3, 3)),
    )


def adain_vgg() -> nn.Sequential:
    """`nn.Sequential(*list(net.vgg.children())[:31])`: to relu4_1."""
    def block(cin, cout):
        return [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(cin, cout, (3, 3)), nn.ReLU()]

    pool = lambda: nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True)  # noqa: E731
    layers = [nn.Conv2d(3, 3, (1, 1))] + block(3, 64) + block(64, 64) + [pool()] + block(64, 128) + block(128, 128)
    layers += [pool()] + block(128, 256) + block(256, 256) + block(256, 256) + block(256, 256) + [pool()]
    layers += block(256, 512)
    return nn.Sequential(*layers)


def adain_style_transfer(vgg, decoder, content, style, alpha=1.0):
    content_f = vgg(content)
    style_f = vgg(style)
    feat = adaptive_instance_normalization(content_f, style_f)
    feat = feat * alpha + content_f * (1 - alpha)
    return decoder(feat)


if __name__ == "__main__":  # self-check against the golden files
    import lzma
    import pathlib
    import sys

    from safetensors.torch import load, load_file

    shared = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[2] / "shared")
    torch.set_grad_enabled(False)
    net = microast_testnet(str(shared / "weights" / "microast"))
    g = load_file(str(shared / "golden" / "microast" / "microast_golden.safetensors"))
    print("MicroAST out_256 max diff", float((net(g["content_256"], g["style"]) - g["out_256"]).abs().max()))
    vgg, dec = adain_vgg(), adain_decoder()
    for m, f in ((vgg, "vgg_relu4_1"), (dec, "decoder")):
        with lzma.open(shared / "golden" / "adain" / f"{f}.safetensors.xz") as fh:
            m.load_state_dict(load(fh.read()))
    io = load_file(str(shared / "golden" / "adain" / "adain_io.safetensors"))
    print("AdaIN out_alpha06 max diff",
          float((adain_style_transfer(vgg, dec, io["content"], io["style"], 0.6) - io["out_alpha06"]).abs().max()))
