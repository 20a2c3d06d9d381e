"""How fast Cancel takes effect in the passes that are one long call on a CPU (issue 16), outside ComfyUI.

For each case the baseline is the time of the whole uninterrupted call, measured in the same run: before issue 16
that was the worst-case latency (interruption was only checked between calls). Then the call runs in a thread, the
interruption flag is set (`host.request_interrupt`, what the CLI's SIGINT/SIGTERM handler and ComfyUI's Cancel do)
at a random point of it, and the time until the call has stopped is the latency. Reported: the median latency over
--repeats, and latency / whole call (below 1: Cancel no longer waits for the whole call).

    python bench/cancel.py [--repeats 5] [--threads 2] [--size 256] [--only vae,stylegan2,project]

Cases (random weights, nothing downloaded):
  vae        full-size SD KL decoder, one --size image (one whole-image call on a CPU)
  stylegan2  StyleGAN2 at --size (config-f channels), a batch of 2 images in one call
  project    GAN projection on that StyleGAN2, 2 steps (each step a forward and a backward pass)
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import random
import statistics
import sys
import tempfile
import threading
import time

from _bench_common import pkg_root

sys.path.insert(0, str(pkg_root()))  # this checkout as `atelier`

import torch  # noqa: E402

from atelier.models import host  # noqa: E402
from atelier.models.errors import Interrupted  # noqa: E402
from atelier.models.manager import ModelManager  # noqa: E402


def _vae_case(mgr: ModelManager):
    from safetensors.torch import save_file

    from atelier.models.vae import codec, kl

    path = pathlib.Path(mgr.models_root) / "vae" / "sd_random.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = kl.AutoencoderKL(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, latent_channels=4)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    vae = codec.load_vae(path.name, manager=mgr)
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8)
    return lambda: codec.decode(vae, z, manager=mgr)


def _stylegan2(mgr: ModelManager):
    from atelier.models.gan import sampling, stylegan2

    torch.manual_seed(0)
    kwargs = dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=SIZE, img_channels=3, channel_base=32768,
                  channel_max=512)
    model = stylegan2.build(kwargs).eval().requires_grad_(False)
    desc = stylegan2.describe(model, kwargs)
    return desc, sampling


def _stylegan2_case(mgr: ModelManager):
    desc, S = _stylegan2(mgr)
    lat = S.make_latent(mgr, desc, 0, 2)
    return lambda: S.sample(mgr, desc, lat, chunk=2)


def _project_case(mgr: ModelManager):
    from atelier.models.gan import project

    desc, _S = _stylegan2(mgr)
    target = torch.rand(1, 3, SIZE, SIZE)
    return lambda: project.project(mgr, desc, target, space="w", steps=2, starts=4, restarts=1)


SIZE = 256  # --size

CASES = {"vae": _vae_case, "stylegan2": _stylegan2_case, "project": _project_case}


def _latency(call, at: float) -> float | None:
    """Seconds from the interruption request (`at` s after the start) until `call` stopped; None if it finished."""
    done: dict[str, float] = {}

    def target() -> None:
        try:
            with torch.inference_mode(False):
                call()
        except Interrupted:
            done["stopped"] = time.perf_counter()

    t = threading.Thread(target=target)
    t.start()
    time.sleep(at)
    asked = time.perf_counter()
    host.request_interrupt()
    t.join()
    host.clear_interrupt()
    return done["stopped"] - asked if "stopped" in done else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--size", type=int, default=256, help="image side (a power of 2, at least 16)")
    a = ap.parse_args(argv)
    global SIZE
    SIZE = a.size
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    mgr = ModelManager(str(pathlib.Path(tempfile.gettempdir()) / "atelier_bench_cancel"), device=torch.device("cpu"))
    rng = random.Random(0)
    results = {}
    for name in a.only.split(","):
        call = CASES[name](mgr)
        call()  # warm-up (first-call allocations, NNPACK checks)
        whole = []
        for _ in range(3):
            t0 = time.perf_counter()
            call()
            whole.append(time.perf_counter() - t0)
        full, fastest = statistics.median(whole), min(whole)
        lat = []
        for _ in range(a.repeats):
            at = rng.uniform(0.1, 0.5) * fastest
            for _try in range(4):  # the machine may run faster now than when the baseline was measured: ask earlier
                got = _latency(call, at)
                if got is not None:
                    lat.append(got)
                    break
                at /= 2
        med = statistics.median(lat) if lat else None
        results[name] = {"whole_call_s": round(full, 3), "cancel_latency_s": None if med is None else round(med, 4),
                         "cancel_latency_max_s": None if not lat else round(max(lat), 4),
                         "latency_over_whole_call": None if med is None else round(med / full, 4),
                         "stopped": f"{len(lat)}/{a.repeats}"}
        print(f"{name}: whole call {full:.2f} s; Cancel took effect in {med if med is not None else float('nan'):.3f} s "
              f"(median, max {max(lat) if lat else float('nan'):.3f} s, {len(lat)}/{a.repeats} stopped)", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
