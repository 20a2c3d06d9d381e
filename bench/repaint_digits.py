"""RePaint digit completion with the pack's shipped MNIST DDPM (issue: inpainting), judged by the LeNet-5 of
../shared/weights/mnist: held-out digits (the last 2,000 test digits, which the DDPM never saw) with their lower
half hidden, completed by RePaint (unconditional: the model's null class) and by OpenCV's Telea fill of the same
mask (the baseline, measured in the same run); the share of completed digits the classifier reads as their true
label, and the PSNR inside the hole.

    python bench/repaint_digits.py [--ddpm FILE] [--n 100] [--start 0] [--steps 100] [--jump-n-sample 2]
                                   [--auto-class] [--bound]

The digits are a fixed shuffle of the held-out 2,000; `--start S --n N` takes shuffled digits S..S+N-1, so the 2,000
can run as parts (e.g. four of 500) whose `correct` counts add up to the whole run's.

`--auto-class` completes toward the class the top half most likely shows, judged by the DDPM itself (RePaint's
class_label -2; 228 extra calls: 12 noise levels x 10 classes, then 36 x the 3 likeliest), instead of the null class.

`--bound` runs no RePaint: it estimates how far the top half alone can take any completion, on the same held-out
digits, two ways. A k-nearest-neighbour vote over the top halves of the digits the DDPM was trained on (the first
8,000 test digits): the share whose vote is the true label (k = 1, 5, 10), and the chance that a neighbour drawn at
random has it (k = 10), which is what a sampler that draws completions in proportion gets. And the DDPM itself as a
classifier of the top half (Li et al. 2023, "Your diffusion model is secretly a zero-shot classifier"), exactly as
RePaint's auto class judges it (models/diffusion/repaint.class_evidence): per class, its noise-prediction error on
the known pixels summed over --levels random noise levels from the middle half of the schedule (default 48; the
first 12 score all classes, the rest the 3 likeliest; --band, --screen, --finalists change that), the same noise for
every class; the share whose lowest-error class is the true label (and within the two lowest). For example
`--bound --n 300 --band 0,0.25 --finalists 10` asks how well the least noisy quarter of the schedule alone judges.

The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench_common import REPO, pkg_root  # noqa: E402
from mnist_models import HELD_OUT, mnist  # noqa: E402


def telea(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # [N,1,S,S] in 0..1
    import cv2

    out = []
    for img, k in zip(images, keep):
        u8 = (img[0].numpy() * 255).round().astype(np.uint8)
        hole = ((1 - k[0].numpy()) * 255).astype(np.uint8)
        out.append(torch.from_numpy(cv2.inpaint(u8, hole, 3, cv2.INPAINT_TELEA).astype(np.float32) / 255))
    return torch.stack(out)[:, None]


def knn_bound(train: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict:
    """k-NN on the top halves ([N,1,32,32] in 0..1): the vote's accuracy and the true label's share among 10."""
    d = torch.cdist(x[..., :16, :].flatten(1), train[..., :16, :].flatten(1))  # [n,N]
    near = train_y[d.topk(10, largest=False).indices]  # [n,10] nearest first
    out = {f"vote_k{k}": round(float((near[:, :k].mode(1).values == y).float().mean()), 3) for k in (1, 5, 10)}
    out["draw_k10"] = round(float((near == y[:, None]).float().mean()), 3)
    return out


def ddpm_class_bound(desc, x: torch.Tensor, keep: torch.Tensor, y: torch.Tensor, levels: int, screen: int,
                     finalists: int, band: tuple[float, float]) -> dict:
    """The class-conditional DDPM as a classifier of the known pixels (x in -1..1): RePaint's own auto-class judge."""
    from atelier.models.diffusion.denoiser import Denoiser
    from atelier.models.diffusion.repaint import class_evidence, evidence_calls

    classes = desc.extra.num_classes - (getattr(desc.extra, "null_class", None) is not None)
    with torch.inference_mode():
        err = class_evidence(Denoiser(desc.model, desc.extra, clip=False), x, keep, classes, levels=levels,
                             screen=screen, finalists=finalists, band=band, generator=torch.Generator().manual_seed(1))
    order = err.argsort(1)
    return {"levels": levels, "screen": screen, "finalists": finalists, "band": band,
            "calls": evidence_calls(classes, levels, screen, finalists),
            "accuracy": round(float((order[:, 0] == y).float().mean()), 3),
            "top2": round(float((order[:, :2] == y[:, None]).any(1).float().mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ddpm", default=str(REPO / "pretrained" / "diffusion_models" / "atelier_mnist_ddpm.safetensors"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0, help="first digit of the fixed shuffle (to run the 2,000 in parts)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--jump-length", type=int, default=10)
    ap.add_argument("--jump-n-sample", type=int, default=2)
    ap.add_argument("--auto-class", action="store_true",
                    help="complete toward the class the top half most likely shows (class_label -2), not the null "
                    "class")
    ap.add_argument("--levels", type=int, default=48, help="--bound: noise levels of the DDPM's class judgement")
    ap.add_argument("--screen", type=int, default=12, help="--bound: levels that score every class")
    ap.add_argument("--finalists", type=int, default=3, help="--bound: classes scored after the screen (10: all)")
    ap.add_argument("--band", default="0.25,0.75", help="--bound: part of the schedule the levels come from, LO,HI")
    ap.add_argument("--bound", action="store_true", help="estimate the top half's information instead (no RePaint)")
    ap.add_argument("--shared", default=os.environ.get("ATELIER_SHARED", str(REPO.parent / "shared")))
    a = ap.parse_args()
    sys.path.insert(0, str(pkg_root()))
    from atelier.models.diffusion import run
    from atelier.models.diffusion.repaint import RePaintSchedule, evidence_calls, model_calls
    from atelier.models.manager import get_manager

    shared = pathlib.Path(a.shared)
    images, labels = mnist(shared)
    idx = torch.arange(len(images) - HELD_OUT, len(images))[torch.randperm(HELD_OUT, generator=torch.Generator()
                                                                           .manual_seed(0))[a.start: a.start + a.n]]
    # [n,1,32,32] in 0..1: the 28² digits resized to 32² as the DDPM was trained (the dataset's resize) and as the
    # LeNet-5 expects them (../shared/weights/README.md: resize 28->32 bilinear)
    x = F.interpolate(images[idx], size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    y = labels[idx]
    keep = torch.ones_like(x)
    keep[..., 16:, :] = 0  # the lower half is hidden
    m = get_manager()
    if a.bound:
        desc = m.load(a.ddpm, family="diffusion")
        train = F.interpolate(images[: len(images) - HELD_OUT], size=(32, 32), mode="bilinear", align_corners=False)
        result = {"n": a.n, "knn": knn_bound(train.clamp(0, 1), labels[: len(images) - HELD_OUT], x, y),
                  "ddpm_classifier": ddpm_class_bound(desc, x * 2 - 1, keep, y, a.levels, a.screen, a.finalists,
                                                      tuple(float(v) for v in a.band.split(",")))}
        print(json.dumps(result))
        return
    lenet = m.load(str(shared / "weights/mnist/lenet_classifier.pth"), family="features")
    desc = m.load(a.ddpm, family="diffusion")
    sched = RePaintSchedule(steps=a.steps, jump_length=a.jump_length, jump_n_sample=a.jump_n_sample)
    t0 = time.perf_counter()
    label = run.AUTO_CLASS if a.auto_class else -1
    filled = ((run.inpaint(m, desc, x * 2 - 1, keep, sched, seed=a.start, class_label=label) + 1) / 2).clamp(0, 1)
    seconds = time.perf_counter() - t0
    base = telea(x, keep)

    def judge(img: torch.Tensor) -> dict:
        with torch.inference_mode():
            p = lenet.model.classify(img).exp()
        hole = (img - x)[..., 16:, :].square().flatten(1).mean(1)
        return {"label_accuracy": round(float((p.argmax(1) == y).float().mean()), 3),
                "correct": int((p.argmax(1) == y).sum()),
                "true_label_confidence": round(float(p[torch.arange(len(y)), y].mean()), 3),
                "psnr_hole_db": round(float((10 * torch.log10(1 / hole.clamp_min(1e-10))).mean()), 2)}

    calls = model_calls(sched) + (evidence_calls(10) if a.auto_class else 0)
    result = {"n": len(y), "start": a.start, "class_label": "auto" if a.auto_class else "none (null class)",
              "model_calls": calls, "seconds": round(seconds, 1),
              "repaint": judge(filled), "telea": judge(base), "original": judge(x),
              "top_half_only": judge(x * keep)}
    result["accuracy_ratio_repaint_over_telea"] = round(
        result["repaint"]["label_accuracy"] / max(result["telea"]["label_accuracy"], 1e-9), 3)
    for k, v in result.items():
        print(f"{k:>34}: {json.dumps(v)}", file=sys.stderr)
    if a.start == 0:  # the strip of the first ten digits, from the run (or part) that starts at the first
        from PIL import Image

        strip = torch.cat([torch.cat(list(t[:10, 0]), dim=1) for t in (x * keep, filled, base, x)], dim=0)
        name = "repaint_digits_auto.png" if a.auto_class else "repaint_digits.png"
        try:
            Image.fromarray((strip.numpy() * 255).round().astype(np.uint8)).save(REPO / "docs" / name)
        except OSError:
            pass
    print(json.dumps(result))


if __name__ == "__main__":
    main()
