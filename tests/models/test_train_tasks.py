"""The families' training tasks on the shared loop: the GAN (three losses, class-conditional) and the conv VAE (the
ELBO against torch.distributions), each trained a few steps at 8x8 and its file read back by the manager as the
family's model whose output equals the saved EMA network's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atelier.models.errors import InputError
from atelier.models.gan.train import GANTask
from atelier.models.manager import ModelManager
from atelier.models.train.loop import StepContext, Trainer, TrainSettings
from atelier.models.vae.train import VAETask
from helpers_train import random_dataset

CPU = torch.device("cpu")


def run(task, path, data, steps=3, **kw):
    s = TrainSettings(**{**dict(steps=steps, batch_size=4, lr=2e-3, ema=0.9, seed=1, precision="fp32"), **kw})
    with torch.inference_mode():  # as ComfyUI runs nodes: the loop leaves it
        trainer = Trainer(task, data, s, str(path), device=CPU)
        return trainer, trainer.run()


@pytest.mark.parametrize("loss", ["non_saturating", "hinge", "wgan_gp"])
def test_gan_task_trains_and_its_file_loads_as_the_ema_generator(tmp_path, loss):
    data = random_dataset(n=12, size=8, channels=1)
    data.labels, data.class_names = torch.arange(12) % 3, ("a", "b", "c")
    task = GANTask(resolution=8, channels=1, loss=loss, base_width=8, z_dim=6, class_names=data.class_names)
    trainer, result = run(task, tmp_path / "g.safetensors", data)
    assert result.step == 3 and set(result.history) == {"d_loss", "g_loss"}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.history.values())
    desc = ModelManager(models_root=str(tmp_path)).load(str(tmp_path / "g.safetensors"), family="gan")
    assert desc.architecture == "DCGAN" and desc.config["class_names"] == list(data.class_names)
    G = trainer.ema["G"].eval()
    z, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        want = (G(z, y) + 1) / 2
        got = desc.model.generate(z, F.one_hot(y, 3).float())
    assert torch.allclose(got.float(), want, atol=1e-4)


def test_gan_generator_step_leaves_no_gradient_in_the_discriminator(tmp_path):
    data = random_dataset(n=8, size=8, channels=1)
    task = GANTask(resolution=8, channels=1, base_width=8, z_dim=4)
    trainer, _ = run(task, tmp_path / "g.safetensors", data, steps=1)
    assert all(p.grad is None for p in trainer.nets["D"].parameters())
    assert all(p.requires_grad for p in trainer.nets["D"].parameters())


def test_gan_task_refuses_a_side_it_cannot_build():
    with pytest.raises(InputError, match="resolution"):
        GANTask(resolution=28, channels=1)


class _ZeroNoise:
    """A StepContext stand-in: z = the posterior mean, and the loss is captured instead of stepped."""

    step = 10**6

    def __init__(self, nets):
        self.nets = nets
        self.loss = None

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def randn(self, *shape):
        return torch.zeros(self._b, *shape)

    def backward(self, name, loss):
        self.loss = loss


@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_vae_loss_is_the_elbo(recon):
    task = VAETask(resolution=8, channels=1, width=8, latent_dim=4, reconstruction=recon, beta=0.5, kl_warmup=10)
    torch.manual_seed(0)
    vae = task.build(CPU)["vae"]
    x = torch.rand(3, 1, 8, 8)
    ctx = _ZeroNoise({"vae": vae})
    ctx._b = 3
    out = VAETask.train_step(task, ctx, x, None)
    mean, logvar = vae.encode_stats(x)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)  # [B]
    logits = vae.decode_logits(mean)
    if recon == "bce":
        rec = -torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(1).sum(1)
    else:
        rec = (torch.sigmoid(logits) - x).square().flatten(1).sum(1)
    want = (rec + 0.5 * kl).mean() / 64  # beta 0.5 after the warm-up, per pixel
    assert torch.allclose(ctx.loss, want, rtol=1e-5)
    assert float(out["kl"]) == pytest.approx(float(kl.mean()), rel=1e-5)
    assert task.kl_weight(0) == 0 and task.kl_weight(5) == pytest.approx(0.25)


def test_vae_task_trains_and_its_file_decodes_like_the_ema_network(tmp_path):
    data = random_dataset(n=12, size=8, channels=1)
    task = VAETask(resolution=8, channels=1, width=8, latent_dim=4)
    trainer, result = run(task, tmp_path / "v.safetensors", data)
    assert set(result.history) == {"loss", "recon", "kl"}
    desc = ModelManager(models_root=str(tmp_path)).load(str(tmp_path / "v.safetensors"), family="vae")
    z = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.allclose(desc.model.decode(z[:, :, None, None]), trainer.ema["vae"].eval().decode(z), atol=1e-5)
    assert result.preview is not None and result.preview.shape[1:] == (1, 8, 8)
