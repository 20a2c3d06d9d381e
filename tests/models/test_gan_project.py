"""GAN projection (models/gan/project.py): a generator's own images are recovered (PSNR goal), the structural term
equals scikit-image's SSIM, targets are prepared with a note, progress stops on interruption, and everything works
the way ComfyUI runs nodes (under torch.inference_mode, with the model loaded there too)."""
from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from atelier.models import host
from atelier.models.errors import InputError
from atelier.models.gan import project as P
from atelier.models.gan import sampling as S
from helpers_packages import package_file  # tests/ is on pytest's pythonpath

PSNR_GOAL = 25.0  # dB, the goal for projecting an image the model generated itself


def add_model(manager, src: pathlib.Path, name: str):
    shutil.copy(src, pathlib.Path(manager.models_root) / "gans" / name)
    return manager.load(name, "gans", family="gan")


def test_dcgan_faces_projection_recovers_its_own_images(manager):
    """Real weights, z space, run as ComfyUI runs nodes: the model is loaded and projected under inference_mode."""
    src = package_file("gan_face_generate", "weights.tar")
    with torch.inference_mode():
        faces = add_model(manager, src, "faces.tar")
        assert next(faces.model.parameters()).is_inference()
        lat = S.make_latent(manager, faces, seed=90210, batch_size=1)  # seeds far from the start search's
        target = S.sample(manager, faces, lat, truncation_psi=1.0)  # [1,3,64,64]
        res = P.project(manager, faces, target, steps=100, starts=64, restarts=4)
    print(f"DCGAN faces projection PSNR: {[round(v, 2) for v in res.psnr.tolist()]} dB (goal >= {PSNR_GOAL})")
    assert res.latent.space == "z" and res.latent.tensor.shape == (1, 100)
    assert res.psnr.min().item() >= PSNR_GOAL
    # the report is honest: re-rendering the latent through GAN Sample gives the same picture and PSNR
    again = S.sample(manager, faces, res.latent, truncation_psi=1.0)
    assert (again - res.image).abs().max().item() <= 1e-4
    assert torch.allclose(P.psnr(again, target), res.psnr, atol=0.01)
    assert res.losses[-1] < res.losses[0] and "PSNR" in res.note
    # control: a random face of the same model is far from the target (the metric separates)
    other = S.sample(manager, faces, S.make_latent(manager, faces, seed=1, batch_size=1), truncation_psi=1.0)
    assert P.psnr(other, target).max().item() < PSNR_GOAL - 8


def test_stylegan2_projection_in_w_and_w_plus(manager, shared_dir):
    """Tiny random-weight StyleGAN2 (NVIDIA golden config): the optimisation runs through the synthesis network
    (in-place ops, inference-mode weights) and gets far closer than its start, the mean w."""
    src = shared_dir / "golden" / "stylegan" / "sg2_orig_16.safetensors"
    if not src.is_file():
        pytest.skip("golden StyleGAN data missing")
    with torch.inference_mode():
        desc = add_model(manager, src, "sg2.safetensors")
        lat = S.make_latent(manager, desc, seed=500, batch_size=1, space="w")
        target = S.sample(manager, desc, lat, truncation_psi=0.5)
        mean = S.sample(manager, desc, lat, truncation_psi=0.0)  # the start: w_avg's image
        start_psnr = P.psnr(mean, target).item()
        for space in ("w", "w+"):
            res = P.project(manager, desc, target, space=space, steps=40)
            print(f"StyleGAN2 16px projection in {space}: {res.psnr.item():.2f} dB (start {start_psnr:.2f} dB)")
            assert res.latent.space == "w" and res.latent.tensor.shape == (1, desc.model.num_ws, 64)
            assert res.psnr.item() >= max(20.0, start_psnr + 8)
            if space == "w":  # one w repeated over the layers
                assert torch.equal(res.latent.tensor[:, 0], res.latent.tensor[:, -1])


def test_projection_of_conditional_model_finds_the_class(manager, shared_dir):
    """z space of a conditional StyleGAN2 with class_label -1: the start search picks a class per target."""
    src = shared_dir / "golden" / "stylegan" / "sg2_cond_16.safetensors"
    if not src.is_file():
        pytest.skip("golden StyleGAN data missing")
    desc = add_model(manager, src, "cond.safetensors")
    target = S.sample(manager, desc, S.make_latent(manager, desc, 7, 1, "z", class_label=2), truncation_psi=0.7)
    res = P.project(manager, desc, target, space="z", steps=3, starts=8, restarts=2)
    assert res.latent.labels is not None and res.latent.labels.shape == (1, 4)
    assert (S.sample(manager, desc, res.latent, truncation_psi=1.0) - res.image).abs().max().item() <= 1e-4
    with pytest.raises(InputError, match=r"class_label: .*4 classes"):
        P.project(manager, desc, target, space="z", steps=1, class_label=4)


