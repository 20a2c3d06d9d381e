"""Metric nodes: Image Quality (PSNR, SSIM, MS-SSIM), Load Feature Extractor, FID / KID.

Socket type ATELIER_FEATURES carries a feature network's ModelDescriptor (family "features", from the
feature_extractors model folder). The maths is in models/metrics.py; these classes only declare inputs, convert and
word the report, which is also shown on the node.
"""
from __future__ import annotations

import logging
import math

import torch

from ..models import metrics
from ..models.descriptor import ModelDescriptor
from ..models.errors import InputError
from ..models.manager import get_manager
from .common import image_to_bchw, model_input, seed_input

log = logging.getLogger(__name__)

CATEGORY = "atelier/metrics"
FEATURES = "ATELIER_FEATURES"
FOLDER = "feature_extractors"
NOT_COMPARABLE = "not comparable with Inception FID/KID or published figures"


def _extractor(obj: object) -> ModelDescriptor:
    if not isinstance(obj, ModelDescriptor) or obj.family != "features":
        got = f"a {obj.family} model" if isinstance(obj, ModelDescriptor) else type(obj).__name__
        raise InputError(f"extractor: expected an ATELIER_FEATURES from Atelier Load Feature Extractor, got {got}")
    return obj


def _fmt(v: float, digits: int) -> str:
    return "inf" if math.isinf(v) else "n/a" if math.isnan(v) else f"{v:.{digits}f}"


class AtelierImageQuality:
    DESCRIPTION = ("Compares two image batches pixel by pixel: PSNR (dB), SSIM (Gaussian window 11, sigma 1.5, as "
                   "scikit-image) and MS-SSIM (5 scales, Wang 2003 weights; needs sides of 176 px or more, else n/a). "
                   "Equal batches are compared pair by pair, a single image against every image of the other. The "
                   "outputs are the means over the pairs; the report (also shown on the node) lists each pair.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("psnr", "ssim", "ms_ssim", "report")
    OUTPUT_TOOLTIPS = ("Mean PSNR in dB (inf when the images are identical).",
                       "Mean SSIM, 1 = identical.",
                       "Mean MS-SSIM, 1 = identical; NaN when the images are smaller than 176 px.",
                       "The values in words, per pair.")
    FUNCTION = "compare"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference": ("IMAGE", {"tooltip": "The reference image(s) (ground truth): 1, or as many as `image`."}),
            "image": ("IMAGE", {"tooltip": "The image(s) to score: same size and channels as the reference."}),
        }}

    def compare(self, reference, image):
        ref, img = image_to_bchw(reference, "reference"), image_to_bchw(image, "image")
        names = ("reference", "image")
        with torch.inference_mode():
            p = metrics.psnr(ref, img, names=names)
            s = metrics.ssim(ref, img, names=names)
            note = ""
            if min(ref.shape[-2:]) >= metrics.MS_MIN_SIDE:
                m = metrics.ms_ssim(ref, img, names=names)
            else:
                m = torch.full_like(s, float("nan"))
                note = (f"MS-SSIM n/a: needs sides of {metrics.MS_MIN_SIDE} px or more (5 scales), got "
                        f"{ref.shape[-2]}x{ref.shape[-1]}")
        means = [float(v.mean()) for v in (p, s, m)]
        lines = [f"PSNR {_fmt(means[0], 2)} dB, SSIM {_fmt(means[1], 4)}, MS-SSIM {_fmt(means[2], 4)}"
                 f" (mean of {len(p)} pair{'s' if len(p) > 1 else ''}, range 0..1)"]
        if len(p) > 1:
            lines += [f"  {i}: PSNR {_fmt(float(p[i]), 2)} dB, SSIM {_fmt(float(s[i]), 4)}, "
                      f"MS-SSIM {_fmt(float(m[i]), 4)}" for i in range(min(len(p), 16))]
            lines += [f"  ... {len(p) - 16} more"] if len(p) > 16 else []
        lines += [note] if note else []
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (*means, text)}


