"""The upscaler's memory guard: what a request needs is estimated before anything is allocated; a request that does
not fit either runs the plan that shrinks before the pass (when that fits) or is refused with both figures. The
free-memory reading is monkeypatched, so nothing here allocates more than a few kilobytes."""
from __future__ import annotations

import pytest
import torch

spandrel = pytest.importorskip("spandrel")

from atelier.models import host, registry  # noqa: E402
from atelier.models.errors import MemoryBudgetError  # noqa: E402
from atelier.models.upscale import upscale as up  # noqa: E402

GiB = 1 << 30


@pytest.fixture
def x4():
    """A tiny random Compact x4 (spandrel's class), as the registry describes it."""
    from spandrel.architectures.Compact import Compact

    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4)
    return registry.detect({k: v.clone() for k, v in net.state_dict().items()}, {}, source="x4.pth")


def _free(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(host, "free_bytes", lambda device: int(nbytes))


def test_issue_case_is_estimated_without_allocating(x4, monkeypatch, manager):
    """8000² by factor 2 with a x4 model: the direct plan builds a 32000² intermediate (11.4 GiB); with 8 GiB free
    the guard shrinks to 4000² first (the pass lands on 16000²); with 2 GiB free it refuses, naming both figures."""
    direct = up.plan_passes(4, 8000, 8000, 16000, 16000)
    assert direct == [(8000, 8000)]
    need = up.request_bytes(x4, 1, 3, direct, 16000, 16000)
    assert need >= 32000 * 32000 * 3 * 4  # the intermediate alone: 11.4 GiB
    _free(monkeypatch, 8 * GiB)
    assert up.memory_plan(x4, 1, 3, 8000, 8000, 16000, 16000, torch.device("cpu"), manager=manager) == [(4000, 4000)]
    _free(monkeypatch, 2 * GiB)
    with pytest.raises(MemoryBudgetError, match=r"8000x8000 -> 16000x16000.*need about [\d.]+ GiB.*2\.00 GiB is free"):
        up.memory_plan(x4, 1, 3, 8000, 8000, 16000, 16000, torch.device("cpu"), manager=manager)


def test_shrunk_plan_runs_and_equals_the_model_on_the_shrunk_input(x4, monkeypatch, manager):
    """When only the shrunk plan fits, the result is the model's pass on the input shrunk to target/scale."""
    x = torch.rand(1, 3, 32, 40)
    full = up.request_bytes(x4, 1, 3, [(32, 40)], 64, 80, activations=0)
    shrunk = up.request_bytes(x4, 1, 3, [(16, 20)], 64, 80, activations=0)
    assert shrunk < full
    _free(monkeypatch, (shrunk + full) / 2 / up.REQUEST_SHARE)
    out = up.upscale(x4, x, factor=2.0, manager=manager)
    with torch.inference_mode():
        want = up.model_pass(x4, up.resize(x, 16, 20), manager=manager)
    assert out.shape == (1, 3, 64, 80)
    assert torch.equal(out, want)


def test_refused_before_any_model_pass(x4, monkeypatch, manager):
    _free(monkeypatch, 1000)
    monkeypatch.setattr(up, "model_pass", lambda *a, **k: pytest.fail("a model pass ran after the guard refused"))
    with pytest.raises(MemoryBudgetError, match="24x24 -> 96x96"):
        up.upscale(x4, torch.rand(1, 3, 24, 24), manager=manager)


def test_alpha_and_batch_count(x4):
    """A batch scales the estimate; an RGBA image's alpha adds to it; alpha through the model runs after the colour
    passes, beside their result (a 1-channel chain next to a 3-channel output: never below the plain estimate)."""
    base = up.request_bytes(x4, 1, 3, [(100, 100)], 400, 400)
    assert up.request_bytes(x4, 2, 3, [(100, 100)], 400, 400) == 2 * base
    assert up.request_bytes(x4, 1, 4, [(100, 100)], 400, 400) > base
    assert (up.request_bytes(x4, 1, 4, [(100, 100)], 400, 400, alpha_model=True)
            >= up.request_bytes(x4, 1, 4, [(100, 100)], 400, 400))
    colour_pass = 4 * 3 * 100 * 100 * (1 + 16)  # input and x4 output of the colour pass
    assert up.request_bytes(x4, 1, 3, [(100, 100)], 200, 200) >= colour_pass + 4 * 3 * 200 * 200 - 4 * 3 * 100 * 100
