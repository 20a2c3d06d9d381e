"""Every example workflow as a user meets it: in ComfyUI's real web canvas, in headless Chromium (issue 14).

Not a test the suite runs (it needs Chromium and takes minutes); run it by hand before changing workflows/:

    ATELIER_COMFYUI=/path/to/ComfyUI ATELIER_COMFYUI_PYTHON=/path/to/ComfyUI/.venv/bin/python \\
        python tests/host/canvas_check.py [--out DIR] [--only NAME] [--url http://127.0.0.1:8188]

It starts a ComfyUI with the pack and the test models exactly as tests/host/conftest.py does (or uses --url), starts
`chromium --headless` and drives it over the DevTools protocol (websocket-client). Per workflow in workflows/:
  1. the template listing (GET /workflow_templates) names it, its JSON and its thumbnail (<name>.jpg) are served
     where the template browser fetches them; it opens by clicking its card in the template browser (no missing
     or red node; screenshot <name>_template.png);
  2. the file is dropped on the canvas (a real drop event carrying the file, what drag-and-drop does);
  3. checks: no missing node type, no node with errors, every node at least as large as its widgets need
     (LGraphNode.computeSize) and wide enough not to cut its title, the view fitted to the graph (no saved view), widget values as in the file;
  4. Run (the Queue command, what the Run button does), wait for success, check every SaveImage/PreviewImage shows
     its images on the canvas, and that "fixed" seeds did not move;
  5. screenshots before and after the run, and one of the template browser.
Prints one line per workflow and writes report.json plus the PNGs into --out (default ./canvas_check).
The exit status is 1 when any check failed.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/ (helpers), as pytest's pythonpath has it


TITLE_MARGIN = 62  # the canvas cuts ("...") a title wider than the node less this (frontend 1.27.10)


class CDP:
    """A minimal DevTools-protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def js(self, expr: str, timeout: float = 60):
        """Evaluate an expression (awaiting a promise) in the page; its JSON value."""
        res = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True,
                        timeout=int(timeout * 1000))
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise RuntimeError(f"page error: {d.get('exception', {}).get('description') or d.get('text')}")
        return res.get("result", {}).get("value")

    def wait_for(self, expr: str, timeout: float = 60, every: float = 0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            val = self.js(expr)
            if val:
                return val
            time.sleep(every)
        raise TimeoutError(f"timed out waiting for {expr}")

    def screenshot(self, path: pathlib.Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_chromium(width: int, height: int, profile: str) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--remote-debugging-port={port}", f"--window-size={width},{height}", f"--user-data-dir={profile}",
         "--no-first-run", "--no-default-browser-check", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            if pages:
                return proc, pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("chromium did not open its DevTools port")


# JavaScript run in the page ------------------------------------------------------------------------------------
JS_READY = "!!(window.app && window.app.graph && window.app.canvas && document.querySelector('canvas#graph-canvas'))"

JS_DROP = """(async () => {
  const text = %s, name = %s;
  const file = new File([text], name, {type: 'application/json'});
  const dt = new DataTransfer(); dt.items.add(file);
  const target = document.querySelector('canvas#graph-canvas');
  const opts = {dataTransfer: dt, bubbles: true, cancelable: true, clientX: 600, clientY: 400};
  target.dispatchEvent(new DragEvent('dragenter', opts));
  target.dispatchEvent(new DragEvent('dragover', opts));
  target.dispatchEvent(new DragEvent('drop', opts));
  return true;
})()"""

JS_INSPECT = """(() => {
  const g = window.app.graph, lg = window.LiteGraph;
  const virtual = new Set(['Note', 'MarkdownNote', 'Reroute', 'PrimitiveNode']);
  const ctx = window.app.canvas.ctx;
  ctx.font = window.app.canvas.title_text_font;
  const nodes = g.nodes.map(n => {
    const min = n.computeSize();
    const title_w = ctx.measureText(n.getTitle ? n.getTitle() : n.title).width;
    return {id: n.id, type: n.type, title: n.title, size: [n.size[0], n.size[1]], min: [min[0], min[1]],
            title_w, pos: [n.pos[0], n.pos[1]], registered: !!lg.registered_node_types[n.type],
            has_errors: !!n.has_errors, virtual: virtual.has(n.type),
            widgets: (n.widgets || []).map(w => [w.name, w.value]),
            saved: (n.serialize().widgets_values || null)};
  });
  const ds = window.app.canvas.ds;
  return {nodes, groups: g.groups.map(gr => ({title: gr.title, bounding: Array.from(gr._bounding || gr.bounding)})),
          scale: ds.scale, offset: [ds.offset[0], ds.offset[1]],
          canvas: [window.app.canvas.canvas.width, window.app.canvas.canvas.height],
          dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300))};
})()"""

JS_RUN = """(async () => {
  window.__atelier_done = null;
  const api = window.comfyAPI.api.api;
  const onOk = (e) => { window.__atelier_done = {ok: true, detail: e.detail}; };
  const onErr = (e) => { window.__atelier_done = {ok: false, detail: e.detail}; };
  api.addEventListener('execution_success', onOk, {once: true});
  api.addEventListener('execution_error', onErr, {once: true});
  await window.app.extensionManager.command.execute('Comfy.QueuePrompt');
  return {node_errors: window.app.lastNodeErrors || null, exec_error: window.app.lastExecutionError || null};
})()"""

JS_OUTPUTS = """(() => {
  const g = window.app.graph;
  return g.nodes.filter(n => ['SaveImage', 'PreviewImage', 'LoadImage'].includes(n.type)).map(n => ({
    type: n.type,
    id: n.id, images: (n.imgs || []).length,
    loaded: (n.imgs || []).filter(i => i.complete && i.naturalWidth > 0).length,
    size: (n.imgs || [])[0] ? [n.imgs[0].naturalWidth, n.imgs[0].naturalHeight] : null,
    srcs: (n.imgs || []).map(i => i.src)}));
})()"""


def fetch_status(url: str) -> tuple[int, str, int]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), len(r.read())
    except urllib.error.HTTPError as e:
        return e.code, "", 0


def check_templates(base: str, names: list[str]) -> tuple[str | None, list[str]]:
    """(module name under which ComfyUI lists the pack's templates, problems)."""
    problems = []
    with urllib.request.urlopen(base + "/workflow_templates", timeout=30) as r:
        listing = json.loads(r.read())
    module = next((m for m, files in listing.items() if set(names) <= set(files)), None)
    if module is None:
        return None, [f"/workflow_templates does not list the workflows: {listing}"]
    extra = sorted(set(listing[module]) - set(names))
    if extra:
        problems.append(f"template listing has entries that are not canvas workflows: {extra}")
    for name in names:
        for ext, kind in ((".json", "json"), (".jpg", "image/jpeg")):
            url = f"{base}/api/workflow_templates/{urllib.parse.quote(module)}/{urllib.parse.quote(name)}{ext}"
            status, ctype, size = fetch_status(url)
            if status != 200 or kind not in ctype or size == 0:
                problems.append(f"{name}{ext}: GET {url} -> {status} {ctype} {size} bytes")
    return module, problems


def _same(a: list, b: list | None) -> bool:
    return isinstance(b, list) and len(a) == len(b) and all(
        x == y or (isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) < 1e-6)
        for x, y in zip(a, b))


