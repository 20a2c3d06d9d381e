"""The embedded runner: executes an API prompt in-process, the way ComfyUI's executor does, without ComfyUI.

    runner = Runner(output_dir="output")
    result = runner.run(api, ui, input_dir="workflows")     # WorkflowError before anything runs if it cannot run
    result.files, result.stats                             # final output paths; seconds and peak memory per node

What it shares with ComfyUI: validation before execution, only the nodes that feed an output node run, in
topological order; one instance per node id kept between runs; ``FUNCTION`` called with the inputs (constants,
linked outputs, hidden PROMPT / EXTRA_PNGINFO / UNIQUE_ID); results as a tuple or ``{"ui", "result"}``;
``INPUT_IS_LIST`` / ``OUTPUT_IS_LIST`` list mapping; outputs of unchanged nodes reused on the next run (``IS_CHANGED``).
It runs the pack's nodes and LoadImage / SaveImage / PreviewImage; other core nodes need a server (``--server``).
Files are written to a staging folder and moved into the output folder only when the whole run succeeded.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..models.errors import AtelierError
from . import interfaces as _if
from .core_nodes import CORE_NODES, IOFolders, LoadImage, file_digest, resolve_image_path
from .outputs import Staging
from .validation import check_value, is_link, output_nodes, problems, topological_order, validate
from .errors import WorkflowError

log = logging.getLogger(__name__)

EMBEDDED_CORE = tuple(CORE_NODES)


class NodeError(AtelierError):
    """A node raised while running; names the node id and type, keeps the original exception as ``cause``."""

    def __init__(self, node_id: str, class_type: str, cause: BaseException) -> None:
        self.node_id, self.class_type, self.cause = node_id, class_type, cause
        text = str(cause) or type(cause).__name__
        if not isinstance(cause, AtelierError):
            text = f"{type(cause).__name__}: {text}"
        super().__init__(f"node {node_id} ({class_type}) failed: {text}")


@dataclass
class NodeStat:
    node_id: str
    class_type: str
    seconds: float
    peak_rss: int | None  # bytes: the process's peak resident memory while the node ran
    rss_rise: int | None = None  # bytes: that peak minus the resident memory when the node started
    peak_cuda: int | None = None  # bytes: torch.cuda.max_memory_allocated while the node ran
    cached: bool = False


@dataclass
class RunResult:
    files: list[str]  # final paths of the files written into the output folder
    ui: dict[str, dict[str, Any]]  # node id -> merged "ui" dict it returned
    stats: list[NodeStat] = field(default_factory=list)
    seconds: float = 0.0


# ---- memory -----------------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int | None:
    """A memory figure of /proc/self/status in bytes (VmHWM: peak RSS, VmRSS: current), None where absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory over a span: resets Linux's VmHWM where allowed, else the process maximum from getrusage."""

    def __init__(self) -> None:
        self.per_node = False
        self.rss_start: int | None = None

    def start(self) -> None:
        self.rss_start = _proc_status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.per_node = True
        except OSError:
            self.per_node = False
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> tuple[int | None, int | None, int | None]:
        """(peak RSS, its rise over the RSS at start, peak CUDA allocation) in bytes."""
        rss = _proc_status("VmHWM") if self.per_node else None
        if rss is None:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = maxrss if sys.platform == "darwin" else maxrss * 1024
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = int(torch.cuda.max_memory_allocated())
        rise = rss - self.rss_start if self.per_node and rss is not None and self.rss_start is not None else None
        return rss, rise, cuda


