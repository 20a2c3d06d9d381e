"""Benchmark: Atelier Upscale Image against core ComfyUI's ImageUpscaleWithModel, same model file, same images.

    python bench/upscale.py [--model FILE] [--sizes 256,512,1024] [--reps 5] [--load N] [--threads N]

Needs a real ComfyUI (its source tree and its venv; see ../shared/HOST.md): `--comfyui DIR`, else $ATELIER_COMFYUI,
else ../comfyui beside the repository. Its workers run under $ATELIER_COMFYUI_PYTHON (the interpreter the host tests
use), else DIR/.venv/bin/python when that exists, else this interpreter. Without ComfyUI it says so and prints
{"error": ...} as its last line.

The test image is made once here (scikit-image's astronaut when this interpreter has scikit-image, else a seeded
synthetic picture: the JSON says which) and handed to the workers as a .npy file, so ComfyUI's environment needs
nothing beyond its own packages. `--load N` runs N busy processes (one spinning thread each) beside every
measurement, to see the ratios on a busy machine; the machine's load average is printed per size either way.

What is measured, per input size (square astronaut images, the model's own scale):
- wall time: one worker process loads both nodes the way ComfyUI runs them (comfy imported with --cpu unless
  --gpu, our pack imported as a package, every call under torch.inference_mode) and alternates core, ours, core,
  ours ... after one warm-up call each; the median of --reps runs per node.
- peak memory: a fresh process per node and size (--mem-reps of them, alternating, median) loads both models,
  notes its resident memory, runs one node once and reads the peak (VmHWM after resetting it, else ru_maxrss).
  Reported as the whole-process peak ratio and as the ratio of the growth above the loaded baseline.
- effective GFLOP/s of each side: the model's convolution FLOPs per input pixel (counted on core's module, 2 per
  multiply-add) times the input pixels over the median time: the arithmetic a direct convolution would do, so a
  Winograd or FFT path can exceed the machine's matmul peak.
- seams (1024 input, or the largest size): both nodes' outputs against the untiled result (spandrel's call on the
  whole image, PyTorch's own convolutions), max abs difference in 1/255 units.
Last line: one JSON object with the ratios (ours / core; below 1 is better).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import tempfile
from typing import Any

from _bench_common import REPO, comfy_python, find_comfyui, peak_rss, pkg_root, reset_peak

SHARED = pathlib.Path(os.environ.get("ATELIER_SHARED") or REPO.parent / "shared")
DEFAULT_MODEL = SHARED / "weights" / "realesr-animevideov3" / "realesr-animevideov3.pth"


# ------------------------------------------------------------------------------------------------ worker side
def setup(comfy: str, model_dir: str, gpu: bool) -> dict[str, Any]:
    """Import comfy as a standalone script must (args parsing on, --cpu), core's upscale nodes and our pack."""
    sys.argv = [sys.argv[0]] + ([] if gpu else ["--cpu"])
    sys.path.insert(0, comfy)
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401
    import folder_paths

    folder_paths.add_model_folder_path("upscale_models", model_dir)
    from comfy_extras import nodes_upscale_model as core_nodes

    sys.path.insert(0, str(pkg_root()))
    from atelier.nodes import upscale as ours

    return {"core": core_nodes, "ours": ours}


def load_nodes(mods: dict[str, Any], name: str) -> dict[str, Any]:
    core_model = mods["core"].UpscaleModelLoader.execute(name)[0]
    our_model = mods["ours"].AtelierLoadUpscaler().load(name)[0]
    return {
        "core": lambda img: mods["core"].ImageUpscaleWithModel.execute(upscale_model=core_model, image=img)[0],
        "ours": lambda img: mods["ours"].AtelierUpscaleImage().upscale(our_model, img)[0],
        "core_model": core_model,
    }


def make_source_image(path: str) -> str:
    """Write the 512x512 RGB uint8 source picture to `path` (.npy); returns what it is."""
    import numpy as np

    try:
        from skimage import data

        img, name = data.astronaut(), "astronaut (scikit-image)"
    except ImportError:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:512, 0:512] / 512.0
        img = np.stack([0.5 + 0.3 * np.sin(9 * xx + 4 * yy), 0.5 + 0.3 * np.cos(7 * yy - 3 * xx * yy),
                        0.4 + 0.4 * xx * (1 - yy)], -1)
        for _ in range(40):  # hard-edged discs and boxes: edges for the seam check
            cy, cx, r = rng.uniform(0, 1, 3) * [512, 512, 60]
            m = ((yy * 512 - cy) ** 2 + (xx * 512 - cx) ** 2 < r**2) if rng.random() < 0.5 else (
                (abs(yy * 512 - cy) < r) & (abs(xx * 512 - cx) < r / 2))
            img[m] = rng.uniform(0, 1, 3)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        img, name = (img * 255).round().astype(np.uint8), "synthetic (seeded discs, boxes and gradients)"
    np.save(path, img)
    return name


