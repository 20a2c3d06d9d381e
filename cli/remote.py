"""``--server``: the same workflow, or a batch of them, on running ComfyUI servers over their HTTP/websocket API.

    fleet = Fleet(["http://gpu1:8188", "http://gpu2:8188"], output_dir="output")
    report = fleet.run([Job(0, "seed=1", api, ui), ...])

Each server has a worker thread holding up to ``depth`` jobs in that server's queue; workers take jobs from one shared
list, so fast servers take more. A server that stops answering is reported and the jobs it held go back to the list
for the others. Per job: local LoadImage files are uploaded (``POST /upload/image``, content-addressed names), the
prompt is queued (``POST /prompt`` with ``client_id`` and ``extra_data.extra_pnginfo.workflow``), progress is read
from ``/ws?clientId=``, the end is confirmed by ``GET /history/{id}`` and the outputs are downloaded
(``GET /view``) into the output folder, never over an existing file.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ..models.errors import AtelierError
from .outputs import Staging

log = logging.getLogger(__name__)


class ServerGone(AtelierError):
    """The server did not answer (refused, reset, timed out, websocket closed)."""


class RemoteError(AtelierError):
    """The server answered with an error for this job (rejected prompt, failed node): retrying elsewhere won't help."""


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def describe_prompt_error(body: Any) -> str:
    """One line from a ``POST /prompt`` 400 answer: the first node error with its node id, type and input."""
    if not isinstance(body, dict):
        return str(body)[:300]
    for nid, err in (body.get("node_errors") or {}).items():
        for e in err.get("errors") or []:
            inp = (e.get("extra_info") or {}).get("input_name")
            where = f"node {nid} ({err.get('class_type')})" + (f", input '{inp}'" if inp else "")
            return f"{where}: {e.get('message')}: {e.get('details')}"
    e = body.get("error") or {}
    return f"{e.get('message', 'rejected')}: {e.get('details', '')}".strip(": ")


