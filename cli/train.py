"""``atelier train KIND DATA_DIR --out FILE``: the trainer nodes' job, headless, for long runs.

    atelier train diffusion digits/ --out runs/digits.safetensors --resolution 28 --channels 1 --labels \\
        --size tiny --steps 20000 --batch-size 128 --save-every 1000 --preview-every 500 [--continue]

One subcommand per entry of `models.train.jobs.KINDS` (a family's own options become flags); the same code path as
the nodes (`jobs.run_job`). With --preview-every the latest samples are written beside the output as
``<name>.preview.png``; the loss curve as ``<name>.loss.png`` at the end. Ctrl-C saves a checkpoint, then stops;
--continue picks the run up again.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch

from ..models.errors import InputError

log = logging.getLogger(__name__)


def _flags(name: str, aliases: tuple[str, ...] = ()) -> list[str]:
    return ["--" + n.replace("_", "-") for n in (name, *aliases)]


def add_parser(sub: Any) -> None:
    """The `train` command and one subcommand per trainable family."""
    from ..models.train import jobs
    from ..models.train.data import CROPS

    t = sub.add_parser("train", help="train a model on a folder of images (the trainer nodes, headless)")
    tsub = t.add_subparsers(dest="train_kind", required=True)
    for kind in jobs.KINDS.values():
        d = jobs.TrainSettings(**kind.defaults)
        ready = "" if kind.make_task is not None else " (not available yet)"
        p = tsub.add_parser(kind.name, help=f"train a {kind.name} model{ready}")
        p.add_argument("data", metavar="DATA_DIR", help="folder of PNG/JPEG/WebP images (sub-folders too)")
        p.add_argument("--out", "-o", required=True, metavar="FILE",
                       help="the model file to write (.safetensors; a .train-state file is kept beside it)")
        p.add_argument("--resolution", type=int, default=32, help="training size in pixels (default 32)")
        p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1: greyscale, 3: RGB (default)")
        p.add_argument("--crop", choices=CROPS, default="center",
                       help="center (default), random crops (from 9/8 of the size) or shift (translated by up to "
                            "1/16 of the size: curbs memorising a small dataset)")
        p.add_argument("--flip", action="store_true", help="random horizontal flips")
        p.add_argument("--labels", action="store_true", help="class labels from the first sub-folder names")
        for o in kind.options:
            kw: dict[str, Any] = {"default": o.default, "help": f"{o.help} (default {o.default})", "dest": o.name}
            if o.choices:
                kw["choices"] = o.choices
            elif isinstance(o.default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = type(o.default)
            p.add_argument(*_flags(o.name, o.aliases), **kw)
        p.add_argument("--steps", type=int, default=1000, help="steps to train in this call (default 1000)")
        p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
        p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
        p.add_argument("--warmup", type=int, default=d.warmup, help=f"warm-up steps (default {d.warmup})")
        p.add_argument("--ema", type=float, default=d.ema, help=f"EMA decay of the saved weights (default {d.ema})")
        p.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
        p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
        p.add_argument("--preview-every", type=int, default=0,
                       help="steps between sample previews written to <name>.preview.png (default 0: none)")
        p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="mixed precision on CUDA (default auto: bf16 where supported)")
        p.add_argument("--continue", dest="continue_run", action="store_true",
                       help="continue the run saved at --out (same architecture and data); without it an existing "
                            "file is never overwritten (a new name is chosen)")
        p.set_defaults(func=cmd_train, train_options=tuple(o.name for o in kind.options))


def _out_path(out: str) -> str:
    root, ext = os.path.splitext(out)
    if ext.lower() not in ("", ".safetensors"):
        raise InputError(f"--out: expected a .safetensors file, got {out!r}")
    if not os.path.basename(root):
        raise InputError(f"--out: expected a file name, got {out!r}")
    return os.path.abspath(root + ".safetensors")


def _save_png(path: str, image: torch.Tensor) -> None:  # [H,W,3] float 0..1
    from PIL import Image

    from ..models.train.checkpoint import atomic_write

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def cmd_train(args: argparse.Namespace) -> int:
    from ..models.train import data as _data
    from ..models.train import jobs
    from ..models.train.loop import grid
    from ..models.train.plot import loss_curve

    kind = jobs.get_kind(args.train_kind)
    options = {n: getattr(args, n) for n in args.train_options}
    if kind.make_task is None:
        kind.task(None, options)  # type: ignore[arg-type]  # raises "not available yet"
    out = _out_path(args.out)
    settings = kind.settings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             ema=args.ema, seed=args.seed, save_every=args.save_every,
                             preview_every=args.preview_every, precision=args.precision)
    settings.check()
    ds = _data.from_folder(os.path.expanduser(args.data), args.resolution, channels=args.channels, crop=args.crop,
                           flip=args.flip, labels=args.labels)
    print(f"data: {ds.summary()}")
    job = jobs.prepare_job(kind, ds, out, settings, options, continue_run=args.continue_run)
    print(job.note)
    stem = os.path.splitext(job.path)[0]
    preview = stem + ".preview.png" if args.preview_every else ""

    def on_preview(x: torch.Tensor) -> None:  # [n,C,S,S] in 0..1
        if preview:
            _save_png(preview, grid(x))

    result = job.run(on_preview)
    curve = os.path.splitext(result.path)[0] + ".loss.png"
    _save_png(curve, loss_curve(result.history)[0])
    print(result.summary())
    print(f"loss curve: {curve}" + (f"; samples: {preview}" if preview else ""))
    return 0
