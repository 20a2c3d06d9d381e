"""Output files the way ComfyUI names them, never overwriting, staged until a run succeeds.

    with Staging("output") as st:           # files are written under st.dir while the run goes on
        ...                                 # an exception removes st.dir: no partial output is left as a result
        final = st.commit()                 # moved into output/, each under a free name

Names follow ComfyUI's SaveImage: ``<prefix>_<counter:05>_.png`` with the counter one past the highest present.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any, Iterable

from ..models.errors import InputError

log = logging.getLogger(__name__)

_COUNTER = re.compile(r"^(?P<base>.*)_(?P<n>\d{5,})_(?P<ext>\.[^.]*)$")
STAGING_PREFIX = ".atelier-staging-"
STALE_AFTER_S = 24 * 3600  # a staging folder of another machine (shared output folder) untouched this long is stale


def expand_prefix(prefix: str, width: int = 0, height: int = 0, now: time.struct_time | None = None) -> str:
    """ComfyUI's filename variables: %width%, %height%, %year% ... %second%, and the frontend's %date:FORMAT%."""
    now = now or time.localtime()
    fields = {"yyyy": f"{now.tm_year:04d}", "yy": f"{now.tm_year % 100:02d}", "MM": f"{now.tm_mon:02d}",
              "dd": f"{now.tm_mday:02d}", "hh": f"{now.tm_hour:02d}", "mm": f"{now.tm_min:02d}",
              "ss": f"{now.tm_sec:02d}", "M": str(now.tm_mon), "d": str(now.tm_mday), "h": str(now.tm_hour),
              "m": str(now.tm_min), "s": str(now.tm_sec)}

    def date(m: re.Match[str]) -> str:
        return re.sub(r"yyyy|yy|MM|dd|hh|mm|ss|M|d|h|m|s", lambda t: fields[t.group(0)], m.group(1))

    out = re.sub(r"%date:([^%]+)%", date, prefix)
    for key, val in (("%width%", width), ("%height%", height), ("%year%", now.tm_year),
                     ("%month%", f"{now.tm_mon:02d}"), ("%day%", f"{now.tm_mday:02d}"), ("%hour%", f"{now.tm_hour:02d}"),
                     ("%minute%", f"{now.tm_min:02d}"), ("%second%", f"{now.tm_sec:02d}")):
        out = out.replace(key, str(val))
    return out


def next_counter(dirs: Iterable[str], base: str) -> int:
    """One past the highest counter of files ``<base>_<n>_...`` in any of `dirs` (1 when there is none)."""
    best = 0
    want = os.path.normcase(base) + "_"
    for d in dirs:
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for f in names:
            if os.path.normcase(f[: len(want)]) != want:
                continue
            head = f[len(want):].split("_")[0]
            if head.isdigit() and f[len(want) + len(head):].startswith("_"):
                best = max(best, int(head))
    return best + 1


def split_prefix(prefix: str, output_dir: str, width: int = 0, height: int = 0) -> tuple[str, str]:
    """(subfolder, file base) of a filename prefix, refusing one that escapes the output folder."""
    prefix = expand_prefix(prefix, width, height)
    norm = os.path.normpath(prefix)
    sub, base = os.path.dirname(norm), os.path.basename(norm)
    root = os.path.abspath(output_dir)
    full = os.path.abspath(os.path.join(root, sub))
    if os.path.isabs(prefix) or os.path.commonpath([root, full]) != root or not base or base in (".", ".."):
        raise InputError(f"filename_prefix: {prefix!r} would save outside the output folder {root}; give a name "
                         f"or a sub-folder inside it")
    return sub, base


def free_name(directory: str, name: str) -> str:
    """`name` if no file has it in `directory`, else the next counter (``x_00003_.png``) or ``x_1.png`` that is free."""
    if not os.path.exists(os.path.join(directory, name)):
        return name
    m = _COUNTER.match(name)
    if m:
        n = max(int(m.group("n")), next_counter([directory], m.group("base")) - 1)
        while True:
            n += 1
            cand = f"{m.group('base')}_{n:05d}_{m.group('ext')}"
            if not os.path.exists(os.path.join(directory, cand)):
                return cand
    stem, ext = os.path.splitext(name)
    i = 1
    while os.path.exists(os.path.join(directory, f"{stem}_{i}{ext}")):
        i += 1
    return f"{stem}_{i}{ext}"


def place(src: str, directory: str, name: str) -> str:
    """Move `src` into `directory` under `name` or the next free name; never replaces an existing file."""
    os.makedirs(directory, exist_ok=True)
    for _ in range(1000):
        dst = os.path.join(directory, free_name(directory, name))
        try:
            os.link(src, dst)  # fails if dst exists: the claim is atomic
        except FileExistsError:
            continue
        except OSError:  # no hard links here (other device, some file systems)
            if os.path.exists(dst):
                continue
            shutil.move(src, dst)
            return dst
        os.unlink(src)
        return dst
    raise InputError(f"could not find a free file name for {name!r} in {directory}")


def output_error(output_dir: str, e: OSError) -> InputError:
    """One line naming the output folder and why it cannot be written (a file, read-only, a read-only mount ...)."""
    why = {errno.EEXIST: "it is a file, not a folder", errno.ENOTDIR: "a part of the path is a file, not a folder",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "it is on a read-only file system", errno.ENOSPC: "the disk is full"}
    where = f" ({e.filename})" if e.filename and os.path.abspath(str(e.filename)) != output_dir else ""
    return InputError(f"output folder {output_dir!r}: cannot write there: "
                      f"{why.get(e.errno or 0, e.strerror or str(e))}{where}")


def _staging_name() -> str:
    """`.atelier-staging-<host>-<pid>-`: whose it is, so a later run can tell a dead run's leftovers from a live one."""
    host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:32] or "host"
    return f"{STAGING_PREFIX}{host}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(output_dir: str) -> list[str]:
    """Remove staging folders left by runs that were killed (SIGKILL, power loss): those of this machine whose
    process is gone, and any untouched for STALE_AFTER_S (another machine's, or an older naming). Returns them."""
    mine = _staging_name().rsplit("-", 2)[0] + "-"  # .atelier-staging-<host>-
    removed = []
    try:
        names = [n for n in os.listdir(output_dir) if n.startswith(STAGING_PREFIX)]
    except OSError:
        return removed
    for n in names:
        path = os.path.join(output_dir, n)
        parts = n[len(mine):].split("-") if n.startswith(mine) else []
        if parts and parts[0].isdigit():
            stale = not _pid_alive(int(parts[0]))
        else:
            try:
                stale = time.time() - os.stat(path).st_mtime > STALE_AFTER_S
            except OSError:
                continue
        if stale and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.warning("removed %s, left by an interrupted run (partial output, never committed)", path)
    return removed


