"""The shared round trip itself (tests/harness.py) can fail: a wrong output, a wrong fact, a flat reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import check_roundtrip, fact, load_file  # tests/ is on pytest's pythonpath


def _mlp() -> tuple[dict, torch.Tensor, torch.Tensor]:
    ref = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3 * 16 * 16), nn.Tanh()).eval()
    z = torch.randn(3, 8)
    with torch.no_grad():
        return ref.state_dict(), z, ref(z).view(3, 3, 16, 16)


def test_round_trip_passes_and_fails_as_it_should(tmp_path):
    sd, z, want = _mlp()
    desc = check_roundtrip(tmp_path / "ok", sd, run=lambda g: g(z), expected=want, family="gan",
                           facts={"architecture": "MLP GAN", "model.z_dim": 8, "model.img_resolution": 16})
    assert fact(desc, "config.layers") == desc.config["layers"]
    with pytest.raises(AssertionError, match="max abs difference"):
        check_roundtrip(tmp_path / "off", sd, run=lambda g: g(z), expected=want + 1e-3)
    with pytest.raises(AssertionError, match=r"model.z_dim = 8, expected 9"):
        check_roundtrip(tmp_path / "fact", sd, run=lambda g: g(z), expected=want, facts={"model.z_dim": 9})
    with pytest.raises(AssertionError, match="not found"):
        check_roundtrip(tmp_path / "name", sd, run=lambda g: g(z), expected=want, facts={"model.nope": 1})
    with pytest.raises(AssertionError, match="flat"):
        check_roundtrip(tmp_path / "flat", sd, run=lambda g: g(z), expected=torch.zeros_like(want))


def test_load_file_writes_both_formats_the_manager_reads(tmp_path):
    sd, z, want = _mlp()
    for fmt in ("safetensors", "pth"):
        desc = load_file(tmp_path, sd, fmt=fmt, name="g")
        assert desc.source.endswith(f"g.{fmt}")
        with torch.no_grad():
            assert torch.allclose(desc.model(z), want, atol=1e-6)
