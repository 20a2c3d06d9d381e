"""Benchmark: the pack's training loop (models/train/loop.py Trainer) against plain training loops on the same networks.

    python bench/train.py [--pairs diffusion,gan] [--steps 20] [--warmup-steps 3] [--reps 3] [--batch 64]
                          [--data mnist|random] [--device cpu|cuda] [--threads 0]

Pairs (each side in its own fresh process, so the peak memory is that side's alone):

- diffusion: our DiffusionTask ("tiny" UNet2DModel, 32x32 greyscale, 10 classes + the null class, the job's
  settings: AdamW lr 2e-4, warm-up 100, grad clip 1.0, EMA 0.999) against the plain loop of diffusers'
  examples/unconditional_image_generation/train_unconditional.py written without accelerate: diffusers'
  UNet2DModel from the same config with our initial weights copied in, DDPMScheduler.add_noise, F.mse_loss,
  backward, clip_grad_norm_, AdamW.step, get_scheduler("constant_with_warmup").step, EMAModel.step (foreach) and the
  example's per-step `loss.item()` log; class labels with the same 10 % null-class drop as ours.
- gan: our GANTask (non_saturating, base_width 32, spectral D, conditional) against the PyTorch DCGAN tutorial's loop
  (D on real, D on fake, D step; G step; BCE-with-logits, which is the non-saturating loss; Adam (0.5, 0.999); the
  tutorial's per-step `.item()` logs) on the same G/D (build_dcgan, same initial weights). The tutorial has neither EMA
  nor gradient clipping, so `ours` runs with ema=0 and grad_clip=0; `ours_shipped` (EMA 0.999, clip 1.0: the GAN
  job's settings) is a second figure.

Data: the first 8,000 MNIST test digits of ../shared/data/mnist (resized to 32x32 by from_images, labels 0-9), or
random digits with --data random (or when the files are absent). Ours draws batches through its ImageDataset; the
plain loops through a torch DataLoader (shuffle, batch --batch) over the same uint8 images, converted per batch.

Timed: ours runs `Trainer.run` (save_every=0, preview_every=0) with the end-of-run save and the last step's preview
stubbed out (the only work excluded); a hook stamps the start of every `_one_step`, so a window is the loop's whole
per-step work (batch, task step, loss checks, EMA, progress) from the start of step i to the start of step i+N.
The plain loops stamp the start of each iteration the same way. After --warmup-steps steps, --reps windows of
--steps steps each: samples/s (steps x batch / wall time) and CPU samples/s (per CPU second, the fairer figure on a
loaded machine), medians. Peak memory over the windows: the process's peak RSS (VmHWM reset after warm-up; every
worker imports the same modules: torch, the pack's trainers and diffusers) and its growth above the RSS at the reset;
on CUDA, torch.cuda.max_memory_allocated. Ratios are ours/baseline (throughput above 1: ours faster; memory below 1:
ours smaller); rss_before_mb (the loaded process before the networks) and rss_at_reset_mb (after warm-up) show where
a difference comes from. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from _bench_common import peak_rss, pkg_root, proc_status, reset_peak, run_worker

PAIRS = {"diffusion": ("ours", "diffusers"), "gan": ("ours", "pytorch", "ours_shipped")}
BASELINE = {"diffusion": "diffusers", "gan": "pytorch"}
SHARED = pathlib.Path(os.environ.get("ATELIER_SHARED", str(pathlib.Path(__file__).resolve().parents[2] / "shared")))
DIFFUSION_SETTINGS = {"lr": 2e-4, "warmup": 100, "grad_clip": 1.0, "ema": 0.999}  # the diffusion job's
GAN_SHIPPED = {"lr": 2e-4, "grad_clip": 1.0, "ema": 0.999}  # the GAN job's
GAN_PLAIN = {"lr": 2e-4, "grad_clip": 0.0, "ema": 0.0}  # what the DCGAN tutorial does


# ------------------------------------------------------------------------------------------------ worker side
class _Clock:
    """Stamps of the start of each step; resets the peak memory when the measured windows begin."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device = warmup, device
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.base, self.reset = 0, False
        self.before = proc_status("VmRSS") or 0  # the loaded process: modules, data; no networks yet

    def mark(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        if len(self.wall) == self.warmup:
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.base, self.reset = reset_peak()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self, steps: int, reps: int, batch: int) -> dict[str, Any]:
        import torch

        peak = peak_rss(self.reset)
        w, c = self.wall[self.warmup:], self.cpu[self.warmup:]
        rates = [steps * batch / (w[(r + 1) * steps] - w[r * steps]) for r in range(reps)]
        cpu_rates = [steps * batch / max(1e-9, c[(r + 1) * steps] - c[r * steps]) for r in range(reps)]
        out = {"samples_s": round(statistics.median(rates), 2), "runs": [round(x, 2) for x in rates],
               "cpu_samples_s": round(statistics.median(cpu_rates), 2),
               "peak_mb": round(peak / 2**20, 1), "growth_mb": round((peak - self.base) / 2**20, 1),
               "rss_at_reset_mb": round(self.base / 2**20, 1), "rss_before_mb": round(self.before / 2**20, 1)}
        if self.device == "cuda":
            out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


