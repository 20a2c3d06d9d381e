"""Benchmark: Atelier Diffusion Sample / RePaint against diffusers' DDIMPipeline, DDPMPipeline and RePaintPipeline,
and against OpenAI guided-diffusion's own code for an ADM model.

    python bench/diffusion.py [--batches 1,16] [--steps 50] [--pipelines ddim,ddpm,repaint,adm] [--repeats 3]
                              [--repaint-steps 250 --jump-length 10 --jump-n-sample 10] [--device cpu|cuda]
                              [--guided-diffusion DIR] [--threads N] [--rounds R]

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

ADM (--pipelines adm; not in the default list, since with the reference present it adds about half again to the
default run's time): ours against openai/guided-diffusion @ 22e0df8 (MIT), which is on no package registry. Its tree
(the folder holding guided_diffusion/) comes from --guided-diffusion DIR, else $ATELIER_GUIDED_DIFFUSION, else
../guided-diffusion beside the repository; without it the ADM cells are skipped, with the reason printed and in the
JSON ("adm": {"skipped": ...}). Only its unet.py, gaussian_diffusion.py, respace.py and script_util.py are used
(torch and numpy; dist_util's mpi4py/blobfile never). Model: `ADM` below, improved-diffusion's CIFAR-10 UNet (128
channels, 3 res blocks, channel_mult 1,2,2,2, attention at 16 and 8, learned sigma; 57.1 M parameters) with the
options of guided-diffusion's ImageNet models (resblock up/down, scale-shift norm, 64-channel heads), linear 1000-step
schedule. Random weights from the reference's create_model with a fixed seed, saved as a safetensors state dict with
the create_model kwargs in its metadata (where our loader reads the head settings), loaded by ours through Atelier
Load Diffusion Model and by the reference with load_state_dict. Both run DDIM, eta 0, x0 clipped, from the same
noise: guided-diffusion's create_gaussian_diffusion(timestep_respacing="ddimN") + ddim_sample_loop, ours Diffusion
Sample with sampler ddim, spacing leading. The two keep the same timesteps whenever 1000 // N is the DDIM stride
(every N dividing 1000, the default 50 included); for other N (3: ddim3 keeps 0,334,668, leading 0,333,666) the
reference runs ours through its own SpacedDiffusion, and "adm" in the JSON says so. What is left between the outputs
is float rounding: the reference's betas are float64, ours float32 as diffusers computes them.
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

from _bench_common import REPO, peak_rss, pkg_root, reset_peak, run_worker

SIDES = ("ours", "diffusers")
ADM_SIDES = ("ours", "guided_diffusion")
PIPELINES = ("ddim", "ddpm", "repaint", "adm")
CIFAR = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
             block_out_channels=(128, 256, 256, 256),
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
             flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, attention_head_dim=None, norm_num_groups=32)

GD_COMMIT = "22e0df8183507e13a7813f8d38d51b072ca1e67c"
# guided-diffusion's create_model kwargs: improved-diffusion's CIFAR-10 UNet (its cifar10_uncond checkpoints) with
# guided-diffusion's ImageNet options (resblock_updown, use_scale_shift_norm, num_head_channels 64); num_heads is
# then unused. channel_mult is explicit: create_model has no default for 32x32.
ADM = dict(image_size=32, num_channels=128, num_res_blocks=3, channel_mult="1,2,2,2", learn_sigma=True,
           class_cond=False, use_checkpoint=False, attention_resolutions="16,8", num_heads=4, num_head_channels=64,
           num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False,
           use_new_attention_order=False)
ADM_DIFFUSION = dict(steps=1000, learn_sigma=True, noise_schedule="linear")  # guided-diffusion's defaults
ADM_SEED = 0
ADM_FILE = "adm_cifar32.safetensors"


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
    return folder


def find_guided_diffusion(arg: str | None) -> tuple[pathlib.Path | None, str]:
    """(the guided-diffusion tree, "") from the argument, else $ATELIER_GUIDED_DIFFUSION, else ../guided-diffusion
    beside the repository; or (None, why the ADM cells are skipped). A named folder that is not the tree is not
    passed over for the next one: the reason then names it."""
    def ok(d: pathlib.Path) -> bool:
        return all((d / "guided_diffusion" / f).is_file() for f in ("unet.py", "respace.py", "script_util.py"))

    named, where = (arg, "--guided-diffusion") if arg else (os.environ.get("ATELIER_GUIDED_DIFFUSION"),
                                                             "ATELIER_GUIDED_DIFFUSION")
    if named:
        d = pathlib.Path(named).expanduser()
        if ok(d):
            return d.resolve(), ""
        return None, (f"{where} {named} is not a guided-diffusion tree (no guided_diffusion/unet.py, respace.py, "
                      f"script_util.py)")
    if ok(REPO.parent / "guided-diffusion"):
        return (REPO.parent / "guided-diffusion").resolve(), ""
    return None, (f"no guided-diffusion reference: pass --guided-diffusion DIR or set ATELIER_GUIDED_DIFFUSION to a "
                  f"checkout of openai/guided-diffusion @ {GD_COMMIT[:7]} (on no package registry)")


def make_adm_model(root: pathlib.Path) -> pathlib.Path:
    """models/diffusion_models/adm_cifar32.safetensors: the `ADM` config from the reference's create_model (importable
    as guided_diffusion), seeded random weights, the create_model kwargs in the metadata (our loader's source for the
    heads). Made again when the file's metadata differs (another config or seed)."""
    path = root / "diffusion_models" / ADM_FILE
    meta = {"create_model_kwargs": json.dumps(ADM, sort_keys=True), "seed": str(ADM_SEED),
            "source": f"openai/guided-diffusion @ {GD_COMMIT[:7]} script_util.create_model, random weights"}
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if f.metadata() == meta:
                return path
    import torch

    from atelier.models.loading import write_safetensors
    from guided_diffusion import script_util as su

    torch.manual_seed(ADM_SEED)
    model = su.create_model(**ADM)
    # zero_module leaves every ResBlock's last conv, every attention's proj_out and the output conv at exactly 0: the
    # network would return 0 and any two samplers would agree trivially. PyTorch's default init instead.
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and not any(
                bool(q.any()) for q in m.parameters()):
            m.reset_parameters()
    write_safetensors(path, model.state_dict(), meta)
    return path


