"""The memory policy for sizes a user chooses: know what a request needs before allocating it, refuse what cannot fit.

    budget.require(budget.tensor_bytes(B, 3, H, W) * 2, "VAE Decode: 4 images of 8192x8192", "cpu")

Every family that allocates by a user-given size (image sides, batch sizes, steps) calls `require` with its estimate
before the first allocation; the error says how much the request needs and how much there is, so the user can
change the size instead of watching the machine swap or the process die. Working memory of a model pass (activations,
tiles) is not this module's business: the tiling engine and `ModelManager.activation_budget` size those to fit.
"""
from __future__ import annotations

import math

import torch

from . import host
from .errors import MemoryBudgetError

# Part of the free memory one request may claim: the rest stays for the process's other allocations (the model's
# working set, the host's own buffers, copies made on the way out).
SHARE = 0.85


def tensor_bytes(*shape: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a dense tensor of `shape` and `dtype`."""
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def available(device: torch.device | str = "cpu") -> int:
    """Bytes one request may use on `device`: SHARE of what is free there (RAM available on the CPU)."""
    return int(host.free_bytes(torch.device(device)) * SHARE)


def require(bytes_needed: float, what: str, device: torch.device | str = "cpu", *, hint: str = "") -> None:
    """Raise MemoryBudgetError when `what` needs more than `available(device)`.

    `what` names the request the way the user set it up ("VAE Sample: 4096 latents of 16384x16384"); `hint` says
    what to change."""
    dev = torch.device(device)
    have = available(dev)
    if bytes_needed > have:
        where = "RAM" if dev.type == "cpu" else f"memory on {dev}"
        raise MemoryBudgetError(f"{what} needs about {format_bytes(bytes_needed)} of {where}; "
                                f"{format_bytes(have)} is free for it" + (f". {hint}" if hint else ""))