def test_ssim_equals_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 48, 40, generator=g)
    y = (x + 0.15 * torch.randn(1, 3, 48, 40, generator=g)).clamp(0, 1)
    ref = metrics.structural_similarity(x[0].numpy(), y[0].numpy(), channel_axis=0, data_range=1.0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    ours = P.ssim(x, y).item()
    assert abs(ours - ref) <= 1e-4, (ours, ref)
    assert P.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert P.structure_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert P.structure_loss(x, y).item() > 0.1


def test_prepare_target_crops_resizes_and_says_so():
    img = torch.rand(2, 4, 90, 120)  # RGBA, landscape
    out, note = P.prepare_target(img, 64, 3)
    assert out.shape == (2, 3, 64, 64)
    assert "centre-cropped to 90x90" in note and "resized from 90x90 to 64x64" in note and "alpha" in note
    grey, note = P.prepare_target(torch.rand(1, 3, 28, 28), 28, 1)
    assert grey.shape == (1, 1, 28, 28) and note == ""
    with pytest.raises(InputError, match="image: expected an image batch"):
        P.prepare_target(torch.rand(3, 8, 8), 8, 3)


def test_projection_reports_progress_and_stops_on_interrupt(manager):
    faces = add_model(manager, package_file("gan_face_generate", "weights.tar"), "faces.tar")
    target = S.sample(manager, faces, S.make_latent(manager, faces, 5, 1), truncation_psi=1.0)
    seen: list[int] = []
    P.project(manager, faces, target, steps=4, starts=4, restarts=2, callback=lambda s, loss: seen.append(s))
    assert seen == [0, 1, 2, 3]

    from atelier.models.errors import Interrupted

    def cancel_at_two(step: int, loss: float) -> None:  # the user presses Cancel while step 2 is reported
        seen.append(step)
        if step == 2:
            host.request_interrupt()

    seen.clear()
    try:
        with pytest.raises(Interrupted):
            P.project(manager, faces, target, steps=50, starts=4, restarts=1, callback=cancel_at_two)
    finally:
        host.clear_interrupt()
    assert seen == [0, 1, 2]


def test_projection_inputs_checked(manager):
    faces = add_model(manager, package_file("gan_face_generate", "weights.tar"), "faces.tar")
    target = torch.rand(1, 3, 64, 64)
    with pytest.raises(InputError, match=r"space: .*has no w space"):
        P.project(manager, faces, target, space="w+", steps=1)
    with pytest.raises(InputError, match="space: expected one of"):
        P.project(manager, faces, target, space="q", steps=1)
    with pytest.raises(InputError, match="steps"):
        P.project(manager, faces, target, steps=0)
    with pytest.raises(InputError, match="learning_rate"):
        P.project(manager, faces, target, steps=1, lr=-1)
    with pytest.raises(InputError, match=r"class_label: .*unconditional"):
        P.project(manager, faces, target, steps=1, class_label=3)


def test_stylegan3_gradients_flow_under_inference_mode(manager, shared_dir):
    """StyleGAN3 (filtered leaky ReLU with in-place ops, no noise inputs), loaded under inference mode as ComfyUI
    does: the loss has a finite, non-zero gradient in w+ and a small step against it lowers the loss."""
    src = shared_dir / "golden" / "stylegan" / "sg3_t_cond_clamp_16.safetensors"
    if not src.is_file():
        pytest.skip("golden StyleGAN data missing")
    with torch.inference_mode():
        desc = add_model(manager, src, "sg3.safetensors")
        target = S.sample(manager, desc, S.make_latent(manager, desc, 5, 1, "w", class_label=1), truncation_psi=0.5)
    g = desc.model
    with torch.inference_mode(False), torch.enable_grad():
        render = P._renderer(g, "w+", "const")
        p = g.w_avg.clone().view(1, 1, -1).repeat(1, g.num_ws, 1).requires_grad_(True)
        tgt = target.clone()
        loss = P.projection_loss(render(p, None), tgt).sum()
        loss.backward()
        grad = p.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        with torch.no_grad():
            stepped = P.projection_loss(render(p - 0.05 * grad / grad.norm(), None), tgt).sum()
    assert stepped < loss.detach()
