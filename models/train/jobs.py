"""One training job, the same for the trainer nodes and `atelier train`: the table of trainable families, each with
its model folder, its own options and a factory of its `TrainTask`; `run_job` plans the output (continue the run at
that name, or a free new name: never overwrite) and runs the shared loop.

Adding a family is one factory and one `KINDS` entry:

    def _gan_task(data: ImageDataset, **opts) -> TrainTask:
        from ..gan.train import GanTask
        return GanTask(resolution=data.size, channels=data.channels, **opts)

    KINDS["gan"] = TrainKind("gan", "gans", "gan", _gan_task, options=(Option("arch", "dcgan", "...", ("dcgan",)),))

The options become node inputs (nodes/train.py) and command-line flags (cli/train.py) with no more code.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..errors import InputError
from .checkpoint import plan_output
from .data import ImageDataset
from .loop import Trainer, TrainResult, TrainSettings, TrainTask

log = logging.getLogger(__name__)

MODEL_EXT = ".safetensors"


@dataclass(frozen=True)
class Option:
    """A family's own training option: a node input and a command-line flag (type from the default)."""

    name: str
    default: Any  # bool, int, float or str
    help: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    aliases: tuple[str, ...] = ()  # more command-line names ("size" for model_size: --size)

    def check(self, value: Any) -> Any:
        if self.choices and value not in self.choices:
            raise InputError(f"{self.name}: expected one of {', '.join(self.choices)}, got {value!r}")
        if isinstance(self.default, (int, float)) and not isinstance(self.default, bool):
            lo = self.min if self.min is not None else -float("inf")
            hi = self.max if self.max is not None else float("inf")
            if not lo <= value <= hi:
                raise InputError(f"{self.name}: expected {lo:g}..{hi:g}, got {value!r}")
        return value


@dataclass(frozen=True)
class TrainKind:
    """A trainable family: where its files go, how the manager loads them back, and how to make its task."""

    name: str  # "diffusion": the subcommand and the node's name
    folder: str  # the model folder its files are written to (and its Load node lists)
    family: str  # the manager family the written file loads as
    make_task: Callable[..., TrainTask] | None  # (dataset, **options) -> task; None: not available yet
    options: tuple[Option, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)  # TrainSettings defaults of this family (lr, ema, ...)

    def settings(self, **given: Any) -> TrainSettings:
        """TrainSettings from this family's defaults, then `given` (None values ignored)."""
        return replace(TrainSettings(**self.defaults), **{k: v for k, v in given.items() if v is not None})

    def task(self, data: ImageDataset, options: dict[str, Any]) -> TrainTask:
        if self.make_task is None:
            raise InputError(f"training a {self.name} is not available yet in this version; "
                             f"available: {', '.join(available())}")
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(f"{self.name} training: unknown option(s) {', '.join(unknown)}; expected "
                             f"{', '.join(known) or 'none'}")
        opts = {n: o.check(options.get(n, o.default)) for n, o in known.items()}
        return self.make_task(data, **opts)


def _diffusion_task(data: ImageDataset, *, model_size: str, schedule: str, prediction: str) -> TrainTask:
    from ..diffusion.train import DiffusionTask

    return DiffusionTask(resolution=data.size, channels=data.channels, size=model_size, schedule=schedule,
                         prediction=prediction, class_names=data.class_names)


def _diffusion_options() -> tuple[Option, ...]:
    from ..diffusion.train import PREDICTIONS, SCHEDULES, SIZES

    return (
        Option("model_size", "tiny", "UNet size: tiny (~0.9 M parameters, 28x28 digits), small (~6 M), base (~35 M, "
               "the DDPM CIFAR-10 layout). The resolution must be a multiple of 4 (tiny, small) or 8 (base).",
               tuple(SIZES), aliases=("size",)),
        Option("schedule", "linear", "Noise schedule: linear (DDPM) or cosine (Nichol & Dhariwal; better at small "
               "sizes).", tuple(SCHEDULES)),
        Option("prediction", "epsilon", "What the UNet learns to predict: epsilon (the noise, DDPM) or v "
               "(velocity; steadier at high noise).", tuple(PREDICTIONS)),
    )


def _gan_task(data: ImageDataset, *, loss: str, base_width: int, z_dim: int) -> TrainTask:
    from ..gan.train import GANTask

    return GANTask(resolution=data.size, channels=data.channels, loss=loss, base_width=base_width, z_dim=z_dim,
                   class_names=data.class_names)


def _gan_options() -> tuple[Option, ...]:
    from ..gan.losses import LOSSES

    return (
        Option("loss", "non_saturating", "Adversarial loss: non_saturating (DCGAN's), hinge, or wgan_gp (Wasserstein "
               "with gradient penalty; Adam betas 0, 0.9).", tuple(LOSSES)),
        Option("base_width", 32, "Channels of the generator's last hidden layer (doubling toward the 4x4 start, at "
               "most 8x); 32 suits 32x32 digits, 64 the DCGAN paper's 64x64 faces.", min=8, max=512),
        Option("z_dim", 100, "Size of the noise vector z.", min=2, max=1024),
    )


def _vae_task(data: ImageDataset, *, width: int, latent_dim: int, reconstruction: str, beta: float,
              kl_warmup: int) -> TrainTask:
    from ..vae.train import VAETask

    return VAETask(resolution=data.size, channels=data.channels, width=width, latent_dim=latent_dim, res_blocks=0,
                   reconstruction=reconstruction, beta=beta, kl_warmup=kl_warmup)


