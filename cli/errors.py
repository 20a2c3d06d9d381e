"""The CLI's error type, shared by conversion, validation, the runner and the remote client."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..models.errors import AtelierError


class WorkflowError(AtelierError, ValueError):
    """A workflow that cannot run: the message names the node id, its type and the input where that applies."""

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        class_type: str | None = None,
        input_name: str | None = None,
    ) -> None:
        self.node_id = None if node_id is None else str(node_id)
        self.class_type = class_type
        self.input_name = input_name
        self.detail = message
        where = []
        if node_id is not None:
            where.append(f"node {node_id}" + (f" ({class_type})" if class_type else ""))
        if input_name is not None:
            where.append(f"input '{input_name}'")
        super().__init__((", ".join(where) + ": " if where else "") + message)


def id_key(nid: Any) -> tuple[int, int, str]:
    """Sort key of node ids: numbers in numeric order, then other ids."""
    s = str(nid)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def sort_ids(ids: Iterable[Any]) -> list[Any]:
    """Node ids in numeric order where they are numbers."""
    return sorted(ids, key=id_key)


def unknown_type_message(ifaces: Mapping[str, Any]) -> str:
    """What to say about a node type the interfaces do not have (they name their source)."""
    source = getattr(ifaces, "source", "the known nodes")
    return f"unknown node type: not among {source} (is a custom node pack missing?)"
