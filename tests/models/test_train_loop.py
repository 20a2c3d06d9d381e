"""The shared training loop (models/train/loop.py) on a tiny conv autoencoder task and a tiny diffusion UNet:
resume == uninterrupted, inference mode, interruption, NaN, output names, failed writes, warm-up, clipping, and
the saved diffusion file loading through the manager as the EMA network."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from atelier.models import host
from atelier.models.errors import InputError, Interrupted
from atelier.models.train import loop as loop_mod
from atelier.models.train.checkpoint import check_resume, load_state, plan_output, state_path
from atelier.models.train.loop import Trainer, TrainingError, TrainSettings
from helpers_train import AETask, listing, max_diff, random_dataset, tiny_diffusion_task

CPU = torch.device("cpu")
TOL = 1e-5


def settings(**kw) -> TrainSettings:
    base = dict(steps=6, batch_size=4, lr=1e-2, warmup=2, grad_clip=1.0, ema=0.9, weight_decay=0.01, seed=3,
                precision="fp32")
    return TrainSettings(**{**base, **kw})


def train(path, task=None, data=None, resume=None, **kw):
    t = Trainer(task or AETask(), data or random_dataset(), settings(**kw), str(path), resume=resume, device=CPU)
    return t, t.run()


def file_bytes(path) -> tuple[bytes, bytes]:
    return open(path, "rb").read(), open(state_path(str(path)), "rb").read()


def assert_same_state(a: str, b: str) -> None:
    sa, sb = load_state(state_path(a)), load_state(state_path(b))
    assert sa.step == sb.step
    assert max_diff(sa.nets["ae"], sb.nets["ae"]) <= TOL
    assert max_diff(sa.ema["ae"], sb.ema["ae"]) <= TOL
    oa, ob = sa.optim["ae"]["state"], sb.optim["ae"]["state"]
    assert oa.keys() == ob.keys() and len(oa) == 6  # 2 convs + norm, weight and bias
    for i in oa:
        assert max_diff({k: torch.as_tensor(v) for k, v in oa[i].items()},
                        {k: torch.as_tensor(v) for k, v in ob[i].items()}) <= TOL
    assert sa.history["loss"] == pytest.approx(sb.history["loss"], abs=TOL)


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("inference", [False, True], ids=["plain", "inference_mode"])
def test_resume_continues_the_same_run(tmp_path, inference):
    full, _ = train(tmp_path / "full.safetensors")
    half = str(tmp_path / "half.safetensors")
    _, r1 = train(half, steps=3)
    assert r1.step == 3
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode:  # as a ComfyUI node: the state is read and the run started inside inference mode
        state = check_resume(half, AETask.kind, AETask().arch())
        t2, r2 = train(half, resume=state, steps=3)
    assert (r2.path, r2.step, r2.steps_run) == (half, 6, 3)
    assert t2.run_id == state.run
    assert len(r2.history["loss"]) == 6
    assert r2.history["loss"] == pytest.approx(full.history["loss"], abs=TOL)
    assert_same_state(full.path, half)
    # the comparison can fail: another seed is another run
    _, other = train(tmp_path / "other.safetensors", steps=3, seed=4)
    assert max(abs(a - b) for a, b in zip(other.history["loss"], full.history["loss"])) > 1e-3


def test_same_seed_same_initial_weights_and_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = AETask(), AETask()
    train(tmp_path / "a.safetensors", task=a, steps=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    train(tmp_path / "b.safetensors", task=b, steps=1)
    assert max_diff(a.initial, b.initial) == 0.0
    c = AETask()
    train(tmp_path / "c.safetensors", task=c, steps=1, seed=9)
    assert max_diff(a.initial, c.initial) > 1e-3


def test_runs_inside_inference_mode_and_learns(tmp_path):
    task = AETask()
    with torch.inference_mode():
        data = random_dataset()  # an IMAGE batch made inside inference mode, as in ComfyUI
        t, r = train(tmp_path / "m.safetensors", task=task, data=data, steps=8, warmup=0)
    after = t.nets["ae"].state_dict()
    assert max_diff(task.initial, after) > 1e-3
    assert r.history["loss"][-1] < r.history["loss"][0]


# ------------------------------------------------------------------------------------------------ interruption


def test_interrupt_from_host_saves_the_last_step_then_resumes(tmp_path):
    full, _ = train(tmp_path / "full.safetensors")
    path = str(tmp_path / "cut.safetensors")
    host.clear_interrupt()

    def stop_at_2(_preview):
        if len(seen) == 1:
            host.request_interrupt()
        seen.append(1)

    seen: list[int] = []
    with pytest.raises(Interrupted):
        Trainer(AETask(), random_dataset(), settings(preview_every=1), path, device=CPU).run(stop_at_2)
    host.clear_interrupt()
    state = check_resume(path, AETask.kind, AETask().arch())
    assert state.step == 2 and len(state.history["loss"]) == 2
    _, r = train(path, resume=state, steps=4)
    assert r.step == 6
    assert_same_state(full.path, path)


class InterruptProcessingException(Exception):
    """What ComfyUI raises on Cancel (matched by name: the loop does not import comfy)."""


@pytest.mark.parametrize("exc", [Interrupted("stop"), InterruptProcessingException()], ids=["ctrl_c", "comfyui"])
def test_interrupt_inside_a_step_saves_the_previous_step(tmp_path, exc):
    path = str(tmp_path / "cut.safetensors")
    with pytest.raises(type(exc)):
        train(path, task=AETask(raise_at=3, exc=exc))
    state = load_state(state_path(path))
    assert state.step == 3 and len(state.history["loss"]) == 3
    full, _ = train(tmp_path / "full.safetensors", steps=3)
    assert_same_state(full.path, path)
    assert [f for f in listing(str(tmp_path)) if ".tmp" in f] == []


def test_other_errors_do_not_save(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError):
        train(path, task=AETask(raise_at=2, exc=ValueError("boom")))
    assert listing(str(tmp_path)) == []


# ------------------------------------------------------------------------------------------------ bad runs


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    path = str(tmp_path / "n.safetensors")
    kept = {}

    def snapshot(_preview):  # the checkpoint of step 2 is written just before this preview
        kept["files"] = file_bytes(path)

    t = Trainer(AETask(nan_at=3), random_dataset(), settings(save_every=2, preview_every=2), path, device=CPU)
    with pytest.raises(TrainingError) as e:
        t.run(snapshot)
    msg = str(e.value)
    assert "step 4" in msg and "nan" in msg.lower() and "step 2" in msg and "n.safetensors" in msg
    assert file_bytes(path) == kept["files"]
    assert load_state(state_path(path)).step == 2
    assert [f for f in listing(str(tmp_path)) if ".tmp" in f] == []


def test_nan_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(TrainingError, match="step 1:.*no checkpoint"):
        train(tmp_path / "n.safetensors", task=AETask(nan_at=0))
    assert listing(str(tmp_path)) == []


def test_foreign_output_is_never_overwritten(tmp_path):
    path = tmp_path / "digits.safetensors"
    path.write_bytes(b"someone else's model")
    _, r = train(path, steps=2)
    assert r.path == str(tmp_path / "digits_2.safetensors")
    assert path.read_bytes() == b"someone else's model"
    assert os.path.isfile(state_path(r.path)) and any("digits_2" in n for n in r.notes)
    # a state file of another run at the name also counts as foreign
    _, r3 = train(tmp_path / "digits_2.safetensors", steps=1)
    assert r3.path == str(tmp_path / "digits_2_2.safetensors")


def test_plan_output_continues_own_run_else_new_name(tmp_path):
    path = str(tmp_path / "p.safetensors")
    train(path, steps=2)
    arch = AETask().arch()
    same, state = plan_output(path, AETask.kind, arch, continue_run=True)
    assert same == path and state is not None and state.step == 2
    new, none = plan_output(path, AETask.kind, arch, continue_run=False)
    assert new == str(tmp_path / "p_2.safetensors") and none is None
    other, none = plan_output(path, AETask.kind, AETask(width=16).arch(), continue_run=True)
    assert other == str(tmp_path / "p_2.safetensors") and none is None


@pytest.mark.parametrize("fail_call", [1, 2], ids=["model_file", "state_file"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_call):
    import safetensors.torch as st

    path = str(tmp_path / "w.safetensors")
    train(path, steps=2)
    before, names = file_bytes(path), listing(str(tmp_path))
    real, calls = st.save_file, []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == fail_call:
            with open(filename, "wb") as f:  # a partial file, then the disk is full
                f.write(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", flaky)
    state = check_resume(path, AETask.kind, AETask().arch())
    with pytest.raises(OSError, match="No space"):
        train(path, resume=state, steps=2)
    assert file_bytes(path) == before
    assert listing(str(tmp_path)) == names  # no temporary file left
    monkeypatch.setattr(st, "save_file", real)
    _, r = train(path, resume=check_resume(path, AETask.kind, AETask().arch()), steps=2)
    assert r.step == 4


def test_resume_of_another_architecture_names_both(tmp_path):
    path = str(tmp_path / "a.safetensors")
    train(path, steps=1)
    with pytest.raises(InputError) as e:
        check_resume(path, AETask.kind, AETask(width=16).arch())
    msg = str(e.value)
    assert '"width": 8' in msg and '"width": 16' in msg and "a.safetensors" in msg
    state = load_state(state_path(path))
    with pytest.raises(InputError, match='"width": 8.*"width": 16'):
        Trainer(AETask(width=16), random_dataset(), settings(), str(tmp_path / "b.safetensors"), resume=state,
                device=CPU)
    with pytest.raises(InputError, match="no training state"):
        check_resume(str(tmp_path / "none.safetensors"), AETask.kind, AETask().arch())


# ------------------------------------------------------------------------------------------------ optimisation


def test_warmup_learning_rates_and_first_adam_step(tmp_path):
    task = AETask()
    t, _ = train(tmp_path / "w.safetensors", task=task, warmup=4, lr=1e-2, ema=0.0, weight_decay=0.0)
    assert task.seen_lr == pytest.approx([1e-2 * min(1.0, (s + 1) / 4) for s in range(6)], rel=1e-12)
    one = AETask()
    t1, _ = train(tmp_path / "w1.safetensors", task=one, steps=1, warmup=4, lr=1e-2, ema=0.0, weight_decay=0.0)
    # AdamW's first update is lr * g / (|g| + eps), i.e. lr/4 * sign(g) in warm-up step 1
    delta = torch.cat([(t1.nets["ae"].state_dict()[k] - one.initial[k]).abs().flatten() for k in one.initial])
    assert float(delta.median()) == pytest.approx(1e-2 / 4, rel=1e-3)


def test_gradient_clipping_bounds_the_norm(tmp_path):
    norms: list[float] = []

    def hook(opt, *_):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(tmp_path / "c.safetensors", task=AETask(loss_scale=1e3), grad_clip=0.5)
        clipped = list(norms)
        norms.clear()
        train(tmp_path / "u.safetensors", task=AETask(loss_scale=1e3), grad_clip=0.0)
    finally:
        handle.remove()
    assert len(clipped) == 6 and max(clipped) <= 0.5 * (1 + 1e-5)
    assert min(norms) > 1.0  # without clipping the same run has far bigger gradients


def test_progress_lines_in_the_log_without_a_bar(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loop_mod, "LOG_EVERY_STEPS", 2)
    monkeypatch.setattr(loop_mod, "LOG_EVERY_SECONDS", 0.0)
    shown: list[torch.Tensor] = []
    with caplog.at_level(logging.INFO, logger="atelier.models.train.loop"):
        t = Trainer(AETask(), random_dataset(), settings(steps=4, preview_every=3, precision="bf16"),
                    str(tmp_path / "l.safetensors"), device=CPU)
        r = t.run(shown.append)
    assert t.amp_dtype is None  # mixed precision on CUDA only: fp32 on the CPU
    assert len(shown) == 2 and shown[0].shape == (16, 3, 8, 8)  # step 3 and the last step
    assert torch.equal(r.preview, shown[-1])
    lines = [r.getMessage() for r in caplog.records if "step" in r.getMessage() and "steps/s" in r.getMessage()]
    assert any("step 2/4" in m and "loss" in m for m in lines) and any("step 4/4" in m for m in lines)


# ------------------------------------------------------------------------------------------------ diffusion file


def test_saved_diffusion_model_loads_through_the_manager_as_the_ema_net(manager, models_root):
    task = tiny_diffusion_task()
    data = random_dataset(8, size=8, channels=1)
    path = models_root / "diffusion_models" / "tiny.safetensors"
    t = Trainer(task, data, settings(steps=3, ema=0.5), str(path), device=CPU)
    r = t.run()
    assert r.preview is not None and r.preview.shape == (16, 1, 8, 8)
    listed = manager.list_models("diffusion_models")  # the pack's shipped models (pretrained/) come after it
    assert "tiny.safetensors" in listed and not any(n.startswith("tiny") and n != "tiny.safetensors" for n in listed)
    desc = manager.load("tiny.safetensors", "diffusion_models", family="diffusion")
    assert (desc.family, desc.architecture) == ("diffusion", "UNet2DModel")
    g = torch.Generator().manual_seed(0)
    x, tt = torch.randn((2, 1, 8, 8), generator=g), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        want = t.ema["unet"](x, tt, None)
        raw = t.nets["unet"](x, tt, None)
        got = desc.model.to(CPU)(x, tt, None)
    assert float((got - want).abs().max()) <= 1e-6
    assert float((raw - want).abs().max()) > 1e-4  # the file holds the EMA weights, not the raw ones
    assert load_state(state_path(str(path))).arch["unet"]["block_out_channels"] == [8, 16]


def test_resolution_the_unet_cannot_build():
    from atelier.models.diffusion.train import DiffusionTask

    with pytest.raises(InputError, match="multiple of 4; got 10"):
        DiffusionTask(resolution=10, channels=1, size="tiny")


def test_state_file_round_trip_is_exact(tmp_path):
    from atelier.models.train.checkpoint import TrainState, save_state

    hist = [0.1, 1 / 3, 2.0 ** -30 + 1.0]
    st = TrainState("k", {"a": 1}, "run1", 3, {"seed": 2}, {"loss": hist}, nets={"n": {"w": torch.arange(3.0)}},
                    optim={"n": {"param_groups": [{"lr": 0.1, "params": [0]}],
                                 "state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(3.0)}}}},
                    extra={"class_names": ["x"]}, scaler={"scale": 1024.0, "_growth_tracker": 7})
    p = str(tmp_path / "s.train-state")
    save_state(p, st)
    back = load_state(p)
    assert back.history["loss"] == hist  # float64: a resumed history equals an uninterrupted one bit for bit
    assert back.scaler == st.scaler and back.extra == st.extra and back.step == 3
    assert torch.equal(back.optim["n"]["state"][0]["exp_avg"], torch.ones(3))
    assert back.optim["n"]["param_groups"] == st.optim["n"]["param_groups"]
