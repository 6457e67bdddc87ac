"""pyproject.toml's run-time dependencies cover what the programs import: the images install
those alone (the Dockerfile), so a module imported at run time from the dev extra, or from
another package's dependencies, is one release away from an ImportError in a pod."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_TIME_PACKAGES = ("contract", "worker", "publisher", "serving", "gateway", "blob_cache")
"""What the images install (the Dockerfile's COPY lines); localcluster is for tests."""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        normalized(re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]) for d in project["dependencies"]
    }


def imported_modules() -> dict[str, set[str]]:
    """Each top-level module imported by the run-time packages, and the files importing it."""
    found: dict[str, set[str]] = {}
    for package in RUN_TIME_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_module_imported_at_run_time_is_a_declared_dependency() -> None:
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in imported_modules().items():
        if (
            module in sys.stdlib_module_names
            or module in RUN_TIME_PACKAGES
            or module == "__future__"
        ):
            continue
        names = {normalized(d) for d in distributions.get(module, [module])}
        if not names & declared():
            missing[module] = sorted(files)
    assert missing == {}


def test_a_worker_starts_without_the_docker_sdk_or_requests() -> None:
    """Together about 8 MB of a worker's 40 MB budget: the worker speaks the Engine API
    itself, and reads registry logins with the SDK only once there is a file to read."""
    probe = "import sys, worker.main; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for heavy in ("docker", "requests", "urllib3"):
        assert f"'{heavy}'" not in loaded, f"{heavy} is imported when a worker starts"
