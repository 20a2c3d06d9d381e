"""What the host tests' workers share (run by ComfyUI's own interpreter; not collected by pytest): import ComfyUI as
a standalone script must (args parsing on, --cpu), register a model folder, then import this pack as a package."""
from __future__ import annotations

import os
import sys
import tempfile


def start(comfy_dir: str, repo: str, folder: str, path: str) -> None:
    """ComfyUI imported with --cpu, `folder` pointed at `path`, and `atelier` importable from `repo`."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401
    import folder_paths

    folder_paths.add_model_folder_path(folder, path)
    pkg_root = tempfile.mkdtemp(prefix="atelier_worker_")
    os.symlink(repo, os.path.join(pkg_root, "atelier"))
    sys.path.insert(0, pkg_root)
