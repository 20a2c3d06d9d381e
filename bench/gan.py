"""GAN throughput: images/s at batch 1 and 32, ours against the reference implementations. Last line: one JSON object.

    python bench/gan.py [--repeats 9] [--batches 1,32] [--cyclegan-size 128] [--device cpu]
                        [--threads N] [--clock wall|cpu] [--only dcgan,mlp] [--nvlabs DIR]

References (the registry packages' own model classes, on the same real weights, loaded by file path so the
packages' __init__ never runs):
- DCGAN faces 64px: gan_face_generate/models.py `Generator`   (our models/gan/dcgan.py)
- DCGAN eyes 128px, 8 classes: omniart_eye_generator/generator.py `Generator`
- MLP GAN MNIST: the layout its README gives, as a plain nn.Sequential (the repository ships no model code)
- CycleGAN vintage (ResnetGenerator, 9 blocks), at --cyclegan-size pixels: vintagify/generator.py `ResnetGenerator`
- StyleGAN2/3 (the golden configs sg2_skip_32, sg3_t_32): NVIDIA's own Generator from an NVlabs/stylegan3 source tree
  given with --nvlabs DIR (not shipped: e.g. `git clone https://github.com/NVlabs/stylegan3`; on the CPU it runs its
  pure-PyTorch reference ops). Without it, ours alone.

"ours" is the whole path a node takes: `sampling.sample` / `sampling.translate` through the model manager (latents in,
images in 0..1 out); "engine" is our generator module's forward alone; "reference" is the reference module's forward;
both of the latter plus the same mapping to 0..1. Medians of interleaved runs after a warm-up, under torch.no_grad.
"ratio" = ours / reference, "engine_ratio" = engine / reference. On a shared machine, `--threads 1 --clock cpu`
times the CPU each run used (time.thread_time of the one compute thread) instead of wall time, so other processes'
load does not swamp the ratios; images/s are then per CPU second.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn

from atelier.models.gan import sampling as S
from atelier.models.manager import ModelManager

REPO = pathlib.Path(__file__).resolve().parents[1]


def package_path(package: str, rel: str) -> pathlib.Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = pathlib.Path(list(spec.submodule_search_locations)[0]) / rel
    return p if p.is_file() else None


def module_from(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    t0 = _clock()
    fn()
    sync()
    return _clock() - t0


def compare(runs: dict[str, Callable[[], object] | None], batch: int, repeats: int, sync: Callable[[], None]) -> dict:
    """Images/s of each callable ("ours", "engine", "reference"): warm-up, interleaved runs, medians."""
    runs = {k: f for k, f in runs.items() if f is not None}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for _ in range(2):
            for f in runs.values():
                f()
        sync()
        for _ in range(repeats):
            for k, f in runs.items():
                times[k].append(timed(f, sync))
    out = {f"{k}_ips": round(batch / statistics.median(t), 2) for k, t in times.items()}
    if "reference_ips" in out:
        out["ratio"] = round(out["ours_ips"] / out["reference_ips"], 3)
        if "engine_ips" in out:
            out["engine_ratio"] = round(out["engine_ips"] / out["reference_ips"], 3)
    return out


def unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp_(0, 1).cpu()


def setups(root: pathlib.Path, shared: pathlib.Path, args) -> list[tuple[str, str, Callable | None, Callable | None]]:
    """(name, file in gans/, reference builder(file, device) -> module, reference call(ref, latent) -> image)."""
    out = []
    faces = package_path("gan_face_generate", "weights.tar")
    if faces:
        def faces_ref(path, dev):
            mod = module_from(faces.parent / "models.py", "_bench_faces")
            g = mod.Generator(ngpu=0, nc=3, nz=100, ngf=64)
            g.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["netG_state_dict"])
            return g.eval().to(dev)
        shutil.copy(faces, root / "gans" / "dcgan_faces_64.tar")
        out.append(("dcgan_faces_64", "dcgan_faces_64.tar", faces_ref, lambda g, z, c: g(z[:, :, None, None])))
    eyes = package_path("omniart_eye_generator", "generator_model_state.pth")
    if eyes:
        def eyes_ref(path, dev):
            g = module_from(eyes.parent / "generator.py", "_bench_eyes").Generator()
            g.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return g.eval().to(dev)
        shutil.copy(eyes, root / "gans" / "dcgan_eyes_128.pth")
        out.append(("dcgan_eyes_128", "dcgan_eyes_128.pth", eyes_ref, lambda g, z, c: g(z[:, :, None, None], c)))
    mlp = shared / "weights" / "mnist" / "gan_mlp_G.ckpt"
    if mlp.is_file():
        def mlp_ref(path, dev):
            g = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 784),
                              nn.Tanh())
            g.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return g.eval().to(dev)
        shutil.copy(mlp, root / "gans" / "gan_mlp_G.ckpt")
        out.append(("mlp_mnist_28", "gan_mlp_G.ckpt", mlp_ref, lambda g, z, c: g(z).view(-1, 1, 28, 28)))
    nvlabs = pathlib.Path(args.nvlabs) if args.nvlabs else None
    if nvlabs is not None and not (nvlabs / "training" / "networks_stylegan3.py").is_file():
        sys.exit(f"bench/gan.py: --nvlabs {nvlabs}: no training/networks_stylegan3.py there (an NVlabs/stylegan3 tree)")
    for cfg in ("sg2_skip_32", "sg3_t_32"):
        src = shared / "golden" / "stylegan" / f"{cfg}.safetensors"
        if src.is_file():
            shutil.copy(src, root / "gans" / f"{cfg}.safetensors")
            out.append((f"stylegan_{cfg}_golden", f"{cfg}.safetensors", nvlabs_builder(nvlabs) if nvlabs else None,
                        lambda g, z, c: g(z, c if c is not None else z.new_zeros(z.shape[0], 0), noise_mode="const")))
    return out


def nvlabs_builder(tree: pathlib.Path) -> Callable:
    """NVIDIA's own Generator (NVlabs/stylegan3 `training/networks_stylegan{2,3}.py`, on the CPU its pure-PyTorch
    reference ops) built from a golden file's recorded class and constructor kwargs, with the file's weights."""
    def build(path, dev):
        from safetensors import safe_open
        from safetensors.torch import load_file

        if str(tree) not in sys.path:
            sys.path.insert(0, str(tree))
        if importlib.util.find_spec("pkg_resources") is None:  # NVIDIA's conv2d_gradfix imports it for parse_version
            import types

            from packaging.version import parse

            sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse)
        import dnnlib

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        module, cls = meta["class_name"].rsplit(".", 1)
        kwargs = json.loads(meta["init_kwargs"])
        kwargs = {k: dnnlib.EasyDict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        g = getattr(importlib.import_module(module), cls)(**kwargs)
        g.load_state_dict(load_file(str(path)))
        return g.eval().to(dev)

    return build


def bench_generators(manager: ModelManager, entries, args, dev, sync) -> dict:
    results = {}
    for name, file, build_ref, call_ref in entries:
        desc = manager.load(file, "gans")
        ref = build_ref(manager.resolve("gans", file), dev) if build_ref else None
        row = {}
        for batch in args.batches:
            lat = S.make_latent(manager, desc, seed=0, batch_size=batch, space="auto",
                                class_label=0 if desc.model.c_dim else -1)
            z_dev = S.make_latent(manager, desc, 0, batch, "z", 0 if desc.model.c_dim else -1)
            zt = z_dev.tensor.to(dev)
            ct = z_dev.labels.to(dev) if z_dev.labels is not None else None
            g = desc.model
            row[f"batch_{batch}"] = compare({
                "ours": lambda: S.sample(manager, desc, lat, truncation_psi=1.0),
                "engine": lambda: unit(g(zt, ct)),
                "reference": (lambda: unit(call_ref(ref, zt, ct))) if ref is not None else None,
            }, batch, args.repeats, sync)
        results[name] = row
        print(f"{name:>28}: {row}", flush=True)
    return results


def bench_cyclegan(manager: ModelManager, args, dev, sync) -> dict:
    src = package_path("vintagify", "resources/G_A2B_epoch33.pth")
    if src is None:
        return {}
    shutil.copy(src, pathlib.Path(manager.models_root) / "gans" / "cyclegan_vintage.pth")
    desc = manager.load("cyclegan_vintage.pth", "gans")
    ref = module_from(src.parent.parent / "generator.py", "_bench_vintage").ResnetGenerator()
    ref.load_state_dict(torch.load(src, map_location="cpu", weights_only=True))
    ref.eval().to(dev)
    row = {}
    s = args.cyclegan_size
    for batch in args.batches:
        x = torch.rand(batch, 3, s, s, generator=torch.Generator().manual_seed(0))
        g = desc.model
        row[f"batch_{batch}"] = compare({
            "ours": lambda: S.translate(manager, desc, x),
            "engine": lambda: unit(g((x * 2 - 1).to(dev))),
            "reference": lambda: unit(ref((x * 2 - 1).to(dev))),
        }, batch, max(3, args.repeats // 3), sync)
    name = f"cyclegan_vintage_{s}"
    print(f"{name:>28}: {row}", flush=True)
    return {name: row}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--cyclegan-size", type=int, default=128, help="image side for the CycleGAN figures")
    ap.add_argument("--device", default="cpu", help="cpu (the goal's figures), cuda, mps")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                    help="wall time, or the compute thread's CPU time (needs --threads 1; for loaded machines)")
    ap.add_argument("--only", default="", help="comma-separated name parts: bench only the matching models "
                    "(dcgan, mlp, stylegan, cyclegan)")
    ap.add_argument("--nvlabs", default=os.environ.get("ATELIER_NVLABS"),
                    help="an NVlabs/stylegan3 source tree: times NVIDIA's StyleGAN2/3 Generator as the reference")
    ap.add_argument("--shared", default=os.environ.get("ATELIER_SHARED", str(REPO.parent / "shared")))
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    global _clock
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (torch.get_num_threads() != 1 or args.device != "cpu"):
        sys.exit("bench/gan.py: --clock cpu measures one thread's CPU time; use it with --threads 1 on --device cpu")
    _clock = CLOCK[args.clock]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    root = pathlib.Path(tempfile.mkdtemp(prefix="atelier-bench-gan-"))
    try:
        (root / "gans").mkdir()
        manager = ModelManager(str(root), device=dev, offload_device=dev)
        entries = setups(root, pathlib.Path(args.shared), args)
        only = [o for o in args.only.split(",") if o]
        picked = lambda name: not only or any(o in name for o in only)  # noqa: E731
        entries = [e for e in entries if picked(e[0])]
        if not entries and not picked("cyclegan_vintage"):
            sys.exit("bench/gan.py: no GAN weights found (pip install --no-deps gan-face-generate==1.1.1 "
                     "omniart-eye-generator==0.1 vintagify==0.1.2; ../shared/weights)")
        results = bench_generators(manager, entries, args, dev, sync)
        if picked("cyclegan_vintage"):
            results.update(bench_cyclegan(manager, args, dev, sync))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = [v["ratio"] for row in results.values() for v in row.values() if "ratio" in v]
    engine = [v["engine_ratio"] for row in results.values() for v in row.values() if "engine_ratio" in v]
    figures = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "repeats": args.repeats,
        "models": results,
        "min_ratio": min(ratios) if ratios else None,
        "min_engine_ratio": min(engine) if engine else None,
        "note": "ratio = ours (node path) / reference images per second, engine_ratio = our module alone / reference"
                + ("" if args.nvlabs else "; StyleGAN timed for ours alone (no --nvlabs tree given)"),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
