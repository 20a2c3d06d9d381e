"""The registry of detectors: a mistyped or broken entry of the pack fails loudly; only a missing third-party
package skips its detector, with a log line."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from atelier.models import registry
from atelier.models.errors import UnknownModelError

SD = {"nothing.weight": torch.zeros(1)}  # recognised by no detector


def test_every_entry_imports():
    for _, rel in registry.DETECTORS:
        mod = registry._module(rel)
        assert mod is not None and callable(mod.detect) and callable(mod.load), rel


def test_mistyped_entry_fails_loudly(monkeypatch):
    monkeypatch.setattr(registry, "DETECTORS", [("typo", ".gan.stylegan9"), *registry.DETECTORS])
    with pytest.raises(ImportError, match=r"detector '\.gan\.stylegan9'.*stylegan9"):
        registry.detect(SD, {}, source="x.safetensors")


def test_broken_import_inside_the_pack_fails_loudly(monkeypatch):
    real = importlib.import_module

    def fake(name, package=None):
        if name == ".gan.dcgan":  # as if dcgan imported a helper module of the pack that is not there
            raise ModuleNotFoundError("No module named 'atelier.models.gan.helperz'", name=f"{package}.gan.helperz")
        return real(name, package)

    monkeypatch.setattr(registry.importlib, "import_module", fake)
    with pytest.raises(ImportError, match="helperz"):
        registry.detect(SD, {}, source="x.safetensors")


def test_missing_third_party_package_skips_its_detector_with_a_log_line(monkeypatch, caplog):
    real = importlib.import_module

    def fake(name, package=None):
        if name == ".spandrel_arch":
            raise ModuleNotFoundError("No module named 'spandrel'", name="spandrel")
        return real(name, package)

    monkeypatch.setattr(registry.importlib, "import_module", fake)
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        with pytest.raises(UnknownModelError) as err:
            registry.detect(SD, {}, source="x.safetensors")
    assert "spandrel" not in str(err.value).split("Tried:")[1].split(".")[0]  # not in the list of detectors tried
    assert "DCGAN" in str(err.value)
    assert any("spandrel" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