def _fetch_image(url: str):
    import io

    from PIL import Image

    with urllib.request.urlopen(url, timeout=60) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def write_thumbnail(path: pathlib.Path, inputs: list[dict], outputs: list[dict], side: int = 320) -> None:
    """The template browser's card picture (<name>.jpg beside the workflow): what the run made. With an input
    image: the upper middle of the input (left) beside the same place in the first output (right), zoomed ×2; else
    up to 4 outputs in a grid."""
    from PIL import Image

    thumb = Image.new("RGB", (side, side), (24, 24, 24))
    srcs = [u for o in outputs for u in o["srcs"]]
    if inputs and inputs[0]["srcs"]:
        a, b = _fetch_image(inputs[0]["srcs"][0]), _fetch_image(srcs[0])
        # the upper middle of the picture (where a subject's face usually is), twice as large
        a, b = (im.crop((im.width // 5, im.height // 20, 7 * im.width // 10, 11 * im.height // 20))
                .resize((side, side), Image.LANCZOS) for im in (a, b))
        thumb.paste(a.crop((0, 0, side // 2, side)), (0, 0))
        thumb.paste(b.crop((side // 2, 0, side, side)), (side // 2, 0))
        for y in range(side):
            thumb.putpixel((side // 2, y), (255, 255, 255))
    else:
        picks = srcs if len(srcs) <= 4 else [srcs[i * len(srcs) // 4] for i in range(4)]
        k = 1 if len(picks) == 1 else 2
        cell = side // k
        for i, url in enumerate(picks[: k * k]):
            im = _fetch_image(url).resize((cell, cell), Image.LANCZOS)
            thumb.paste(im, ((i % k) * cell, (i // k) * cell))
    tmp = path.with_suffix(".tmp.jpg")
    thumb.save(tmp, "JPEG", quality=85, optimize=True)
    tmp.replace(path)


JS_CLICK_TEXT = """(() => { const el = Array.from(document.querySelectorAll('.p-dialog *')).find(e =>
    e.children.length === 0 && e.textContent.trim() === %s); if (el) el.click(); return !!el })()"""


JS_SCROLL_TO_CARD = """(() => { const c = %s; if (c) { c.scrollIntoView({block: 'center'}); return true; }
    document.querySelectorAll('.p-dialog *').forEach(e => { if (e.scrollHeight > e.clientHeight + 4
        && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY)) e.scrollTop += e.clientHeight; });
    return false })()"""


def open_from_template_browser(cdp: CDP, module: str, name: str, n_nodes: int, out: pathlib.Path) -> list[str]:
    """Workflow -> Browse Templates -> the pack's category -> the card: what a user clicks. Problems found."""
    cdp.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()), true")
    cdp.js("window.app.extensionManager.command.execute('Comfy.BrowseTemplates'), true")
    cdp.wait_for("!!document.querySelector('.p-dialog')", timeout=20)
    card = f"document.querySelector('[data-testid=\"template-workflow-{name}\"]')"
    try:
        cdp.wait_for(JS_CLICK_TEXT % json.dumps(module), timeout=20)
        # the grid renders cards as they scroll into view: scroll down as a user does until the card is there
        cdp.wait_for(JS_SCROLL_TO_CARD % card, timeout=40, every=0.5)
    except TimeoutError:
        cdp.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()), true")
        return [f"template browser: no card for {name} under {module!r}"]
    cdp.js(f"{card}.click(), true")
    try:
        cdp.wait_for(f"!document.querySelector('.p-dialog') && window.app.graph.nodes.length === {n_nodes}",
                     timeout=30)
    except TimeoutError:
        dialogs = cdp.js("Array.from(document.querySelectorAll('.p-dialog, .p-toast-message')).map(d => "
                         "d.innerText.slice(0, 300))")
        cdp.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()), true")
        return [f"template browser: {name} did not open ({dialogs})"]
    time.sleep(1.5)
    cdp.screenshot(out / f"{name}_template.png")
    info = cdp.js(JS_INSPECT)
    return [f"opened from the template browser: node {n['id']} ({n['type']}) is missing or red"
            for n in info["nodes"] if not n["registered"] or n["has_errors"]]


def check_workflow(cdp: CDP, path: pathlib.Path, out: pathlib.Path, run_timeout: float,
                   thumbnails: pathlib.Path | None = None, module: str | None = None) -> dict:
    name = path.stem
    data = json.loads(path.read_text(encoding="utf-8"))
    problems: list[str] = []
    if module:
        problems += open_from_template_browser(cdp, module, name, len(data["nodes"]), out)
    cdp.js("window.app.graph.clear(), true")
    cdp.js(JS_DROP % (json.dumps(path.read_text(encoding="utf-8")), json.dumps(path.name)))
    cdp.wait_for(f"window.app.graph.nodes.length === {len(data['nodes'])}", timeout=30)
    time.sleep(1.5)  # fitView runs on the next animation frame; let the canvas draw
    info = cdp.js(JS_INSPECT)
    cdp.screenshot(out / f"{name}_loaded.png")
    if info["dialogs"]:
        problems.append(f"dialogs open after loading: {info['dialogs']}")
    for n in info["nodes"]:
        if not n["registered"]:
            problems.append(f"node {n['id']} ({n['type']}): type not registered (missing node)")
        if n["has_errors"]:
            problems.append(f"node {n['id']} ({n['type']}): marked with errors (red)")
        if not n["virtual"] and (n["size"][0] + 0.5 < n["min"][0] or n["size"][1] + 0.5 < n["min"][1]):
            problems.append(f"node {n['id']} ({n['type']}): size {n['size']} smaller than its widgets need {n['min']}")
        if n["title_w"] + TITLE_MARGIN > n["size"][0]:
            problems.append(f"node {n['id']} ({n['type']}): its title ({n['title_w']:.0f} px) is cut at width {n['size'][0]}")
    saved = {n["id"]: n.get("widgets_values") for n in data["nodes"]}
    for n in info["nodes"]:  # what the canvas would save again == what the file holds
        vals, again = saved.get(n["id"]), n["saved"]
        if isinstance(vals, list) and not n["virtual"] and not _same(vals, again):
            problems.append(f"node {n['id']} ({n['type']}): the canvas holds widget values {again}, the file {vals}")
    # the view was fitted: every node lies inside the visible canvas
    s, (ox, oy) = info["scale"], info["offset"]
    cw, ch = info["canvas"]
    for n in info["nodes"]:
        x0, y0 = (n["pos"][0] + ox) * s, (n["pos"][1] - 30 + oy) * s
        x1, y1 = (n["pos"][0] + n["size"][0] + ox) * s, (n["pos"][1] + n["size"][1] + oy) * s
        if x0 < -2 or y0 < -2 or x1 > cw + 2 or y1 > ch + 2:
            problems.append(f"node {n['id']} ({n['type']}) is outside the view after loading "
                            f"(scale {s:.2f}, offset {ox:.0f},{oy:.0f})")
    queued = cdp.js(JS_RUN)
    if queued.get("node_errors"):
        problems.append(f"Run refused: {json.dumps(queued['node_errors'])[:800]}")
        done = None
    else:
        try:
            done = cdp.wait_for("window.__atelier_done", timeout=run_timeout, every=0.5)
        except TimeoutError:
            done = None
            problems.append(f"no execution_success within {run_timeout:.0f} s")
    if done and not done.get("ok"):
        problems.append(f"execution error: {json.dumps(done.get('detail'))[:800]}")
    outputs = []
    if done and done.get("ok"):
        try:
            cdp.wait_for("(() => { const o = " + JS_OUTPUTS + "; return o.length && o.every(x => x.loaded > 0) })()",
                         timeout=30)
        except TimeoutError:
            pass
        shown = cdp.js(JS_OUTPUTS)
        inputs = [o for o in shown if o["type"] == "LoadImage"]
        outputs = [o for o in shown if o["type"] != "LoadImage"]
        if thumbnails is not None and outputs:
            write_thumbnail(thumbnails / f"{name}.jpg", inputs, outputs)
        for o in outputs:
            if not o["loaded"]:
                problems.append(f"output node {o['id']} shows no image after the run")
        after = cdp.js(JS_INSPECT)
        before = {n["id"]: n["saved"] for n in info["nodes"]}
        for n in after["nodes"]:
            if n["has_errors"]:
                problems.append(f"node {n['id']} ({n['type']}): marked with errors after the run")
            fixed = any(k.endswith("control_after_generate") and v == "fixed" for k, v in n["widgets"])
            if fixed and not _same(before.get(n["id"]) or [], n["saved"]):
                problems.append(f"node {n['id']} ({n['type']}): a fixed seed changed on Run: "
                                f"{before.get(n['id'])} -> {n['saved']}")
    time.sleep(1.0)
    cdp.screenshot(out / f"{name}_ran.png")
    return {"workflow": path.name, "ok": not problems, "problems": problems, "outputs": outputs,
            "nodes": len(info["nodes"]), "scale": round(info["scale"], 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running ComfyUI with the pack and the test models (default: start one)")
    ap.add_argument("--out", default="canvas_check", help="folder for screenshots and report.json")
    ap.add_argument("--only", action="append", help="workflow name(s) to check (default: all)")
    ap.add_argument("--size", default="1600x1000", help="browser window, WxH")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a Run may take")
    ap.add_argument("--thumbnails", action="store_true",
                    help="(re)write each template's thumbnail, workflows/<name>.jpg, from what its run shows")
    ap.add_argument("--keep", action="store_true", help="leave the server running (prints its URL)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(WORKFLOWS.glob("*.json"))
    if args.only:
        files = [f for f in files if f.stem in args.only]
    server = None
    tmp = tempfile.mkdtemp(prefix="atelier_canvas_")
    if args.url:
        base = args.url.rstrip("/")
    else:
        from conftest import ComfyServer, comfyui_location  # the host tests' server, same models and layout

        loc = comfyui_location()
        if isinstance(loc, str):
            raise SystemExit(loc)
        shared = pathlib.Path(os.environ.get("ATELIER_SHARED", REPO.parent / "shared"))
        if not shared.is_dir():
            shared = pathlib.Path("/work/shared")
        server = ComfyServer(loc[0], loc[1], pathlib.Path(tmp) / "comfy", shared)
        server.base.mkdir(parents=True)
        server.prepare()
        server.start()
        base = server.url
        print(f"ComfyUI at {base} (log {server.log_path})", flush=True)
    width, height = (int(v) for v in args.size.split("x"))
    browser, ws_url = start_chromium(width, height, os.path.join(tmp, "profile"))
    report: dict = {"url": base, "workflows": []}
    failed = False
    try:
        module, problems = check_templates(base, [f.stem for f in sorted(WORKFLOWS.glob("*.json"))])
        report["templates"] = {"module": module, "problems": problems}
        print(f"templates: module {module!r}: {'ok' if not problems else problems}", flush=True)
        failed |= bool(problems)
        cdp = CDP(ws_url)
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        # A fresh profile: no first-run tour, no template dialog on start.
        cdp.call("Page.navigate", url=base)
        cdp.wait_for(JS_READY, timeout=120)
        time.sleep(3)
        cdp.js("(async () => { const s = window.app.extensionManager.setting; "
               "for (const [k, v] of [['Comfy.TutorialCompleted', true], ['Comfy.Validation.Workflows', true], ['Comfy.Minimap.Visible', false], ['Comfy.NodeBadge.NodeSourceBadgeMode', 'None']]) "
               "{ try { await s.set(k, v) } catch (e) {} } return true })()")
        cdp.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()), true")
        if module:
            try:
                cdp.js("window.app.extensionManager.command.execute('Comfy.BrowseTemplates'), true")
                time.sleep(2)
                cdp.js(f"""(() => {{ const el = Array.from(document.querySelectorAll('*')).find(e =>
                    e.children.length === 0 && e.textContent.trim() === {json.dumps(module)}); if (el) el.click();
                    return !!el }})()""")
                time.sleep(4)
                cdp.screenshot(out / "template_browser.png")
                cdp.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()), true")
                time.sleep(1)
            except Exception as e:  # noqa: BLE001 - the screenshot is a bonus; the listing was checked over HTTP
                print(f"template browser screenshot failed: {e}", flush=True)
        for f in files:
            try:
                res = check_workflow(cdp, f, out, args.timeout, WORKFLOWS if args.thumbnails else None, module)
            except Exception as e:  # noqa: BLE001 - report and go on with the next workflow
                res = {"workflow": f.name, "ok": False, "problems": [f"{type(e).__name__}: {e}"]}
            report["workflows"].append(res)
            failed |= not res["ok"]
            print(f"{'ok  ' if res['ok'] else 'FAIL'} {f.name}: {len(res.get('outputs', []))} output node(s) "
                  f"{[o.get('size') for o in res.get('outputs', [])]}" +
                  ("" if res["ok"] else "\n     " + "\n     ".join(res["problems"])), flush=True)
    finally:
        (out / "report.json").write_text(json.dumps(report, indent=1))
        os.killpg(browser.pid, 15)
        if server is not None and not args.keep:
            server.stop()
        elif server is not None:
            print(f"server left running at {base}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