def test_image(size: int, path: str):
    """[1,size,size,3] IMAGE: the source picture, resized (content only matters for the seam check)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.load(path)).float().div(255).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return x.movedim(1, -1).contiguous()


def conv_flops_per_pixel(model) -> float:
    """FLOPs (2 per multiply-add) of the module's convolutions per input pixel, counted on a 64x64 input."""
    import torch

    total = [0.0]

    def hook(m, inp, out):
        kh, kw = m.kernel_size
        total[0] += 2.0 * out.numel() * (m.in_channels // m.groups) * kh * kw

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        p = next(model.parameters())
        with torch.inference_mode():
            model(torch.rand(1, p.shape[1] if p.ndim == 4 else 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    return total[0] / (64 * 64)


def worker_time(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    mods = setup(a.comfyui, a.model_dir, a.gpu)
    nodes = load_nodes(mods, a.model_name)
    if a.threads:  # pinned: both nodes use exactly this many threads
        torch.set_num_threads(a.threads)
    out: dict[str, Any] = {"flops_per_pixel": conv_flops_per_pixel(nodes["core_model"].model),
                           "torch": torch.__version__, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for size in a.sizes:
            img = test_image(size, a.image)
            load0 = os.getloadavg()[0]
            times: dict[str, list[float]] = {"core": [], "ours": []}
            for rep in range(a.reps + 1):  # rep 0: warm-up, not counted
                for which in ("core", "ours") if rep % 2 == 0 else ("ours", "core"):
                    t0 = time.perf_counter()
                    res = nodes[which](img)
                    _sync(a.gpu)
                    if rep:
                        times[which].append(time.perf_counter() - t0)
                    del res
            med = {k: statistics.median(v) for k, v in times.items()}
            out[str(size)] = med | {"runs": times, "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}
            print(f"  time {size}: core {med['core']:.2f}s  ours {med['ours']:.2f}s", file=sys.stderr)
    return out


def _sync(gpu: bool) -> None:
    if gpu:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def worker_mem(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    mods = setup(a.comfyui, a.model_dir, a.gpu)
    nodes = load_nodes(mods, a.model_name)
    img = test_image(a.sizes[0], a.image)
    base, reset = reset_peak()
    if a.gpu and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        res = nodes[a.which](img)
    peak = peak_rss(reset)
    info = {"base": base, "peak": peak, "shape": list(res.shape)}
    if a.gpu and torch.cuda.is_available():
        info["gpu_peak"] = torch.cuda.max_memory_allocated()
    return info


def worker_seams(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    mods = setup(a.comfyui, a.model_dir, a.gpu)
    nodes = load_nodes(mods, a.model_name)
    img = test_image(a.sizes[0], a.image)
    with torch.inference_mode():
        ref = nodes["core_model"](img.movedim(-1, 1)).movedim(1, -1).clamp(0, 1)  # spandrel, untiled, on the CPU
        out = {}
        for which in ("core", "ours"):
            res = nodes[which](img)
            out[which] = (res.cpu() - ref).abs().max().item() * 255
    return out


# ------------------------------------------------------------------------------------------------ orchestration
def run_worker(py: str, kind: str, a: argparse.Namespace, sizes: list[int], which: str = "") -> dict[str, Any]:
    cmd = [py, __file__, "--worker", kind, "--comfyui", a.comfyui, "--model", a.model, "--reps", str(a.reps),
           "--sizes", ",".join(map(str, sizes)), "--threads", str(a.threads), "--image", a.image]
    cmd += (["--which", which] if which else []) + (["--gpu"] if a.gpu else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker ({which or ''} {sizes}) failed:\n{proc.stderr[-3000:]}")
    sys.stderr.write("".join(l + "\n" for l in proc.stderr.splitlines() if l.startswith("  time")))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", help="ComfyUI source tree (default $ATELIER_COMFYUI or ../comfyui)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="upscale model file (default: Real-ESRGAN Compact x4)")
    p.add_argument("--sizes", default="256,512,1024", help="input sizes (square)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per node and size (median reported)")
    p.add_argument("--mem-reps", type=int, default=3, help="fresh processes per node and size for memory (median)")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI use its GPU (default --cpu)")
    p.add_argument("--threads", type=int, default=0, help="pin torch's intra-op threads for both nodes in the timing "
                   "(0: torch's default)")
    p.add_argument("--load", type=int, default=0, help="run N busy processes (one spinning thread each) beside every "
                   "measurement")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-seams", action="store_true")
    p.add_argument("--worker", choices=("time", "mem", "seams"), help=argparse.SUPPRESS)
    p.add_argument("--which", choices=("core", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    a.model = str(pathlib.Path(a.model).resolve())
    a.model_dir, a.model_name = os.path.dirname(a.model), os.path.basename(a.model)

    if a.worker:
        fn = {"time": worker_time, "mem": worker_mem, "seams": worker_seams}[a.worker]
        print(json.dumps(fn(a)))
        return 0

    comfy = find_comfyui(a.comfyui)
    if comfy is None:
        msg = ("no ComfyUI found: give --comfyui DIR or set ATELIER_COMFYUI to a ComfyUI source tree with its venv "
               "(see ../shared/HOST.md); this benchmark compares against core's ImageUpscaleWithModel")
        print(msg)
        print(json.dumps({"error": msg}))
        return 2
    a.comfyui = str(comfy)
    py = comfy_python(comfy)
    if not os.path.isfile(a.model):
        print(json.dumps({"error": f"model file not found: {a.model}"}))
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        a.image = os.path.join(tmp, "source.npy")
        image_name = make_source_image(a.image)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
        try:
            return measure(a, py, comfy, image_name)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()


def measure(a: argparse.Namespace, py: str, comfy: pathlib.Path, image_name: str) -> int:
    load0 = os.getloadavg()[0]
    print(f"ComfyUI {comfy} ({py}); model {a.model_name}; sizes {a.sizes}; {a.reps} runs each; "
          f"{'GPU' if a.gpu else 'CPU'}; {os.cpu_count()} CPUs, load {load0:.1f}; {a.load} busy processes beside; "
          f"image: {image_name}")
    times = run_worker(py, "time", a, a.sizes)
    result: dict[str, Any] = {"model": a.model_name, "device": "gpu" if a.gpu else "cpu", "reps": a.reps,
                              "threads": times["threads"], "torch": times["torch"], "busy_processes": a.load,
                              "image": image_name.split(" ")[0], "load_start": round(load0, 2)}
    gflop = times["flops_per_pixel"] / 1e9
    for s in a.sizes:
        t = times[str(s)]
        g = {w: gflop * s * s / t[w] for w in ("core", "ours")}
        result[f"time_ratio_{s}"] = round(t["ours"] / t["core"], 3)
        result[f"gflops_core_{s}"] = round(g["core"], 1)
        result[f"gflops_ours_{s}"] = round(g["ours"], 1)
        result[f"load_{s}"] = t["load"]
        print(f"{s:>5}px  time  core {t['core']:8.2f}s ({g['core']:5.0f} GFLOP/s)  ours {t['ours']:8.2f}s "
              f"({g['ours']:5.0f} GFLOP/s)  ratio {t['ours'] / t['core']:.3f}   load {t['load'][0]}->{t['load'][1]}")
    if not a.no_memory:
        for s in a.sizes:
            runs = {w: [] for w in ("core", "ours")}
            for _ in range(a.mem_reps):  # fresh processes, alternating; the allocator's peaks vary run to run
                for w in ("core", "ours"):
                    runs[w].append(run_worker(py, "mem", a, [s], w))
            m = {w: {k: statistics.median(r[k] for r in v) for k in ("base", "peak")} for w, v in runs.items()}
            ratio = m["ours"]["peak"] / m["core"]["peak"]
            growth = (m["ours"]["peak"] - m["ours"]["base"]) / max(1, m["core"]["peak"] - m["core"]["base"])
            result[f"mem_ratio_{s}"] = round(ratio, 3)
            result[f"mem_growth_ratio_{s}"] = round(growth, 3)
            mb = {w: (m[w]["peak"] / 2**20, (m[w]["peak"] - m[w]["base"]) / 2**20) for w in m}
            print(f"{s:>5}px  peak  core {mb['core'][0]:8.0f}MB  ours {mb['ours'][0]:8.0f}MB  ratio {ratio:.3f}   "
                  f"(growth above baseline: core {mb['core'][1]:.0f}MB ours {mb['ours'][1]:.0f}MB, ratio {growth:.3f})")
    if not a.no_seams:
        s = 1024 if 1024 in a.sizes else max(a.sizes)
        seams = run_worker(py, "seams", a, [s])
        result[f"seam_core_{s}"] = round(seams["core"], 4)
        result[f"seam_ours_{s}"] = round(seams["ours"], 4)
        print(f"{s:>5}px  seams vs untiled (max abs diff, /255): core {seams['core']:.4f}  ours {seams['ours']:.4f}")
    result["time_ratio_max"] = max(result[f"time_ratio_{s}"] for s in a.sizes)
    if not a.no_memory:
        result["mem_ratio_max"] = max(result[f"mem_ratio_{s}"] for s in a.sizes)
    result["load_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
