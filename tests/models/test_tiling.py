"""The tiling engine: tiled equals untiled when context covers the receptive field; OOM back-off; channels."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from atelier.models import budget, cpu_conv, tiling
from atelier.models.errors import InputError, TilingError


def _net(cin: int, cout: int, depth: int, up: int = 1) -> nn.Module:
    """A conv net with receptive-field radius `depth` (3x3 convs) and pixel-shuffle upscaling by `up`."""
    layers: list[nn.Module] = [nn.Conv2d(cin, 8, 3, padding=1), nn.LeakyReLU(0.2)]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.2)]
    layers += [nn.Conv2d(8, cout * up * up, 3, padding=1), nn.PixelShuffle(up)]
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("up", [1, 2, 3])
@pytest.mark.parametrize("tile", [48, (40, 64), (97, 44)])
def test_tiled_equals_untiled(channels, up, tile):
    depth = 6
    net = _net(channels, channels, depth, up)
    x = torch.rand(2, channels, 97, 131)  # odd sizes; square tiles, wide ones, full-height strips
    with torch.no_grad():
        ref = net(x)
        out = tiling.tiled_apply(net, x, scale=up, tile=tile, context=depth, blend=8, max_batch=3, progress=None)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1 / 255 / 100  # far inside the 1/255 goal: float rounding only
    if out.shape[-2:] == (97 * up, 131 * up) and out.shape[-1] > (tile if isinstance(tile, int) else tile[1]) * up:
        # several tiles: the accumulator is channels last, so the [B,H,W,C] IMAGE a node hands back is a view
        assert out.movedim(1, -1).is_contiguous()


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_release_cpu_heap_returns_the_holes_freed_tensors_leave():
    """Tensors below glibc's mmap threshold live in the heap; freeing most of them leaves holes that stay resident
    (pinned by the survivors between them) until release_cpu_heap gives their pages back."""
    if budget._malloc_trim() is None:
        pytest.skip("no glibc malloc_trim on this platform: release_cpu_heap is a no-op here")
    budget.release_cpu_heap()
    every = [torch.ones(25_000) for _ in range(400)]  # 100 KB each: under glibc's mmap threshold, so in the heap
    keep = every[::10]
    del every
    before = _rss()  # the freed 90 % (36 MB) is still resident: every hole has a survivor above it
    budget.release_cpu_heap()
    after = _rss()
    assert before - after >= 16 << 20, (before - after) / 2**20
    assert float(sum(k.sum() for k in keep)) == 25_000 * len(keep)  # the survivors are intact


def test_context_below_receptive_field_is_not_exact():
    """The property above is real: with too little context the tiles differ (so the test can fail)."""
    net = _net(3, 3, 12)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        out = tiling.tiled_apply(net, x, tile=40, context=1, blend=0, progress=None)
        assert (out - net(x)).abs().max().item() > 1e-4


def test_downscaling_encoder_with_alignment():
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 8, stride=8)).eval()
    x = torch.rand(1, 3, 8 * 23, 8 * 17)
    with torch.no_grad():
        ref = enc(x)
        out = tiling.tiled_apply(enc, x, scale=1 / 8, tile=64, context=8, blend=8, align=8, progress=None)
    assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-5


def test_non_aligned_size_is_padded_and_cropped_back():
    """45x51 with align 4: padded by reflection to 48x52, tiled, cropped back to 90x102. It equals the network on the
    reflect-padded image (torch's own pad), cropped; away from the padded edges it equals the network on the image."""
    net = _net(3, 3, 3, 2)  # receptive radius 3 input pixels: 6 output pixels
    x = torch.rand(1, 3, 45, 51)
    with torch.no_grad():
        out = tiling.tiled_apply(net, x, scale=2, tile=32, context=4, blend=4, align=4, progress=None)
        padded = net(torch.nn.functional.pad(x, (0, 1, 0, 3), mode="reflect"))[..., :90, :102]
        plain = net(x)
    assert out.shape == (1, 3, 90, 102)
    assert (out - padded).abs().max().item() < 1e-5
    assert (out - plain)[..., :-6, :-6].abs().max().item() < 1e-5
    assert (out - plain)[..., -6:, :].abs().max().item() > 1e-4  # the padding does reach the edge: the test can fail


def test_oom_halves_tile_then_succeeds():
    net = _net(3, 3, 4)
    seen: list[int] = []

    def fn(t):
        seen.append(t.shape[-1])
        if t.shape[-1] > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return net(t)

    x = torch.rand(1, 3, 100, 100)
    with torch.no_grad():
        out = tiling.tiled_apply(fn, x, tile=100, context=4, blend=4, progress=None)
        ref = net(x)
    assert (out - ref).abs().max() < 1e-5
    assert seen[0] == 100 and max(s for s in seen[-4:]) <= 40


def test_oom_everywhere_raises_with_attempts():
    def fn(t):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(TilingError, match=r"every tile size tried \(256px, 256px, 128px"):
        tiling.tiled_apply(fn, torch.rand(1, 3, 256, 256), tile=256, context=4, blend=4, progress=None, max_batch=2)


def test_other_errors_are_not_swallowed():
    def fn(t):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        tiling.tiled_apply(fn, torch.rand(1, 3, 64, 64), tile=32, context=2, blend=2, progress=None)


def test_bad_input():
    with pytest.raises(InputError, match="empty"):
        tiling.tiled_apply(lambda t: t, torch.rand(0, 3, 8, 8), progress=None)
    with pytest.raises(InputError, match=r"\[B,C,H,W\]"):
        tiling.tiled_apply(lambda t: t, torch.rand(3, 8, 8), progress=None)


def test_auto_tile_from_budget():
    assert budget.fit_side(300, 200, None, None) == 300  # fits: whole image
    side = budget.fit_side(4096, 4096, bytes_per_pixel=1024, budget_bytes=256 << 20)
    assert side == 512  # 256 MiB / 1 KiB per pixel = 512^2 pixels


def _covers(length: int, side: int, overlap: int) -> int:
    """Tiles of `side` the engine lays along `length` with `overlap` (its own `_starts`)."""
    starts, size = tiling._starts(length, side, overlap, 1)
    assert size == min(side, length) and starts[0] == 0 and starts[-1] + size == length
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))
    return len(starts)


