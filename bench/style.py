"""Benchmark: style transfer, Atelier Style Transfer against the reference implementation run untiled.

    python bench/style.py [--cells microast:1024,microast:2048,microast:4096,adain:1024] [--repeats 3]
                          [--mem-fraction 0.7] [--threads N]

Models: MicroAST with its real weights (../shared/weights/microast); AdaIN with the seeded random weights of
../shared/golden/adain (the real VGG is not available here; cost does not depend on the values).
Inputs: content [1,3,S,S] and a 512x512 style, seeded uniform noise (cost does not depend on the content).

Variants, each cell in a fresh process (one model, one size, one variant):
- ours:      Atelier Load Style Model + Atelier Style Transfer (IMAGE in and out, style_size 512, automatic tiles
             with whole-image statistics), as a node runs, inference mode.
- reference: bench/style_reference.py, a transcription of upstream's modules (MicroAST TestNet, pytorch-AdaIN
             vgg/decoder/style_transfer), called once on the whole image as upstream's test scripts do.
Peak memory: the process's peak resident set (VmHWM, reset after loading and a warm-up), whole ("peak_mb") and above
the loaded baseline ("growth_mb"); time: median wall time of --repeats calls (1 at 4096² and above). The reference
runs under an address-space cap of --mem-fraction of the available memory; where it needs more it fails with an
allocation error and the cell reports "peak_mb_at_least". Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import pathlib
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from _bench_common import REPO, available_bytes, peak_rss, pkg_root, proc_status, ratios, reset_peak, run_worker

SHARED = pathlib.Path(os.environ.get("ATELIER_SHARED") or REPO.parent / "shared")
MICROAST = SHARED / "weights" / "microast"
ADAIN = SHARED / "golden" / "adain"
STYLE_SIDE = 512


def make_models(root: pathlib.Path) -> None:
    """models/style/microast/<four parts>; models/style/adain/{vgg_normalised,decoder}.safetensors."""
    (root / "style" / "microast").mkdir(parents=True, exist_ok=True)
    (root / "style" / "adain").mkdir(parents=True, exist_ok=True)
    for f in MICROAST.glob("*_iter_160000.pth.tar"):
        dst = root / "style" / "microast" / f.name
        if not dst.exists():
            shutil.copy(f, dst)
    for src, dst in (("vgg_relu4_1", "vgg_normalised"), ("decoder", "decoder")):
        out = root / "style" / "adain" / f"{dst}.safetensors"
        if not out.exists():
            with lzma.open(ADAIN / f"{src}.safetensors.xz") as fh:
                data = fh.read()
            tmp = out.with_suffix(".partial")
            tmp.write_bytes(data)
            tmp.rename(out)


# ------------------------------------------------------------------ worker side
def _cap_address_space(fraction: float) -> int:
    allowance = int(fraction * available_bytes())
    resource.setrlimit(resource.RLIMIT_AS, ((proc_status("VmSize") or 0) + allowance,
                                            resource.getrlimit(resource.RLIMIT_AS)[1]))
    return allowance


def _setup(model: str, variant: str, models: str):
    """(run(content, style), warm-up sizes) for one cell; content/style as the variant takes them."""
    import torch

    if variant == "reference":
        sys.path.insert(0, str(REPO / "bench"))
        import style_reference as ref

        if model == "microast":
            net = ref.microast_testnet(str(MICROAST))
            return lambda c, s: net(c, s)
        from safetensors.torch import load_file

        vgg, dec = ref.adain_vgg().eval(), ref.adain_decoder().eval()
        vgg.load_state_dict(load_file(os.path.join(models, "style", "adain", "vgg_normalised.safetensors")))
        dec.load_state_dict(load_file(os.path.join(models, "style", "adain", "decoder.safetensors")))
        return lambda c, s: ref.adain_style_transfer(vgg, dec, c, s)
    sys.path.insert(0, str(pkg_root()))
    from atelier.models.manager import ModelManager, set_manager
    from atelier.nodes import style as nodes

    set_manager(ModelManager(models, device=torch.device("cpu")))
    name = "microast/decoder_iter_160000.pth.tar" if model == "microast" else "adain/decoder.safetensors"
    desc = nodes.AtelierLoadStyleModel().load(name)[0]
    node = nodes.AtelierStyleTransfer()

    def run(c, s):
        img, sty = c.movedim(1, -1), s.movedim(1, -1)  # IMAGE [1,S,S,3], as a node gets it
        return node.apply(desc, img, 1.0, STYLE_SIDE, False, style=sty)["result"][0]
    return run


def worker(model: str, variant: str, size: int, models: str, repeats: int, frac: float) -> dict[str, Any]:
    import torch

    run = _setup(model, variant, models)
    g = torch.Generator().manual_seed(0)
    content = torch.rand(1, 3, size, size, generator=g)
    style = torch.rand(1, 3, STYLE_SIDE, STYLE_SIDE, generator=g)
    with torch.inference_mode():
        run(content[..., :64, :64], style)  # warm-up: imports, weights paged in; not measured
        base, reset = reset_peak()
        cap = _cap_address_space(frac) if variant == "reference" else None
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                out = run(content, style)
            except RuntimeError as e:  # "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"
                m = re.search(r"allocate (\d+) bytes", str(e))
                if cap is None or m is None:
                    raise
                need = max(proc_status("VmHWM") or 0, (proc_status("VmRSS") or 0) + int(m.group(1)))
                return {"failed": f"out of memory: allowed {cap / 2**30:.1f} GB above the loaded process",
                        "peak_mb_at_least": round(need / 2**20), "base_mb": round(base / 2**20)}
            times.append(time.perf_counter() - t0)
            del out
    peak = peak_rss(reset)
    return {"wall_s": round(statistics.median(times), 3), "runs": len(times), "peak_mb": round(peak / 2**20),
            "growth_mb": round((peak - base) / 2**20), "base_mb": round(base / 2**20), "peak_reset": reset}


# ------------------------------------------------------------------ orchestration
def run_cell(model: str, variant: str, size: int, models: str, a) -> dict:
    repeats = a.repeats if size < 4096 else 1
    cmd = [sys.executable, __file__, "--worker", model, variant, str(size), "--models-dir", models,
           "--repeats", str(repeats), "--mem-fraction", str(a.mem_fraction)]
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    return run_worker(cmd, a.max_cell_s, env=env)


def summarise(cells: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, row in cells.items():
        ours, ref = row.get("ours", {}), row.get("reference", {})
        if "peak_mb" not in ours:
            continue
        r = ratios(ours, ref, "the reference")
        if r is not None:
            out[key] = r
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="microast:1024,microast:2048,microast:4096,adain:1024")
    p.add_argument("--variants", default="ours,reference")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per cell below 4096² (median reported)")
    p.add_argument("--mem-fraction", type=float, default=0.7)
    p.add_argument("--max-cell-s", type=float, default=1800.0)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the workers (0: torch's default)")
    p.add_argument("--models-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "VARIANT", "SIZE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        model, variant, size = a.worker
        print(json.dumps(worker(model, variant, int(size), a.models_dir, a.repeats, a.mem_fraction)))
        return 0
    if not MICROAST.is_dir() or not ADAIN.is_dir():
        print(json.dumps({"error": f"{MICROAST} or {ADAIN} not found (set ATELIER_SHARED)"}))
        return 2
    models = pathlib.Path(tempfile.gettempdir()) / f"atelier_bench_style_{os.getuid()}"
    make_models(models)
    result: dict[str, Any] = {"device": "cpu", "cpus": os.cpu_count(), "cells": {}}
    print(f"style bench: {a.cells}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for spec in a.cells.split(","):
        model, size = spec.split(":")
        for variant in a.variants.split(","):
            cell = run_cell(model, variant, int(size), str(models), a)
            result["cells"].setdefault(f"{model}_{size}", {})[variant] = cell
            print(f"  {model:8s} {size:>5s} {variant:9s} {json.dumps(cell)}", file=sys.stderr)
    result["summary"] = summarise(result["cells"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
