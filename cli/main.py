"""``atelier``: run workflows headless (in-process or on ComfyUI servers), check them, inspect model files.

    atelier run WORKFLOW.json [--output DIR] [--models DIR] [--input DIR]
                [--server URL ...] [--batch-seeds 1-8] [--set NODE.INPUT=VALUE ...]
    atelier validate WORKFLOW.json ... [--server URL]
    atelier convert WORKFLOW.json [-o API.json]
    atelier models inspect FILE
    atelier train diffusion|gan|vae DATA_DIR --out FILE [--resolution 32 --steps N ...]   (see cli/train.py)

Errors print one line (``atelier: error: ...``) and exit 1; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import traceback
from typing import Any, Iterator, Sequence

from ..models.errors import AtelierError
from .errors import WorkflowError

MAX_JOBS = 100_000


def _err(msg: str) -> None:
    print(f"atelier: error: {msg}", file=sys.stderr)


def _bar(total: int, desc: str, unit: str, show: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if show is None else not show, leave=False)


# ---- sweeps -----------------------------------------------------------------------------------------------------


def parse_seeds(spec: str) -> list[int]:
    """``1-8``, ``3``, ``1,5,9`` or a mix (``1-4,10``) -> the seeds."""
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                lo, hi = int(a), int(b)
                if hi < lo or hi - lo >= MAX_JOBS:
                    raise ValueError
                seeds += range(lo, hi + 1)
            else:
                seeds.append(int(part))
        except ValueError:
            raise WorkflowError(f"--batch-seeds: expected seeds like 1-8 or 1,5,9, got {spec!r}") from None
    return seeds


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_set(spec: str) -> tuple[str, str, list[Any]]:
    """``NODE.INPUT=VALUE`` -> (node, input, values); ``V1,V2`` or a JSON list sweeps over several values."""
    key, eq, text = spec.partition("=")
    node, dot, name = key.rpartition(".")
    if not eq or not dot or not node or not name:
        raise WorkflowError(f"--set: expected NODE.INPUT=VALUE (e.g. 5.steps=20 or 5.steps=10,20), got {spec!r}")
    val = _parse_value(text)
    if isinstance(val, list):
        values = val
    elif isinstance(val, str) and "," in text:
        values = [_parse_value(v.strip()) for v in text.split(",")]
    else:
        values = [val]
    return node, name, values


def expand_jobs(api: dict, ui: dict | None, ifaces: Any, seeds: list[int] | None, sets: list[str]) -> list[tuple[str, dict, dict | None]]:
    """(label, api, ui) for every combination of the seeds and --set values; the UI widgets follow the values."""
    from .interfaces import input_names, input_spec
    from .workflow import find_node, seed_inputs, set_input

    axes: list[list[tuple[str, list[tuple[str, str]], Any]]] = []
    if seeds:
        targets = seed_inputs(api, ifaces)
        if not targets:
            raise WorkflowError("--batch-seeds: the workflow has no seed input (an INT named seed or noise_seed, or "
                                "one with control_after_generate) set to a constant")
        axes.append([(f"seed={s}", targets, s) for s in seeds])
    for spec in sets:
        ref, name, values = parse_set(spec)
        nid = find_node(api, ref)
        iface = ifaces.get(api[nid].get("class_type"))
        if iface is not None and input_spec(iface, name) is None:
            raise WorkflowError(f"--set: the node has no such input (it has {', '.join(input_names(iface))})",
                                node_id=nid, class_type=api[nid].get("class_type"), input_name=name)
        axes.append([(f"{nid}.{name}={v if isinstance(v, str) else json.dumps(v)}", [(nid, name)], v) for v in values])
    count = 1
    for axis in axes:
        count *= len(axis)
    if count > MAX_JOBS:
        raise WorkflowError(f"the sweep makes {count} jobs; at most {MAX_JOBS}")
    jobs = []
    for combo in itertools.product(*axes) if axes else [()]:
        a, u = copy.deepcopy(api), copy.deepcopy(ui)
        for _label, targets, value in combo:
            for nid, name in targets:
                set_input(a, u, nid, name, value, ifaces)
        jobs.append((" ".join(c[0] for c in combo) or "run", a, u))
    return jobs


# ---- output -----------------------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MB"


def summary_table(stats: list[Any], total: float) -> str:
    """Per node: id, type, seconds, peak RSS, its rise during the node (and peak CUDA memory when CUDA was used)."""
    cuda = any(s.peak_cuda is not None for s in stats)
    width = max([len(s.class_type) for s in stats] + [4])
    head = f"{'node':>6}  {'type':<{width}}  {'time':>9}  {'peak RSS':>10}  {'+RSS':>9}" + (f"  {'peak CUDA':>10}" if cuda else "")
    rows = [head, "-" * len(head)]
    for s in stats:
        t = "cached" if s.cached else f"{s.seconds:.2f} s"
        row = f"{s.node_id:>6}  {s.class_type:<{width}}  {t:>9}  {_mb(s.peak_rss):>10}  {_mb(s.rss_rise):>9}"
        rows.append(row + (f"  {_mb(s.peak_cuda):>10}" if cuda else ""))
    rows.append(f"{'total':>6}  {'':<{width}}  {total:>7.2f} s")
    return "\n".join(rows)


# ---- commands ---------------------------------------------------------------------------------------------------


def _setup_models(models: str | None) -> None:
    models = models or os.environ.get("ATELIER_MODELS")
    if not models:
        return
    if not os.path.isdir(models):
        raise WorkflowError(f"--models: {models!r} is not a folder (expected a models root with upscale_models/, vae/ ...)")
    from ..models.manager import ModelManager, set_manager

    set_manager(ModelManager(models_root=models))


def _load(path: str, ifaces: Any) -> tuple[dict, dict | None]:
    from .workflow import read_workflow_file, split_workflow

    return split_workflow(read_workflow_file(path), ifaces, name=os.path.basename(path))


def _server_interfaces(servers: list[str]) -> Any:
    from .interfaces import Interfaces
    from .remote import fetch_object_info

    info, failed = fetch_object_info(servers)
    if info is None:
        raise WorkflowError("no server answered: " + "; ".join(f"{u}: {why}" for u, why in failed.items()))
    for url, why in failed.items():
        print(f"atelier: server {url} did not answer ({why}); going on without it", file=sys.stderr)
    return Interfaces(info, source="the nodes of the server (" + ", ".join(servers) + ")")


def cmd_run(args: argparse.Namespace) -> int:
    from .interfaces import interfaces
    from .validation import validate

    _setup_models(args.models)
    servers = args.server or []
    ifaces = _server_interfaces(servers) if servers else interfaces()
    api, ui = _load(args.workflow, ifaces)
    input_dir = args.input or str(pathlib.Path(args.workflow).resolve().parent)
    seeds = parse_seeds(args.batch_seeds) if args.batch_seeds else None
    jobs = expand_jobs(api, ui, ifaces, seeds, args.set or [])
    if servers:
        for _label, a, _u in jobs:
            validate(a, ifaces, files="strict")
        return _run_remote(args, servers, jobs, input_dir)
    return _run_local(args, ifaces, jobs, input_dir)


def _run_local(args: argparse.Namespace, ifaces: Any, jobs: list[tuple[str, dict, dict | None]], input_dir: str) -> int:
    from .runner import NodeError, Runner

    if args.progress:
        from ..models.progress import show_bars

        show_bars(True)  # inner bars (tiles, steps) too, even without a terminal
    bar: list[Any] = [None]

    def on_event(kind: str, **info: Any) -> None:
        if bar[0] is None:
            bar[0] = _bar(info["total"], "nodes", "node", args.progress)
        if kind == "start":
            bar[0].set_description_str(f"#{info['node_id']} {info['class_type']}")
        elif kind in ("done", "cached"):
            bar[0].update(1)

    runner = Runner(ifaces, output_dir=args.output, input_dir=input_dir, preview_dir=args.preview, on_event=on_event)
    for _label, api, _ui in jobs:  # every job checked before the first one runs
        runner.prepare(api, input_dir)
    failures = 0
    for label, api, ui in jobs:
        bar[0] = None
        try:
            result = runner.run(api, ui, input_dir=input_dir)
        except NodeError as e:
            if len(jobs) == 1:
                raise
            failures += 1
            _err(f"{label}: {e}")
            continue
        finally:
            if bar[0] is not None:
                bar[0].close()
        if not args.quiet:
            if len(jobs) > 1:
                print(f"[{label}]", file=sys.stderr)
            print(summary_table(result.stats, result.seconds), file=sys.stderr)
        for f in result.files:
            print(f)
    if failures:
        _err(f"{failures} of {len(jobs)} jobs failed; their outputs were not kept")
    return 1 if failures else 0


def _run_remote(args: argparse.Namespace, servers: list[str], jobs: list[tuple[str, dict, dict | None]], input_dir: str) -> int:
    from .remote import Fleet, Job

    bar = _bar(len(jobs), "jobs", "job", args.progress)
    lock = threading.Lock()

    def say(msg: str) -> None:
        with lock:
            bar.write(msg, file=sys.stderr) if not bar.disable else print(msg, file=sys.stderr)

    def on_event(kind: str, **info: Any) -> None:
        if kind == "job_done":
            r = info["result"]
            with lock:
                bar.update(1)
            if not args.quiet:
                say(f"{r.job.label}: done on {r.server} in {r.seconds:.1f} s ({len(r.files)} file(s))")
        elif kind == "job_failed":
            r = info["result"]
            with lock:
                bar.update(1)
            say(f"atelier: {r.job.label} failed" + (f" on {r.server}" if r.server else "") + f": {r.error}")
        elif kind == "server_failed":
            moved = info["requeued"]
            say(f"atelier: server {info['server']} failed: {info['reason']}"
                + (f"; {len(moved)} job(s) moved to the other servers" if moved else ""))
        elif kind == "progress":
            with lock:
                bar.set_postfix_str(f"{info['job'].label} #{info['node']} {info['value']}/{info['max']}", refresh=False)

    fleet = Fleet(servers, output_dir=args.output, input_dir=input_dir, depth=args.depth,
                  job_timeout=args.timeout, on_event=on_event)
    report = fleet.run([Job(i, label, a, u) for i, (label, a, u) in enumerate(jobs)])
    bar.close()
    for r in report.results:
        for f in r.files:
            print(f)
    if report.dead_servers and not args.quiet:
        say("atelier: servers that failed: " + ", ".join(report.dead_servers))
    if report.failed:
        _err(f"{len(report.failed)} of {len(jobs)} jobs failed: " + "; ".join(
            f"{r.job.label}: {r.error}" for r in report.failed[:3]) + (" ..." if len(report.failed) > 3 else ""))
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .interfaces import interfaces
    from .validation import validate

    _setup_models(args.models)
    ifaces = _server_interfaces(args.server) if args.server else interfaces()
    bad = 0
    for path in args.workflows:
        try:
            api, _ui = _load(path, ifaces)
            validate(api, ifaces, files="strict" if args.server else "lenient")
            print(f"{path}: ok")
        except AtelierError as e:
            bad += 1
            print(f"{path}: {e}")
    return 1 if bad else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .interfaces import interfaces

    api, _ui = _load(args.workflow, interfaces())
    text = json.dumps(api, indent=2) + "\n"
    if args.out:
        pathlib.Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_models_inspect(args: argparse.Namespace) -> int:
    from ..models.manager import inspect_file

    if not os.path.isfile(args.file):
        raise WorkflowError(f"no file {args.file!r}")
    print(json.dumps(inspect_file(args.file).to_json(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atelier", description="Atelier: run ComfyUI workflows headless, inspect models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a workflow (UI or API format, or a PNG ComfyUI saved)")
    r.add_argument("workflow", help="workflow .json (canvas or API format) or a PNG carrying one")
    r.add_argument("--output", "-o", default="output", help="folder for the results (default: ./output)")
    r.add_argument("--models", help="models root (upscale_models/, vae/, ...); default $ATELIER_MODELS or ./user_models")
    r.add_argument("--input", help="folder LoadImage paths are relative to (default: the workflow's folder)")
    r.add_argument("--preview", help="folder for PreviewImage files (default: a temporary folder)")
    r.add_argument("--server", action="append", metavar="URL",
                   help="run on this ComfyUI server instead (repeat to spread a batch over several)")
    r.add_argument("--batch-seeds", metavar="SEEDS", help="one job per seed, e.g. 1-8 or 1,5,9")
    r.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="set an input (node id or title); V1,V2 or a JSON list sweeps over values")
    r.add_argument("--depth", type=int, default=2, help="jobs queued on each server at once (default 2)")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds a job may take on a server (default 3600)")
    r.add_argument("--quiet", "-q", action="store_true", help="print only the output paths")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check workflows against the node interfaces without running them")
    v.add_argument("workflows", nargs="+")
    v.add_argument("--models", help="models root for the pack's model lists")
    v.add_argument("--server", action="append", metavar="URL", help="check against this server's nodes instead")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("convert", help="print the API format of a workflow")
    c.add_argument("workflow")
    c.add_argument("--out", "-o", help="write here instead of stdout")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("models", help="model files")
    msub = m.add_subparsers(dest="models_command", required=True)
    mi = msub.add_parser("inspect", help="print what a model file is, as JSON")
    mi.add_argument("file")
    mi.set_defaults(func=cmd_models_inspect)

    from .train import add_parser as add_train_parser

    add_train_parser(sub)
    return p


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """SIGINT and SIGTERM stop the run the same way: the engine's interruption flag is set (loops check it between
    units of work) and KeyboardInterrupt is raised, so staged files are removed on the way out. Handlers are restored
    after (main() is also called in-process, by tests)."""
    from ..models import host

    got: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum: int, _frame: Any) -> None:
        got["signal"] = signum
        host.request_interrupt()
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        host.clear_interrupt()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``atelier`` command; returns the exit status (0 ok, 1 error, 130/143 interrupted)."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    with _stop_on_signals() as got:
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            _err("interrupted" + (" (SIGTERM)" if got.get("signal") == signal.SIGTERM else ""))
            return 143 if got.get("signal") == signal.SIGTERM else 130
        except BrokenPipeError:  # output piped into `head` and the like
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except AtelierError as e:
            if args.debug:
                traceback.print_exc()
            cause = getattr(e, "cause", None)
            hint = "" if args.debug or cause is None or isinstance(cause, AtelierError) else " (--debug shows the traceback)"
            _err(f"{e}{hint}")
            return 1
        except OSError as e:  # a file or folder named on the command line (or found through it)
            if args.debug:
                traceback.print_exc()
            where = f"{e.filename}: " if e.filename else ""
            _err(f"{where}{e.strerror or e}")
            return 1
        except Exception as e:  # noqa: BLE001  a bug: one line, the traceback on demand
            if args.debug:
                raise
            _err(f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                 "(a bug; --debug shows the traceback)")
            return 1


if __name__ == "__main__":
    sys.exit(main())