class Staging:
    """A hidden folder inside the output folder where a run writes; moved into place by `commit`, else removed.

    A run killed outright (SIGKILL) cannot remove its folder: the next run in that folder does (see
    `remove_stale_staging`). Folders that cannot be written give one InputError naming them."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self.dir = ""
        self.moved: dict[str, str] = {}  # staged path relative to the staging folder -> final path

    def __enter__(self) -> "Staging":
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            if not os.path.isdir(self.output_dir):
                raise FileExistsError(errno.EEXIST, "File exists", self.output_dir)
            remove_stale_staging(self.output_dir)
            self.dir = tempfile.mkdtemp(prefix=_staging_name(), dir=self.output_dir)
        except OSError as e:
            raise output_error(self.output_dir, e) from None
        return self

    def commit(self) -> list[str]:
        """Move every staged file into the output folder (same sub-folders), in name order; returns their paths."""
        try:
            for base, _dirs, files in sorted(os.walk(self.dir)):
                rel = os.path.relpath(base, self.dir)
                for f in sorted(files):
                    dst = place(os.path.join(base, f), os.path.normpath(os.path.join(self.output_dir, rel)), f)
                    self.moved[os.path.normpath(os.path.join(rel, f))] = dst
        except OSError as e:
            raise output_error(self.output_dir, e) from None
        return list(self.moved.values())

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def png_info(prompt: Any = None, extra_pnginfo: dict[str, Any] | None = None) -> Any:
    """The PNG text chunks ComfyUI's SaveImage writes: ``prompt`` (API JSON) and each extra_pnginfo key (``workflow``)."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    if prompt is not None:
        meta.add_text("prompt", json.dumps(prompt))
    for key, val in (extra_pnginfo or {}).items():
        meta.add_text(key, json.dumps(val))
    return meta
