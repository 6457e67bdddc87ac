"""deploy/'s manifests as the cluster would get them: rendered by kustomize (``kubectl
kustomize``) and by ``helm template``, the tools ``scripts/install-packages`` puts in
``.tools/`` (pinned, checked). Each render runs once per test session (a subprocess each);
every call returns freshly parsed documents, so a test may change what it gets."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

Document = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
DEPLOY = ROOT / "deploy" / "kubernetes"
CONTAINERD_DEPLOY = ROOT / "deploy" / "kubernetes-containerd"
BLOB_CACHE_COMPONENT = "optional/blob-cache"
CHART = ROOT / "deploy" / "helm" / "puller"
RELEASE = "puller"
"""The release name the chart is rendered with: the one its README installs, which names
everything as the kustomize base does."""
NAMESPACE = "puller"


class RenderFailed(Exception):
    """kustomize or helm refused to render; the message is what it said."""


def tool(name: str) -> str:
    path = TOOLS / name
    if not os.access(path, os.X_OK):
        raise RenderFailed(f"{path} is missing: run scripts/install-packages")
    return str(path)


def run_tool(*command: str, cwd: Path | None = None) -> str:
    """A tool's standard output; raises :class:`RenderFailed` with its error output."""
    with tempfile.TemporaryDirectory() as home:
        # helm keeps a cache and a configuration under these; the tests leave none behind
        env = {
            **os.environ,
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
        }
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=cwd, env=env, timeout=60, check=False
        )
    if done.returncode != 0:
        raise RenderFailed(done.stderr.strip() or f"{command[0]} exited {done.returncode}")
    return done.stdout


def documents(text: str) -> list[Document]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def kustomize(directory: Path, components: tuple[str, ...] = ()) -> list[Document]:
    """What ``kubectl apply -k directory`` applies; with ``components`` (paths inside
    ``directory``), as its README says to add them: listed in its kustomization."""
    return documents(_kustomized(directory, components))


@functools.cache
def _kustomized(directory: Path, components: tuple[str, ...]) -> str:
    if not components:
        return run_tool(tool("kubectl"), "kustomize", str(directory))
    with tempfile.TemporaryDirectory() as top:
        copy = Path(top) / directory.name
        shutil.copytree(directory, copy)
        kustomization = copy / "kustomization.yaml"
        listed = "".join(f"  - {component}\n" for component in components)
        kustomization.write_text(f"{kustomization.read_text()}\ncomponents:\n{listed}")
        return run_tool(tool("kubectl"), "kustomize", str(copy))


def helm_template(values: str = "") -> list[Document]:
    """``helm template`` of the chart with ``values`` (YAML) over its defaults, as release
    :data:`RELEASE` in :data:`NAMESPACE`."""
    return documents(_templated(values))


@functools.cache
def _templated(values: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        file.write(values)
        file.flush()
        return run_tool(
            tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--values", file.name,
        )  # fmt: skip


@functools.cache
def helm_lint(values: str = "") -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        file.write(values)
        file.flush()
        return run_tool(tool("helm"), "lint", "--strict", str(CHART), "--values", file.name)
