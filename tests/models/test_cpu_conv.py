"""models/cpu_conv's Winograd F(4x4, 3x3) path: equal to a float64 convolution within float32 rounding for any size,
layout, bias and grouping of images; its layers choose their calls, keep the state dict and never use stale kernels."""
from __future__ import annotations

import time

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


def test_groups_of_images(monkeypatch):
    """A scratch limit below one call's needs cuts it into groups of images (here 1, 2 and 3 per group), with the
    same result; the work buffers grow to the largest group only."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(5, 64, 16, 20, generator=g), torch.randn(80, 64, 3, 3, generator=g) / 24, torch.randn(80)
    want = exact(x, w, b)
    per_image = 36 * 4 * 5 * 80
    scratch = cpu_conv._Scratch()
    for group in (1, 2, 3):
        monkeypatch.setattr(cpu_conv, "WINOGRAD_SCRATCH", group * per_image)
        with torch.inference_mode():
            close(winograd_conv3x3(x, winograd_kernels(w, scratch.take("u", 36 * 64 * 80)), b, scratch), want)
        assert scratch.bufs["a"].numel() == group * per_image


class Always(dict):
    def __init__(self, value: bool):
        super().__init__()
        self.value = value

    def get(self, key, default=None):
        return self.value


def test_use_winograd_layers_keep_keys_and_choose_calls():
    """use_winograd converts the eligible layers (not a 1x1, not 32 channels), sharing one scratch, with the same
    state dict; calls of WINOGRAD_MIN_TILES tiles or more on maps of WINOGRAD_MIN_SIDE take Winograd, the rest
    (small calls, small maps, recorded gradients) PyTorch's own convolution; results equal the exact chain; weights
    changed in place or loaded are used at the next call (nothing is kept between calls)."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(3)]).eval()
    model = torch.nn.Sequential(body, torch.nn.Conv2d(64, 32, 1), torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_winograd(model) == 3
    assert all(type(m) is WinogradConv2d for m in body) and type(model[2]) is torch.nn.Conv2d
    assert len({id(m.scratch) for m in body}) == 1
    assert model.state_dict().keys() == keys.keys() and not list(model.buffers())
    scratch = body[0].scratch
    scratch.faster = Always(True)  # as if Winograd had measured faster for every shape

    def chain(x):
        for m in body:
            x = exact(x, m.weight, m.bias)
        return x

    calls = []
    orig = cpu_conv.winograd_conv3x3
    try:
        cpu_conv.winograd_conv3x3 = lambda *a, **k: calls.append(a[0].shape[0]) or orig(*a, **k)
        with torch.inference_mode():
            for x in (torch.randn(4, 64, 16, 16), torch.randn(1, 64, 32, 32)):  # 64 tiles each: Winograd
                close(body(x), chain(x), rel=1e-4)
            body(torch.randn(3, 64, 16, 16))  # 48 tiles: too few
            body(torch.randn(16, 64, 8, 8))  # 8 px a side
        y = body(torch.randn(4, 64, 16, 16, requires_grad=True))  # gradients recorded
        y.sum().backward()
        assert calls == [4] * 3 + [1] * 3
        ref = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(3)])
        body.load_state_dict(ref.state_dict())
        x = torch.randn(4, 64, 16, 16)
        with torch.inference_mode():
            close(body[0](x), exact(x, ref[0].weight, ref[0].bias))
        with torch.no_grad():
            body[0].weight.mul_(2)
        with torch.inference_mode():
            close(body[0](x), exact(x, 2 * ref[0].weight, ref[0].bias))
    finally:
        cpu_conv.winograd_conv3x3 = orig


def test_each_shape_is_measured_once_and_the_faster_way_kept():
    """The first call of a shape runs both ways (Winograd twice: once to allocate its scratch, once timed) and
    remembers the faster per shape and thread count; later calls take only that way, both giving the exact result."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
    use_winograd(layer)
    conv, x = layer[0], torch.randn(4, 64, 16, 16)
    calls = []
    orig = cpu_conv.winograd_conv3x3
    try:
        cpu_conv.winograd_conv3x3 = lambda *a, **k: calls.append(1) or orig(*a, **k)
        with torch.inference_mode():
            close(conv(x), exact(x, conv.weight, conv.bias))
            key = ((4, 64, 16, 16), (64, 64, 3, 3), torch.get_num_threads())
            assert len(calls) == 3 and list(conv.scratch.faster) == [key]
            for faster, want_calls in ((True, 4), (False, 4)):
                conv.scratch.faster[key] = faster
                close(conv(x), exact(x, conv.weight, conv.bias))
                assert len(calls) == want_calls
            conv(torch.randn(1, 64, 32, 32))  # another shape: measured too
            assert len(calls) == 7 and len(conv.scratch.faster) == 2
    finally:
        cpu_conv.winograd_conv3x3 = orig


def test_scratch_released_after_a_run():
    """scratch_released drops the work buffers when the run ends (also on an error), the per-shape choices stay."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
    use_winograd(model)
    scratch = model[0].scratch
    for fail in (False, True):
        try:
            scratch.faster.clear()  # measured again: Winograd runs, whichever way wins
            with torch.inference_mode(), cpu_conv.scratch_released(model):
                model(torch.randn(4, 64, 16, 16))
                assert scratch.bufs and scratch.faster
                if fail:
                    raise KeyError("stop")
        except KeyError:
            assert fail
        assert not scratch.bufs and len(scratch.faster) == 1


