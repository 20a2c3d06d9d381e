"""One progress helper for every long loop: ComfyUI's ProgressBar and interruption inside ComfyUI, tqdm outside."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from . import host

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Progress:
    """`with Progress(total, "tiles") as p: ... p.update()`: advances the bar and stops on a user interrupt.

    Inside ComfyUI, `update` reports websocket progress and raises ComfyUI's InterruptProcessingException when the
    user pressed Cancel; outside it, a tqdm bar (hidden when stderr is not a terminal unless ATELIER_PROGRESS=1) and
    Ctrl-C as usual.
    """

    def __init__(self, total: int, desc: str = "", *, enabled: bool = True) -> None:
        self.total = max(1, int(total))
        self.value = 0
        self._comfy = host.progress_bar(self.total) if enabled else None
        self._tqdm = None
        if enabled and self._comfy is None and self.total > 1:
            from tqdm.auto import tqdm

            force = os.environ.get("ATELIER_PROGRESS") == "1"  # the CLI's --progress: bars even without a terminal
            self._tqdm = tqdm(total=self.total, desc=desc or None, leave=False, disable=False if force else None)

    def __enter__(self) -> "Progress":
        host.throw_if_interrupted()
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

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __exit__(self, *exc: object) -> None:
        self.close()
