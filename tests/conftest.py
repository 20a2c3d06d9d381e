"""Shared fixtures: where ../shared is, a fresh model manager per test, a models root in a temp dir."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

from helpers_golden import golden_folder  # tests/ is on pytest's pythonpath

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared() -> pathlib.Path | None:
    env = os.environ.get("ATELIER_SHARED")
    for cand in ([pathlib.Path(env)] if env else []) + [REPO.parent / "shared"]:
        if (cand / "weights").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared beside the repository (or $ATELIER_SHARED); skips the test when it is missing."""
    d = _shared()
    if d is None:
        pytest.skip("../shared (weights, golden data) not found beside the repository; set ATELIER_SHARED")
    return d


@pytest.fixture(scope="session")
def repo_dir() -> pathlib.Path:
    return REPO


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def models_root(tmp_path) -> pathlib.Path:
    """An empty models root with the pack's sub-folders."""
    for sub in ("upscale_models", "vae", "vae_approx", "checkpoints", "diffusion_models", "diffusers", "gans", "inpaint"):
        (tmp_path / "models" / sub).mkdir(parents=True)
    return tmp_path / "models"


@pytest.fixture
def manager(models_root):
    """A fresh process-wide manager over `models_root`, restored afterwards."""
    from atelier.models import manager as m

    fresh = m.ModelManager(str(models_root), device=torch.device("cpu"))
    m.set_manager(fresh)
    yield fresh
    m.set_manager(None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: OpenMP fan-out costs more than it gains (up to 20x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def golden(shared_dir) -> pathlib.Path:
    """../shared/golden/stylegan: NVIDIA's StyleGAN outputs on random weights (README inside)."""
    return golden_folder(shared_dir, "stylegan")
