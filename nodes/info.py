"""Model Info: what a model file is (family, architecture, scale, dtypes, memory) before wiring it."""
from __future__ import annotations

import json

from ..models.manager import FOLDERS, get_manager
from .common import model_input, split_choice


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
        return {"required": {"model": model_input(*FOLDERS, prefixed=True, tooltip="A model file, as folder/name.")}}

    def inspect(self, model: str):
        folder, name = split_choice(model, FOLDERS, "model")
        desc = get_manager().load(name, folder)
        text = json.dumps(desc.to_json(), indent=2)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"AtelierModelInfo": AtelierModelInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierModelInfo": "Atelier Model Info"}