@pytest.mark.parametrize("H,W", [(512, 512), (1024, 1024), (768, 512), (300, 2000), (1000, 333), (200, 150)])
def test_plan_tiles_stays_under_the_pixel_cap_and_weighs_row_widths(H, W):
    """plan_tiles keeps every tile within max_pixels and within the image, its tiles cover it with the overlap, and
    no other column count or width (checked by brute force) costs less under the same width cost; with NNPACK's
    width cost a 512^2 image goes in full-width strips, with a flat cost in the fewest pixels (four 276^2 tiles)."""
    cap, overlap = 96 * 1024, 40
    for cost in (cpu_conv.nnpack_width_cost, lambda w: 1.0):
        th, tw = tiling.plan_tiles(H, W, cap, overlap, 1, cost)
        assert th * tw <= cap and th <= H and tw <= W
        total = _covers(H, th, overlap) * _covers(W, tw, overlap) * th * tw * cost(tw)
        for w in range(2 * overlap + 1, W + 1):  # every width, each with the tallest rows the cap allows
            rows = min(H, cap // w)
            if rows < 2 * overlap + 1 and rows < H:
                continue
            n = _covers(H, rows, overlap)
            h = H if n == 1 else -(-(H + (n - 1) * overlap) // n)
            assert _covers(H, h, overlap) * _covers(W, w, overlap) * h * w * cost(w) >= total * (1 - 1e-9) - 1e-6 \
                or w * h > cap
    assert tiling.plan_tiles(512, 512, cap, overlap, 1, cpu_conv.nnpack_width_cost) == (158, 512)
    assert tiling.plan_tiles(512, 512, cap, overlap, 1) == (276, 276)
    assert tiling.plan_tiles(200, 150, cap, overlap, 1) == (200, 150)  # fits: one call