def adm_spacing(steps: int) -> dict[str, Any]:
    """The timesteps kept for `steps` DDIM steps: guided-diffusion's "ddimN" (the smallest integer stride with exactly
    N of range(0, 1000, stride); None when none has) and ours, "leading" (i * (1000 // N)). Needs guided_diffusion
    and atelier importable."""
    from guided_diffusion.respace import space_timesteps

    from atelier.models.diffusion.schedules import spaced_timesteps

    T = ADM_DIFFUSION["steps"]
    ours = sorted(int(t) for t in spaced_timesteps(steps, T, "leading"))
    try:
        ddim = sorted(int(t) for t in space_timesteps(T, f"ddim{steps}"))
    except ValueError:
        ddim = None
    return {"ours": ours, "ddim": ddim, "same": ddim == ours}


def adm_reference_diffusion(steps: int):
    """guided-diffusion's SpacedDiffusion for `steps` DDIM steps: create_gaussian_diffusion(timestep_respacing=
    "ddimN") where that keeps our timesteps, else ours through its SpacedDiffusion (use_timesteps), built as
    create_gaussian_diffusion builds it."""
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion import script_util as su

    sp = adm_spacing(steps)
    if sp["same"]:
        return su.create_gaussian_diffusion(**ADM_DIFFUSION, timestep_respacing=f"ddim{steps}")
    return su.SpacedDiffusion(use_timesteps=sp["ours"], betas=gd.get_named_beta_schedule(
        ADM_DIFFUSION["noise_schedule"], ADM_DIFFUSION["steps"]), model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE, rescale_timesteps=False)


# ------------------------------------------------------------------------------------------------ worker side
def _ours(models: str, pipeline: str, batch: int, a) -> tuple:
    import torch

    from atelier.models.diffusion import repaint as rp
    from atelier.models.diffusion import run as drun
    from atelier.models.manager import ModelManager, set_manager
    from atelier.nodes import diffusion as nodes

    set_manager(ModelManager(models, device=torch.device(a.device)))
    desc = nodes.AtelierLoadDiffusionModel().load(f"diffusion_models/{ADM_FILE}" if pipeline == "adm" else
                                                  "diffusers/cifar/unet/diffusion_pytorch_model.safetensors")[0]
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
    sampler = "ddim" if pipeline == "adm" else pipeline

    def run(steps: int) -> Any:
        return node.sample(desc, seed=0, batch_size=batch, width=32, height=32, steps=steps, sampler=sampler,
                           spacing="leading", eta=0.0, class_label=-1, guidance=1.0, clip="on")[0].movedim(-1, 1)
    return run, a.steps


