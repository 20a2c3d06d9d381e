"""Issues 2 and 14: every example workflow runs unchanged on a real ComfyUI, and gives what the headless runner gives.

Each canvas workflow in workflows/ is queued exactly as the canvas queues it: the API prompt its UI converts to
(which must equal its twin workflows/api/<name>.api.json), with the UI as extra_pnginfo, no value rewritten: input
images are the ones a user's ComfyUI has (the pack copies its example inputs from workflows/input/ into the input
folder when it loads; ComfyUI's own example.png). Waited for on /history, its images fetched through /view; the same
prompt then runs in this process through atelier.cli.runner.Runner with the input folder `atelier run` uses by
default (the workflow's folder, then the pack's example inputs). Both hosts run the same code on the same CPU, so the
8-bit outputs must agree to within 1/255.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.host

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
MAX_DIFF = 1  # in 8-bit levels: 1/255
EXAMPLE_INPUTS = WORKFLOWS / "input"
# Core nodes the embedded runner lacks -> the pack node doing the same job, for the headless side only (the model
# then comes from our loader, so the comparison also checks that a core-loaded model gives what ours gives).
HEADLESS_SUBSTITUTES = {"UpscaleModelLoader": "AtelierLoadUpscaler"}


def _cases() -> list[tuple[str, pathlib.Path | None, pathlib.Path | None]]:
    """(name, API twin or None, canvas file or None) per workflow: canvas files in workflows/, twins in workflows/api/."""
    found: dict[str, dict[str, pathlib.Path]] = {}
    for f in sorted(WORKFLOWS.glob("*.json")) if WORKFLOWS.is_dir() else []:
        found.setdefault(f.stem, {})["ui"] = f
    for f in sorted((WORKFLOWS / "api").glob("*.api.json")) if (WORKFLOWS / "api").is_dir() else []:
        found.setdefault(f.name[: -len(".api.json")], {})["api"] = f
    return [(name, d.get("api"), d.get("ui")) for name, d in sorted(found.items())]


def _params():
    cases = _cases()
    if not cases:
        return [pytest.param(None, marks=pytest.mark.skip(reason="workflows/ holds no *.json workflow yet"))]
    return [pytest.param(c, id=c[0]) for c in cases]


def _convert(comfy, ui_file: pathlib.Path) -> tuple[dict, dict | None]:
    """A canvas workflow -> (API prompt, UI) by atelier.cli.workflow, with the real server's /object_info as the
    node interfaces (the widget order that matters is the one the real host has)."""
    from atelier.cli import workflow
    ifaces = workflow.Interfaces(comfy.object_info, source="the ComfyUI under test")
    return workflow.load_workflow(ui_file, ifaces)


def _load(comfy, case) -> tuple[dict, dict | None]:
    """What the canvas queues for the file (its UI converted with the server's interfaces), else the API twin."""
    name, api_file, ui_file = case
    if ui_file is not None:
        return _convert(comfy, ui_file)
    return json.loads(api_file.read_text(encoding="utf-8")), None


def _plain_prompt(api: dict) -> dict:
    return {str(nid): {"class_type": n["class_type"], "inputs": n.get("inputs", {})} for nid, n in api.items()}


def _ancestors(api: dict, nid: str, seen: set | None = None) -> set:
    seen = set() if seen is None else seen
    if nid in seen or nid not in api:
        return seen
    seen.add(nid)
    for v in api[nid].get("inputs", {}).values():
        if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
            _ancestors(api, str(v[0]), seen)
    return seen


def _headless_part(api: dict, runnable: set, output_nodes: set) -> tuple[dict, dict]:
    """The prompt as the headless runner can take it: core loaders swapped for ours (HEADLESS_SUBSTITUTES), and only
    the output nodes (with what feeds them) whose every node it can run. Also {dropped output: unrunnable nodes}."""
    swapped = {nid: {**n, "class_type": HEADLESS_SUBSTITUTES.get(n["class_type"], n["class_type"])}
               for nid, n in api.items()}
    keep: set = set()
    dropped = {}
    for nid in [nid for nid, n in api.items() if n["class_type"] in output_nodes]:
        anc = _ancestors(swapped, nid)
        missing = sorted({swapped[a]["class_type"] for a in anc} - runnable)
        if missing:
            dropped[nid] = missing
        else:
            keep |= anc
    return {nid: n for nid, n in swapped.items() if nid in keep}, dropped


def _runner_images(result, out_dir: pathlib.Path, preview_dir: pathlib.Path) -> dict[str, np.ndarray]:
    from PIL import Image

    images = {}
    for nid, ui in result.ui.items():
        for i, rec in enumerate(ui.get("images", [])):
            base = preview_dir if rec.get("type") == "temp" else out_dir
            with Image.open(base / rec.get("subfolder", "") / rec["filename"]) as im:
                images[f"{nid}:{i}"] = np.asarray(im.convert("RGBA" if "A" in im.getbands() else "RGB"))
    return images


def _missing_models(comfy, api: dict) -> list[str]:
    """Model files a loader names that the test's models root lacks (e.g. big-lama.pt, an SD checkpoint: no real
    LaMa or diffusion weights can be had on the test machines)."""
    missing = []
    for node in api.values():
        spec = comfy.object_info.get(node.get("class_type"), {}).get("input", {})
        for key, value in node.get("inputs", {}).items():
            decl = spec.get("required", {}).get(key) or spec.get("optional", {}).get(key)
            if (key.endswith("_name") and isinstance(value, str) and decl and isinstance(decl[0], list)
                    and value not in decl[0]):
                missing.append(f"{node['class_type']}.{key}={value}")
    return missing


def _model_files(root: pathlib.Path) -> set[pathlib.Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", _params())
def test_workflow_runs_on_comfyui_as_headless(case, comfy, pack_manager, tmp_path):
    name = case[0]
    api, ui = _load(comfy, case)  # verbatim: what the canvas queues for this file
    missing = _missing_models(comfy, api)
    if missing:
        pytest.skip(f"workflow {name} needs model files this machine does not have: {', '.join(missing)}")

    before = _model_files(comfy.models_root)
    entry = comfy.run(api, ui)
    served = dict(comfy.image_arrays(entry))
    # A training workflow wrote a model (and its training state) that a second run would continue: the headless
    # run starts from the same state as ComfyUI's did.
    for f in _model_files(comfy.models_root) - before:
        f.unlink()
    assert served, f"workflow {name} produced no image on ComfyUI (outputs: {list(entry.get('outputs', {}))})"

    from atelier.cli.errors import WorkflowError
    from atelier.cli.runner import Runner

    out_dir, preview_dir = tmp_path / "out", tmp_path / "preview"
    input_dir = str(WORKFLOWS)  # `atelier run workflows/<name>.json` reads inputs from the workflow's folder
    runner = Runner(output_dir=str(out_dir), input_dir=input_dir, preview_dir=str(preview_dir))
    output_nodes = {k for k, v in comfy.object_info.items() if v.get("output_node")}
    api_headless, dropped = _headless_part(api, set(runner.classes), output_nodes)
    if not api_headless:
        pytest.skip(f"workflow {name} ran on ComfyUI; none of its outputs can run headless ({dropped})")
    try:
        runner.prepare(api_headless, input_dir)
    except WorkflowError as e:
        if "embedded runner does not provide" in str(e):
            pytest.skip(f"workflow {name} ran on ComfyUI; no headless comparison: {e}")
        raise
    result = runner.run(api_headless, ui, input_dir=input_dir)
    headless = _runner_images(result, out_dir, preview_dir)

    served = {k: v for k, v in served.items() if k.split(":")[0] in api_headless}  # outputs both hosts ran
    if not served and not headless:
        pytest.skip(f"workflow {name}: its outputs the headless runner can run save no image")
    assert sorted(served) == sorted(headless), \
        f"images per node differ: ComfyUI {sorted(served)}, headless {sorted(headless)}"
    report = {}
    for key, a in served.items():
        b = headless[key]
        if a.shape != b.shape:
            report[key] = f"shape {a.shape} on ComfyUI, {b.shape} headless"
            continue
        diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
        if diff > MAX_DIFF:
            report[key] = f"max abs diff {diff}/255 (mean {np.abs(a.astype(float) - b).mean():.3f})"
    assert not report, f"workflow {name}: ComfyUI and the headless runner disagree: {report}"


@pytest.mark.parametrize("case", _params())
def test_canvas_workflow_converts_to_its_api_twin(case, comfy):
    """The canvas file and its `.api.json` twin are the same graph, read with the real server's node interfaces."""
    name, api_file, ui_file = case
    if api_file is None or ui_file is None:
        pytest.skip(f"workflow {name} has no {'canvas file' if ui_file is None else 'API twin'} to compare with")
    converted, _ = _convert(comfy, ui_file)
    twin = json.loads(api_file.read_text(encoding="utf-8"))
    assert _plain_prompt(converted) == _plain_prompt(twin), \
        f"{ui_file.name} converts to another graph than {api_file.name}"


def test_pack_provides_its_example_inputs(comfy):
    """The pack copied workflows/input/* into ComfyUI's input folder when it loaded (a stock install then has every
    image and dataset folder the examples load), said so in the log, and Load Image lists the images (its menu shows
    top-level files only)."""
    shipped = sorted(p for p in EXAMPLE_INPUTS.glob("*") if p.is_file()) if EXAMPLE_INPUTS.is_dir() else []
    if not shipped:
        pytest.skip("workflows/input/ ships no example input")
    choices = comfy.object_info["LoadImage"]["input"]["required"]["image"][0]
    for src in shipped:
        dst = comfy.input_dir / src.name
        assert dst.is_file() and dst.read_bytes() == src.read_bytes(), f"{src.name} was not copied into {comfy.input_dir}"
        assert src.name in choices, f"Load Image does not list {src.name}: {choices}"
    for folder in (p for p in EXAMPLE_INPUTS.glob("*") if p.is_dir()):  # example datasets: the whole tree
        files = sorted(f.relative_to(folder) for f in folder.rglob("*") if f.is_file())
        for rel in files:
            dst = comfy.input_dir / folder.name / rel
            assert dst.is_file() and dst.read_bytes() == (folder / rel).read_bytes(), \
                f"{folder.name}/{rel} was not copied into {comfy.input_dir}"
    assert "added the example input image(s)" in comfy.log_text(), "the copy was not announced in the log"
