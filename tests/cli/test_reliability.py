"""Issue 16: output folders that cannot be written, leftovers of killed runs, SIGTERM: one-line errors, no partial
files left behind."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from atelier.cli import outputs
from atelier.cli.main import main



def ui_workflow() -> dict:
    """LoadImage in.png -> SaveImage res (canvas format)."""
    return {
        "last_node_id": 2, "last_link_id": 1, "version": 0.4, "groups": [], "config": {}, "extra": {},
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [], "widgets_values": ["in.png", "image"],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}, {"name": "MASK", "type": "MASK", "links": []}]},
            {"id": 2, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
             "outputs": [], "widgets_values": ["res"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
    }


@pytest.fixture
def wf(tmp_path):
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "wf.json").write_text(json.dumps(ui_workflow()))
    return tmp_path / "wf.json"


def _one_line_error(err: str, *names: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("atelier: error:"), err
    for n in names:
        assert n in err, (n, err)


def test_output_is_a_file(tmp_path, wf, capsys):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["run", str(wf), "--output", str(out), "--no-progress", "-q"]) == 1
        _one_line_error(capsys.readouterr().err, str(out), "not a folder")


@pytest.mark.parametrize("code,why", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")])
def test_output_folder_not_writable(tmp_path, wf, capsys, monkeypatch, code, why):
    """A read-only folder or mount (simulated: the tests may run as root, which ignores permission bits)."""
    out = tmp_path / "ro"
    out.mkdir()

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code), str(out / ".atelier-staging-x"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert main(["run", str(wf), "--output", str(out), "--no-progress", "-q"]) == 1
    _one_line_error(capsys.readouterr().err, str(out), why)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_output_folder_read_only_for_real(tmp_path, wf, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["run", str(wf), "--output", str(out), "--no-progress", "-q"]) == 1
    finally:
        out.chmod(0o755)
    _one_line_error(capsys.readouterr().err, str(out), "permission denied")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # exited and reaped: no process has it (a reuse within the test is vanishingly unlikely)


def test_leftovers_of_killed_runs_are_removed(tmp_path, wf, capsys):
    out = tmp_path / "out"
    out.mkdir()
    mine = outputs._staging_name()  # .atelier-staging-<host>-<pid>-
    host_prefix = mine.rsplit("-", 2)[0]
    dead = out / f"{host_prefix}-{_dead_pid()}-abc123"
    live = out / f"{host_prefix}-{os.getpid()}-def456"  # a run going on in this process: left alone
    old = out / ".atelier-staging-q1w2e3"  # the naming before issue 16, a day old
    recent_other = out / ".atelier-staging-otherhost-1-zzz"  # another machine's, recent: may be running
    for d in (dead, live, old, recent_other):
        d.mkdir()
        (d / "res_00001_.png").write_bytes(b"partial")
    past = time.time() - outputs.STALE_AFTER_S - 60
    os.utime(old, (past, past))
    assert main(["run", str(wf), "--output", str(out), "--no-progress", "-q"]) == 0
    left = sorted(n for n in os.listdir(out))
    assert left == sorted([live.name, recent_other.name, "res_00001_.png"]), left


SLOW_RUN = """
import sys, time
from atelier.cli import core_nodes
orig = core_nodes.LoadImage.load_image
def slow(self, *a, **k):
    out = orig(self, *a, **k)
    print("STARTED", flush=True)
    time.sleep(60)
    return out
core_nodes.LoadImage.load_image = slow
from atelier.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_cleanly_and_removes_staging(tmp_path, wf):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    p = subprocess.Popen([sys.executable, "-c", SLOW_RUN, "run", str(wf), "--output", str(out), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.strip() == "STARTED", (line, p.stderr.read() if p.poll() is not None else "")
        assert any(n.startswith(outputs.STAGING_PREFIX) for n in os.listdir(out))  # the run is staging
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert time.monotonic() - t0 < 30
    assert p.returncode == 143, (p.returncode, err)
    _one_line_error(err, "interrupted")
    assert os.listdir(out) == []
