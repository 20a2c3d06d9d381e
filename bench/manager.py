"""Benchmarks of the shared manager and tiling engine. Last line: one JSON object of the figures.

    python bench/manager.py [--repeats 7] [--weights ../shared/weights]

- cached reload vs first load (the same file through ModelManager.load, fresh manager vs warm cache)
- safetensors vs pickle (`torch.load(weights_only=True)`) load time of the same state dict
- tiling overhead: tiled_apply with 4 tiles vs one untiled call on an image that fits
Medians of several runs.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from atelier.models import loading, tiling
from atelier.models.manager import ModelManager, placement

REPO = pathlib.Path(__file__).resolve().parents[1]


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--weights", default=os.environ.get("ATELIER_SHARED", str(REPO.parent / "shared")) + "/weights")
    ap.add_argument("--size", type=int, default=384, help="image side for the tiling overhead figure")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    src = pathlib.Path(args.weights) / "realesr-animevideov3" / "realesr-animevideov3.pth"
    if not src.is_file():
        sys.exit(f"bench/manager.py: needs {src} (../shared/weights); not found")
    root = pathlib.Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    try:
        (root / "upscale_models").mkdir()
        pth = root / "upscale_models" / "model.pth"
        shutil.copy(src, pth)
        sd, _ = loading.read_state_dict(pth)
        st = root / "upscale_models" / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, st)

        first = _median(lambda: ModelManager(str(root), device=torch.device("cpu")).load("model.pth", "upscale_models"), args.repeats)
        warm = ModelManager(str(root), device=torch.device("cpu"))
        warm.load("model.pth", "upscale_models")
        cached = _median(lambda: warm.load("model.pth", "upscale_models"), args.repeats)
        t_st = _median(lambda: loading.read_state_dict(st), args.repeats)
        t_pk = _median(lambda: loading.read_state_dict(pth), args.repeats)

        desc = warm.load("model.pth", "upscale_models")
        x = torch.rand(1, 3, args.size, args.size)
        rf = desc.receptive_field or 16
        with warm.use(desc) as model:
            dev, dt = placement(model)
            untiled = _median(lambda: model(x), args.repeats)
            tile = args.size // 2 + 2 * rf + 8  # 2x2 tiles
            # one tile per call, as the upscale engine plans on a CPU (its per-call fast paths take one image)
            tiled = _median(lambda: tiling.tiled_apply(model, x, scale=desc.scale, tile=tile, context=rf, blend=8,
                                                       max_batch=1, device=dev, dtype=dt, progress=None), args.repeats)
            diff = (tiling.tiled_apply(model, x, scale=desc.scale, tile=tile, context=rf, blend=8, progress=None)
                    - model(x)).abs().max().item()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = {
        "first_load_s": round(first, 4),
        "cached_load_s": round(cached, 6),
        "cached_over_first": round(cached / first, 5),
        "safetensors_read_s": round(t_st, 4),
        "pickle_read_s": round(t_pk, 4),
        "safetensors_over_pickle": round(t_st / t_pk, 3),
        "untiled_s": round(untiled, 4),
        "tiled_2x2_s": round(tiled, 4),
        "tiled_over_untiled": round(tiled / untiled, 3),
        "tiled_max_abs_diff": diff,
        "image": args.size,
        "repeats": args.repeats,
    }
    for k, v in figures.items():
        print(f"{k:>24}: {v}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
