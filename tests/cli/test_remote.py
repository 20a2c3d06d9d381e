"""--server mode against fake ComfyUI servers (aiohttp on 127.0.0.1, random ports) speaking ComfyUI's HTTP/websocket
API: one server dies mid-batch, one never answers; every job still completes on the one left, the failures are
reported, nothing is overwritten. Every loop is bounded; the servers stop at the end of each test."""
from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from atelier.cli.interfaces import BUILTIN_CORE  # noqa: E402
from atelier.cli.main import main  # noqa: E402
from atelier.cli.remote import Fleet, Job  # noqa: E402


class FakeComfy:
    """The endpoints of ComfyUI the client uses; executes one prompt at a time, like ComfyUI's queue."""

    def __init__(self, *, delay: float = 0.1, die_after: int | None = None, reject_prefix: str | None = None):
        self.delay, self.die_after, self.reject_prefix = delay, die_after, reject_prefix
        self.prompts: list[dict] = []
        self.uploads: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.history: dict[str, dict] = {}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.counters: dict[str, int] = {}
        self.dead = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    # -- lifecycle --

    def start(self) -> "FakeComfy":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/object_info", self.object_info)
        app.router.add_post("/prompt", self.post_prompt)
        app.router.add_get("/history/{pid}", self.get_history)
        app.router.add_get("/view", self.view)
        app.router.add_post("/upload/image", self.upload)
        app.router.add_get("/ws", self.ws)
        self.lock = asyncio.Lock()
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def die(self) -> None:
        self.dead = True
        for ws in list(self.sockets.values()):
            await ws.close()
        await self.runner.cleanup()

    def stop(self) -> None:
        if not self.dead:
            asyncio.run_coroutine_threadsafe(self.die(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # -- endpoints --

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        self.sockets[request.query["clientId"]] = sock
        await sock.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}})
        async for _msg in sock:
            pass
        return sock

    async def post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt, pid, cid = body["prompt"], body["prompt_id"], body["client_id"]
        image = prompt["1"]["inputs"]["image"]
        if image not in self.uploads:  # ComfyUI's LoadImage only sees files in its input folder
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation", "message": "invalid"},
                                      "node_errors": {"1": {"errors": [{"message": "Custom validation failed for node",
                                                                        "details": f"image - Invalid image file: {image}",
                                                                        "extra_info": {"input_name": "image"}}],
                                                            "class_type": "LoadImage"}}}, status=400)
        if prompt["2"]["inputs"]["filename_prefix"] == self.reject_prefix:
            return web.json_response({"error": {"message": "Prompt outputs failed validation"},
                                      "node_errors": {"2": {"errors": [{"message": "Value not in list",
                                                                        "details": "filename_prefix",
                                                                        "extra_info": {"input_name": "filename_prefix"}}],
                                                            "class_type": "SaveImage"}}}, status=400)
        self.prompts.append(body)
        if self.die_after is not None and len(self.prompts) >= self.die_after:
            asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self.die()))
        else:
            asyncio.ensure_future(self.execute(pid, body, cid))
        return web.json_response({"prompt_id": pid, "number": len(self.prompts), "node_errors": {}})

    async def execute(self, pid: str, body: dict, cid: str) -> None:
        async with self.lock:
            sock = self.sockets.get(cid)

            async def send(kind, **data):
                if sock is not None and not sock.closed:
                    await sock.send_json({"type": kind, "data": {"prompt_id": pid, **data}})

            await send("execution_start")
            await send("executing", node="2")
            for v in (1, 2):
                await asyncio.sleep(self.delay / 2)
                await send("progress", value=v, max=2, node="2")
            prefix = body["prompt"]["2"]["inputs"]["filename_prefix"]
            self.counters[prefix] = self.counters.get(prefix, 0) + 1
            name = f"{prefix}_{self.counters[prefix]:05}_.png"
            meta = PngInfo()
            meta.add_text("prompt", json.dumps(body["prompt"]))
            meta.add_text("workflow", json.dumps(body.get("extra_data", {}).get("extra_pnginfo", {}).get("workflow")))
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (len(self.prompts), 0, 0)).save(buf, "PNG", pnginfo=meta)
            self.files[name] = buf.getvalue()
            images = [{"filename": name, "subfolder": "", "type": "output"}]
            self.history[pid] = {"prompt": [0, pid, body["prompt"], {}, ["2"]], "outputs": {"2": {"images": images}},
                                 "status": {"status_str": "success", "completed": True, "messages": []}}
            await send("executed", node="2", output={"images": images})
            await send("execution_success")
            await send("executing", node=None)

    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response(BUILTIN_CORE)

    async def get_history(self, request: web.Request) -> web.Response:
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def view(self, request: web.Request) -> web.Response:
        assert request.query["type"] == "output"
        return web.Response(body=self.files[request.query["filename"]], content_type="image/png")

    async def upload(self, request: web.Request) -> web.Response:
        post = await request.post()
        f = post["image"]
        self.uploads[f.filename] = f.file.read()
        return web.json_response({"name": f.filename, "subfolder": "", "type": post.get("type", "input")})


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def servers():
    started: list[FakeComfy] = []

    def make(**kw) -> FakeComfy:
        started.append(FakeComfy(**kw).start())
        return started[-1]

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def image(tmp_path) -> bytes:
    arr = np.random.RandomState(1).randint(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "in.png")
    return (tmp_path / "in.png").read_bytes()


