"""The training loop under torchrun: 2 CPU processes (gloo) at global batch 8 give the same losses and weights as
one process at batch 8 (GroupNorm networks: per-sample normalisation, so only float rounding differs), and only
rank 0 writes files."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from atelier.models.train.checkpoint import load_state, state_path
from helpers_train import max_diff

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "ddp_train_script.py"
TOL = 1e-5


def _run(args: list[str], out: pathlib.Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, *args, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]


def test_two_processes_match_one(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([], one)
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"], two)
    for name, net in (("ae", "ae"), ("unet", "unet")):
        a = load_state(state_path(str(one / f"{name}.safetensors")))
        b = load_state(state_path(str(two / f"{name}.safetensors")))
        assert a.step == b.step == 4
        assert b.history["loss"] == pytest.approx(a.history["loss"], abs=TOL)
        assert max_diff(a.nets[net], b.nets[net]) <= TOL
        assert max_diff(a.ema[net], b.ema[net]) <= TOL
    assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == sorted(
        ["ae.safetensors", "ae.train-state", "unet.safetensors", "unet.train-state"])