def _vae_options() -> tuple[Option, ...]:
    from ..vae.train import RECONSTRUCTIONS

    return (
        Option("width", 32, "Channels of the first level (then 2x and 4x; the image is halved twice, so the "
               "resolution must be a multiple of 4).", min=8, max=256),
        Option("latent_dim", 32, "Size of the flat latent z (0: a spatial latent of 4 channels at 1/4 size, sharper "
               "reconstructions, weaker prior samples).", min=0, max=1024),
        Option("reconstruction", "bce", "Likelihood of the pixels: bce (Bernoulli, for near-binary images such as "
               "digits) or mse (Gaussian, photos).", tuple(RECONSTRUCTIONS)),
        Option("beta", 1.0, "Weight of the KL term (1: the ELBO; above 1: a beta-VAE, smoother latents, blurrier "
               "images).", min=0.0, max=100.0),
        Option("kl_warmup", 1000, "Steps over which the KL weight rises from 0 to beta.", min=0, max=10_000_000),
    )


KINDS: dict[str, TrainKind] = {
    "diffusion": TrainKind("diffusion", "diffusion_models", "diffusion", _diffusion_task, _diffusion_options(),
                           {"lr": 2e-4, "batch_size": 64, "warmup": 100, "ema": 0.999}),
    "gan": TrainKind("gan", "gans", "gan", _gan_task, _gan_options(),
                     {"lr": 2e-4, "batch_size": 64, "warmup": 0, "ema": 0.999}),
    "vae": TrainKind("vae", "vae", "vae", _vae_task, _vae_options(),
                     {"lr": 2e-3, "batch_size": 64, "warmup": 100, "ema": 0.999}),
}


def available() -> list[str]:
    return [k for k, v in KINDS.items() if v.make_task is not None]


def get_kind(name: str) -> TrainKind:
    if name not in KINDS:
        raise InputError(f"train: expected one of {', '.join(KINDS)}, got {name!r}")
    return KINDS[name]


def model_path(kind: TrainKind, name: str) -> tuple[str, str]:
    """(the directory new files of the family go to, the file path) for a model name from a node; names that
    leave the folder are refused."""
    stem = str(name).strip().replace("\\", "/")
    if stem.lower().endswith(MODEL_EXT):
        stem = stem[:-len(MODEL_EXT)]
    norm = os.path.normpath(stem) if stem else ""
    if (not norm or norm in (".", "..") or os.path.isabs(stem) or norm.split(os.sep)[0] == ".."
            or ":" in norm or "\x00" in norm):
        raise InputError(f"name: expected a model name such as 'digits' (written to the {kind.folder} folder), "
                         f"got {name!r}")
    folder = model_dir(kind.folder)
    return folder, os.path.join(folder, norm + MODEL_EXT)


def model_dir(folder: str) -> str:
    """Where new files of a model folder go: the first of its directories named like it (ComfyUI lists the legacy
    models/unet before models/diffusion_models; an extra_model_paths.yaml entry with is_default comes first), else
    the first."""
    from ..manager import get_manager

    dirs = get_manager().folder_dirs(folder)
    named = [d for d in dirs if os.path.basename(os.path.normpath(d)) == folder]
    return (named or dirs)[0]


@dataclass
class Job:
    """A planned run: where it writes (`path`, maybe a free name beside the one asked), what it resumes (`note`)."""

    kind: TrainKind
    path: str
    note: str
    trainer: Trainer

    def run(self, on_preview: Callable[[torch.Tensor], None] | None = None) -> TrainResult:
        return self.trainer.run(on_preview)


def prepare_job(kind: TrainKind, data: ImageDataset, out_path: str, settings: TrainSettings,
                options: dict[str, Any], *, continue_run: bool = True, device: torch.device | None = None) -> Job:
    """The task of `kind` on `data` and the output plan (checkpoint.plan_output): the run already at `out_path`
    continues when `continue_run` and its architecture matches; otherwise a new file, never an overwrite."""
    if not len(data):
        raise InputError("dataset: the dataset is empty")
    with torch.inference_mode(False):  # tensors the task keeps must not be inference tensors (nodes run inside it)
        task = kind.task(data, options)
        path, resume = plan_output(out_path, task.kind, task.arch(), continue_run)
        trainer = Trainer(task, data, settings, path, resume=resume, device=device)
    note = _plan_note(out_path, trainer.path, resume, continue_run)  # the trainer may take yet another free name
    log.info("training %s: %s", kind.name, note)
    return Job(kind, trainer.path, note, trainer)


def run_job(kind: TrainKind, data: ImageDataset, out_path: str, settings: TrainSettings, options: dict[str, Any],
            *, continue_run: bool = True, on_preview: Callable[[torch.Tensor], None] | None = None,
            device: torch.device | None = None) -> tuple[TrainResult, str]:
    """Train `settings.steps` more steps of `kind` on `data` into `out_path` or a free name beside it (see
    prepare_job). Returns the result and a note for the report (the file chosen, what was resumed)."""
    job = prepare_job(kind, data, out_path, settings, options, continue_run=continue_run, device=device)
    return job.run(on_preview), job.note


def _plan_note(asked: str, path: str, resume: Any, continue_run: bool) -> str:
    if resume is not None:
        return f"continued run {resume.run} from step {resume.step}"
    if os.path.abspath(path) != os.path.abspath(asked):
        why = "holds another run (other architecture or data)" if continue_run else "exists and continue is off"
        return f"{os.path.basename(asked)} {why}; started a new run in {os.path.basename(path)}"
    return "started a new run"