def _digits(kind: str, n: int = 8000):  # [N,1,32,32] uint8 dataset with labels 0..9
    import numpy as np
    import torch

    from atelier.models.train.data import from_images

    root = SHARED / "data" / "mnist"
    if kind == "mnist" and (root / "t10k-images-idx3-ubyte.gz").is_file():
        with gzip.open(root / "t10k-images-idx3-ubyte.gz", "rb") as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28, 1)[:n]
        with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "rb") as f:
            labels = torch.from_numpy(np.frombuffer(f.read(), dtype=np.uint8, offset=8)[:n].astype(np.int64))
        images = torch.from_numpy(raw.astype(np.float32) / 255.0)
    else:
        g = torch.Generator().manual_seed(0)
        images, labels = torch.rand(n, 28, 28, 1, generator=g), torch.randint(10, (n,), generator=g)
    ds = from_images(images, 32, channels=1)
    ds.labels, ds.class_names = labels, tuple(str(i) for i in range(10))
    return ds


def _initial(task, seed: int = 0) -> dict:
    """The networks exactly as the Trainer builds them (its seeded init stream), on the CPU."""
    import torch

    from atelier.models.train.loop import _STREAM_INIT, mix

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix(seed, 0, _STREAM_INIT))
        return task.build(torch.device("cpu"))


