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
    folder per checkout: two checkouts on one machine never import each other's code)."""
    tag = hashlib.sha1(str(REPO.resolve()).encode()).hexdigest()[:12]
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


def run_worker(cmd: list[str], timeout: float, **kw) -> dict:
    """Run one benchmark cell in its own process; its last stdout line is a JSON object. A timeout or a failure gives
    {"skipped": why} instead of stopping the whole bench."""
    import json
    import subprocess

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        return {"skipped": f"ran past the {timeout:.0f} s limit"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"skipped": f"worker failed (exit {proc.returncode}): {' | '.join(tail)[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(ours: dict, ref: dict, name: str) -> dict | None:
    """ours/ref for whole-process peak, growth above the loaded process, and wall time; or, when the reference ran
    out of memory, an upper bound on the peak ratio from what it asked for. None when the reference has neither."""
    if "peak_mb" in ref:
        return {"peak": round(ours["peak_mb"] / ref["peak_mb"], 3),
                "growth": round(ours["growth_mb"] / max(1, ref["growth_mb"]), 3),
                "time": round(ours["wall_s"] / max(1e-9, ref["wall_s"]), 3)}
    if "peak_mb_at_least" in ref:
        return {"peak_at_most": round(ours["peak_mb"] / ref["peak_mb_at_least"], 3),
                "note": f"{name} ran out of memory; it needed more than {ref['peak_mb_at_least']} MB"}
    return None
