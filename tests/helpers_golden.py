"""Where the golden data of ../shared lives, for the tests that compare against upstream reference outputs."""
from __future__ import annotations

import pathlib

import pytest


def golden_folder(shared_dir: pathlib.Path, name: str) -> pathlib.Path:
    """../shared/golden/<name> (upstream reference outputs, README inside); skips the test when it is missing."""
    d = shared_dir / "golden" / name
    if not d.is_dir():
        pytest.skip(f"shared/golden/{name} missing")
    return d