class AtelierFeatureExtractorLoader:
    DESCRIPTION = ("Loads a feature network for FID/KID from models/feature_extractors: a classifier whose "
                   "penultimate layer gives the features, e.g. the LeNet-5 MNIST classifier (f6, 84-d). Detected from "
                   "the weights; nothing in the file is run. Scores are named after it: they compare only with "
                   "scores from the same network.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (FEATURES,)
    RETURN_NAMES = ("extractor",)
    OUTPUT_TOOLTIPS = ("The feature network, for Atelier FID / KID.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"extractor_name": model_input(FOLDER, tooltip="A model file in models/feature_extractors.")}}

    def load(self, extractor_name: str):
        return (get_manager().load(extractor_name, FOLDER, family="features"),)


class AtelierFIDKID:
    DESCRIPTION = ("Fréchet distance (FID) and kernel distance (KID, unbiased MMD² with a cubic kernel over random "
                   "subsets) between two image sets, in the features of the network you load. The report names the "
                   "network: such scores compare only with scores from the same network and similar set sizes, "
                   "never with published Inception FID.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("fid", "kid", "kid_std", "report")
    OUTPUT_TOOLTIPS = ("FID in the extractor's features (0 = same statistics).",
                       "KID: mean unbiased MMD² over the subsets (about 0 for sets from one distribution).",
                       "Standard deviation of KID over the subsets.",
                       "The scores with the extractor's name, set sizes and subsets.")
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "extractor": (FEATURES, {"tooltip": "From Atelier Load Feature Extractor."}),
            "real": ("IMAGE", {"tooltip": "Reference images (e.g. held-out data), 2 or more; any size."}),
            "generated": ("IMAGE", {"tooltip": "Images to score, 2 or more; any size."}),
            "subset_size": ("INT", {"default": 1000, "min": 2, "max": 100000, "tooltip":
                            "KID: images per subset (capped at the smaller set's size)."}),
            "subsets": ("INT", {"default": 100, "min": 1, "max": 10000, "tooltip": "KID: number of random subsets."}),
            "seed": seed_input("KID: seed of the random subsets (fixed: the same images give the same score).",
                               control=False),
        }}

    def score(self, extractor, real, generated, subset_size: int, subsets: int, seed: int):
        desc = _extractor(extractor)
        x, y = image_to_bchw(real, "real"), image_to_bchw(generated, "generated")
        for t, n in ((x, "real"), (y, "generated")):
            if t.shape[0] < 2:
                raise InputError(f"{n}: expected 2 images or more (FID fits a covariance), got {t.shape[0]}")
        manager = get_manager()
        f_real = metrics.features(desc, x, manager=manager, name="real")
        f_gen = metrics.features(desc, y, manager=manager, name="generated")
        fid = metrics.fid(f_real, f_gen)
        kid, kid_std, m = metrics.kid(f_real, f_gen, subset_size=subset_size, subsets=subsets, seed=seed)
        text = report(desc, fid, kid, kid_std, m, subsets, len(x), len(y))
        return {"ui": {"text": [text]}, "result": (fid, kid, kid_std, text)}


def report(desc: ModelDescriptor, fid: float, kid: float, kid_std: float, subset: int, subsets: int,
           n_real: int, n_gen: int) -> str:
    """The FID/KID report: scores with the extractor's name, sizes, and what they do not compare with."""
    label, dim = metrics.extractor_label(desc), desc.extra.dim
    lines = [f"FID ({label}) = {fid:.4g} — {NOT_COMPARABLE}",
             f"KID ({label}) = {kid:.4g} ± {kid_std:.2g} ({subsets} subsets of {subset})",
             f"real: {n_real} images, generated: {n_gen} images"]
    if min(n_real, n_gen) <= dim:
        lines.append(f"few images for {dim}-d features: FID is biased upwards; compare only at equal set sizes")
    return "\n".join(lines)


NODE_CLASS_MAPPINGS = {
    "AtelierImageQuality": AtelierImageQuality,
    "AtelierFeatureExtractorLoader": AtelierFeatureExtractorLoader,
    "AtelierFIDKID": AtelierFIDKID,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AtelierImageQuality": "Atelier Image Quality",
    "AtelierFeatureExtractorLoader": "Atelier Load Feature Extractor",
    "AtelierFIDKID": "Atelier FID / KID",
}
