"""The Helm chart in ``deploy/helm/puller``: ``helm lint``, the same objects as kustomize
renders (compared field by field, apart from what Helm adds by convention), and every check
of :mod:`tests.unit.test_kubernetes_manifests` on its renders, with options on."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from . import rendering
from .test_kubernetes_manifests import (
    CHECKS,
    CONTAINERD_DEPLOY,
    DEPLOY,
    WITH_BLOB_CACHE,
    CacheRun,
    Document,
    Manifests,
    blob_caches,
    check_blob_cache,
    generated_name,
    load,
    optional_examples,
)

HELM_LABELS = frozenset(
    {
        "helm.sh/chart",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
    }
)
"""The labels Helm charts carry by convention (the release is in the selectors too)."""
HELM_ANNOTATIONS = frozenset({"checksum/config"})
"""What rolls pods on a changed setting in the chart; kustomize puts a hash in the name."""

CONTAINERD: dict[str, Any] = {"imageStore": "containerd"}
BLOB_CACHE: dict[str, Any] = {
    "blobCache": {"enabled": True, "clusterIP": "10.96.0.50", "nodeCIDRs": ["192.0.2.0/24"]}
}
"""The kustomize component's own placeholders."""
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "containerd": CONTAINERD,
    "blob-cache": BLOB_CACHE,
    "containerd-blob-cache": {"imageStore": "containerd", "blobCache": {"enabled": True}},
}


def values(given: dict[str, Any]) -> str:
    return yaml.safe_dump(given)


def chart(given: dict[str, Any]) -> Manifests:
    return Manifests(rendering.helm_template(values(given)), optional_examples())


def normalized(node: Any, key: str = "") -> Any:
    """``node`` without what Helm adds by convention, and with kustomize's hash suffixes
    taken off ConfigMap names (both sides name them the same otherwise)."""
    if isinstance(node, list):
        return [normalized(item) for item in node]
    if not isinstance(node, dict):
        return node
    dropped = {
        "labels": HELM_LABELS,
        "matchLabels": HELM_LABELS,
        "selector": HELM_LABELS,
        "annotations": HELM_ANNOTATIONS,
    }.get(key, frozenset())
    result = {k: normalized(v, k) for k, v in node.items() if k not in dropped}
    if key in ("configMapRef", "configMap") or node.get("kind") == "ConfigMap":
        named = result.get("metadata", result)
        named["name"] = generated_name(named["name"])
    return result


def by_name(documents: list[Document]) -> dict[str, Document]:
    return {
        f"{d['kind']} {generated_name(d['metadata']['name'])}": normalized(d) for d in documents
    }


def assert_same_objects(helm: list[Document], kustomize: list[Document]) -> None:
    ours, theirs = by_name(helm), by_name(kustomize)
    # The chart makes no Namespace: Helm installs into one that exists (the README says
    # how to label it for Pod Security, as namespace.yaml does).
    assert theirs.pop("Namespace puller")["metadata"]["labels"]
    assert sorted(ours) == sorted(theirs)
    for name, document in ours.items():
        assert list(differences(document, theirs[name], name)) == []


def differences(helm: Any, kustomize: Any, path: str) -> Iterator[str]:
    """Where the two differ: ``path.to.field: helm's value != kustomize's``."""
    if isinstance(helm, dict) and isinstance(kustomize, dict):
        for key in sorted(helm.keys() | kustomize.keys()):
            yield from differences(helm.get(key), kustomize.get(key), f"{path}.{key}")
    elif isinstance(helm, list) and isinstance(kustomize, list) and len(helm) == len(kustomize):
        for index, (ours, theirs) in enumerate(zip(helm, kustomize, strict=True)):
            yield from differences(ours, theirs, f"{path}[{index}]")
    elif helm != kustomize:
        yield f"{path}: {helm!r} != {kustomize!r}"


def test_the_chart_lints_with_every_variant() -> None:
    for given in VARIANTS.values():
        said = rendering.helm_lint(values(given))
        assert "0 chart(s) failed" in said, said


def test_the_chart_at_its_defaults_makes_what_the_kustomize_base_makes() -> None:
    assert_same_objects(rendering.helm_template(), load().resources)


def test_the_chart_for_containerd_makes_what_the_containerd_overlay_makes() -> None:
    assert_same_objects(
        rendering.helm_template(values(CONTAINERD)), load(CONTAINERD_DEPLOY).resources
    )


