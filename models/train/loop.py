"""The one training loop every family's trainer runs (GAN, VAE, diffusion): the families bring a `TrainTask`
(their networks, one training step, a preview sampler, their file format); the loop brings everything else.

- Seeded and stateless per step: the batch of step s, its augmentations and the task's noise are drawn from
  generators seeded by (seed, s), so a resumed run sees exactly what an uninterrupted one would have.
- AdamW with linear warm-up, gradient clipping, EMA of the networks the task names (the EMA weights are what the
  model file holds); autocast bf16 (fp16 with a gradient scaler where bf16 is missing) on CUDA, fp32 elsewhere.
- It leaves ComfyUI's `torch.inference_mode()` explicitly (nodes run inside it) and builds the networks there.
- Progress per step with the losses; a preview of samples every `preview_every` steps; checkpoints every
  `save_every` steps, at the end, and when the user interrupts (saved first, then the interrupt goes on); a loss that
  turns NaN stops the run with an error naming the step, and the last good checkpoint stays as it was.
- Under `torchrun` the loop joins the process group itself (`init_distributed`: gloo on CPU, nccl on CUDA with
  cuda:LOCAL_RANK), wraps the networks in DistributedDataParallel and each process takes its slice of the same
  global batch, so N processes match one at the same global batch; only rank 0 writes files and previews.
- The networks are initialised from the seed too (in a forked RNG: the caller's global generator is untouched).
- A checkpoint is the model file and its state file, both written to temporary names and renamed only when both
  are complete; an existing output that is not this run's is never overwritten (a free name is taken instead).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import InputError
from ..progress import Progress
from .checkpoint import STATE_SUFFIX, TrainState, free_name, new_run_id, same_arch, state_path, write_state
from .data import ImageDataset

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_STREAM_ORDER, _STREAM_AUGMENT, _STREAM_NOISE, _STREAM_INIT = 0, 1, 2, 3
LOG_EVERY_STEPS, LOG_EVERY_SECONDS = 100, 10.0  # progress lines in the log when no bar is shown


class TrainingError(InputError):
    """Training cannot go on (a loss turned NaN, a configuration the data cannot feed)."""


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000  # steps this call trains (a resumed run goes on from its step)
    batch_size: int = 64  # the global batch (split over processes under torchrun)
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: int = 0  # steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # max gradient norm per optimizer (0: off)
    ema: float = 0.999  # EMA decay (0: off)
    seed: int = 0
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    preview_every: int = 0  # steps between previews (0: only at the end)
    precision: str = "auto"

    def check(self) -> None:
        if self.steps < 1:
            raise InputError(f"steps: expected at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise InputError(f"batch_size: expected at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"learning_rate: expected a positive number, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise InputError(f"ema: expected a decay in [0, 1), got {self.ema}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")


class TrainTask:
    """What a family brings. `build` runs inside the loop (outside inference mode); the rest after it."""

    kind = ""

    def arch(self) -> dict[str, Any]:
        """The architecture as JSON: a resumed checkpoint must have the same."""
        raise NotImplementedError

    def build(self, device: torch.device) -> dict[str, nn.Module]:
        """Fresh networks on `device` (fp32), in training mode."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
        """optimizer name -> (the networks it updates, AdamW overrides such as betas)."""
        raise NotImplementedError

    def ema_networks(self) -> tuple[str, ...]:
        return ()

    def train_step(self, ctx: "StepContext", batch: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One step on this process's slice: batch [b,C,S,S] in 0..1 on the device; calls ctx.backward per optimizer;
        returns the losses to log (scalars)."""
        raise NotImplementedError

    def sample(self, nets: dict[str, nn.Module], n: int, seed: int) -> torch.Tensor:  # [n,C,S,S] in 0..1
        raise NotImplementedError

    def save_model(self, path: str, nets: dict[str, nn.Module], meta: dict[str, str]) -> None:
        """Write the family's model file to `path` with `meta` added to its metadata: one file, as it is (the loop
        passes a temporary name in the output folder, with the output's extension, and renames it together with
        the state file once both are complete)."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}


