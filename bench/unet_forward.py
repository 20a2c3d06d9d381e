"""Micro-benchmark: one UNet forward pass, Atelier's UNet2DModel against diffusers' UNet2DModel on the same weights.

    python bench/unet_forward.py [--batches 1,16] [--repeats 7] [--threads N] [--clock wall|cpu] [--channels-first]
                                 [--onednn-too]

Config: google/ddpm-cifar10-32's UNet2DModel (block_out_channels 128,256,256,256, layers_per_block 2, attention at
16x16, 35.7 M parameters) with random weights; input [B,3,32,32], float32, CPU, torch.inference_mode. Each variant
gets two warm-up calls, then --repeats timed calls alternating ours/diffusers; medians are reported with their
ratio (ours / diffusers, below 1 = faster) and the largest output difference. On a shared machine use
`--threads 1 --clock cpu` (the process's CPU time, which other processes do not inflate). Ours is loaded after the
thread count is set, as the pack loads it: on one thread its 3x3 convolutions of at least 16 px a side and 1024 px
per call run through NNPACK (models/cpu_conv.use_nnpack_alone), on more threads those of at least 64 channels on maps
of at least 16 px a side through our Winograd F(4x4, 3x3) (models/cpu_conv.use_winograd), the rest through oneDNN.
Calls too small for Winograd take oneDNN with weights packed once per node run (models/cpu_conv.PACK_BUDGET); the
timed calls run inside one such run (`scratch_released`), the packs made during the warm-up calls. With --onednn-too
a third model joins the interleaving: ours with every Winograd layer turned back into a plain convolution (oneDNN,
nothing packed), so that both of our paths meet the same phases of a shared machine. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from _bench_common import pkg_root

CIFAR10_DDPM = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None, "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
    "norm_eps": 1e-6, "norm_num_groups": 32, "mid_block_scale_factor": 1, "act_fn": "silu",
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = _clock()
        fn()
        out.append(_clock() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--channels-first", action="store_true",
                    help="run ours in NCHW (the loader's default is channels-last, which is what the pack runs)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--onednn-too", action="store_true",
                    help="also time ours with its Winograd layers as plain convolutions, interleaved")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCKS[args.clock]
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu measures one thread's work: give --threads 1")
    sys.path.insert(0, str(pkg_root()))
    from diffusers import UNet2DModel as Reference

    from atelier.models.cpu_conv import scratch_released
    from atelier.models.diffusion.unet2d_io import load

    torch.manual_seed(0)
    ref = Reference(**CIFAR10_DDPM).eval()
    ours = load(ref.state_dict(), {"config": CIFAR10_DDPM}).model
    if args.channels_first:
        ours.use_channels_last(False)
    plain = None
    if args.onednn_too:
        from atelier.models.cpu_conv import WinogradConv2d

        plain = load(ref.state_dict(), {"config": CIFAR10_DDPM}).model
        for m in plain.modules():
            if type(m) is WinogradConv2d:
                m.__class__ = torch.nn.Conv2d
    results = {}
    for b in [int(s) for s in args.batches.split(",")]:
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, 3, 32, 32, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g).float()
        xo = x  # the contract: NCHW in, NCHW out (ours converts inside)
        with torch.inference_mode(), scratch_released(ours):  # inside one run, as a node runs it
            for _ in range(2):
                ours(xo, t), ref(x, t)
                if plain is not None:
                    plain(xo, t)
            diff = (ours(xo, t) - ref(x, t).sample).abs().max().item()
            t_ours, t_ref, t_plain = [], [], []
            for _ in range(args.repeats):
                t_ours += timed(lambda: ours(xo, t), 1)
                t_ref += timed(lambda: ref(x, t), 1)
                if plain is not None:
                    t_plain += timed(lambda: plain(xo, t), 1)
        mo, mr = statistics.median(t_ours), statistics.median(t_ref)
        results[f"batch{b}"] = {"ours_s": round(mo, 4), "diffusers_s": round(mr, 4), "ratio": round(mo / mr, 3),
                                "max_abs_diff": diff}
        if plain is not None:
            mp = statistics.median(t_plain)
            results[f"batch{b}"].update(ours_onednn_s=round(mp, 4), ratio_onednn=round(mp / mr, 3))
            print(f"batch {b:3d}: ours with oneDNN only {mp * 1000:8.1f} ms  ratio {mp / mr:.3f}", flush=True)
        print(f"batch {b:3d}: ours {mo * 1000:8.1f} ms  diffusers {mr * 1000:8.1f} ms  ratio {mo / mr:.3f}  "
              f"max|diff| {diff:.2e}", flush=True)
    print(json.dumps({"bench": "unet_forward", "config": "google/ddpm-cifar10-32 (random weights)",
                      "threads": torch.get_num_threads(), "clock": args.clock, "channels_last": not args.channels_first,
                      "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
