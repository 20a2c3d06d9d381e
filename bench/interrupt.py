"""Benchmark: how long Cancel takes to stop Atelier Upscale Image on a slow architecture at a large size.

    python bench/interrupt.py [--model FILE] [--size 4096] [--after 20] [--load N]

Inside a real ComfyUI (found as bench/upscale.py finds it; the worker runs under $ATELIER_COMFYUI_PYTHON or its
.venv, comfy imported with --cpu unless --gpu): one worker loads the model with Atelier Load Upscaler, starts Atelier
Upscale Image on a --size² image and, --after seconds later, presses Cancel the way the server's /interrupt does
(`comfy.model_management.interrupt_current_processing(True)`) from another thread. The figure is the time from that
call to the node raising ComfyUI's InterruptProcessingException. Default model: DCTLSA x4 (the slowest architecture
of the shared weights). 8000² with a x4 model would be a 32000² output, over the 16384 px limit: the default is
4096² (a 16384² output). A benchmark figure, not a test; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any

from _bench_common import REPO, comfy_python, find_comfyui

SHARED = pathlib.Path(os.environ.get("ATELIER_SHARED") or REPO.parent / "shared")
DEFAULT_MODEL = SHARED / "weights" / "dctlsa" / "DCTLSA_X4.pt"


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from upscale import setup

    mods = setup(a.comfyui, os.path.dirname(a.model), a.gpu)
    import comfy.model_management as mm

    ours = mods["ours"]
    model = ours.AtelierLoadUpscaler().load(os.path.basename(a.model))[0]
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, a.size, a.size, 3, generator=gen)  # [1,H,W,3]
    pressed: list[float] = []

    def press() -> None:
        pressed.append(time.perf_counter())
        mm.interrupt_current_processing(True)

    timer = threading.Timer(a.after, press)
    t0 = time.perf_counter()
    timer.start()
    outcome = "finished"
    try:
        ours.AtelierUpscaleImage().upscale(model, img)
    except mm.InterruptProcessingException:
        outcome = "interrupted"
    t1 = time.perf_counter()
    timer.cancel()
    mm.interrupt_current_processing(False)
    latency = t1 - pressed[0] if pressed else None
    return {"outcome": outcome, "latency_s": latency, "ran_s": t1 - t0, "load": os.getloadavg()[0],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", help="ComfyUI source tree (default $ATELIER_COMFYUI or ../comfyui)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="upscale model file (default: DCTLSA x4)")
    p.add_argument("--size", type=int, default=4096, help="input side in pixels (square, random content)")
    p.add_argument("--after", type=float, default=20.0, help="seconds into the run when Cancel is pressed")
    p.add_argument("--load", type=int, default=0, help="N busy processes beside the measurement")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI use its GPU (default --cpu)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.model = str(pathlib.Path(a.model).resolve())
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    comfy = find_comfyui(a.comfyui)
    if comfy is None or not os.path.isfile(a.model):
        msg = "no ComfyUI found (--comfyui or $ATELIER_COMFYUI)" if comfy is None else f"no model file {a.model}"
        print(json.dumps({"error": msg}))
        return 2
    a.comfyui = str(comfy)
    py = comfy_python(comfy)
    print(f"ComfyUI {comfy} ({py}); {os.path.basename(a.model)} on {a.size}x{a.size}; Cancel after {a.after:g} s; "
          f"{'GPU' if a.gpu else 'CPU'}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {a.load} busy beside")
    cmd = [py, __file__, "--worker", "--comfyui", a.comfyui, "--model", a.model, "--size", str(a.size),
           "--after", str(a.after)] + (["--gpu"] if a.gpu else [])
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    finally:
        for b in busy:
            b.kill()
            b.wait()
    if proc.returncode != 0:
        print(json.dumps({"error": f"worker failed: {proc.stderr[-2000:]}"}))
        return 1
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res |= {"model": os.path.basename(a.model), "size": a.size, "after_s": a.after, "busy_processes": a.load}
    lat = res["latency_s"]
    print(f"{res['outcome']} after {res['ran_s']:.1f} s; Cancel took effect in "
          f"{'-' if lat is None else f'{lat:.2f} s'} (load {res['load']:.1f})")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
