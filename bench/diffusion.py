"""Benchmark: Atelier Diffusion Sample / RePaint against diffusers' DDIMPipeline, DDPMPipeline and RePaintPipeline.

    python bench/diffusion.py [--batches 1,16] [--steps 50] [--pipelines ddim,ddpm,repaint] [--repeats 3]
                              [--repaint-steps 250 --jump-length 10 --jump-n-sample 10] [--device cpu|cuda]

Model: the google/ddpm-cifar10-32 UNet2DModel configuration (35.7 M parameters, 32x32, block_out_channels
128,256,256,256, attention at 16x16) with random weights, saved once as a diffusers folder (unet/ + scheduler/) in a
temp dir. Both sides load those files: ours through Atelier Load Diffusion Model (the pack's own UNet2DModel),
diffusers through UNet2DModel.from_pretrained. Both start from the same noise (ours: item i from seed + i; diffusers'
randn_tensor patched to return it), so their outputs are compared too ("max_diff", on [0,1] images).

Cells, each in a fresh process (one pipeline, one batch, one side): wall time of the whole call (median of --repeats
after a 1-step warm-up), its CPU time ("cpu_s", the fairer figure on a shared, overloaded machine; --threads pins
torch's threads on both sides) and the process's peak resident memory during the calls ("peak_mb": whole process; "growth_mb":
above the loaded baseline). DDPM runs --steps steps (diffusers' DDPMPipeline default is 1000; the per-step cost is
what is compared). RePaint: batch 1 at the reference settings (250 steps, jump length 10, 10 resamplings: 2,410 model
calls) unless told fewer; the cheaper schedule's model calls are reported beside it. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

from _bench_common import peak_rss, pkg_root, reset_peak, run_worker

SIDES = ("ours", "diffusers")
CIFAR = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
             block_out_channels=(128, 256, 256, 256),
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
             flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, attention_head_dim=None, norm_num_groups=32)


def make_model(root: pathlib.Path) -> pathlib.Path:
    """models/diffusers/cifar/{unet,scheduler}: the DDPM CIFAR-10 config with seeded random weights."""
    folder = root / "diffusers" / "cifar"
    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        import torch
        from diffusers import DDPMScheduler, UNet2DModel

        torch.manual_seed(0)
        UNet2DModel(**CIFAR).save_pretrained(folder / "unet", safe_serialization=True)
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_pretrained(
            folder / "scheduler")
    for sub in ("diffusion_models", "diffusers"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------------------------------------ worker side
def _ours(models: str, pipeline: str, batch: int, a) -> tuple:
    import torch

    from atelier.models.diffusion import repaint as rp
    from atelier.models.diffusion import run as drun
    from atelier.models.manager import ModelManager, set_manager
    from atelier.nodes import diffusion as nodes

    set_manager(ModelManager(models, device=torch.device(a.device)))
    desc = nodes.AtelierLoadDiffusionModel().load("diffusers/cifar/unet/diffusion_pytorch_model.safetensors")[0]
    if pipeline == "repaint":
        image, mask = _repaint_inputs(batch)
        keep = 1 - mask

        def run(steps: int) -> Any:
            sched = rp.RePaintSchedule(steps=steps, jump_length=a.jump_length if steps > 1 else 1,
                                       jump_n_sample=a.jump_n_sample if steps > 1 else 1)
            from atelier.models.manager import get_manager
            out = drun.inpaint(get_manager(), desc, image * 2 - 1, keep, sched, seed=0)
            return ((out + 1) / 2).clamp(0, 1)
        return run, a.repaint_steps
    node = nodes.AtelierDiffusionSample()

    def run(steps: int) -> Any:
        return node.sample(desc, seed=0, batch_size=batch, width=32, height=32, steps=steps, sampler=pipeline,
                           spacing="leading", eta=0.0, class_label=-1, guidance=1.0, clip="on")[0].movedim(-1, 1)
    return run, a.steps


def _repaint_inputs(batch: int):
    import torch

    image = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(batch, 1, 32, 32)
    mask[..., 8:24, 6:20] = 1
    return image, mask


def _diffusers(models: str, pipeline: str, batch: int, a) -> tuple:
    import diffusers
    import torch
    from diffusers.schedulers import scheduling_ddpm, scheduling_repaint

    from atelier.models.latents import generator, seeded_normal

    folder = pathlib.Path(models) / "diffusers" / "cifar"
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").to(a.device).eval()
    mod = {"ddim": diffusers.pipelines.ddim.pipeline_ddim, "ddpm": diffusers.pipelines.ddpm.pipeline_ddpm,
           "repaint": diffusers.pipelines.deprecated.repaint.pipeline_repaint}[pipeline]
    gens: list = []  # our per-step noise streams (item i: seed 0 + i, stream 1), restarted with every run

    def start(shape, **kw):  # the starting noise: ours (item i from seed + i, stream 0)
        gens[:] = [generator(i, 1) for i in range(batch)]
        return seeded_normal(shape, 0).to(kw.get("device") or "cpu")

    def step(shape, **kw):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in gens]).to(kw.get("device") or "cpu")

    mod.randn_tensor = start
    scheduling_ddpm.randn_tensor = step
    scheduling_repaint.randn_tensor = step
    if pipeline == "repaint":
        pipe = diffusers.RePaintPipeline(unet=unet, scheduler=diffusers.RePaintScheduler())
        image, mask = _repaint_inputs(batch)

        def run(steps: int) -> Any:
            out = pipe(image * 2 - 1, 1 - mask, num_inference_steps=steps, eta=0.0, jump_length=a.jump_length if
                       steps > 1 else 1, jump_n_sample=a.jump_n_sample if steps > 1 else 1, output_type="np").images
            return torch.from_numpy(out).movedim(-1, 1)
        pipe.set_progress_bar_config(disable=True)
        return run, a.repaint_steps
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler") if pipeline == "ddim" else \
        diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    pipe = (diffusers.DDIMPipeline if pipeline == "ddim" else diffusers.DDPMPipeline)(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int) -> Any:
        kw = {"eta": 0.0, "use_clipped_model_output": True} if pipeline == "ddim" else {}
        return torch.from_numpy(pipe(batch_size=batch, num_inference_steps=steps, output_type="np", **kw).images
                                ).movedim(-1, 1)
    return run, a.steps


def worker(side: str, pipeline: str, batch: int, models: str, out_path: str, a) -> dict[str, Any]:
    sys.path.insert(0, str(pkg_root()))
    import torch

    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    with torch.inference_mode():
        run, steps = (_ours if side == "ours" else _diffusers)(models, pipeline, batch, a)
        run(1)  # warm-up: imports, weights paged in
        base, reset = reset_peak()
        times, cpu, out = [], [], None
        for _ in range(a.repeats if pipeline != "repaint" else 1):
            if a.device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = run(steps)
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peak = peak_rss(reset)
    torch.save(out.float().cpu(), out_path)
    cell = {"wall_s": round(statistics.median(times), 3), "runs": [round(t, 3) for t in times],
            "cpu_s": round(statistics.median(cpu), 3),
            "peak_mb": round(peak / 2**20), "growth_mb": round((peak - base) / 2**20), "steps": steps}
    if a.device == "cuda":
        cell["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return cell


# ------------------------------------------------------------------------------------------------ orchestration
def run_cell(side: str, pipeline: str, batch: int, models: str, out_path: str, a, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, pipeline, str(batch), "--models-dir", models, "--out",
           out_path, "--steps", str(a.steps), "--repeats", str(a.repeats), "--repaint-steps", str(a.repaint_steps),
           "--jump-length", str(a.jump_length), "--jump-n-sample", str(a.jump_n_sample), "--device", a.device,
           "--threads", str(a.threads)]
    return run_worker(cmd, timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--pipelines", default="ddim,ddpm,repaint")
    p.add_argument("--steps", type=int, default=50, help="DDIM and DDPM steps")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median; RePaint: 1)")
    p.add_argument("--repaint-steps", type=int, default=250)
    p.add_argument("--jump-length", type=int, default=10)
    p.add_argument("--jump-n-sample", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every cell (0: torch's default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    p.add_argument("--models-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "PIPELINE", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        side, pipeline, batch = a.worker
        print(json.dumps(worker(side, pipeline, int(batch), a.models_dir, a.out, a)))
        return 0

    tmp = pathlib.Path(tempfile.gettempdir()) / f"atelier_bench_diffusion_{os.getuid()}"
    make_model(tmp)
    sys.path.insert(0, str(pkg_root()))
    import torch

    from atelier.models.diffusion import repaint as rp

    result: dict[str, Any] = {"device": a.device, "cpus": os.cpu_count(), "steps": a.steps,
                              "model": "UNet2DModel ddpm-cifar10-32 config, random weights", "cells": {}}
    print(f"diffusion bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    summary: dict[str, Any] = {}
    for pipeline in a.pipelines.split(","):
        for batch in ([1] if pipeline == "repaint" else [int(b) for b in a.batches.split(",")]):
            cells = {}
            for side in SIDES:
                out = str(tmp / f"{pipeline}_{batch}_{side}.pt")
                cells[side] = run_cell(side, pipeline, batch, str(tmp), out, a, a.timeout)
                print(f"  {pipeline:8s} b{batch:<3d} {side:10s} {json.dumps(cells[side])}", file=sys.stderr)
            if all("wall_s" in c for c in cells.values()):
                o, d = (torch.load(str(tmp / f"{pipeline}_{batch}_{s}.pt"), weights_only=True) for s in SIDES)
                cells["max_diff"] = float((o - d).abs().max())
                summary[f"{pipeline}_b{batch}"] = {
                    "time": round(cells["ours"]["wall_s"] / cells["diffusers"]["wall_s"], 3),
                    "cpu_time": round(cells["ours"]["cpu_s"] / cells["diffusers"]["cpu_s"], 3),
                    "peak": round(cells["ours"]["peak_mb"] / cells["diffusers"]["peak_mb"], 3),
                    "growth": round(cells["ours"]["growth_mb"] / max(1, cells["diffusers"]["growth_mb"]), 3),
                    "max_diff": round(cells["max_diff"], 6)}
            result["cells"][f"{pipeline}_b{batch}"] = cells
    ref = rp.RePaintSchedule(steps=a.repaint_steps, jump_length=a.jump_length, jump_n_sample=a.jump_n_sample)
    summary["repaint_model_calls"] = {"run": rp.model_calls(ref), "reference": rp.model_calls(rp.REFERENCE),
                                      "cheap": rp.model_calls(rp.CHEAP), "cheap_schedule": vars(rp.CHEAP)}
    result["summary"] = summary
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