def _api(prefix: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def _run_bounded(fleet: Fleet, jobs: list[Job]):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("report", fleet.run(jobs)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the batch did not finish within 60 s"
    return box["report"]


def test_batch_survives_a_dying_server(tmp_path, servers, image):
    good = servers(delay=0.1)
    dying = servers(delay=0.4, die_after=2)
    never = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_00001_.png").write_bytes(b"keep me")
    events = []
    fleet = Fleet([good.url, dying.url, never], output_dir=str(out), input_dir=str(tmp_path), depth=2,
                  job_timeout=30, http_timeout=5, poll_interval=0.2, on_event=lambda k, **i: events.append((k, i)))
    prefixes = ["x", "y"] * 4
    jobs = [Job(i, f"job{i}", _api(p), {"nodes": [], "links": [], "tag": i}) for i, p in enumerate(prefixes)]
    report = _run_bounded(fleet, jobs)

    assert report.failed == []
    assert set(report.dead_servers) == {dying.url, never}
    lost = [e for k, e in events if k == "server_failed" and e["server"] == dying.url]
    assert lost and lost[0]["requeued"], "the dying server held jobs that had to move"
    files = [f for r in report.results for f in r.files]
    assert len(files) == len(set(files)) == 8 and all(os.path.isfile(f) for f in files)
    for r in report.results:  # each job's own result, with its graph embedded
        assert r.server == good.url and len(r.files) == 1
        with Image.open(r.files[0]) as im:
            prompt, workflow = json.loads(im.text["prompt"]), json.loads(im.text["workflow"])
        assert prompt["2"]["inputs"]["filename_prefix"] == prefixes[r.job.index]
        assert workflow["tag"] == r.job.index
    assert (out / "x_00001_.png").read_bytes() == b"keep me"
    assert sorted(os.listdir(out)) == sorted(["x_00001_.png"] + [os.path.basename(f) for f in files])
    assert list(good.uploads.values()) == [image]  # uploaded once per server, content-addressed
    assert all(p["prompt"]["1"]["inputs"]["image"] in good.uploads for p in good.prompts)
    assert all(p["client_id"] for p in good.prompts)


def test_rejected_prompt_is_reported_not_retried(tmp_path, servers, image):
    a, b = servers(delay=0.05), servers(delay=0.05, reject_prefix="bad")
    a.reject_prefix = "bad"
    fleet = Fleet([a.url, b.url], output_dir=str(tmp_path / "out"), input_dir=str(tmp_path), job_timeout=30,
                  http_timeout=5, poll_interval=0.2)
    report = _run_bounded(fleet, [Job(0, "ok", _api("ok")), Job(1, "bad", _api("bad"))])
    assert report.dead_servers == {}
    assert [r.job.label for r in report.failed] == ["bad"]
    assert "node 2 (SaveImage), input 'filename_prefix'" in report.failed[0].error
    assert len(report.results[0].files) == 1


def test_cli_server_mode(tmp_path, servers, image, capsys):
    good, dying = servers(delay=0.05), servers(delay=0.3, die_after=1)
    (tmp_path / "wf.json").write_text(json.dumps(_api("sweep")))
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "wf.json"), "--output", str(out), "--server", good.url, "--server", dying.url,
                 "--set", "2.filename_prefix=a,b,c,d", "--no-progress", "--timeout", "30"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"server {dying.url} failed" in captured.err
    assert sorted(os.path.basename(p) for p in captured.out.split()) == [f"{p}_00001_.png" for p in "abcd"]
    assert sorted(os.listdir(out)) == [f"{p}_00001_.png" for p in "abcd"]
