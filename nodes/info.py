"""Model Info: what a model file is (family, architecture, scale, dtypes, memory) before wiring it."""
from __future__ import annotations

import json

from ..models.manager import FOLDERS, get_manager


class AtelierModelInfo:
    DESCRIPTION = "Shows what a model file is (family, architecture, scale, channels, dtypes, size needs, memory) as JSON."
    CATEGORY = "atelier/util"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("The model's descriptor as JSON.",)
    FUNCTION = "inspect"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        choices = [f"{f}/{n}" for f in FOLDERS for n in get_manager().list_models(f)] or ["(no models found)"]
        return {"required": {"model": (choices, {"tooltip": "A model file, as folder/name."})}}

    def inspect(self, model: str):
        folder, _, name = model.partition("/")
        desc = get_manager().load(name, folder)
        text = json.dumps(desc.to_json(), indent=2)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"AtelierModelInfo": AtelierModelInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierModelInfo": "Atelier Model Info"}