@pytest.mark.skipif(not cpu_conv.packing_usable(), reason="this PyTorch build has no oneDNN packed convolution")
@pytest.mark.parametrize("shape", [(1, 64, 96, 4, 4), (2, 70, 64, 5, 9), (1, 256, 256, 8, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_weights_equal_convolution(shape, bias):
    """oneDNN with a weight packed once gives the convolution (float64 reference), channels-last, from NCHW or
    channels-last input."""
    torch.manual_seed(0)
    N, C, K, H, W = shape
    x, w = torch.randn(N, C, H, W), torch.randn(K, C, 3, 3) / (3 * C ** 0.5)
    b = torch.randn(K) if bias else None
    packed = cpu_conv.pack_weight(w.contiguous(memory_format=torch.channels_last), (N, C, H, W), (1, 1))
    with torch.inference_mode():
        for xi in (x, x.contiguous(memory_format=torch.channels_last)):
            y = cpu_conv.packed_conv(xi, packed, b, (1, 1))
            assert y.shape == (N, K, H, W) and y.is_contiguous(memory_format=torch.channels_last)
            close(y, exact(x, w, b))


@pytest.mark.skipif(not cpu_conv.packing_usable(), reason="this PyTorch build has no oneDNN packed convolution")
def test_small_calls_pack_weights_only_inside_a_run_and_within_the_budget(monkeypatch):
    """Calls too small for Winograd take a packed weight only inside `scratch_released` (never outside a run, where
    weights may be patched between calls), one pack per layer and shape, made at the run's first such call and
    dropped when it ends, so weights changed between runs are used; the packs stay within the budget, beyond which
    layers keep PyTorch's convolution; results equal the exact chain."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(3)]).eval()
    assert use_winograd(body) == 3
    scratch = body[0].scratch
    weight_bytes = sum(p.numel() * p.element_size() for p in body.parameters())
    assert scratch.pack_budget == cpu_conv.pack_budget(body) == int(cpu_conv.PACK_BUDGET * weight_bytes)
    assert cpu_conv.pack_budget(torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1))) == 0
    scratch.faster = Always(True)  # as if the packed way had measured faster for every shape
    packs = []
    orig = cpu_conv.pack_weight
    monkeypatch.setattr(cpu_conv, "pack_weight", lambda w, *a: packs.append(w.shape) or orig(w, *a))
    ran = []
    orig_conv = cpu_conv.packed_conv
    monkeypatch.setattr(cpu_conv, "packed_conv", lambda x, *a: ran.append(x.shape[0]) or orig_conv(x, *a))

    def chain(x):
        for m in body:
            x = exact(x, m.weight, m.bias)
        return x

    scratch.pack_budget = 10 ** 9
    small = torch.randn(1, 64, 8, 8)
    with torch.inference_mode():
        body(small)  # outside a run: nothing packed
        assert not packs and not ran
        with cpu_conv.scratch_released(body):
            assert scratch.in_run
            for _ in range(2):
                close(body(small), chain(small), rel=1e-4)
            other = torch.randn(2, 64, 4, 4)  # another shape: packed too
            close(body(other), chain(other), rel=1e-4)
            assert len(packs) == 6 and ran.count(1) == 6 and ran.count(2) == 3
            assert scratch.bufs["packed_bytes"] == 6 * body[0].weight.numel() * 4
        assert not scratch.in_run and not scratch.bufs
        with torch.no_grad():
            body[1].weight.mul_(-1)  # changed between runs: the next run packs it anew
        with cpu_conv.scratch_released(body):
            close(body(small), chain(small), rel=1e-4)
        assert len(packs) == 9
        scratch.pack_budget = 2 * body[0].weight.numel() * 4  # room for two layers' packs
        ran.clear()
        with cpu_conv.scratch_released(body):
            close(body(small), chain(small), rel=1e-4)
            assert ran == [1, 1] and scratch.bufs["packed_bytes"] == scratch.pack_budget


@pytest.mark.skipif(not cpu_conv.packing_usable(), reason="this PyTorch build has no oneDNN packed convolution")
def test_no_pack_is_kept_for_a_shape_it_did_not_speed_up(monkeypatch):
    """A shape whose packed call measured slower gives its pack back at once (the budget goes to shapes it speeds
    up), and later calls and runs of that shape make none; the results stay exact."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(2)]).eval()
    use_winograd(body)
    scratch = body[0].scratch
    scratch.pack_budget = 10 ** 9
    packs = []
    orig = cpu_conv.pack_weight
    monkeypatch.setattr(cpu_conv, "pack_weight", lambda w, *a: packs.append(w.shape) or orig(w, *a))
    orig_conv = cpu_conv.packed_conv
    monkeypatch.setattr(cpu_conv, "packed_conv", lambda *a: time.sleep(0.01) or orig_conv(*a))  # always slower
    small = torch.randn(1, 64, 8, 8)
    want = exact(exact(small, body[0].weight, body[0].bias), body[1].weight, body[1].bias)
    with torch.inference_mode():
        with cpu_conv.scratch_released(body):
            # measured slower: the pack dropped; the second layer (same shapes) takes that choice and packs nothing
            close(body(small), want, rel=1e-4)
            assert len(packs) == 1 and scratch.bufs["packed_bytes"] == 0 and not scratch.bufs["packed"]
            close(body(small), want, rel=1e-4)
        with cpu_conv.scratch_released(body):
            close(body(small), want, rel=1e-4)
    assert len(packs) == 1 and set(scratch.faster.values()) == {False}