class ComfyClient:
    """The few endpoints of one ComfyUI server (stdlib HTTP; websocket-client for /ws)."""

    def __init__(self, url: str, *, timeout: float = 30.0, client_id: str | None = None) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                detail: Any = json.loads(text)
            except ValueError:
                detail = text.decode("utf-8", "replace")
            if e.code >= 500 and not isinstance(detail, dict):
                raise ServerGone(f"{self.url}{path}: HTTP {e.code}") from None
            raise RemoteError(describe_prompt_error(detail) if path == "/prompt" else f"{path}: HTTP {e.code} {detail}"[:400]) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ServerGone(f"{self.url}: {getattr(e, 'reason', None) or e}") from None

    def get_json(self, path: str) -> Any:
        return json.loads(self._request("GET", path) or b"null")

    def object_info(self) -> dict[str, Any]:
        return self.get_json("/object_info")

    def queue(self, prompt: dict[str, Any], workflow: dict[str, Any] | None, prompt_id: str) -> str:
        payload: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        if workflow is not None:
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        out = json.loads(self._request("POST", "/prompt", json.dumps(payload).encode(), {"Content-Type": "application/json"}))
        return str(out.get("prompt_id", prompt_id))

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        return (self.get_json(f"/history/{urllib.parse.quote(prompt_id)}") or {}).get(prompt_id)

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        return self._request("GET", f"/view?{q}")

    def upload_image(self, path: str, name: str) -> str:
        """Upload a local file into the server's input folder as `name`; returns the value for LoadImage."""
        boundary = uuid.uuid4().hex
        with open(path, "rb") as f:
            data = f.read()
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="type"\r\n\r\ninput\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        out = json.loads(self._request("POST", "/upload/image", b"".join(parts),
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        sub = out.get("subfolder") or ""
        return f"{sub}/{out['name']}" if sub else out["name"]

    def websocket(self) -> Any:
        import websocket  # websocket-client

        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            return websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as e:
            raise ServerGone(f"{self.url}: websocket: {e}") from None


@dataclass
class Job:
    index: int
    label: str
    api: dict[str, Any]
    ui: dict[str, Any] | None = None
    failed_on: list[str] = field(default_factory=list)


@dataclass
class JobResult:
    job: Job
    server: str | None
    files: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class BatchReport:
    results: list[JobResult]
    dead_servers: dict[str, str]  # url -> why it was dropped

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if r.error is not None]


def output_records(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The files of a /history entry that are results (type "output"), in node order."""
    recs = []
    for _nid, out in sorted((entry.get("outputs") or {}).items(), key=lambda kv: (len(kv[0]), kv[0])):
        for key in ("images", "gifs", "videos", "audio", "files"):
            for rec in out.get(key) or []:
                if isinstance(rec, dict) and rec.get("type", "output") == "output" and rec.get("filename"):
                    recs.append(rec)
    return recs


def history_error(entry: dict[str, Any]) -> str | None:
    """The failure of a finished /history entry, or None when it succeeded."""
    status = entry.get("status") or {}
    if status.get("status_str", "success") == "success":
        return None
    for kind, data in status.get("messages") or []:
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".rstrip(": "))
        if kind == "execution_interrupted":
            return "interrupted on the server"
    return "the server reports an error"


class Fleet:
    """Spreads jobs over ComfyUI servers; see the module docstring."""

    def __init__(self, servers: list[str], *, output_dir: str = "output", input_dir: str | None = None,
                 depth: int = 2, job_timeout: float = 3600.0, http_timeout: float = 30.0, max_attempts: int = 3,
                 poll_interval: float = 2.0, on_event: Callable[..., None] | None = None) -> None:
        if not servers:
            raise ValueError("at least one server URL is needed")
        self.servers = list(dict.fromkeys(normalize_url(s) for s in servers))
        self.output_dir = os.path.abspath(output_dir)
        self.input_dir = os.path.abspath(input_dir or os.getcwd())
        self.depth = max(1, depth)
        self.job_timeout = job_timeout
        self.http_timeout = http_timeout
        self.max_attempts = max_attempts
        self.poll_interval = poll_interval
        self.on_event = on_event or (lambda *a, **k: None)
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._results: dict[int, JobResult] = {}
        self._total = 0
        self._dead: dict[str, str] = {}
        self._alive = 0

    # -- bookkeeping (under self._cond) --

    def _finish(self, result: JobResult) -> None:
        with self._cond:
            if result.job.index in self._results:
                return
            self._results[result.job.index] = result
            self._cond.notify_all()
        self.on_event("job_done" if result.error is None else "job_failed", result=result)

    def _server_failed(self, url: str, why: str, held: list[Job], *, retry: bool = True) -> None:
        """Drop a server; the jobs it held go back to the list (or fail: `retry` False, or too many attempts)."""
        failed: list[tuple[Job, str]] = []
        requeued: list[Job] = []
        with self._cond:
            self._dead[url] = why
            self._alive -= 1
            for job in reversed(held):
                job.failed_on.append(url)
                if retry and len(job.failed_on) < self.max_attempts:
                    self._pending.appendleft(job)
                    requeued.append(job)
                else:
                    failed.append((job, f"{url}: {why}" + (" (tried on " + ", ".join(job.failed_on) + ")" if retry else "")))
            if self._alive == 0:
                failed += [(job, f"no server left to run it (last failure: {url}: {why})") for job in self._pending]
                self._pending.clear()
            self._cond.notify_all()
        self.on_event("server_failed", server=url, reason=why, requeued=[j.label for j in reversed(requeued)])
        for job, err in failed:
            self._finish(JobResult(job, url, error=err))

    def _take(self, want: int, busy: bool) -> list[Job] | None:
        """Up to `want` pending jobs; None when the batch is over for this worker."""
        with self._cond:
            while True:
                if self._pending and want > 0:
                    return [self._pending.popleft() for _ in range(min(want, len(self._pending)))]
                if busy:
                    return []
                if len(self._results) >= self._total or self._alive <= 0:
                    return None
                self._cond.wait(0.5)

    # -- per job --

    def _localize(self, client: ComfyClient, job: Job, uploaded: dict[str, str]) -> tuple[dict, dict | None]:
        """A copy of the job whose local LoadImage paths are replaced by the names uploaded to this server."""
        api, ui = copy.deepcopy(job.api), copy.deepcopy(job.ui)
        for nid, node in api.items():
            if node.get("class_type") not in ("LoadImage", "LoadImageMask"):
                continue
            val = (node.get("inputs") or {}).get("image")
            if not isinstance(val, str):
                continue
            path = os.path.expanduser(val)
            path = path if os.path.isabs(path) else os.path.join(self.input_dir, path)
            if not os.path.isfile(path):
                continue  # a name already in the server's input folder
            if path not in uploaded:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
                uploaded[path] = client.upload_image(path, f"atelier_{digest}{os.path.splitext(path)[1].lower()}")
            node.setdefault("inputs", {})["image"] = uploaded[path]
            if ui is not None:
                for n in ui.get("nodes") or []:
                    if str(n.get("id")) == nid and isinstance(n.get("widgets_values"), list) and n["widgets_values"]:
                        n["widgets_values"][0] = uploaded[path]
        return api, ui

    def _download(self, client: ComfyClient, entry: dict[str, Any]) -> list[str]:
        """Every output file of a finished prompt into the output folder; all or nothing."""
        with Staging(self.output_dir) as st:
            for rec in output_records(entry):
                data = client.view(rec["filename"], rec.get("subfolder", ""), rec.get("type", "output"))
                sub = os.path.normpath(rec.get("subfolder") or ".")
                if os.path.isabs(sub) or sub.split(os.sep)[0] == "..":
                    sub = "."
                name = os.path.basename(rec["filename"])
                os.makedirs(os.path.join(st.dir, sub), exist_ok=True)
                tmp = os.path.join(st.dir, sub, name)
                with open(tmp, "wb") as f:
                    f.write(data)
            return st.commit()

    # -- the worker --

    def _worker(self, url: str) -> None:
        client = ComfyClient(url, timeout=self.http_timeout)
        held: dict[str, tuple[Job, float]] = {}
        uploaded: dict[str, str] = {}
        ws = None
        try:
            ws = client.websocket()
            self._loop(client, ws, held, uploaded)
        except ServerGone as e:
            self._server_failed(url, str(e), [job for job, _ in held.values()])
        except Exception as e:  # noqa: BLE001 - a local failure (disk full, a bug): fail its jobs, never hang the batch
            log.exception("worker for %s stopped", url)
            self._server_failed(url, f"{type(e).__name__}: {e}", [job for job, _ in held.values()], retry=False)
        finally:
            if ws is not None:
                try:
                    ws.close()
                except Exception:  # noqa: BLE001 - closing a dead socket
                    pass

    def _submit(self, client: ComfyClient, job: Job, held: dict[str, tuple[Job, float]], uploaded: dict[str, str]) -> None:
        pid = uuid.uuid4().hex
        held[pid] = (job, time.monotonic())  # held before any request: if the server dies now, the job is requeued
        try:
            api, ui = self._localize(client, job, uploaded)
            client.queue(api, ui, pid)
        except RemoteError as e:
            del held[pid]
            self._finish(JobResult(job, client.url, error=str(e)))
            return
        self.on_event("job_queued", server=client.url, job=job)

    def _check(self, client: ComfyClient, pid: str, held: dict[str, tuple[Job, float]]) -> None:
        job, t0 = held[pid]
        entry = client.history(pid)  # a prompt enters the history when it has finished, well or not
        if entry is None:
            if time.monotonic() - t0 > self.job_timeout:
                del held[pid]
                self._finish(JobResult(job, client.url, error=f"timed out after {self.job_timeout:.0f} s"))
            return
        err = history_error(entry)
        if err is not None:
            del held[pid]
            self._finish(JobResult(job, client.url, error=err, seconds=time.monotonic() - t0))
            return
        files = self._download(client, entry)  # if the server dies while downloading, the job is still held
        del held[pid]
        self._finish(JobResult(job, client.url, files=files, seconds=time.monotonic() - t0))

    def _loop(self, client: ComfyClient, ws: Any, held: dict[str, tuple[Job, float]], uploaded: dict[str, str]) -> None:
        import websocket

        ws.settimeout(1.0)
        last_poll = 0.0
        while True:
            jobs = self._take(self.depth - len(held), busy=bool(held))
            if jobs is None:
                return
            for job in jobs:
                self._submit(client, job, held, uploaded)
            if not held:
                continue
            finished: set[str] = set()
            try:
                msg = ws.recv()
            except websocket.WebSocketTimeoutException:
                msg = None
            except (websocket.WebSocketException, OSError) as e:
                raise ServerGone(f"{client.url}: websocket closed ({e or type(e).__name__})") from None
            if isinstance(msg, str):
                finished |= self._on_message(client.url, msg, held)
            if not finished and time.monotonic() - last_poll > self.poll_interval:
                finished = set(held)  # missed messages (or none sent): ask the history now and then
            if finished:
                last_poll = time.monotonic()
                for pid in finished & set(held):
                    self._check(client, pid, held)

    def _on_message(self, url: str, text: str, held: dict[str, tuple[Job, float]]) -> set[str]:
        try:
            msg = json.loads(text)
        except ValueError:
            return set()
        kind, data = msg.get("type"), msg.get("data") or {}
        pid = data.get("prompt_id")
        if pid not in held:
            return set()
        job = held[pid][0]
        if kind == "progress":
            self.on_event("progress", server=url, job=job, node=data.get("node"), value=data.get("value"), max=data.get("max"))
        elif kind == "executing" and data.get("node") is not None:
            self.on_event("executing", server=url, job=job, node=data.get("node"))
        elif kind in ("execution_success", "execution_error", "execution_interrupted") or (
                kind == "executing" and data.get("node") is None):
            return {pid}
        return set()

    def run(self, jobs: list[Job]) -> BatchReport:
        """Run every job on the servers; returns when each job has succeeded or failed (bounded by job_timeout)."""
        with self._cond:
            self._pending.extend(jobs)
            self._total = len(jobs)
            self._alive = len(self.servers)
        threads = [threading.Thread(target=self._worker, args=(u,), name=f"atelier-{u}", daemon=True) for u in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [self._results.get(j.index) or JobResult(j, None, error="not run") for j in jobs]
        return BatchReport(results, dict(self._dead))


def fetch_object_info(servers: list[str], timeout: float = 30.0) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """(the /object_info of the first server that answers, {url: why} for those that did not)."""
    failed: dict[str, str] = {}
    for url in servers:
        try:
            return ComfyClient(url, timeout=timeout).object_info(), failed
        except (ServerGone, RemoteError, ValueError) as e:
            failed[normalize_url(url)] = str(e)
    return None, failed