def _guided(models: str, pipeline: str, batch: int, a) -> tuple:
    """guided-diffusion's own UNetModel and DDIM loop over the same file and starting noise (ours: item i from seed
    0 + i, in the variance-preserving space the reference starts in)."""
    from safetensors.torch import load_file

    from atelier.models.latents import seeded_normal

    sys.path.insert(0, a.guided_diffusion)
    from guided_diffusion import script_util as su

    model = su.create_model(**ADM)
    model.load_state_dict(load_file(str(pathlib.Path(models) / "diffusion_models" / ADM_FILE)), strict=True)
    model.to(a.device).eval()
    shape = (batch, 3, ADM["image_size"], ADM["image_size"])

    def run(steps: int) -> Any:
        diffusion = adm_reference_diffusion(steps)
        noise = seeded_normal(shape, 0).to(a.device)
        out = diffusion.ddim_sample_loop(model, shape, noise=noise, clip_denoised=True, progress=False, eta=0.0)
        return ((out + 1) / 2).clamp(0, 1)
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
        run, steps = {"ours": _ours, "diffusers": _diffusers, "guided_diffusion": _guided}[side](
            models, pipeline, batch, a)
        run(2 if side == "guided_diffusion" else 1)  # warm-up: imports, weights paged in (the reference needs 2 steps)
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
           "--threads", str(a.threads)] + (["--guided-diffusion", a.guided_diffusion] if a.guided_diffusion else [])
    return run_worker(cmd, timeout)


