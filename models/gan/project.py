"""GAN inversion: find the latent whose image matches a target, by optimisation (no downloaded network).

    res = project(manager, desc, target, space="w", steps=300)      # target [B,C,H,W] in 0..1
    res.latent, res.image, res.psnr, res.note

Adam on w (one w for every layer, NVIDIA's projector), w+ (one per layer), or z (the only space of DCGAN/MLP
generators), after Karras et al. 2020 ("Analyzing and Improving the Image Quality of StyleGAN", appendix D): the
start is the best of the mean w and a few random latents, the learning rate ramps up then down (cosine), and w gets a
decaying exploration noise during the first three quarters. The loss replaces their VGG/LPIPS distance by terms that
need nothing downloaded: mean squared error, L1, and a multi-scale structural term (1 - SSIM, Wang et al. 2004,
averaged over three scales as in MS-SSIM, Wang et al. 2003). Inside ComfyUI nodes run under `torch.inference_mode`;
the optimisation leaves it and uses normal clones of the weights where they are inference tensors.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from ..descriptor import ModelDescriptor
from ..errors import InputError
from ..manager import ModelManager, placement
from ..image import match_channels, split_alpha
from ..progress import Progress, interruptible
from .sampling import GANLatent, check_generator, class_labels, model_identity, model_name, resolve_space

log = logging.getLogger(__name__)

PROJECT_SPACES = ("auto", "w", "w+", "z")
# Defaults per space. z: small z-only generators (DCGAN/MLP) are cheap to evaluate and their z landscape has many
# poor basins, so a wide start search and more restarts pay; w: the mean w is already a good start (NVIDIA uses it).
_AUTO = {"z": {"lr": 0.2, "starts": 256, "restarts": 8}, "w": {"lr": 0.1, "starts": 32, "restarts": 4}}


@dataclass
class Projection:
    latent: GANLatent  # the found latent ("w": [B,num_ws,w_dim], "z": [B,z_dim])
    image: torch.Tensor  # [B,C,res,res] in 0..1: what the latent generates (noise_mode const)
    target: torch.Tensor  # [B,C,res,res] in 0..1: the target as compared (after any resizing)
    psnr: torch.Tensor  # [B] dB between image and target
    losses: list[float] = field(default_factory=list)  # total loss per step
    note: str = ""


# ----------------------------------------------------------------------------------------------------------------
# target and loss


def prepare_target(image: torch.Tensor, resolution: int, channels: int, name: str = "image"
                   ) -> tuple[torch.Tensor, str]:
    """image [B,C,H,W] in 0..1 -> [B,channels,res,res]: alpha dropped, centre-cropped to square, resized; and a
    note saying what was done ("" when nothing was)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
        got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{name}: expected an image batch [B,C,H,W], got {got}")
    notes = []
    x, alpha = split_alpha(image.float())
    if alpha is not None:
        notes.append("alpha ignored")
    x = match_channels(x, channels)
    H, W = x.shape[-2:]
    if H != W:
        s = min(H, W)
        top, left = (H - s) // 2, (W - s) // 2
        x = x[..., top : top + s, left : left + s]
        notes.append(f"{name} {W}x{H} centre-cropped to {s}x{s} (the model makes square images)")
    if x.shape[-1] != resolution:
        side = x.shape[-1]
        mode = "area" if side > resolution else "bicubic"
        kw = {} if mode == "area" else {"align_corners": False}
        x = F.interpolate(x, size=(resolution, resolution), mode=mode, **kw).clamp(0, 1)
        notes.append(f"{name} resized from {side}x{side} to {resolution}x{resolution}, the model's size (the result "
                     "is at that size; upscale it afterwards if needed)")
    return x.contiguous(), "; ".join(notes)


def _gauss(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:  # [B]
    """Mean SSIM of x, y [B,C,H,W] in 0..1 (Gaussian window, valid region; the window shrinks for small images)."""
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    k1 = _gauss(size, sigma * size / window, x.device, x.dtype)
    c = x.shape[1]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # one grouped blur for all five maps
    kh = k1.view(1, 1, -1, 1).repeat(5 * c, 1, 1, 1)
    kw = k1.view(1, 1, 1, -1).repeat(5 * c, 1, 1, 1)
    mx, my, xx, yy, xy = F.conv2d(F.conv2d(stack, kh, groups=5 * c), kw, groups=5 * c).chunk(5, dim=1)
    sxx, syy, sxy = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def structure_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 3) -> torch.Tensor:  # [B]
    """1 - SSIM averaged over `scales` halvings (as many as the image allows, down to 8 pixels)."""
    total, n = x.new_zeros(x.shape[0]), 0
    for s in range(scales):
        if s and min(x.shape[-2:]) < 16:
            break
        if s:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        total = total + (1 - ssim(x, y))
        n += 1
    return total / n