def test_the_chart_with_the_blob_cache_makes_what_the_blob_cache_component_makes() -> None:
    assert_same_objects(
        rendering.helm_template(values(BLOB_CACHE)), load(DEPLOY, WITH_BLOB_CACHE).resources
    )


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def rendered(request: pytest.FixtureRequest) -> Manifests:
    return chart(VARIANTS[request.param])


@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__ for check in CHECKS])
def test_the_chart_passes_every_check(
    rendered: Manifests, check: Callable[[Manifests], Iterator[str]]
) -> None:
    assert list(check(copy.deepcopy(rendered))) == []


def test_on_containerd_the_blob_cache_is_ctrs_mirror_not_the_engines_cache() -> None:
    m = chart(VARIANTS["containerd-blob-cache"])
    hosts = m.config_map("puller-containerd-hosts")
    assert hosts is not None
    mirror = tomllib.loads(hosts["hosts.toml"])
    assert mirror["server"] == "https://registry-1.docker.io"
    assert list(mirror["host"]) == ["http://puller-blob-cache.puller.svc:5001"]
    assert "PULLER_PULL_THROUGH_CACHES" not in (m.config_map("puller-worker-config") or {})
    (service,) = [s for s in m.of_kind("Service") if s["metadata"]["name"] == "puller-blob-cache"]
    assert "clusterIP" not in service["spec"]


def test_the_values_reach_the_objects() -> None:
    given = {
        "worker": {
            "image": {"tag": "1.2.3"},
            "resources": {"limits": {"cpu": "2", "memory": "1Gi"}},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "env": {"PULLER_MAX_CONCURRENT_PULLS": 4},
        },
        "http": {"image": {"digest": "sha256:" + "a" * 64}, "replicas": 3},
    }
    m = chart(given)
    (worker,) = m.of_kind("DaemonSet")
    pod = worker["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "cyberdojo/puller-worker:1.2.3"
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "1Gi"}
    assert pod["tolerations"] == given["worker"]["tolerations"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert (m.config_map("puller-worker-config") or {})["PULLER_MAX_CONCURRENT_PULLS"] == "4"
    (http,) = m.of_kind("Deployment")
    assert http["spec"]["replicas"] == 3
    image = http["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "cyberdojo/puller-http@sha256:" + "a" * 64


def test_the_blob_caches_connections_are_a_value_checked_against_its_memory_limit() -> None:
    def cache_with(**given: Any) -> Manifests:
        return chart({"blobCache": {**BLOB_CACHE["blobCache"], **given}})

    m = cache_with(maxConnections=1000, resources={"limits": {"memory": "1Gi"}})
    (cache,) = blob_caches(m)
    assert isinstance(cache, CacheRun)
    assert cache.max_connections == 1000
    assert list(check_blob_cache(m)) == []
    problems = list(check_blob_cache(cache_with(maxConnections=1000)))  # 512Mi
    assert any("memory limit of 512Mi" in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (
            {"imageStore": "cri-o"},
            'imageStore must be one of the following: "docker", "containerd"',
        ),
        ({"blobcache": {"enabled": True}}, "Additional property blobcache is not allowed"),
        (
            {"worker": {"terminationGracePeriodSeconds": 25}},
            r"terminationGracePeriodSeconds \(25\) must exceed PULLER_SHUTDOWN_GRACE \(20\) \+ 5",
        ),
        ({"blobCache": {"enabled": True}}, "blobCache.clusterIP: on Docker nodes"),
        (
            {"blobCache": {"enabled": True, "clusterIP": "10.96.0.50"}},
            "blobCache.nodeCIDRs: on Docker nodes",
        ),
    ],
    ids=["store", "misspelt", "grace", "cluster-ip", "node-cidrs"],
)
def test_values_that_cannot_work_are_refused_saying_why(given: dict[str, Any], said: str) -> None:
    with pytest.raises(rendering.RenderFailed, match=said):
        rendering.helm_template(values(given))


def test_the_charts_version_is_the_projects() -> None:
    project = tomllib.loads((rendering.ROOT / "pyproject.toml").read_text())["project"]
    metadata = yaml.safe_load((rendering.CHART / "Chart.yaml").read_text())
    assert metadata["version"] == metadata["appVersion"] == project["version"]
