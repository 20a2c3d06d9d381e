"""models/cpu_conv's Winograd F(4x4, 3x3) path: equal to a float64 convolution within float32 rounding for any size,
layout, bias and grouping of images; its layers keep transformed kernels only within their budget and never
use stale ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atelier.models import cpu_conv
from atelier.models.cpu_conv import WinogradConv2d, use_winograd, winograd_conv3x3, winograd_kernels


def exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-5) -> float:
    err = (got.double() - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), (err, want.abs().max().item())
    return err


@pytest.mark.parametrize("shape", [(2, 64, 96, 17, 23), (1, 128, 64, 16, 16), (3, 70, 64, 5, 9), (4, 64, 64, 32, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_winograd_equals_convolution(shape, channels_last, bias):
    """Sizes that are not multiples of the 4x4 tile, channels-last or not, with and without bias: float32 rounding
    of the exact result (about 1e-6 of its scale; F.conv2d itself is at 1e-7), shape and channels-last output."""
    N, C, K, H, W = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(K, C, 3, 3, generator=g) / (9 * C) ** 0.5
    b = torch.randn(K, generator=g) if bias else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = winograd_conv3x3(x, winograd_kernels(w), b)
    assert got.shape == (N, K, H, W)
    close(got, exact(x, w, b))


def test_groups_of_images_and_per_call_kernels(monkeypatch):
    """A scratch limit below one call's needs cuts it into groups of images (here 1, 2 and 3 per group); per-call
    kernels (float32, a transposed view into scratch) give the same result as kept ones."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(5, 64, 16, 20, generator=g), torch.randn(80, 64, 3, 3, generator=g) / 24, torch.randn(80)
    want = exact(x, w, b)
    per_image = 36 * 4 * 5 * 80
    scratch = cpu_conv._Scratch()
    for group in (1, 2, 3):
        monkeypatch.setattr(cpu_conv, "WINOGRAD_SCRATCH", group * per_image)
        with torch.inference_mode():
            u = winograd_kernels(w, scratch.take("u", 36 * 64 * 80))
            close(winograd_conv3x3(x, u, b, scratch), want)
        assert scratch.bufs["a"].numel() <= max(group, 1) * per_image * 3  # grown to the largest group only


def net(channels: int = 64, layers: int = 3, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers)]).eval()


def test_layers_keep_kernels_within_budget_and_drop_stale_ones():
    """use_winograd converts the eligible layers (not a 1x1, not 32 channels) with a kept-kernel budget equal to the
    converted weights' bytes. Kernels are 4x a weight, so of five layers only the first keeps its kernels (small
    calls only) and the other four take PyTorch's convolution on small calls; large calls never keep; new weights
    through load_state_dict or an in-place change are used at the next call, and the stale kernels' bytes go back
    to the budget."""
    body = net(layers=5)
    model = torch.nn.Sequential(body, torch.nn.Conv2d(64, 32, 1), torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
    assert use_winograd(model) == 5
    assert all(type(m) is WinogradConv2d for m in body) and type(model[2]) is torch.nn.Conv2d
    scratch = body[0].scratch
    weight_bytes = 64 * 64 * 9 * 4
    assert all(m.scratch is scratch for m in body) and scratch.budget == 5 * weight_bytes

    def chain(x):
        for m in body:
            x = exact(x, m.weight, m.bias)
        return x

    x = torch.randn(1, 64, 16, 16)  # 16 tiles: a small call
    with torch.inference_mode():
        close(body(x), chain(x), rel=1e-4)
    kept = [m._kernels is not None for m in body]
    assert kept == [True, False, False, False, False] and scratch.budget == weight_bytes
    calls = []
    orig = cpu_conv.winograd_conv3x3
    try:
        cpu_conv.winograd_conv3x3 = lambda *a, **k: calls.append(1) or orig(*a, **k)
        with torch.inference_mode():
            body(torch.randn(2, 64, 20, 20))  # 50 tiles: small, nothing more fits: PyTorch's for all but the first
    finally:
        cpu_conv.winograd_conv3x3 = orig
    assert calls == [1]
    with torch.inference_mode():
        big = torch.randn(16, 64, 16, 16)  # 256 tiles: large, kernels per call
        close(body(big), chain(big), rel=1e-4)
    assert [m._kernels is not None for m in body] == kept
    ref = net(layers=5, seed=1)
    body.load_state_dict(ref.state_dict())
    assert scratch.budget == 5 * weight_bytes and body[0]._kernels is None
    with torch.inference_mode():
        close(body[0](x), exact(x, ref[0].weight, ref[0].bias))
    with torch.no_grad():
        body[0].weight.mul_(2)
    with torch.inference_mode():
        close(body[0](x), exact(x, 2 * ref[0].weight, ref[0].bias))
    # small maps and recorded gradients: PyTorch's own convolution
    calls = []
    orig = cpu_conv.winograd_conv3x3
    try:
        cpu_conv.winograd_conv3x3 = lambda *a, **k: calls.append(1) or orig(*a, **k)
        with torch.inference_mode():
            body[1](torch.randn(4, 64, 8, 8))  # 8 px a side: under WINOGRAD_MIN_SIDE
        y = body[1](torch.randn(16, 64, 16, 16, requires_grad=True))
        y.sum().backward()
        with torch.inference_mode():
            body[1](big)  # the one call that takes Winograd (large: kernels per call)
    finally:
        cpu_conv.winograd_conv3x3 = orig
    assert calls == [1]