def projection_loss(x: torch.Tensor, y: torch.Tensor, l1_weight: float = 0.1, ssim_weight: float = 0.05
                    ) -> torch.Tensor:  # [B]
    """Per-image loss: MSE + l1_weight * L1 + ssim_weight * multi-scale (1 - SSIM); x, y in 0..1."""
    # a pixel the target has saturated (at 0 or 1) is matched by any value beyond it: GAN outputs are not clamped
    x = torch.where(((x > 1) & (y >= 1)) | ((x < 0) & (y <= 0)), y, x)
    d = x - y
    loss = d.square().flatten(1).mean(1)
    if l1_weight:
        loss = loss + l1_weight * d.abs().flatten(1).mean(1)
    if ssim_weight:
        loss = loss + ssim_weight * structure_loss(x, y)
    return loss


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [B] dB for images in 0..1
    mse = (x.float() - y.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


# ----------------------------------------------------------------------------------------------------------------
# the generator as a differentiable function


# In-place arithmetic the inference engines use on fresh intermediates, and its out-of-place equivalents.
_OUT_OF_PLACE: dict[str, Callable] = {
    "add_": torch.add, "sub_": torch.sub, "mul_": torch.mul, "div_": torch.div, "clamp_": torch.clamp,
    "clamp_min_": torch.clamp_min, "clamp_max_": torch.clamp_max, "neg_": torch.neg, "addcmul_": torch.addcmul,
    "leaky_relu_": F.leaky_relu, "relu_": torch.relu, "tanh_": torch.tanh, "sigmoid_": torch.sigmoid,
}


class _OutOfPlace(TorchFunctionMode):
    """Runs in-place arithmetic out of place while gradients are recorded.

    The generators overwrite intermediates in place for speed (`x = F.leaky_relu_(x); x = x.mul_(gain)`), which
    autograd refuses when a later in-place op overwrites a tensor an earlier op saved for backward. Every such call in
    them uses the returned tensor, so returning a new tensor instead keeps the result and makes it differentiable.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        repl = _OUT_OF_PLACE.get(getattr(func, "__name__", ""))
        if repl is not None and torch.is_grad_enabled():
            return repl(*args, **kwargs)
        return func(*args, **kwargs)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Normal clones of the module's inference-mode tensors (ComfyUI loads under inference_mode); None if none."""
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    if not any(t.is_inference() for t in named.values()):
        return None
    return {k: t.clone() if t.is_inference() else t for k, t in named.items()}


def _call(module: torch.nn.Module, weights: dict[str, torch.Tensor] | None, prefix: str, *args, **kwargs):
    sub = module.get_submodule(prefix) if prefix else module
    if weights is None:
        return sub(*args, **kwargs)
    cut = len(prefix) + 1 if prefix else 0
    own = {k[cut:]: v for k, v in weights.items() if not prefix or k.startswith(prefix + ".")}
    return functional_call(sub, own, args, kwargs)


def _renderer(model: torch.nn.Module, space: str, noise_mode: str
              ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """(latent parameter, labels) -> image in [0,1] units (not clamped, so gradients flow)."""
    weights = _weights(model)
    lo, hi = model.output_range

    def render(p: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with _OutOfPlace():
            if space in ("w", "w+"):
                ws = p.expand(-1, model.num_ws, -1) if space == "w" else p  # [B,num_ws,w_dim]
                img = _call(model, weights, "synthesis", ws, noise_mode=noise_mode)
            else:
                img = _call(model, weights, "", p, labels, noise_mode=noise_mode)
        return (img.float() - lo) / (hi - lo)

    return render


# ----------------------------------------------------------------------------------------------------------------
# projection


def _check_space(desc: ModelDescriptor, space: str) -> str:
    if space not in PROJECT_SPACES:
        raise InputError(f"space: expected one of {PROJECT_SPACES}, got {space!r}")
    if space == "w+":
        resolve_space(desc, "w")
        return "w+"
    return resolve_space(desc, space)


def _candidates(model: torch.nn.Module, space: str, n: int, seed: int, labels: torch.Tensor | None,
                c_dim: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Starting points: (latents [n, ...] on dev, their labels [n,c_dim] or None); w spaces include the mean w."""
    gen = torch.Generator().manual_seed((int(seed) * 2654435761 + 97) % 2**64)  # not GAN Latent's seed streams
    z = torch.randn(n, model.z_dim, generator=gen).to(dev)  # [n,z_dim]
    if labels is None and c_dim:
        lab = class_labels(c_dim, -1, seed, n).to(dev)  # a class per candidate: the search finds the target's
    else:
        lab = None if labels is None else labels[:1].expand(n, -1).to(dev)
    if space == "z":
        return z, lab
    with torch.no_grad():
        w = model.mapping(z, lab)[:, :1]  # [n,1,w_dim]
    w = torch.cat([model.w_avg.float().view(1, 1, -1), w[:-1]])
    return (w if space == "w" else w.expand(-1, model.num_ws, -1)).contiguous(), lab


def _best_starts(render, model, space, target, starts, k, seed, labels, c_dim, dev, known=None):
    """Per target, the k candidates with the lowest loss: (starts [B*k,...], labels [B*k,c_dim] | None), k per
    target in a row."""
    B = target.shape[0]
    if labels is not None and B > 1 and (labels != labels[:1]).any():  # different classes: one search each
        per = [_best_starts(render, model, space, target[i : i + 1], starts, k, seed, labels[i : i + 1], c_dim, dev,
                            None if known is None else known[i : i + 1]) for i in range(B)]
        return torch.cat([p[0] for p in per]), torch.cat([p[1] for p in per])
    cand, lab = _candidates(model, space, starts, seed, labels, c_dim, dev)
    scores = []
    with torch.no_grad():
        for i in range(0, starts, 32):
            img = render(cand[i : i + 32], lab[i : i + 32] if lab is not None else None)  # [n,C,H,W]
            scores.append(torch.stack([projection_loss(_known_only(img, t, None if known is None else known[j]),
                                                       t.expand_as(img)) for j, t in enumerate(target)]))  # [B,n]
    top = torch.cat(scores, 1).topk(min(k, starts), dim=1, largest=False).indices.flatten()  # [B*k]
    return cand[top].clone(), None if lab is None else lab[top].clone()


def _lr_at(t: float, lr: float) -> float:
    """NVIDIA's schedule: ramp up over the first 5 %, cosine down over the last 25 %."""
    ramp = min(1.0, (1.0 - t) / 0.25)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return lr * ramp * min(1.0, t / 0.05)


def _w_std(model: torch.nn.Module, dev: torch.device, samples: int = 2000) -> float:
    """Spread of w around its mean, for the exploration noise's scale."""
    g = torch.Generator().manual_seed(123)
    z = torch.randn(samples, model.z_dim, generator=g).to(dev)
    c = None
    if model.c_dim:
        c = F.one_hot(torch.arange(samples) % model.c_dim, model.c_dim).float().to(dev)
    with torch.no_grad():
        w = model.mapping(z, c)[:, 0]
    return float(((w - model.w_avg.float()).square().sum() / samples).sqrt())


@dataclass
class _Problem:
    render: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    target: torch.Tensor  # [N,C,H,W], N = targets * restarts (each target k times in a row)
    labels: torch.Tensor | None  # [N,c_dim]
    l1_weight: float
    ssim_weight: float
    known: torch.Tensor | None = None  # [N,1,H,W] 1 where the target is known (masked projection)

    def loss(self, p: torch.Tensor) -> torch.Tensor:  # [N]
        return projection_loss(_known_only(self.render(p, self.labels), self.target, self.known), self.target,
                               self.l1_weight, self.ssim_weight)

    def keep(self, rows: torch.Tensor) -> None:
        self.target = self.target[rows]
        self.labels = None if self.labels is None else self.labels[rows]
        self.known = None if self.known is None else self.known[rows]


def _known_only(x: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    """x where the target is known, the target itself elsewhere: unknown pixels add nothing to the loss."""
    return x if known is None else known * x + (1 - known) * target


def _prune(prob: _Problem, param: torch.Tensor, opt: torch.optim.Adam, k: int
           ) -> tuple[torch.Tensor, torch.optim.Adam, torch.Tensor]:
    """Keep each target's best of its k rows (Adam's moments too). Returns (param, optimiser, kept rows)."""
    with torch.no_grad():
        loss = prob.loss(param).view(-1, k)  # [B,k], noise-free
    rows = loss.argmin(1) + torch.arange(loss.shape[0], device=loss.device) * k  # [B]
    new = param.detach()[rows].clone().requires_grad_(True)
    new_opt = torch.optim.Adam([new], lr=opt.param_groups[0]["lr"], betas=opt.param_groups[0]["betas"])
    state = opt.state.get(param)
    if state:
        new_opt.state[new] = {key: (v[rows].clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                              for key, v in state.items()}
    prob.keep(rows)
    return new, new_opt, rows


def _optimise(prob: _Problem, start: torch.Tensor, steps: int, lr: float, k: int, noise_scale: float,
              callback: Callable[[int, float], None] | None) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Adam from `start` [B*k,...]; the k restarts per target are cut to the best after a quarter of the steps.
    Returns (best latent per target [B,...], total loss per step, kept rows of the start [B])."""
    param = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr, betas=(0.9, 0.999))
    rows = torch.arange(start.shape[0], device=start.device)
    prune_at = steps // 4 if k > 1 else None  # < steps, so pruning always happens when k > 1
    best, best_loss, losses = None, None, []
    with Progress(steps, "GAN projection") as bar:
        for step in range(steps):
            if step == prune_at:
                param, opt, kept = _prune(prob, param, opt, k)
                rows = rows[kept]
            t = step / steps
            for group in opt.param_groups:
                group["lr"] = _lr_at(t, lr)
            strength = noise_scale * max(0.0, 1.0 - t / 0.75) ** 2
            loss = prob.loss(param + torch.randn_like(param) * strength if strength else param)  # [N]
            if strength == 0 and (prune_at is None or step >= prune_at):  # the best noise-free point per target
                best, best_loss = _track(best, best_loss, param, loss)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            losses.append(float(loss.detach().sum()))
            if callback is not None:
                callback(step, losses[-1])
            bar.update()
    with torch.no_grad():
        best, _ = _track(best, best_loss, param, prob.loss(param))
    return best, losses, rows


def _track(best: torch.Tensor | None, best_loss: torch.Tensor | None, param: torch.Tensor, loss: torch.Tensor):
    cur, cur_loss = param.detach(), loss.detach()
    if best is None:
        return cur.clone(), cur_loss.clone()
    better = cur_loss < best_loss
    best = best.clone()
    best[better] = cur[better]
    return best, torch.where(better, cur_loss, best_loss)


def _known(mask: torch.Tensor, B: int, size: torch.Size, resolution: int) -> torch.Tensor:  # -> [B,1,res,res]
    """1 - mask, cropped and resized like the target (prepare_target)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (3, 4) or mask.shape[0] not in (1, B) \
            or tuple(mask.shape[-2:]) != tuple(size):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"mask: expected [B|1,H,W] matching the image ({size[-1]}x{size[-2]}, batch {B}), got {got}")
    m = mask.float().reshape(mask.shape[0], 1, *mask.shape[-2:]).clamp(0, 1)
    m, _ = prepare_target(m, resolution, 1, "mask")
    return (1 - m).expand(B, -1, -1, -1).contiguous()


def project(
    manager: ModelManager,
    desc: ModelDescriptor,
    image: torch.Tensor,  # [B,C,H,W] in 0..1
    *,
    space: str = "auto",  # "auto" (w where the model has one, else z), "w", "w+", "z"
    steps: int = 300,
    lr: float | None = None,  # Adam's peak learning rate; None: 0.1 in w (NVIDIA's), 0.2 in z
    class_label: int = -1,  # conditional models in z: the target's class, -1 = found by the start search
    seed: int = 0,  # random starting candidates
    starts: int | None = None,  # candidates tried before optimising (w: the mean w is one); None: z 256, w 32
    restarts: int | None = None,  # best candidates optimised per target for the first quarter; None: z 8, w 4
    l1_weight: float = 0.1,
    ssim_weight: float = 0.05,
    noise_mode: str = "const",
    callback: Callable[[int, float], None] | None = None,  # (step, total loss) after every step
    mask: torch.Tensor | None = None,  # [B|1,H,W] 1 = unknown: only the known pixels are fitted (inpainting)
) -> Projection:
    """Invert `image` into the generator's latent space. See the module docstring. With `mask`, the loss sees only
    the pixels where the mask is 0 (Yeh et al. 2017's context loss), so the generator fills the rest."""
    g = check_generator(desc)
    space = _check_space(desc, space)
    if steps < 1:
        raise InputError(f"steps: expected at least 1, got {steps}")
    auto = _AUTO["z" if space == "z" else "w"]
    lr = auto["lr"] if lr is None or lr == 0 else float(lr)
    starts = auto["starts"] if starts is None else int(starts)
    restarts = auto["restarts"] if restarts is None else int(restarts)
    if not lr > 0:
        raise InputError(f"learning_rate: expected a positive number (or 0 for automatic), got {lr}")
    target, note = prepare_target(image, g.img_resolution, g.img_channels)
    B, k = target.shape[0], max(1, min(int(restarts), int(starts)))
    known = None if mask is None else _known(mask, B, image.shape[-2:], g.img_resolution)
    what = f"{model_name(desc)} ({desc.architecture})"
    # -1 on a conditional model: the start search tries random classes and keeps the best ones per target
    labels = None if g.c_dim and class_label == -1 else class_labels(g.c_dim, class_label, seed, B, what)
    if note:
        log.info("GAN projection: %s", note)
    with manager.use(desc) as model, torch.inference_mode(False), torch.enable_grad(), interruptible(model):
        dev = placement(model)[0]
        tgt = target.clone().to(dev)  # a normal tensor (not an inference one)
        render = _renderer(model, space, noise_mode)
        kn = None if known is None else known.clone().to(dev)
        start, lab = _best_starts(render, model, space, tgt, max(starts, k), k, seed,
                                  None if labels is None else labels.clone().to(dev), g.c_dim, dev, kn)
        prob = _Problem(render, tgt.repeat_interleave(k, 0), lab, l1_weight, ssim_weight,
                        None if kn is None else kn.repeat_interleave(k, 0))
        noise_scale = 0.05 * _w_std(model, dev) if space in ("w", "w+") else 0.0
        best, losses, rows = _optimise(prob, start, steps, lr, k, noise_scale, callback)
        lab = None if lab is None else lab[rows]
        with torch.no_grad():
            if space in ("w", "w+"):
                best = best.expand(-1, g.num_ws, -1)
            img = render(best, lab).clamp(0, 1)  # render() is already in 0..1 units
    latent = GANLatent(best.float().cpu().contiguous(), "z" if space == "z" else "w", model_identity(desc),
                       model_name(desc), None if lab is None else lab.float().cpu())
    img, tgt_cpu = img.float().cpu(), target.float().cpu()
    score = psnr(img, tgt_cpu)
    note = "; ".join(filter(None, [note, "PSNR " + ", ".join(f"{v:.1f}" for v in score.tolist()) + " dB"]))
    return Projection(latent, img, tgt_cpu, score, losses, note)


def complete(
    manager: ModelManager,
    desc: ModelDescriptor,
    image: torch.Tensor,  # [B,C,H,W] in 0..1
    mask: torch.Tensor,  # [B|1,H,W] 1 = the hole
    *,
    blend: int = 4,
    **project_kw,
) -> tuple[torch.Tensor, Projection]:  # ([B,C,H,W] float32, the projection)
    """Semantic inpainting by projection (Yeh et al. 2017): fit the latent to the known pixels only, then paste
    the generator's image into the hole with `masks.edge_blend(mask, blend)` (a ramp `blend` pixels inside the
    hole's edge; the pixels outside the hole are returned exactly). A non-square image is filled inside its centre
    square (what the generator sees); the generator's image is resized back to that square."""
    from .. import masks as M
    from ..image import match_channels, split_alpha

    res = project(manager, desc, image, mask=mask, **project_kw)
    B, C, H, W = image.shape
    m = M.as_mask(mask).clamp(0, 1).expand(B, H, W).to(image.device, torch.float32)
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    colour, alpha = split_alpha(image.float())
    gen = F.interpolate(res.image, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1) \
        if res.image.shape[-1] != s else res.image
    gen = match_channels(gen.to(image.device), colour.shape[1])
    fill = colour.clone()
    fill[..., top : top + s, left : left + s] = gen
    wgt = M.edge_blend(m, blend)[:, None]  # [B,1,H,W], 0 outside the hole
    inside = torch.zeros_like(wgt)
    inside[..., top : top + s, left : left + s] = 1
    wgt = wgt * inside
    out = torch.where(wgt > 0, colour * (1 - wgt) + fill * wgt, colour.float())
    if alpha is not None:
        out = torch.cat([out, alpha], 1)
    if bool(((m > 0)[:, None] & (inside == 0)).any()):
        res.note = "; ".join(filter(None, [res.note, "hole pixels outside the centre square left as they were"]))
    return out, res