def pool(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two rounds of one side's cell: the timed runs together (medians of all), the larger peak."""
    if "wall_s" not in a:
        return a
    runs = a["runs"] + b["runs"]
    cpu = a.get("cpu_runs", [a["cpu_s"]]) + [b["cpu_s"]]
    return {**a, "wall_s": round(statistics.median(runs), 3), "runs": runs, "cpu_s": round(statistics.median(cpu), 3),
            "cpu_runs": cpu, "peak_mb": max(a["peak_mb"], b["peak_mb"]),
            "growth_mb": max(a["growth_mb"], b["growth_mb"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--pipelines", default="ddim,ddpm,repaint", help=f"any of {','.join(PIPELINES)}")
    p.add_argument("--steps", type=int, default=50, help="DDIM and DDPM steps")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median; RePaint: 1)")
    p.add_argument("--repaint-steps", type=int, default=250)
    p.add_argument("--jump-length", type=int, default=10)
    p.add_argument("--jump-n-sample", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every cell (0: torch's default)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run each cell's sides this many times, alternating (ours, reference, ours, ...), and pool "
                        "their timed runs: on a shared machine a slow phase then hits both sides")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    p.add_argument("--guided-diffusion", help="the openai/guided-diffusion tree for the ADM cells (default: "
                   "$ATELIER_GUIDED_DIFFUSION, else ../guided-diffusion beside the repository)")
    p.add_argument("--models-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "PIPELINE", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        side, pipeline, batch = a.worker
        print(json.dumps(worker(side, pipeline, int(batch), a.models_dir, a.out, a)))
        return 0

    pipelines = a.pipelines.split(",")
    if set(pipelines) - set(PIPELINES):
        p.error(f"--pipelines: expected any of {','.join(PIPELINES)}, got {a.pipelines!r}")
    tmp = pathlib.Path(tempfile.gettempdir()) / f"atelier_bench_diffusion_{os.getuid()}"
    for sub in ("diffusion_models", "diffusers"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    if set(pipelines) - {"adm"}:
        make_model(tmp)
    sys.path.insert(0, str(pkg_root()))
    import torch

    from atelier.models.diffusion import repaint as rp

    result: dict[str, Any] = {"device": a.device, "cpus": os.cpu_count(), "steps": a.steps,
                              "model": "UNet2DModel ddpm-cifar10-32 config, random weights", "cells": {}}
    print(f"diffusion bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    summary: dict[str, Any] = {}
    for pipeline in pipelines:
        sides = ADM_SIDES if pipeline == "adm" else SIDES
        if pipeline == "adm":
            result["adm"] = adm_setup(a, tmp)
            if "skipped" in result["adm"]:
                print(f"  adm      skipped: {result['adm']['skipped']}", file=sys.stderr)
                continue
        for batch in ([1] if pipeline == "repaint" else [int(b) for b in a.batches.split(",")]):
            cells = {}
            for r in range(a.rounds):
                for side in sides:
                    out = str(tmp / f"{pipeline}_{batch}_{side}.pt")
                    cell = run_cell(side, pipeline, batch, str(tmp), out, a, a.timeout)
                    print(f"  {pipeline:8s} b{batch:<3d} {side:10s} {json.dumps(cell)}", file=sys.stderr)
                    cells[side] = cell if r == 0 or "wall_s" not in cell else pool(cells[side], cell)
            if all("wall_s" in c for c in cells.values()):
                o, d = (torch.load(str(tmp / f"{pipeline}_{batch}_{s}.pt"), weights_only=True) for s in sides)
                cells["max_diff"] = float((o - d).abs().max())
                ours, ref = cells[sides[0]], cells[sides[1]]
                summary[f"{pipeline}_b{batch}"] = ratio = {
                    "time": round(ours["wall_s"] / ref["wall_s"], 3),
                    "cpu_time": round(ours["cpu_s"] / ref["cpu_s"], 3),
                    "peak": round(ours["peak_mb"] / ref["peak_mb"], 3),
                    "growth": round(ours["growth_mb"] / max(1, ref["growth_mb"]), 3),
                    "max_diff": round(cells["max_diff"], 6)}
                if pipeline == "adm":
                    print(f"  adm      b{batch:<3d} ours/{sides[1]}: {json.dumps(ratio)}", file=sys.stderr)
            result["cells"][f"{pipeline}_b{batch}"] = cells
    ref = rp.RePaintSchedule(steps=a.repaint_steps, jump_length=a.jump_length, jump_n_sample=a.jump_n_sample)
    summary["repaint_model_calls"] = {"run": rp.model_calls(ref), "reference": rp.model_calls(rp.REFERENCE),
                                      "cheap": rp.model_calls(rp.CHEAP), "cheap_schedule": vars(rp.CHEAP)}
    result["summary"] = summary
    print(json.dumps(result))
    return 0


def adm_setup(a, tmp: pathlib.Path) -> dict[str, Any]:
    """The ADM section's facts (reference, config, model file, the timesteps each side keeps), the model file made;
    or {"skipped": why} without the reference. Sets a.guided_diffusion for the workers."""
    gd, why = find_guided_diffusion(a.guided_diffusion)
    if gd is None:
        return {"skipped": why}
    if a.steps < 2:  # its GaussianDiffusion indexes the second timestep's posterior variance
        return {"skipped": f"--steps {a.steps}: guided-diffusion's sampler needs at least 2 steps"}
    a.guided_diffusion = str(gd)
    sys.path.insert(0, str(gd))
    path = make_adm_model(tmp)
    sp = adm_spacing(a.steps)
    if sp["same"]:
        spacing = (f"reference: timestep_respacing ddim{a.steps}; ours: leading; both keep "
                   f"{_span(sp['ours'])}")
    else:
        kept = f"keeps {_span(sp['ddim'])}" if sp["ddim"] else "has no integer stride"
        spacing = (f"reference ddim{a.steps} {kept}, our leading spacing {_span(sp['ours'])} (no spacing of ours "
                   f"equals it: 1000 // {a.steps} is not its stride); the reference runs our timesteps through its "
                   f"SpacedDiffusion(use_timesteps=...) so both do the same work")
    print(f"  adm      guided-diffusion {gd}; {spacing}", file=sys.stderr)
    return {"reference": f"openai/guided-diffusion @ {GD_COMMIT[:7]} (MIT): {gd}", "create_model_kwargs": ADM,
            "diffusion": ADM_DIFFUSION, "seed": ADM_SEED, "file": str(path), "sampler": "DDIM, eta 0, x0 clipped",
            "spacing": spacing, "timesteps": {"ours": sp["ours"], "ddim": sp["ddim"]},
            "max_diff_note": "float rounding: the reference's betas are float64, ours float32 (as diffusers' "
                             "schedulers); learned sigma plays no part in DDIM eta 0"}


def _span(ts: list[int]) -> str:
    return ",".join(map(str, ts)) if len(ts) <= 6 else f"{ts[0]},{ts[1]},...,{ts[-1]} ({len(ts)})"


if __name__ == "__main__":
    sys.exit(main())
