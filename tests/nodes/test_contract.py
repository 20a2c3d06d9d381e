"""Every node of the pack follows the V1 contract and the house conventions (ids, categories, docs, tooltips)."""
from __future__ import annotations

import inspect

import pytest

import atelier
from atelier.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

CORE_TYPES = {"IMAGE", "MASK", "LATENT", "UPSCALE_MODEL", "INT", "FLOAT", "STRING", "BOOLEAN", "VAE"}
NODES = sorted(NODE_CLASS_MAPPINGS.items())


def test_root_package_exports_the_mappings():
    assert atelier.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_node_contract(node_id, cls):
    assert node_id.startswith("Atelier") and NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Atelier ")
    assert cls.CATEGORY.startswith("atelier/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert callable(getattr(cls, cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            assert isinstance(decl, tuple) and 1 <= len(decl) <= 2, f"{node_id}.{name}: bad declaration {decl!r}"
            opts = decl[1] if len(decl) == 2 else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            kind = decl[0]
            if isinstance(kind, list):
                assert kind, f"{node_id}.{name}: empty combo"
                if "default" in opts:
                    assert opts["default"] in kind
            elif kind in ("INT", "FLOAT") and "default" in opts:
                assert opts.get("min", float("-inf")) <= opts["default"] <= opts.get("max", float("inf"))
            assert name in params or any(p.kind == p.VAR_KEYWORD for p in params.values()), f"{node_id}.{name} not a parameter of {cls.FUNCTION}"
    assert isinstance(cls.RETURN_TYPES, tuple)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