# ---- calling a node ---------------------------------------------------------------------------------------------


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    out = fn(**kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    return out


async def _await(x: Any) -> Any:
    return await x


def map_over_lists(cls: type, fn: Callable[..., Any], data: dict[str, list[Any]]) -> list[Any]:
    """ComfyUI's list mapping: one call with whole lists (INPUT_IS_LIST), else one call per index, shorter lists
    repeating their last item."""
    if getattr(cls, "INPUT_IS_LIST", False):
        return [_call(fn, data)]
    if not data:
        return [_call(fn, {})]
    n = max(len(v) for v in data.values())
    return [_call(fn, {k: v[i if i < len(v) else -1] for k, v in data.items()}) for i in range(n)]


def merge_results(cls: type, results: list[Any]) -> tuple[list[list[Any]], dict[str, list[Any]]]:
    """(outputs as one list per output slot, merged ui) from the calls' returns (tuple or {"ui", "result"})."""
    n_out = len(getattr(cls, "RETURN_TYPES", ()))
    uis, rets = [], []
    for r in results:
        if isinstance(r, dict):
            if "ui" in r and r["ui"] is not None:
                uis.append(r["ui"])
            if "result" in r:
                rets.append(r["result"])
        else:
            rets.append(r)
    for r in rets:
        if not isinstance(r, (tuple, list)) or len(r) != n_out:
            got = f"{len(r)} values" if isinstance(r, (tuple, list)) else type(r).__name__
            raise TypeError(f"returned {got}; its RETURN_TYPES declares {n_out}")
    is_list = list(getattr(cls, "OUTPUT_IS_LIST", [False] * n_out))
    outs: list[list[Any]] = []
    for i in range(n_out if rets else 0):
        if i < len(is_list) and is_list[i]:
            outs.append([x for r in rets for x in r[i]])
        else:
            outs.append([r[i] for r in rets])
    ui = {k: [y for u in uis for y in u.get(k, [])] for k in (uis[0] if uis else {})}
    return outs, ui


# ---- the runner -------------------------------------------------------------------------------------------------


class Runner:
    """Runs API prompts in this process. Keep one Runner for a batch: instances and unchanged outputs are reused."""

    def __init__(
        self,
        ifaces: Mapping[str, Any] | None = None,
        *,
        output_dir: str = "output",
        input_dir: str | None = None,
        preview_dir: str | None = None,
        on_event: Callable[..., None] | None = None,
    ) -> None:
        self.ifaces = ifaces if ifaces is not None else _if.interfaces()
        self.classes: dict[str, type] = {**_if.pack_classes(), **CORE_NODES}
        self.output_dir = os.path.abspath(output_dir)
        self.input_dir = os.path.abspath(input_dir or os.getcwd())
        self.preview_dir = os.path.abspath(preview_dir or os.path.join(tempfile.gettempdir(), "atelier-preview"))
        self.on_event = on_event or (lambda *a, **k: None)
        self._instances: dict[str, tuple[str, Any]] = {}
        self._cache: dict[str, tuple[str, list[list[Any]]]] = {}

    # -- before running --

    def prepare(self, api: dict[str, Any], input_dir: str | None = None) -> list[str]:
        """Everything checked before anything runs; returns the execution order. Raises WorkflowError."""
        validate(api, self.ifaces, classes=self.classes, files="lenient")
        order = topological_order(api, output_nodes(api, self.ifaces))
        for nid in order:
            ctype = api[nid]["class_type"]
            if ctype not in self.classes:
                raise WorkflowError(
                    f"a ComfyUI core node the embedded runner does not provide (it runs the pack's nodes and "
                    f"{', '.join(EMBEDDED_CORE)}); run this workflow on a ComfyUI server with --server URL",
                    node_id=nid, class_type=ctype)
        # model names must be among the files this machine has (the pack's loaders list them)
        strict = [e for e in problems(api, self.ifaces, classes=self.classes, files="strict") if e.node_id in order]
        if strict:
            raise strict[0]
        io = self._io(input_dir, "")
        for nid in order:
            self._custom_checks(nid, api[nid], io)
        return order

    def _io(self, input_dir: str | None, staging: str) -> IOFolders:
        return IOFolders(os.path.abspath(input_dir or self.input_dir), self.output_dir, staging, self.preview_dir)

    def _constants(self, node: Mapping[str, Any]) -> dict[str, Any]:
        iface = self.ifaces[node["class_type"]]
        out = {}
        for name, val in (node.get("inputs") or {}).items():
            spec = _if.input_spec(iface, name)
            if spec is None or is_link(val):
                continue
            out[name] = check_value(name, spec[0], spec[1], val, skip_range=True)[0]
        return out

    def _custom_checks(self, nid: str, node: Mapping[str, Any], io: IOFolders) -> None:
        cls, ctype = self.classes[node["class_type"]], node["class_type"]
        consts = self._constants(node)
        if cls is LoadImage:
            try:
                resolve_image_path(consts.get("image"), io)
            except AtelierError as e:
                raise WorkflowError(str(e).removeprefix("image: "), node_id=nid, class_type=ctype, input_name="image") from None
            return
        fn = getattr(cls, "VALIDATE_INPUTS", None)
        if fn is None:
            return
        spec = inspect.getfullargspec(fn)
        names = [a for a in spec.args if a not in ("cls", "s", "self")]
        linked = [k for k, v in (node.get("inputs") or {}).items() if is_link(v)]
        args = {k: consts.get(k) for k in names if k != "input_types"}
        if spec.varkw is not None:
            args.update({k: v for k, v in consts.items()})
            args.update({k: None for k in linked})
        try:
            ok = fn(**args)
        except Exception as e:  # noqa: BLE001 - a failing check is a reason not to run
            ok = f"{type(e).__name__}: {e}"
        if ok is not True:
            named = [k for k in names if k in consts] or names or [None]
            raise WorkflowError(str(ok) if ok is not False else "rejected by the node's own input check",
                                node_id=nid, class_type=ctype, input_name=named[0])

    # -- running --

    def _instance(self, nid: str, ctype: str) -> Any:
        held = self._instances.get(nid)
        if held is None or held[0] != ctype:
            held = (ctype, self.classes[ctype]())
            self._instances[nid] = held
        return held[1]

    def _signature(self, nid: str, node: Mapping[str, Any], sigs: Mapping[str, str | None], io: IOFolders) -> str | None:
        """A key of everything the node's output depends on; None: always run (output node, or IS_CHANGED NaN)."""
        cls = self.classes[node["class_type"]]
        if getattr(cls, "OUTPUT_NODE", False):
            return None
        parts: list[Any] = [node["class_type"]]
        consts = self._constants(node)
        for name, val in sorted((node.get("inputs") or {}).items()):
            if is_link(val):
                src = sigs.get(str(val[0]))
                if src is None:
                    return None
                parts.append([name, src, val[1]])
            elif name in consts:
                parts.append([name, repr(consts[name])])
        if cls is LoadImage:
            parts.append(file_digest(resolve_image_path(consts.get("image"), io)))
        elif hasattr(cls, "IS_CHANGED"):
            try:
                spec = inspect.getfullargspec(cls.IS_CHANGED)
                args = consts if spec.varkw else {k: v for k, v in consts.items() if k in spec.args}
                token = cls.IS_CHANGED(**args)
            except Exception as e:  # noqa: BLE001 - like ComfyUI: a failing IS_CHANGED means "always run"
                log.warning("IS_CHANGED of node %s failed (%s); it will always run", nid, e)
                return None
            if isinstance(token, float) and math.isnan(token):
                return None
            parts.append(repr(token))
        return json.dumps(parts)

    def _inputs(self, nid: str, node: Mapping[str, Any], api: Mapping[str, Any], outs: Mapping[str, list[list[Any]]],
                extra_pnginfo: Any) -> dict[str, list[Any]]:
        cls, iface = self.classes[node["class_type"]], self.ifaces[node["class_type"]]
        consts = self._constants(node)
        data: dict[str, list[Any]] = {}
        for name in _if.input_names(iface):
            val = (node.get("inputs") or {}).get(name)
            if name not in (node.get("inputs") or {}):
                continue
            if is_link(val):
                src = outs.get(str(val[0]), [])
                if val[1] >= len(src):
                    raise WorkflowError(f"node {val[0]} produced no output {val[1]}", node_id=nid,
                                        class_type=node["class_type"], input_name=name)
                data[name] = src[val[1]]
            else:
                data[name] = [consts[name]]
        hidden = (cls.INPUT_TYPES().get("hidden") or {})
        values = {"PROMPT": api, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": nid, "DYNPROMPT": None}
        for name, kind in hidden.items():
            if kind in values:
                data[name] = [values[kind]]
        return data

    def run(self, api: dict[str, Any], ui: dict[str, Any] | None = None, *, input_dir: str | None = None) -> RunResult:
        """Validate, then execute; output files land in the output folder only if every node succeeded."""
        order = self.prepare(api, input_dir)
        extra = {"workflow": ui} if ui is not None else None
        t_run = time.perf_counter()
        outs: dict[str, list[list[Any]]] = {}
        sigs: dict[str, str | None] = {}
        uis: dict[str, dict[str, Any]] = {}
        stats: list[NodeStat] = []
        mem = PeakMemory()
        with Staging(self.output_dir) as st:
            io = self._io(input_dir, st.dir)
            for i, nid in enumerate(order):
                node, ctype = api[nid], api[nid]["class_type"]
                sig = self._signature(nid, node, sigs, io)
                sigs[nid] = sig
                hit = self._cache.get(nid)
                if sig is not None and hit is not None and hit[0] == sig:
                    outs[nid] = hit[1]
                    stats.append(NodeStat(nid, ctype, 0.0, None, cached=True))
                    self.on_event("cached", index=i, total=len(order), node_id=nid, class_type=ctype)
                    continue
                self.on_event("start", index=i, total=len(order), node_id=nid, class_type=ctype)
                inst = self._instance(nid, ctype)
                if getattr(inst, "ATELIER_IO", False):
                    inst.io = io
                cls = self.classes[ctype]
                t0 = time.perf_counter()
                mem.start()
                try:
                    data = self._inputs(nid, node, api, outs, extra)
                    with torch.inference_mode():  # as ComfyUI's executor runs every node
                        outs[nid], ui_out = merge_results(cls, map_over_lists(cls, getattr(inst, cls.FUNCTION), data))
                except (WorkflowError, KeyboardInterrupt):
                    raise
                except Exception as e:
                    self._cache.pop(nid, None)
                    raise NodeError(nid, ctype, e) from e
                rss, rise, cuda = mem.stop()
                stat = NodeStat(nid, ctype, time.perf_counter() - t0, rss, rise, cuda)
                stats.append(stat)
                if ui_out:
                    uis[nid] = ui_out
                if sig is not None:
                    self._cache[nid] = (sig, outs[nid])
                else:
                    self._cache.pop(nid, None)
                self.on_event("done", index=i, total=len(order), node_id=nid, class_type=ctype, stat=stat)
            files = st.commit()
        _rename_records(uis, st.moved, self.output_dir)
        return RunResult(files, uis, stats, time.perf_counter() - t_run)


def _rename_records(uis: dict[str, dict[str, Any]], moved: Mapping[str, str], output_dir: str) -> None:
    """Point the "output" file records of the nodes' ui at the names the files got in the output folder."""
    for ui in uis.values():
        for recs in ui.values():
            for rec in recs if isinstance(recs, list) else []:
                if not isinstance(rec, dict) or rec.get("type") != "output" or "filename" not in rec:
                    continue
                final = moved.get(os.path.normpath(os.path.join(rec.get("subfolder") or "", rec["filename"])))
                if final is not None:
                    rel = os.path.relpath(final, output_dir)
                    rec["subfolder"], rec["filename"] = os.path.dirname(rel), os.path.basename(rel)
