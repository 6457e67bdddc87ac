"""The worker's AMQP connection uses pika's public API only: no private member of another
object is touched (ruff's SLF001, never silenced there), so a pika minor release cannot
break it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = (
    "worker/broker/connection.py",
    "worker/broker/outbox.py",
    "worker/broker/topology.py",
    "contract/connection.py",
)


@pytest.mark.parametrize("module", MODULES)
def test_no_private_member_of_another_object_is_used(module: str) -> None:
    source = (ROOT / module).read_text(encoding="utf-8")
    assert "SLF001" not in source
    private = [
        f"{module}:{node.lineno}: .{node.attr}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert private == []
