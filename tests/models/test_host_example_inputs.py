"""models/host.provide_example_inputs: the pack's example input images reach ComfyUI's input folder (issue 14), never
replacing a user's file, only inside ComfyUI, and not when ATELIER_NO_EXAMPLE_INPUTS is set."""
from __future__ import annotations

import sys
import types

import pytest

from atelier.models import host


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """A stand-in for a running ComfyUI: comfy.model_management present, folder_paths with an input directory."""
    input_dir = tmp_path / "comfy_input"
    fp = types.ModuleType("folder_paths")
    fp.get_input_directory = lambda: str(input_dir)
    monkeypatch.setitem(sys.modules, "comfy.model_management", types.ModuleType("comfy.model_management"))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.delenv("ATELIER_NO_EXAMPLE_INPUTS", raising=False)
    return input_dir


@pytest.fixture
def examples(tmp_path):
    src = tmp_path / "examples"
    src.mkdir()
    (src / "a.png").write_bytes(b"pack a")
    (src / "b.png").write_bytes(b"pack b")
    return src


def test_copies_only_missing_files_and_says_so(fake_comfy, examples, caplog):
    fake_comfy.mkdir()
    (fake_comfy / "b.png").write_bytes(b"the user's own b")
    with caplog.at_level("INFO", logger=host.__name__):
        assert host.provide_example_inputs(str(examples)) == ["a.png"]
    assert (fake_comfy / "a.png").read_bytes() == b"pack a"
    assert (fake_comfy / "b.png").read_bytes() == b"the user's own b"  # never replaced
    assert sorted(p.name for p in fake_comfy.iterdir()) == ["a.png", "b.png"]  # no temporary left behind
    assert "a.png" in caplog.text and str(fake_comfy) in caplog.text
    assert host.provide_example_inputs(str(examples)) == []  # the second start copies nothing


def test_nothing_outside_comfyui_or_when_turned_off(fake_comfy, examples, monkeypatch):
    monkeypatch.setenv("ATELIER_NO_EXAMPLE_INPUTS", "1")
    assert host.provide_example_inputs(str(examples)) == [] and not fake_comfy.exists()
    monkeypatch.delenv("ATELIER_NO_EXAMPLE_INPUTS")
    monkeypatch.delitem(sys.modules, "comfy.model_management")
    assert host.provide_example_inputs(str(examples)) == [] and not fake_comfy.exists()


def test_copies_a_dataset_folder_tree_whole_and_never_merges_into_a_users_folder(fake_comfy, examples):
    """An example dataset (a folder of class sub-folders) arrives with its tree; a folder of that name the user has
    is left exactly as it is (nothing added to it)."""
    for cls, name in (("0", "x.png"), ("0", "y.png"), ("7", "z.png")):
        (examples / "digits" / cls).mkdir(parents=True, exist_ok=True)
        (examples / "digits" / cls / name).write_bytes(f"pack {cls}/{name}".encode())
    (examples / "mine").mkdir()
    (examples / "mine" / "pack.png").write_bytes(b"pack")
    (fake_comfy / "mine").mkdir(parents=True)
    (fake_comfy / "mine" / "user.png").write_bytes(b"user")
    assert host.provide_example_inputs(str(examples)) == ["a.png", "b.png", "digits"]
    got = sorted(str(p.relative_to(fake_comfy / "digits")) for p in (fake_comfy / "digits").rglob("*.png"))
    assert got == ["0/x.png", "0/y.png", "7/z.png"]
    assert (fake_comfy / "digits" / "7" / "z.png").read_bytes() == b"pack 7/z.png"
    assert sorted(p.name for p in (fake_comfy / "mine").iterdir()) == ["user.png"]
    assert sorted(p.name for p in fake_comfy.iterdir()) == ["a.png", "b.png", "digits", "mine"]  # no temporary


def test_example_input_finds_pack_files_and_folders_only_inside_the_pack(tmp_path, monkeypatch):
    pack = tmp_path / "input"
    monkeypatch.setattr(host, "EXAMPLE_INPUTS_DIR", str(pack))
    (pack / "digits" / "3").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    assert host.example_input("digits") == str(pack / "digits")
    assert host.example_input("nothing_here") is None
    assert host.example_input("../outside") is None  # a name climbing out of the pack's folder is not looked up
