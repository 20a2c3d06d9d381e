"""Benchmark: VAE decoding, Atelier VAE Decode against the untiled call and core ComfyUI's VAEDecodeTiled.

    python bench/vae.py [--sizes 512,2048,4096] [--models taef2,sd] [--variants ours,untiled,core_tiled]
                        [--max-cell-s 900] [--mem-fraction 0.7] [--comfyui DIR]

Models: TAEF2 (the real ../shared/weights/taef2 pair) and a full-size SD1 KL decoder (ch 128, ch_mult 1,2,4,4, two
resnets per level, mid attention) with random weights, written once to a temp dir. Latents are seeded normal noise
[1,c,S/8,S/8] (what is measured, memory and time, does not depend on their content).

Variants, each in a fresh process (one cell = one model, one size, one variant):
- ours:       Atelier Load VAE + Atelier VAE Decode, automatic tiling (TAESD: tiles with the receptive field as
              context; KL: exact bands with whole-image GroupNorm statistics), as a node runs, inference mode.
- untiled:    the decoder module called on the whole latent (`model.decode(z)`), no tiling at all.
- core_tiled: core's VAELoader + VAEDecodeTiled (tile 512, overlap 64: its defaults), comfy imported with --cpu,
              only where a ComfyUI source tree with its venv is found (--comfyui, $ATELIER_COMFYUI, ../comfyui).
Peak memory: the process's peak resident set (VmHWM, reset after loading; ru_maxrss where that reset is not
possible), reported whole ("peak_mb") and above the loaded baseline ("growth_mb"); wall time of the decode call.
The untiled call runs under an address-space cap of --mem-fraction (0.7) of the available memory: where it needs
more, it fails with an allocation error and the cell reports "peak_mb_at_least" (its resident set then plus the
allocation it asked for), so the ratio ours/untiled is an upper bound. Tiled cells predicted to need more than that
share (the smallest size's peak plus the output image), and any cell predicted (scaled by pixels from the smallest
size) to take more than --max-cell-s seconds, are skipped with the reason. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

from _bench_common import (REPO, available_bytes, comfy_python, find_comfyui, peak_rss, pkg_root, proc_status,
                           ratios, reset_peak, run_worker)

TAEF2_DIR = REPO.parent / "shared" / "weights" / "taef2"
VARIANTS = ("ours", "untiled", "core_tiled")
LATENT = {"taef2": 32, "sd": 4}


# ------------------------------------------------------------------------------------------------ helpers
def make_models(root: pathlib.Path) -> None:
    """models/vae_approx: the TAEF2 pair; models/vae/sd_random.safetensors: a full-size SD1 KL autoencoder."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(pkg_root()))
    from atelier.models.vae import kl

    (root / "vae_approx").mkdir(parents=True, exist_ok=True)
    (root / "vae").mkdir(parents=True, exist_ok=True)
    for half in ("encoder", "decoder"):
        dst = root / "vae_approx" / f"taef2_{half}.pth"
        if not dst.exists():
            dst.write_bytes((TAEF2_DIR / f"taef2_{half}.pth").read_bytes())
    dst = root / "vae" / "sd_random.safetensors"
    if not dst.exists():
        torch.manual_seed(0)
        model = kl.AutoencoderKL(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, latent_channels=4)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst))