def mix(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for (seed, step, stream)."""
    h = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB)
    h ^= h >> 31
    return h & 0x7FFF_FFFF_FFFF_FFFF


def batch_indices(n: int, batch: int, seed: int, step: int,
                  orders: dict[int, torch.Tensor] | None = None) -> torch.Tensor:  # [batch] long
    """The items of step `step`: consecutive slices of one seeded permutation per epoch. `orders` (epoch ->
    permutation) is a cache the caller keeps between steps, so an epoch's permutation is drawn once, not every step
    (the same indices either way; it holds the last two epochs)."""
    parts, got, start = [], 0, step * batch
    while got < batch:
        epoch, offset = divmod(start, n)
        perm = orders.get(epoch) if orders is not None else None
        if perm is None:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix(seed, epoch, _STREAM_ORDER)))
            if orders is not None:
                while len(orders) >= 2:
                    orders.pop(min(orders))
                orders[epoch] = perm
        take = perm[offset:offset + batch - got]
        parts.append(take)
        got += len(take)
        start += len(take)
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def init_distributed() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1 in the environment) and none is initialised
    yet: nccl when CUDA is there (this process on cuda:LOCAL_RANK), gloo otherwise. True when a group is up."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    log.info("training: process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    device: torch.device | None = None  # where collectives run (CUDA for nccl), None: CPU

    @classmethod
    def current(cls) -> "_Dist":
        import torch.distributed as dist

        if init_distributed():
            dev = None
            if dist.get_backend() == "nccl":
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
            return cls(dist.get_world_size(), dist.get_rank(), dev)
        return cls()

    def local(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0] // self.world
        return x[self.rank * b:(self.rank + 1) * b]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))


class StepContext:
    """What a task's step uses: the (DDP-wrapped) networks, autocast, seeded noise of the global batch (this
    process's slice), and `backward(optimizer, loss)`."""

    def __init__(self, loop: "Trainer", step: int) -> None:
        self._loop = loop
        self.step = step
        self.device = loop.device
        self.nets = loop.forward_nets
        self.global_batch = loop.settings.batch_size
        self._gen = torch.Generator(loop.device).manual_seed(mix(loop.seed, step, _STREAM_NOISE))

    def autocast(self) -> contextlib.AbstractContextManager:
        dt = self._loop.amp_dtype
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dt)

    def randn(self, *item_shape: int) -> torch.Tensor:  # [b, *item_shape]
        full = torch.randn((self.global_batch, *item_shape), generator=self._gen, device=self.device)
        return self._loop.dist.local(full)

    def rand(self, *item_shape: int) -> torch.Tensor:
        full = torch.rand((self.global_batch, *item_shape), generator=self._gen, device=self.device)
        return self._loop.dist.local(full)

    def randint(self, high: int, *item_shape: int) -> torch.Tensor:
        full = torch.randint(high, (self.global_batch, *item_shape), generator=self._gen, device=self.device)
        return self._loop.dist.local(full)

    @property
    def generator(self) -> torch.Generator:
        return self._gen

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Backward of `loss` (plus anything `accumulate`d), clipping and one step of optimizer `name`."""
        self._loop.optimize(name, loss)

    def accumulate(self, loss: torch.Tensor) -> None:
        """Backward of a part of the next `backward`'s loss now, so its activations are freed before the rest is
        computed (a GAN's discriminator on real, then on fake images: half the activations held at once)."""
        if self._loop.scaler is not None:
            self._loop.scaler.scale(loss).backward()
        else:
            loss.backward()

    @property
    def distributed(self) -> bool:
        """Running as one of several processes (DDP): one forward per backward there."""
        return self._loop.dist.world > 1


@dataclass
class TrainResult:
    path: str
    step: int
    steps_run: int
    seconds: float
    history: dict[str, list[float]]
    preview: torch.Tensor | None = None  # [n,C,S,S] in 0..1: the last samples
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        last = ", ".join(f"{k} {v[-1]:.4g}" for k, v in self.history.items() if v)
        rate = self.steps_run / self.seconds if self.seconds > 0 else 0.0
        return (f"step {self.step} ({self.steps_run} this run, {rate:.2f} steps/s); {last}; saved {self.path}"
                + "".join(f"; {n}" for n in self.notes))


class Trainer:
    def __init__(self, task: TrainTask, data: ImageDataset, settings: TrainSettings, out_path: str, *,
                 resume: TrainState | None = None, device: torch.device | None = None) -> None:
        settings.check()
        self.task, self.data, self.settings = task, data, settings
        self.dist = _Dist.current()
        if settings.batch_size % self.dist.world:
            raise TrainingError(f"batch_size: {settings.batch_size} does not split over {self.dist.world} "
                                f"processes; use a multiple of {self.dist.world}")
        if resume is not None and not same_arch(resume, task.kind, task.arch()):
            raise InputError(f"resume: the checkpoint is {resume.describe()}, but this run trains a {task.kind} "
                             f"{json.dumps(task.arch(), sort_keys=True)}; pick a matching checkpoint or change the "
                             f"settings")
        if device is None:
            if self.dist.device is not None:
                device = self.dist.device
            else:
                from ..manager import get_manager

                device = get_manager().compute_device
        self.device = device
        self.amp_dtype, self.scaler = _precision(settings.precision, device)
        self.resume = resume
        self.run_id = resume.run if resume else new_run_id()
        self.seed = int(resume.settings.get("seed", settings.seed)) if resume else settings.seed
        self.step = resume.step if resume else 0
        self.history: dict[str, list[float]] = {k: list(v) for k, v in (resume.history if resume else {}).items()}
        self.notes: list[str] = []
        self.path = self._claim_output(out_path)
        self.nets: dict[str, nn.Module] = {}
        self.forward_nets: dict[str, nn.Module] = {}
        self.ema: dict[str, nn.Module] = {}
        self.opts: dict[str, tuple[torch.optim.Optimizer, list[nn.Parameter]]] = {}
        self._base_step = self.step  # where this call started
        self._saved_step = -1  # the step of the last checkpoint this run wrote (-1: none)
        self._stepped = False  # an optimizer has updated the weights in the step under way
        self._orders: dict[int, torch.Tensor] = {}  # epoch -> its permutation of the items (batch_indices' cache)

    def _claim_output(self, path: str) -> str:
        """`path` when it is free or holds this run's checkpoint; otherwise a free name (never overwrite)."""
        existing = [p for p in (path, state_path(path)) if os.path.exists(p)]
        if not existing:
            return path
        if self.resume is not None and all(_run_of(p) == self.resume.run for p in existing):
            return path
        new = free_name(path)
        if self.dist.rank == 0:
            log.warning("training output %s exists and is not this run's; writing %s instead", path, new)
        self.notes.append(f"{os.path.basename(path)} exists and is not this run's: wrote {os.path.basename(new)}")
        return new

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the same seed, the same initial weights, on every process
            torch.manual_seed(mix(self.seed, 0, _STREAM_INIT))
            self.nets = self.task.build(self.device)
        if self.resume:
            for name, net in self.nets.items():
                net.load_state_dict(self.resume.nets[name])
        self.forward_nets = dict(self.nets)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_nets = {n: DDP(m, device_ids=ids) if any(p.requires_grad for p in m.parameters()) else m
                                 for n, m in self.nets.items()}
        ema = self.settings.ema > 0
        for name in self.task.ema_networks() if ema else ():
            copy_ = copy.deepcopy(self.nets[name]).requires_grad_(False).eval()
            if self.resume and name in self.resume.ema:
                copy_.load_state_dict(self.resume.ema[name])
            self.ema[name] = copy_
        s = self.settings
        for oname, (names, overrides) in self.task.optimizers().items():
            params = [p for n in names for p in self.nets[n].parameters() if p.requires_grad]
            kw = {"lr": s.lr, "betas": s.betas, "weight_decay": s.weight_decay, **overrides}
            opt = torch.optim.AdamW(params, **kw)
            if self.resume and oname in self.resume.optim:
                opt.load_state_dict(_normal_tensors(self.resume.optim[oname]))
                for g in opt.param_groups:  # the settings of this call win (e.g. a lower learning rate)
                    g.update({k: v for k, v in kw.items() if k != "lr"})
            self.opts[oname] = (opt, params)
        if self.scaler is not None and self.resume and self.resume.scaler:
            self.scaler.load_state_dict(self.resume.scaler)

    # ------------------------------------------------------------------ one step

    def lr_factor(self, step: int) -> float:
        """The warm-up factor of the learning rate in step `step` (0-based): linear from 1/warmup to 1."""
        w = self.settings.warmup
        return min(1.0, (step + 1) / w) if w > 0 else 1.0

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        opt, params = self.opts[name]
        for g in opt.param_groups:
            g["lr"] = self.settings.lr * self.lr_factor(self.step) * g.get("lr_scale", 1.0)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
        else:
            loss.backward()
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        self._stepped = True
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.settings.ema, (1 + self.step) / (10 + self.step))
        for name, ema in self.ema.items():
            src = self.nets[name]
            e_params = [p for p in ema.parameters()]
            s_params = [p.detach() for p in src.parameters()]
            torch._foreach_lerp_(e_params, s_params, 1.0 - decay)
            for eb, sb in zip(ema.buffers(), src.buffers()):
                eb.copy_(sb)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = batch_indices(len(self.data), self.settings.batch_size, self.seed, step, self._orders)
        x = self.data.batch(idx, torch.Generator().manual_seed(mix(self.seed, step, _STREAM_AUGMENT)))
        labels = self.data.labels[idx] if self.data.labels is not None else None
        x = self.dist.local(x).to(self.device, non_blocking=True)
        return x, (self.dist.local(labels).to(self.device) if labels is not None else None)

    def _one_step(self) -> dict[str, float]:
        self._stepped = False
        batch, labels = self._batch(self.step)
        losses = self.task.train_step(StepContext(self, self.step), batch, labels)
        values = self.dist.mean({k: float(v) for k, v in losses.items()})
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            kept = (f"the checkpoint of step {self._saved_step} ({self.path}) is kept as it was"
                    if self._saved_step >= 0 else "this run wrote no checkpoint")
            raise TrainingError(
                f"training stopped at step {self.step + 1}: the {bad[0]} loss became {values[bad[0]]}; {kept} "
                f"(lower the learning rate, raise warm-up or clip gradients harder)")
        for k, v in values.items():
            self.history.setdefault(k, []).append(v)
        if self.ema:
            self._update_ema()
        self.step += 1
        self._stepped = False
        return values

    # ------------------------------------------------------------------ saving

    def final_nets(self) -> dict[str, nn.Module]:
        """The networks as saved: EMA copies where there are some."""
        return {n: self.ema.get(n, m) for n, m in self.nets.items()}

    def save(self) -> None:
        """Write the model file and the state file of the current step (rank 0 only). Both go to temporary names
        first and are renamed only when both are complete, so a failed write leaves the previous pair intact."""
        if self.dist.rank != 0:
            return
        state = TrainState(self.task.kind, self.task.arch(), self.run_id, self.step,
                           {**asdict(self.settings), "seed": self.seed}, self.history,
                           nets={n: m.state_dict() for n, m in self.nets.items()},
                           ema={n: m.state_dict() for n, m in self.ema.items()},
                           optim={n: o.state_dict() for n, (o, _) in self.opts.items()},
                           extra=self.task.extra_state(),
                           scaler=dict(self.scaler.state_dict()) if self.scaler is not None else {})
        meta = {"atelier_train": json.dumps({"run": self.run_id, "step": self.step, "kind": self.task.kind})}
        folder, name = os.path.split(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        root, ext = os.path.splitext(name)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp_model = os.path.join(folder, f".{root}.tmp-{tag}{ext}")
        tmp_state = os.path.join(folder, f".{root}.tmp-{tag}{STATE_SUFFIX}")
        nets = self.final_nets()
        was = {n: m.training for n, m in nets.items()}
        try:
            for m in nets.values():
                m.eval()
            self.task.save_model(tmp_model, nets, meta)
            write_state(tmp_state, state)
            os.replace(tmp_state, state_path(self.path))
            os.replace(tmp_model, self.path)
        finally:
            for n, m in nets.items():
                m.train(was[n])
            for tmp in (tmp_model, tmp_state):
                if os.path.exists(tmp):
                    os.remove(tmp)
        self._saved_step = self.step

    def preview(self, n: int = 16) -> torch.Tensor:
        nets = self.final_nets()
        was = {k: m.training for k, m in nets.items()}
        for m in nets.values():
            m.eval()
        try:
            with torch.no_grad():
                return self.task.sample(nets, n, self.seed).float().clamp(0, 1).cpu()
        finally:
            for k, m in nets.items():
                m.train(was[k])

    # ------------------------------------------------------------------ the run

    def run(self, on_preview: Callable[[torch.Tensor], None] | None = None) -> TrainResult:
        """Train `settings.steps` more steps; returns what was saved."""
        with _training_mode():
            return self._run(on_preview)

    def _run(self, on_preview: Callable[[torch.Tensor], None] | None) -> TrainResult:
        self._setup()
        s, start, t0 = self.settings, self.step, time.perf_counter()
        preview = None
        show = self.dist.rank == 0
        try:
            with Progress(s.steps, f"Training {self.task.kind}", enabled=show) as bar:
                ticker = _LogTicker(s.steps, start, self.task.kind) if show and not _bar_visible(bar) else None
                for i in range(s.steps):
                    values = self._one_step()
                    last = i == s.steps - 1
                    if s.save_every and self.step % s.save_every == 0 and not last:
                        self.save()
                    pic = None
                    if show and (last or (s.preview_every and self.step % s.preview_every == 0)):
                        preview = self.preview()
                        if on_preview is not None:
                            on_preview(preview)
                        pic = grid(preview) if bar.shows_previews else None
                    text = " ".join(f"{k} {v:.4f}" for k, v in values.items())
                    bar.set_text(text)
                    if ticker is not None:
                        ticker.tick(self.step, text, last)
                    bar.update(1, pic)
        except KeyboardInterrupt:  # also ComfyUI's interrupt (an Exception there: see below)
            self._save_on_stop()
            raise
        except Exception as e:
            if type(e).__name__ == "InterruptProcessingException":
                self._save_on_stop()
            raise
        if self._saved_step != self.step:
            self.save()
        return TrainResult(self.path, self.step, self.step - start, time.perf_counter() - t0, self.history, preview,
                           list(self.notes))

    def _save_on_stop(self) -> None:
        """On an interrupt: save the last completed step (unless saved already), then let the interrupt go on."""
        if self._stepped:  # stopped inside a step after an optimizer changed the weights: not a step's state
            log.warning("training interrupted inside step %d after a weight update; the last checkpoint (step %d) "
                        "is kept", self.step + 1, self._saved_step)
            return
        if self.step in (self._base_step, self._saved_step):  # nothing new since the start or the last save
            return
        log.info("training interrupted at step %d: saving a checkpoint first", self.step)
        try:
            self.save()
        except Exception:  # noqa: BLE001 - the interrupt goes on; the previous checkpoint is intact
            log.exception("training: the checkpoint of step %d could not be written", self.step)


class _LogTicker:
    """Progress lines in the log (every LOG_EVERY_STEPS steps or LOG_EVERY_SECONDS) when no bar shows them."""

    def __init__(self, steps: int, start: int, kind: str) -> None:
        self.end, self.kind = start + steps, kind
        self.t0 = self.last_t = time.perf_counter()
        self.start = self.last_step = start

    def tick(self, step: int, text: str, last: bool) -> None:
        now = time.perf_counter()
        since = now - self.last_t
        if not (last or since >= LOG_EVERY_SECONDS or (step - self.last_step >= LOG_EVERY_STEPS and since >= 1.0)):
            return
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        log.info("training %s: step %d/%d, %s (%.2f steps/s)", self.kind, step, self.end, text, rate)
        self.last_t, self.last_step = now, step


def _bar_visible(bar: Progress) -> bool:
    """Whether a tqdm bar is drawn (outside ComfyUI, on a terminal or forced on)."""
    t = getattr(bar, "_tqdm", None)
    return t is not None and not getattr(t, "disable", True)


def _run_of(path: str) -> str | None:
    """The run id an existing model or state file was written by (None: not an Atelier training output)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable or not safetensors: not ours
        return None
    try:
        if "atelier_train_state" in meta:
            return json.loads(meta["atelier_train_state"]).get("run")
        return json.loads(meta.get("atelier_train", "{}")).get("run")
    except (ValueError, AttributeError):
        return None


def _normal_tensors(obj: Any) -> Any:
    """A copy with every tensor cloned here (outside inference mode): a state read inside ComfyUI's inference mode
    holds inference tensors, which the optimizer could not update in place."""
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _normal_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normal_tensors(v) for v in obj]
    return obj


@contextlib.contextmanager
def _training_mode() -> Iterator[None]:
    """Leave ComfyUI's inference mode (and any no_grad) for the duration of training."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    if device.type != "cuda" or precision == "fp32":
        if precision in ("bf16", "fp16") and device.type != "cuda":
            log.info("precision %s: mixed precision is used on CUDA only; training in fp32 on %s", precision, device)
        return None, None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def grid(images: torch.Tensor, cols: int | None = None) -> torch.Tensor:  # [n,C,S,S] -> [H,W,3] in 0..1
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    x = images if c == 3 else images[:, :1].expand(-1, 3, -1, -1)
    out = torch.ones(3, rows * (h + 2) + 2, cols * (w + 2) + 2)
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = x[i]
    return out.movedim(0, -1)