def _loader(ds, batch: int):
    """The plain loops' data: a shuffling DataLoader over the same uint8 images and labels, batches forever."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    dl = DataLoader(TensorDataset(ds.images, ds.labels), batch_size=batch, shuffle=True, drop_last=True,
                    generator=torch.Generator().manual_seed(0))
    while True:
        yield from dl


def _ours(task, ds, settings: dict, a, clock: _Clock) -> None:
    import torch

    from atelier.models.train.loop import Trainer, TrainSettings

    class TimedTrainer(Trainer):
        def _one_step(self) -> dict[str, float]:
            clock.mark()
            return super()._one_step()

        def save(self) -> None:  # the end-of-run checkpoint: not timed, not written
            clock.mark()
            self._saved_step = self.step

        def preview(self, n: int = 16) -> torch.Tensor:  # the last step's preview: not timed
            return torch.zeros(1, ds.channels, ds.size, ds.size)

    s = TrainSettings(steps=a.warmup_steps + a.reps * a.steps, batch_size=a.batch, save_every=0, preview_every=0,
                      precision="fp32", **settings)
    out = os.path.join(tempfile.mkdtemp(prefix="atelier_bench_train_"), "bench.safetensors")
    TimedTrainer(task, ds, s, out, device=torch.device(a.device)).run()


def _diffusers(task, ds, a, clock: _Clock) -> None:
    """train_unconditional.py's step, without accelerate (conditional: class labels with the null-class drop)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    dev = torch.device(a.device)
    s = DIFFUSION_SETTINGS
    model = UNet2DModel.from_config(dict(task.config))
    model.load_state_dict(_initial(task)["unet"].state_dict())
    model.to(dev).train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=s["warmup"])
    ema_model = EMAModel(model.parameters(), decay=s["ema"], model_cls=UNet2DModel, model_config=model.config,
                         foreach=True)
    ema_model.to(dev)
    data, null = _loader(ds, a.batch), task.num_classes
    logs: list[dict] = []
    for _ in range(a.warmup_steps + a.reps * a.steps):
        clock.mark()
        images, labels = next(data)
        clean_images = images.to(dev).float() / 255.0 * 2 - 1  # [B,1,32,32]
        labels = labels.to(dev)
        labels = torch.where(torch.rand(labels.shape, device=dev) < task.uncond_prob, null, labels)
        noise = torch.randn(clean_images.shape, device=dev)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                  device=dev).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        model_output = model(noisy_images, timesteps, class_labels=labels).sample
        loss = F.mse_loss(model_output.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema_model.step(model.parameters())
        logs.append({"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]})
    clock.mark()


def _dcgan_tutorial(task, ds, a, clock: _Clock) -> None:
    """The PyTorch DCGAN tutorial's training loop (conditional: the labels go to G and D)."""
    import torch
    from torch import nn

    dev = torch.device(a.device)
    nets = _initial(task)
    netG, netD = nets["G"].to(dev).train(), nets["D"].to(dev).train()
    criterion = nn.BCEWithLogitsLoss()  # D gives logits: BCE(sigmoid) in one, the non-saturating loss
    optimizerD = torch.optim.Adam(netD.parameters(), lr=GAN_PLAIN["lr"], betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=GAN_PLAIN["lr"], betas=(0.5, 0.999))
    real_label, fake_label = 1.0, 0.0
    G_losses, D_losses = [], []
    data = _loader(ds, a.batch)
    for _ in range(a.warmup_steps + a.reps * a.steps):
        clock.mark()
        images, y = next(data)
        netD.zero_grad()
        real = images.to(dev).float() / 255.0 * 2 - 1  # [B,1,32,32]
        y = y.to(dev)
        b = real.size(0)
        label = torch.full((b,), real_label, dtype=torch.float, device=dev)
        output = netD(real, y).view(-1)
        errD_real = criterion(output, label)
        errD_real.backward()
        noise = torch.randn(b, task.z_dim, device=dev)
        fake = netG(noise, y)
        label.fill_(fake_label)
        output = netD(fake.detach(), y).view(-1)
        errD_fake = criterion(output, label)
        errD_fake.backward()
        errD = errD_real + errD_fake
        optimizerD.step()
        netG.zero_grad()
        label.fill_(real_label)
        output = netD(fake, y).view(-1)
        errG = criterion(output, label)
        errG.backward()
        optimizerG.step()
        G_losses.append(errG.item())
        D_losses.append(errD.item())
    clock.mark()


def worker(pair: str, side: str, a) -> dict[str, Any]:
    sys.path.insert(0, str(pkg_root()))
    import torch

    import diffusers.optimization  # noqa: F401 - every worker imports the same modules (equal library memory)
    import diffusers.training_utils  # noqa: F401
    from atelier.models.diffusion.train import DiffusionTask
    from atelier.models.gan.train import GANTask

    if a.threads:
        torch.set_num_threads(a.threads)
    ds = _digits(a.data)
    clock = _Clock(a.warmup_steps, a.device)
    if pair == "diffusion":
        task = DiffusionTask(resolution=32, channels=1, size="tiny", class_names=ds.class_names)
        run: Callable[[], None] = ((lambda: _ours(task, ds, DIFFUSION_SETTINGS, a, clock)) if side == "ours"
                                   else (lambda: _diffusers(task, ds, a, clock)))
    else:
        task = GANTask(resolution=32, channels=1, loss="non_saturating", base_width=32, class_names=ds.class_names)
        run = {"ours": lambda: _ours(task, ds, GAN_PLAIN, a, clock),
               "ours_shipped": lambda: _ours(task, ds, GAN_SHIPPED, a, clock),
               "pytorch": lambda: _dcgan_tutorial(task, ds, a, clock)}[side]
    run()
    return {**clock.result(a.steps, a.reps, a.batch), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ orchestration
def _ratio(x: float, y: float) -> float:
    return round(x / y, 3) if y else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="diffusion,gan")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="timed windows per side (median)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--data", default="mnist", choices=("mnist", "random"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: the manager's compute device)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on every side (0: torch's default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per side")
    p.add_argument("--worker", nargs=2, metavar=("PAIR", "SIDE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device is None:
        sys.path.insert(0, str(pkg_root()))
        from atelier.models.manager import get_manager

        a.device = get_manager().compute_device.type
    if a.worker:
        print(json.dumps(worker(*a.worker, a)))
        return 0

    print(f"train bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, device {a.device}", file=sys.stderr)
    result: dict[str, Any] = {"device": a.device, "cpus": os.cpu_count(), "batch": a.batch, "steps": a.steps,
                              "warmup_steps": a.warmup_steps, "reps": a.reps, "data": a.data, "cells": {},
                              "summary": {}}
    for pair in a.pairs.split(","):
        cells = {}
        for side in PAIRS[pair]:
            cmd = [sys.executable, __file__, "--worker", pair, side, "--steps", str(a.steps), "--warmup-steps",
                   str(a.warmup_steps), "--reps", str(a.reps), "--batch", str(a.batch), "--data", a.data,
                   "--device", a.device, "--threads", str(a.threads)]
            cells[side] = run_worker(cmd, a.timeout)
            print(f"  {pair:9s} {side:13s} {json.dumps(cells[side])}", file=sys.stderr)
        result["cells"][pair] = cells
        base = cells[BASELINE[pair]]
        for side in (s for s in PAIRS[pair] if s.startswith("ours")):
            o = cells[side]
            if "samples_s" not in o or "samples_s" not in base:
                continue
            mem = "cuda_peak_mb" if a.device == "cuda" else "peak_mb"
            r = {"samples_s": [o["samples_s"], base["samples_s"], _ratio(o["samples_s"], base["samples_s"])],
                 "cpu_samples_s": [o["cpu_samples_s"], base["cpu_samples_s"],
                                   _ratio(o["cpu_samples_s"], base["cpu_samples_s"])],
                 "peak_mb": [o[mem], base[mem], _ratio(o[mem], base[mem])],
                 "growth_mb": [o["growth_mb"], base["growth_mb"], _ratio(o["growth_mb"], base["growth_mb"])]}
            result["summary"][f"{pair}_{side}"] = r
            print(f"{pair} {side} vs {BASELINE[pair]}: samples/s {r['samples_s'][0]} vs {r['samples_s'][1]} "
                  f"(x{r['samples_s'][2]}), CPU samples/s x{r['cpu_samples_s'][2]}; peak {r['peak_mb'][0]} vs "
                  f"{r['peak_mb'][1]} MB (x{r['peak_mb'][2]}), growth {r['growth_mb'][0]} vs {r['growth_mb'][1]} MB",
                  file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
