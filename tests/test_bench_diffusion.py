"""bench/diffusion.py's ADM cells without the guided-diffusion reference (on no package registry): skipped, with the
reason in the printed lines and in the JSON, never a failure."""
from __future__ import annotations

import importlib.util
import json

import pytest


@pytest.fixture
def bench(repo_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_dir / "bench"))  # its _bench_common
    spec = importlib.util.spec_from_file_location("bench_diffusion", repo_dir / "bench" / "diffusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_adm_skips_without_reference(bench, how, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "not-guided-diffusion"
    empty.mkdir()
    monkeypatch.setenv("ATELIER_GUIDED_DIFFUSION", str(empty))
    argv = ["--pipelines", "adm", "--steps", "3"] + (["--guided-diffusion", str(empty)] if how == "argument" else [])
    assert bench.main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    why = result["adm"]["skipped"]
    assert str(empty) in why and "not a guided-diffusion tree" in why
    assert ("--guided-diffusion" if how == "argument" else "ATELIER_GUIDED_DIFFUSION") in why
    assert f"adm      skipped: {why}" in err
    assert result["cells"] == {} and not any(k.startswith("adm") for k in result["summary"])


def test_reference_location(bench, tmp_path, monkeypatch):
    monkeypatch.delenv("ATELIER_GUIDED_DIFFUSION", raising=False)
    tree = tmp_path / "gd"
    (tree / "guided_diffusion").mkdir(parents=True)
    for name in ("unet.py", "respace.py", "script_util.py"):
        (tree / "guided_diffusion" / name).write_text("")
    assert bench.find_guided_diffusion(str(tree)) == (tree.resolve(), "")
    monkeypatch.setenv("ATELIER_GUIDED_DIFFUSION", str(tree))
    assert bench.find_guided_diffusion(None) == (tree.resolve(), "")
    monkeypatch.setenv("ATELIER_GUIDED_DIFFUSION", str(tmp_path))  # named but wrong: no fallback to another
    assert bench.find_guided_diffusion(None)[0] is None
