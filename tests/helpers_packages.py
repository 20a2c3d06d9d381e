"""Files and modules of registry packages that ship real weights, found without importing (running) the packages."""
from __future__ import annotations

import importlib.util
import pathlib
import types

import pytest


def package_file(package: str, relpath: str) -> pathlib.Path:
    """A file inside an installed package; skips the test when the package or file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        pytest.skip(f"{package} has no {relpath}")
    return path


def package_module(package: str, relpath: str) -> types.ModuleType:
    """One module file of a package, loaded by path (the packages' __init__ load weights or plot at import)."""
    path = package_file(package, relpath)
    spec = importlib.util.spec_from_file_location(f"_ref_{package}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
