"""What bench/upscale.py and bench/vae.py share: finding a ComfyUI tree and its interpreter, importing this pack as
`atelier` from any interpreter, and reading the process's memory. Standard library only, so that a worker measuring
core ComfyUI imports nothing of ours before it measures (cli/runner.py's PeakMemory does the same for the CLI)."""
from __future__ import annotations

import hashlib
import os
import pathlib
import resource
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def find_comfyui(arg: str | None) -> pathlib.Path | None:
    """The ComfyUI source tree: the argument, $ATELIER_COMFYUI, or ../comfyui beside the repository."""
    for cand in (arg, os.environ.get("ATELIER_COMFYUI"), str(REPO.parent / "comfyui")):
        if cand and (pathlib.Path(cand) / "main.py").is_file() and (pathlib.Path(cand) / "comfy").is_dir():
            return pathlib.Path(cand).resolve()
    return None


def comfy_python(comfy: pathlib.Path) -> str:
    """The interpreter the host tests use: $ATELIER_COMFYUI_PYTHON, else ComfyUI's .venv, else this one."""
    env = os.environ.get("ATELIER_COMFYUI_PYTHON")
    if env and os.path.isfile(env):
        return env
    venv = comfy / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def pkg_root() -> pathlib.Path:
    """A folder holding `atelier` -> this repository, so the pack imports as a package under any interpreter (one
    folder per checkout: several checkouts on one machine must not import each other's code)."""
    tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:8]
    root = pathlib.Path(tempfile.gettempdir()) / f"atelier_bench_pkg_{os.getuid()}_{tag}"
    root.mkdir(exist_ok=True)
    link = root / "atelier"
    if not link.exists() or link.resolve() != REPO:
        tmp = root / f"atelier.{os.getpid()}"
        os.symlink(REPO, tmp)
        os.replace(tmp, link)
    return root


def proc_status(key: str) -> int | None:
    """A figure of /proc/self/status in bytes (VmRSS, VmHWM, VmSize), None where absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def reset_peak() -> tuple[int | None, bool]:
    """(current RSS, whether the peak-RSS counter VmHWM could be reset to it) before the measured call."""
    base = proc_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        return base, True
    except OSError:
        return base, False


def peak_rss(reset: bool) -> int:
    """The peak RSS since reset_peak() (the process's lifetime maximum where it could not reset)."""
    peak = proc_status("VmHWM") if reset else None
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
