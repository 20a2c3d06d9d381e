"""Small building blocks the diffusion UNets share (diffusers UNet2DModel and OpenAI ADM): lean, allocation-light.

- `norm_silu`: GroupNorm then SiLU in place (one fewer full-size tensor per residual block).
- `attention`: multi-head self-attention through F.scaled_dot_product_attention; the softmax is in float32
  (q, k, v upcast where the backend has no fused fp32-accumulating kernel: CPU and MPS in half precision).
- `cpu_layout`: channels-last activations, plus Winograd 3x3 convolutions on the CPU (NNPACK's on one thread, our
  GEMM-based ones on more where they measure faster), set once at load.
- `SinusoidalEmbedding`: the DDPM/ADM timestep embedding with its frequencies precomputed (a float32 buffer that
  stays float32 when the module is cast to half precision; not in the state dict).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu_conv import use_nnpack_alone, use_winograd
from ..manager import get_manager


def cpu_layout(model: nn.Module) -> nn.Module:
    """Give a UNet (with a `use_channels_last(on)` method) its layout, once, at load: channels-last activations
    (faster convolutions on CPU and GPU), and Winograd 3x3 convolutions when the manager computes on the CPU:
    NNPACK's where `use_nnpack_alone` applies (one thread), else `use_winograd` (the products through PyTorch's own
    GEMMs, in its own pool, for the shapes where that measures faster than oneDNN on the machine itself; the calls
    too small for it, the deep levels at small batches, take oneDNN with weights packed once per node run). NNPACK
    reads NCHW: `conv3x3` converts its input and weight per call, which costs less than keeping the whole model in
    NCHW (oneDNN then reorders every other layer's weights per call: 0.86 against 0.77 of diffusers' time at batch
    1, bench/unet_forward.py)."""
    device = get_manager().compute_device
    if not use_nnpack_alone(model, device) and device.type == "cpu":
        use_winograd(model)
    return model.use_channels_last()


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient is recorded (inference)."""
    return F.silu(x, inplace=not (x.requires_grad and torch.is_grad_enabled()))


def norm_silu(x: torch.Tensor, norm: nn.GroupNorm, fp32: bool = False) -> torch.Tensor:
    """silu(group_norm(x)) [B,C,H,W]; `fp32`: normalise in float32 and cast back (ADM's GroupNorm32)."""
    return silu(group_norm(x, norm, fp32))


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, fp32: bool = False) -> torch.Tensor:
    if fp32 and x.dtype != torch.float32:
        return F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v [B,heads,T,d], softmax in float32."""
    if q.dtype != torch.float32 and q.device.type != "cuda":
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class SinusoidalEmbedding(nn.Module):
    """t [B] (float timesteps) -> [B,dim] = cat(sin(t f), cos(t f)) (cos first when `flip_sin_to_cos`).

    f_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)), i = 0..dim/2-1: diffusers' `get_timestep_embedding`
    (`downscale_freq_shift`), which with flip_sin_to_cos=True and freq_shift=0 is also guided-diffusion's.
    """

    def __init__(self, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                 max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift, self.max_period = dim, flip_sin_to_cos, freq_shift, max_period
        self.register_buffer("freqs", self._freqs(torch.device("cpu")), persistent=False)

    def _freqs(self, device: torch.device) -> torch.Tensor:
        half = self.dim // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=device)
        return torch.exp(exponent / (half - self.freq_shift))

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """Recompute the frequencies (after building on the meta device)."""
        self.freqs = self._freqs(device or torch.device("cpu"))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:  # .half()/.to(dtype): keep the frequencies exact
            self.freqs = self._freqs(self.freqs.device)
        return self

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B,dim] float32
        args = t.float()[:, None] * self.freqs[None]
        sin, cos = torch.sin(args), torch.cos(args)
        emb = torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb
