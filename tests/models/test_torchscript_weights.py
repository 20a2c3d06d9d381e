"""The TorchScript weight reader: real archives written by torch.jit.script / torch.jit.trace give exactly the
module's state_dict(); crafted archives whose pickles name anything outside the allow-list are refused, naming it,
and nothing in them runs."""
from __future__ import annotations

import pickle
import zipfile

import pytest
import torch
from torch import nn

from atelier.models import loading
from atelier.models.errors import ModelLoadError, UnsafeFileError
from atelier.models.torchscript_weights import is_torchscript, read_torchscript


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1))
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))
        self.plain = torch.arange(5.0)  # a plain tensor attribute: not in state_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.bn(self.conv(x))) * self.scale.view(1, 2, 1, 1) + self.plain.sum()


def _net() -> Net:
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.num_batches_tracked.fill_(7)
    return net


@pytest.mark.parametrize("how", ["script", "trace"])
def test_archive_weights_equal_state_dict(tmp_path, how):
    net = _net()
    ts = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.randn(1, 3, 8, 8))
    path = tmp_path / f"{how}.pt"
    torch.jit.save(ts, str(path))
    assert is_torchscript(path)
    sd, meta = read_torchscript(path)
    ref = net.state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
    assert meta["format"] == "torchscript"
    # the weights rebuild the module: same output as the original
    fresh = Net().eval()
    fresh.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), net(x))


def _rewrite(src, dst, entry_suffix: str, payload: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, payload if n.endswith(entry_suffix) else zin.read(n))


class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("entry", ["data.pkl", "constants.pkl"])
def test_crafted_archive_refused_naming_the_global(tmp_path, entry):
    import os

    src = tmp_path / "real.pt"
    torch.jit.save(torch.jit.script(_net()), str(src))
    marker = tmp_path / "pwned"
    evil = tmp_path / "big-lama.pt"
    _rewrite(src, evil, entry, pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafeFileError, match=r"(posix|os|nt)\.system"):
        read_torchscript(evil)
    with pytest.raises(UnsafeFileError, match="allow-list"):
        loading.read_state_dict(evil)
    assert not marker.exists()


def test_crafted_archive_other_tricks(tmp_path):
    src = tmp_path / "real.pt"
    torch.jit.save(torch.jit.script(_net()), str(src))
    # builtins.eval reached through a __torch__-looking name is still not a __torch__ class
    bad = tmp_path / "a.pt"
    _rewrite(src, bad, "data.pkl", b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(UnsafeFileError, match="builtins.eval"):
        read_torchscript(bad)
    # a __torch__ record built with constructor arguments
    bad2 = tmp_path / "b.pt"
    _rewrite(src, bad2, "data.pkl", b"\x80\x02c__torch__\nM\nX\x01\x00\x00\x00a\x85\x81.")
    with pytest.raises(UnsafeFileError, match="constructor"):
        read_torchscript(bad2)
    # a truncated storage
    trunc = tmp_path / "c.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(trunc, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, zin.read(n)[:3] if "/data/" in n else zin.read(n))
    with pytest.raises(ModelLoadError, match="truncated"):
        read_torchscript(trunc)
