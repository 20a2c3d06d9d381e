"""One progress helper for every long loop: ComfyUI's ProgressBar and interruption inside ComfyUI, tqdm outside."""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

import torch

from . import host

log = logging.getLogger(__name__)

_SETTINGS = {"bars": None}  # None: tqdm decides (shown on a terminal); True: always; False: never
_OPEN = threading.local()  # enabled bars open on this thread (`no_bar_open`)


def show_bars(show: bool | None) -> None:
    """Outside ComfyUI: show the inner bars (tiles, steps) always (True), never (False), or on a terminal only
    (None, the default). The CLI's --progress calls this once; nothing reads the environment."""
    _SETTINGS["bars"] = show


class Progress:
    """`with Progress(total, "tiles") as p: ... p.update()`: advances the bar and stops on a user interrupt.

    Inside ComfyUI, `update` reports websocket progress and raises ComfyUI's InterruptProcessingException when the
    user pressed Cancel; outside it, a tqdm bar (hidden when stderr is not a terminal unless `show_bars(True)`) and
    Ctrl-C as usual.
    """

    def __init__(self, total: int, desc: str = "", *, enabled: bool = True) -> None:
        self.total = max(1, int(total))
        self.value = 0
        self._enabled = enabled
        self._counted = False
        self._comfy = host.progress_bar(self.total) if enabled else None
        self._tqdm = None
        show = _SETTINGS["bars"]
        if enabled and self._comfy is None and self.total > 1 and show is not False:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc or None, leave=False, disable=None if show is None else False)

    def __enter__(self) -> "Progress":
        host.throw_if_interrupted()
        if self._enabled:
            _OPEN.n = getattr(_OPEN, "n", 0) + 1
            self._counted = True
        return self

    @property
    def shows_previews(self) -> bool:
        """Whether a preview passed to `update` is shown (inside ComfyUI): build one only then."""
        return self._comfy is not None

    def update(self, n: int = 1, preview: "torch.Tensor | None" = None) -> None:
        """Advance by n; `preview` [H,W,3] in 0..1 is shown in the node inside ComfyUI."""
        self.value = min(self.total, self.value + n)
        if self._comfy is not None:
            self._comfy.update_absolute(self.value, self.total, host.preview_payload(preview))
        if self._tqdm is not None:
            self._tqdm.update(n)
        host.throw_if_interrupted()

    def set_text(self, text: str) -> None:
        """A short status next to the bar (the losses of a training step): tqdm's postfix outside ComfyUI, the
        node's progress text inside it where the host supports one."""
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)
        elif self._comfy is not None:
            host.progress_text(text)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        if self._counted:
            _OPEN.n -= 1
            self._counted = False

    def __exit__(self, *exc: object) -> None:
        self.close()


def no_bar_open() -> bool:
    """No enabled bar is open on this thread: an inner loop (Compact's strips inside one upscale call) may show its
    own; inside a loop that shows one (the tiles), it stays quiet instead of fighting over the node's bar."""
    return getattr(_OPEN, "n", 0) == 0


def _check(_module: torch.nn.Module, _args: object) -> None:
    host.throw_if_interrupted()


@contextlib.contextmanager
def interruptible(model: torch.nn.Module, depth: int | None = None, *, enabled: bool = True
                  ) -> Iterator[torch.nn.Module]:
    """Cancel checked before each sub-module (down to `depth` levels; None: all) runs, for the duration of the block.

    One forward pass of a large model on a slow device (a StyleGAN image or a whole-image VAE decode on a CPU) takes
    many seconds; with this, Cancel stops it within one layer's time instead of one pass's. The check is a flag read
    (ComfyUI: under its mutex), well under a microsecond; with the hook dispatch a few microseconds per layer call,
    nothing next to the layer itself."""
    if not enabled:
        yield model
        return
    handles = [m.register_forward_pre_hook(_check) for m in _units(model, depth)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def add_interrupt_checks(model: torch.nn.Module, depth: int) -> int:
    """The checks of `interruptible`, registered for good (once per module, at load, for models that always run
    long passes, e.g. upscalers on big tiles). Returns the number of hooks."""
    done = getattr(model, "_atelier_interrupt_hooks", None)
    if done is not None:
        return done
    units = _units(model, depth)
    for m in units:
        m.register_forward_pre_hook(_check)
    model._atelier_interrupt_hooks = len(units)
    return len(units)


def _units(model: torch.nn.Module, depth: int | None) -> list[torch.nn.Module]:
    """The sub-modules down to `depth` levels below the model (None: all)."""
    return [m for name, m in model.named_modules() if name and (depth is None or name.count(".") < depth)]
