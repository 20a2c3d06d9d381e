"""Training checkpoints: the family's model file plus a state file beside it, both written to a temporary name and
renamed, so a failed write never damages the previous checkpoint.

    digits.safetensors     the model as the family's Load node reads it (EMA weights when EMA is on), with its
                           config in the metadata and `atelier_train` = {"run", "step", "kind"}
    digits.train-state     safetensors too: raw weights (`net.<name>.<key>`), EMA weights (`ema.<name>.<key>`), the
                           optimizer moments (`opt.<name>.<index>.<key>`), the loss history (`loss.<name>`), and in
                           the metadata the run id, step, task kind, architecture and settings as JSON

The state file has its own extension so that no model folder lists it. Nothing is unpickled: AdamW's state is
tensors, its hyper-parameters JSON.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, ModelLoadError
from ..loading import atomic_write

log = logging.getLogger(__name__)

STATE_SUFFIX = ".train-state"
FORMAT = 1


def state_path(model_path: str) -> str:
    root, _ = os.path.splitext(model_path)
    return root + STATE_SUFFIX


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class TrainState:
    """What a resumed run needs besides the code: weights, EMA, optimizer moments, step and history."""

    kind: str
    arch: dict[str, Any]
    run: str
    step: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    nets: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    ema: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optim: dict[str, dict[str, Any]] = field(default_factory=dict)  # torch optimizer state_dicts
    extra: dict[str, Any] = field(default_factory=dict)  # JSON the task keeps (e.g. class names)
    scaler: dict[str, Any] = field(default_factory=dict)  # the fp16 gradient scaler's state (JSON), if any

    def describe(self) -> str:
        return f"a {self.kind} run {self.run} at step {self.step} of {json.dumps(self.arch, sort_keys=True)}"


def _flatten(state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for group, nets in (("net", state.nets), ("ema", state.ema)):
        for name, sd in nets.items():
            tensors.update({f"{group}.{name}.{k}": v for k, v in sd.items()})
    optim_meta = {}
    for name, osd in state.optim.items():
        optim_meta[name] = {"param_groups": osd["param_groups"], "scalars": {}}
        for idx, st in osd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{name}.{idx}.{k}"] = v
                else:
                    optim_meta[name]["scalars"][f"{idx}.{k}"] = v
    for name, values in state.history.items():
        tensors[f"loss.{name}"] = torch.tensor(values, dtype=torch.float64)  # exact (files of float32 read too)
    meta = {"format": FORMAT, "kind": state.kind, "arch": state.arch, "run": state.run, "step": state.step,
            "settings": state.settings, "optim": optim_meta, "extra": state.extra,
            "history_names": list(state.history)}
    if state.scaler:
        meta["scaler"] = state.scaler
    return ({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            {"atelier_train_state": json.dumps(meta)})


def write_state(path: str, state: TrainState) -> None:
    """Write `state` to `path` as it is (callers write to a temporary name: see save_state)."""
    from safetensors.torch import save_file

    tensors, meta = _flatten(state)
    save_file(tensors, path, metadata=meta)


def save_state(path: str, state: TrainState) -> None:
    atomic_write(path, lambda tmp: write_state(tmp, state))


def read_header(path: str) -> dict[str, Any]:
    """The JSON metadata of a state file (no tensors read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["atelier_train_state"])
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is reported as such
        raise ModelLoadError(f"training state {path!r}: not a readable Atelier training state ({e})") from None


def load_state(path: str) -> TrainState:
    from safetensors.torch import load_file

    meta = read_header(path)
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"training state {path!r}: format {meta.get('format')!r}, this version reads {FORMAT}")
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"training state {path!r}: cannot read its tensors ({e})") from None
    state = TrainState(meta["kind"], meta["arch"], meta["run"], int(meta["step"]), meta.get("settings", {}),
                       extra=meta.get("extra", {}), scaler=meta.get("scaler", {}))
    optim: dict[str, dict[str, Any]] = {n: {"param_groups": o["param_groups"], "state": {}}
                                        for n, o in meta.get("optim", {}).items()}
    for key, v in tensors.items():
        group, rest = key.split(".", 1)
        if group in ("net", "ema"):
            name, k = rest.split(".", 1)
            getattr(state, "nets" if group == "net" else "ema").setdefault(name, {})[k] = v
        elif group == "opt":
            name, idx, k = rest.split(".", 2)
            optim[name]["state"].setdefault(int(idx), {})[k] = v
        elif group == "loss":
            state.history[rest] = v.tolist()
    for name, o in meta.get("optim", {}).items():
        for key, v in o.get("scalars", {}).items():
            idx, k = key.split(".", 1)
            optim[name]["state"].setdefault(int(idx), {})[k] = v
    state.optim = optim
    return state


def same_arch(state: TrainState, kind: str, arch: dict[str, Any]) -> bool:
    return state.kind == kind and json.dumps(state.arch, sort_keys=True) == json.dumps(arch, sort_keys=True)


def check_resume(path: str, kind: str, arch: dict[str, Any]) -> TrainState:
    """The state to resume from `path` (a model file or its state file); an error naming both architectures when it
    belongs to another one."""
    sp = path if path.endswith(STATE_SUFFIX) else state_path(path)
    if not os.path.isfile(sp):
        raise InputError(f"resume: {path!r} has no training state beside it ({os.path.basename(sp)}); only "
                         f"checkpoints written by an Atelier trainer can be resumed")
    state = load_state(sp)
    if not same_arch(state, kind, arch):
        raise InputError(f"resume: {os.path.basename(path)} is {state.describe()}, but this run trains a {kind} "
                         f"{json.dumps(arch, sort_keys=True)}; pick a matching checkpoint or change the settings")
    return state


def free_name(path: str) -> str:
    """`path`, or `stem_2.ext`, `stem_3.ext`, ... the first whose model and state files do not exist."""
    root, ext = os.path.splitext(path)
    candidate, n = path, 1
    while os.path.exists(candidate) or os.path.exists(state_path(candidate)):
        n += 1
        candidate = f"{root}_{n}{ext}"
    return candidate


def plan_output(path: str, kind: str, arch: dict[str, Any], continue_run: bool) -> tuple[str, TrainState | None]:
    """Where to write and what to resume: the run already at `path` continues when `continue_run` and its
    architecture matches; any other existing file is never overwritten (a new name is chosen, and logged)."""
    sp = state_path(path)
    if continue_run and os.path.isfile(sp):
        header = read_header(sp)
        if header.get("kind") == kind and json.dumps(header.get("arch"), sort_keys=True) == json.dumps(
                arch, sort_keys=True):
            return path, load_state(sp)
    if os.path.exists(path) or os.path.exists(sp):
        new = free_name(path)
        log.warning("training output %s exists and is not this run's; writing %s instead", path, new)
        return new, None
    return path, None
