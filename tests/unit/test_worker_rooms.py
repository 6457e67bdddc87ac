"""The worker's rooms import one way: stores import no other room and no store imports
another; the rooms and the top-level modules form no cycle."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import worker

WORKER = Path(worker.__file__).parent
STORES = ("worker.stores.docker", "worker.stores.containerd")


def module_name(path: Path) -> str:
    parts = ("worker", *path.relative_to(WORKER).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The worker modules ``path`` imports (``from worker.x import y`` counts ``worker.x``
    and, when it is a module, ``worker.x.y``)."""
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            named.add(node.module)
            named.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
    return {name for name in named if name in MODULES}


def room(module: str) -> str:
    """``worker.stores`` for ``worker.stores.docker``; a top-level module is its own room."""
    return ".".join(module.split(".")[:2])


MODULES = {module_name(path): path for path in WORKER.rglob("*.py")}
IMPORTS = {module: imported_modules(path) for module, path in MODULES.items()}


def test_the_stores_import_no_other_room() -> None:
    outside = {
        module: sorted(name for name in names if room(name) != "worker.stores")
        for module, names in IMPORTS.items()
        if room(module) == "worker.stores"
    }
    assert outside == {module: [] for module in outside}


def store_of(module: str) -> str | None:
    """The store package ``module`` belongs to, if any."""
    return next((s for s in STORES if module == s or module.startswith(f"{s}.")), None)


def test_no_store_imports_another_store() -> None:
    for module, names in IMPORTS.items():
        store = store_of(module)
        if store is not None:
            assert {store_of(name) for name in names} <= {store, None}, module


def test_what_the_stores_share_imports_no_store() -> None:
    shared = [m for m in IMPORTS if room(m) == "worker.stores" and store_of(m) is None]
    assert "worker.stores.contract" in shared and "worker.stores.failures" in shared
    for module in shared:
        assert {store_of(name) for name in IMPORTS[module]} <= {None}, module


def test_the_rooms_import_one_way() -> None:
    graph: dict[str, set[str]] = {}
    for module, names in IMPORTS.items():
        graph.setdefault(room(module), set()).update(
            room(name) for name in names if room(name) != room(module)
        )
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        raise AssertionError(f"rooms importing each other: {error.args[1]}") from None


def test_the_pull_service_and_catch_up_import_no_observer_implementation() -> None:
    """Observers (the metrics, the usage log) subclass the hooks; the daemon wires them in."""
    observed = {
        module: sorted(name for name in names if name == "worker.metrics" or "pruning" in name)
        for module, names in IMPORTS.items()
        if room(module) in {"worker.pulls", "worker.catch_up"}
    }
    assert observed == {module: [] for module in observed}