# ------------------------------------------------------------------------------------------------ worker side
def _cap_address_space(fraction: float) -> int:
    """Limit this process to its current mappings plus `fraction` of the available memory, so that an untiled decode
    too big for the machine fails with an allocation error (which says how much it asked for) instead of being
    killed by the kernel. Returns the allowance in bytes."""
    import resource

    allowance = int(fraction * available_bytes())
    resource.setrlimit(resource.RLIMIT_AS, ((proc_status("VmSize") or 0) + allowance, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return allowance


def worker(model: str, variant: str, size: int, models: str, comfy: str | None, mem_fraction: float = 0.7
           ) -> dict[str, Any]:
    if variant == "core_tiled":
        sys.argv = [sys.argv[0], "--cpu"]
        sys.path.insert(0, comfy)
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401
    sys.path.insert(0, str(pkg_root()))
    import torch

    z = torch.randn(1, LATENT[model], size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    name = "vae_approx/taef2_decoder.pth" if model == "taef2" else "vae/sd_random.safetensors"
    if variant == "core_tiled":
        import folder_paths
        import nodes as core

        folder_paths.add_model_folder_path("vae", os.path.join(models, "vae"))
        vae = core.VAELoader().load_vae(name.split("/", 1)[1])[0]
        run = lambda: core.VAEDecodeTiled().decode(vae, {"samples": z}, 512, 64)[0]  # noqa: E731
    else:
        from atelier.models.manager import ModelManager, set_manager
        from atelier.nodes import vae as ours

        set_manager(ModelManager(models, device=torch.device("cpu")))
        v = ours.AtelierLoadVAE().load(name)[0]
        if variant == "ours":
            run = lambda: ours.AtelierVAEDecode().decode(v, {"samples": z})[0]  # noqa: E731
        else:
            run = lambda: v.decoder.model.decode(z)  # noqa: E731
    with torch.inference_mode():
        small = {"samples": z[..., :8, :8]}  # warm-up (imports, NNPACK check, weights paged in): not measured
        if variant == "core_tiled":
            core.VAEDecode().decode(vae, small)
        elif variant == "ours":
            ours.AtelierVAEDecode().decode(v, small)
        else:
            v.decoder.model.decode(small["samples"])
        base, reset = reset_peak()
        cap = _cap_address_space(mem_fraction) if variant == "untiled" else None
        t0 = time.perf_counter()
        try:
            out = run()
        except RuntimeError as e:  # "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"
            m = re.search(r"allocate (\d+) bytes", str(e))
            if cap is None or m is None:
                raise
            need = max(proc_status("VmHWM") or 0, (proc_status("VmRSS") or 0) + int(m.group(1)))
            return {"failed": f"out of memory: allowed {cap / 2**30:.1f} GB more than the loaded process "
                              f"({mem_fraction:.0%} of the available memory)",
                    "peak_mb_at_least": round(need / 2**20), "base_mb": round(base / 2**20),
                    "wall_s_until_failure": round(time.perf_counter() - t0, 1)}
        wall = time.perf_counter() - t0
    peak = peak_rss(reset)
    return {"wall_s": round(wall, 2), "peak_mb": round(peak / 2**20), "growth_mb": round((peak - base) / 2**20),
            "base_mb": round(base / 2**20), "shape": list(out.shape), "peak_reset": reset}


# ------------------------------------------------------------------------------------------------ orchestration
def run_cell(py: str, model: str, variant: str, size: int, models: str, comfy: str | None, timeout: float,
             frac: float) -> dict:
    cmd = [py, __file__, "--worker", model, variant, str(size), "--models-dir", models, "--mem-fraction", str(frac)]
    if comfy:
        cmd += ["--comfyui", comfy]
    return run_worker(cmd, timeout, cwd=comfy if variant == "core_tiled" else None)


def _predict(first: dict, first_size: int, size: int) -> tuple[float, float]:
    """(seconds, peak MB) scaled by pixels from the variant's smallest measured cell."""
    k = (size / first_size) ** 2
    return first["wall_s"] * k, first["base_mb"] + first["growth_mb"] * k


def _skip_reason(model: str, variant: str, size: int, first: dict | None, first_size: int, a) -> str | None:
    if variant == "core_tiled" and a.comfyui is None:
        return "no ComfyUI found (--comfyui DIR or $ATELIER_COMFYUI)"
    if variant == "core_tiled" and model == "taef2":
        return ("core ComfyUI's TAESD has no GroupNorm pool layers: its VAELoader cannot load TAEF2 (and lists no "
                "taef2 pair), so there is no like-for-like core cell")
    if first is None or "wall_s" not in first or size == first_size:
        return None
    secs, peak_mb = _predict(first, first_size, size)
    if variant == "untiled":
        return None if secs <= a.max_cell_s else f"predicted {secs:.0f} s > --max-cell-s {a.max_cell_s:.0f}"
    peak_mb = first["peak_mb"] + 3 * size * size * 4 * 2 / 2**20  # tiled: bounded by the tile, plus the output
    avail = available_bytes() / 2**20
    if peak_mb > a.mem_fraction * avail:
        return f"predicted peak {peak_mb / 1024:.1f} GB > {a.mem_fraction:.0%} of the {avail / 1024:.1f} GB available"
    if secs > a.max_cell_s:
        return f"predicted {secs:.0f} s > --max-cell-s {a.max_cell_s:.0f} on this machine ({os.cpu_count()} CPUs)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,2048,4096")
    p.add_argument("--models", default="taef2,sd")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--max-cell-s", type=float, default=900.0, help="skip cells predicted to take longer")
    p.add_argument("--mem-fraction", type=float, default=0.7,
                   help="skip cells predicted to need more than this share of the available memory")
    p.add_argument("--comfyui", help="ComfyUI source tree (default $ATELIER_COMFYUI or ../comfyui)")
    p.add_argument("--models-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "VARIANT", "SIZE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        model, variant, size = a.worker
        print(json.dumps(worker(model, variant, int(size), a.models_dir, a.comfyui, a.mem_fraction)))
        return 0

    comfy = find_comfyui(a.comfyui)
    a.comfyui = str(comfy) if comfy else None
    if not TAEF2_DIR.is_dir():
        print(json.dumps({"error": f"{TAEF2_DIR} not found (../shared beside the repository)"}))
        return 2
    models = pathlib.Path(tempfile.gettempdir()) / f"atelier_bench_vae_{os.getuid()}"
    make_models(models)
    sizes = sorted(int(s) for s in a.sizes.split(",") if s.strip())
    result: dict[str, Any] = {"device": "cpu", "cpus": os.cpu_count(), "comfyui": a.comfyui, "cells": {}}
    print(f"VAE decode bench: sizes {sizes}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"ComfyUI: {a.comfyui or 'none'}", file=sys.stderr)
    for model in a.models.split(","):
        for variant in a.variants.split(","):
            py = comfy_python(comfy) if variant == "core_tiled" and comfy else sys.executable
            first = None
            for size in sizes:
                reason = _skip_reason(model, variant, size, first, sizes[0], a)
                cell = {"skipped": reason} if reason else run_cell(py, model, variant, size, str(models), a.comfyui,
                                                                   max(a.max_cell_s * 2, 120), a.mem_fraction)
                if size == sizes[0]:
                    first = cell
                result["cells"].setdefault(model, {}).setdefault(str(size), {})[variant] = cell
                print(f"  {model:6s} {size:5d} {variant:10s} {json.dumps(cell)}", file=sys.stderr)
    result["summary"] = summarise(result["cells"], sizes)
    print(json.dumps(result))
    return 0


def summarise(cells: dict, sizes: list[int]) -> dict[str, Any]:
    """Ratios ours/untiled and ours/core_tiled per model and size (peak memory, growth, time); untiled peaks the
    machine could not run are estimated from the smallest size (marked)."""
    out: dict[str, Any] = {}
    for model, by_size in cells.items():
        first = by_size.get(str(sizes[0]), {}).get("untiled", {})
        for size in sizes:
            row = by_size.get(str(size), {})
            ours = row.get("ours", {})
            if "peak_mb" not in ours:
                continue
            for other in ("untiled", "core_tiled"):
                ref = row.get(other, {})
                key = f"{model}_{size}_vs_{other}"
                if ratios(ours, ref, other) is not None:
                    out[key] = ratios(ours, ref, other)
                elif other == "untiled" and "peak_mb" in first:
                    est = _predict(first, sizes[0], size)
                    out[key] = {"peak": round(ours["peak_mb"] / est[1], 3), "untiled_peak_mb_estimated": round(est[1]),
                                "note": "untiled not run (see its cell); its peak scaled from the smallest size"}
            out[f"{model}_{size}_ours_peak_mb"] = ours["peak_mb"]
    return out


if __name__ == "__main__":
    sys.exit(main())
