"""The Kubernetes manifests in ``deploy/``, as the cluster gets them.

Each way of deploying is rendered by the real tools (:mod:`tests.unit.rendering`: ``kubectl
kustomize`` for the base, its overlay and its optional component; ``helm template`` for the
chart) and every object rendered is validated offline against Kubernetes' own schemas for
:data:`KUBERNETES_VERSION` (kubernetes-validate, strict: an unknown field is an error).
Schemas say nothing of what matters to puller, so each check below reads the render for one
thing and returns the problems it finds, naming them; the programs' own settings tables
(``worker/settings.py``, ``gateway/settings.py``) and servers are the reference, so a setting
renamed in the code and not in the manifests fails here. ``test_each_check_fails_on_a_broken_copy``
breaks a copy of the render in each way listed in :data:`BREAKAGES` and sees the check meant
to catch it complain.

The RabbitmqCluster in ``optional/`` is the RabbitMQ Cluster Operator's custom resource: no
core schema knows it, so only its shape is checked here.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import re
import shutil
import socket
import tempfile
import tomllib
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath
from typing import Any, cast
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from contract import BrokerUnavailable, Misconfigured
from contract.connection import check_url
from gateway.api import Gateway
from gateway.metrics import GatewayMetrics
from gateway.settings import SETTINGS as GATEWAY_SETTINGS
from gateway.settings import GatewaySettings
from publisher import Publisher
from publisher.replies import AnswerMemory
from serving.http import Request
from serving.settings import InvalidSetting, Setting, read
from tests.fakes.store import MemoryStore
from worker.catch_up.ledger import OffsetStore
from worker.daemon import CANCEL_GRACE, Worker
from worker.settings import SETTINGS as WORKER_SETTINGS
from worker.settings import WorkerSettings

from . import rendering

KUBERNETES_VERSION = "1.30"
"""The Kubernetes version the manifests are validated against (deploy/kubernetes/README.md
says the same)."""

DEPLOY = rendering.DEPLOY
CONTAINERD_DEPLOY = rendering.CONTAINERD_DEPLOY
"""The overlay for nodes that run containerd: the base, its worker patched."""
NAMESPACE = "puller"
WORKER_IMAGE = "cyberdojo/puller-worker"
HTTP_IMAGE = "cyberdojo/puller-http"
SERVICE_NAME = "puller"
"""cyber-dojo's Ruby services call ``http://puller:5017``."""
CLIENT_LABEL = {"puller-client": "true"}
WORKLOAD_KINDS = ("DaemonSet", "Deployment", "StatefulSet", "Job")
CLUSTER_KINDS = ("Namespace", "PriorityClass")
"""The kinds rendered here that belong to no namespace."""
DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
"""Where the docker SDK looks when ``DOCKER_HOST`` is unset."""
READINESS_PATH = "/ready"
LIVENESS_PATH = "/alive"
METRICS_PATH = "/metrics"

Document = dict[str, Any]


@dataclass(frozen=True)
class Program:
    """One of puller's long-running programs, as its image runs it."""

    image: str
    settings_class: type[Any]
    table: tuple[Setting, ...]
    port_attribute: str
    port_name: str
    secret: str
    """The Secret holding this program's own RabbitMQ URL (one broker user per program)."""

    @property
    def variables(self) -> set[str]:
        return {s.env for s in self.table} | {s.file_env for s in self.table if s.secret}


WORKER = Program(
    WORKER_IMAGE, WorkerSettings, WORKER_SETTINGS, "health_port", "health", "puller-worker-amqp"
)
HTTP = Program(
    HTTP_IMAGE, GatewaySettings, GATEWAY_SETTINGS, "http_port", "http", "puller-http-amqp"
)
PROGRAMS = {program.image: program for program in (WORKER, HTTP)}


# -- the manifests as rendered ------------------------------------------------------------------


@dataclass
class Source:
    """The kustomize base's own files (what its kustomization lists), for the checks that
    read them rather than the render."""

    kustomization: Document
    files: list[str]
    """The YAML files beside kustomization.yaml."""


@dataclass
class Manifests:
    resources: list[Document]
    """Every object the render makes, generated ConfigMaps included."""
    optional: list[Document]
    """``optional/*.yaml``: applied apart, not part of the render."""
    source: Source | None = None
    """The base's kustomization, for a kustomize render; none for the Helm chart's."""

    def of_kind(self, kind: str) -> list[Document]:
        return [doc for doc in self.resources if doc.get("kind") == kind]

    def find(self, kind: str, name: str) -> Document | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def config_map(self, name: str) -> dict[str, str] | None:
        found = self.find("ConfigMap", name)
        return None if found is None else found.setdefault("data", {})

    @property
    def config_maps(self) -> dict[str, dict[str, str]]:
        """Each ConfigMap's data by its name as written (before kustomize's hash suffix)."""
        return {
            generated_name(doc["metadata"]["name"]): doc.setdefault("data", {})
            for doc in self.of_kind("ConfigMap")
        }


def generated_name(name: str) -> str:
    """A generated ConfigMap's name without the hash of its content kustomize appends."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def documents(path: Path) -> list[Document]:
    with path.open(encoding="utf-8") as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def optional_examples() -> list[Document]:
    return [doc for path in sorted(DEPLOY.glob("optional/*.yaml")) for doc in documents(path)]


def load(directory: Path = DEPLOY, components: tuple[str, ...] = ()) -> Manifests:
    """What ``kubectl apply -k directory`` applies (rendered by kustomize), with the base's
    own kustomization beside it."""
    (kustomization,) = documents(DEPLOY / "kustomization.yaml")
    files = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    return Manifests(
        rendering.kustomize(directory, components),
        optional_examples(),
        Source(kustomization, files),
    )


# -- reading pods ------------------------------------------------------------------------------


def image_name(reference: str) -> str:
    """The repository of an image reference, without tag or digest."""
    name = reference.partition("@")[0]
    head, slash, last = name.rpartition("/")
    return f"{head}{slash}{last.partition(':')[0]}"


def pod_spec(workload: Document) -> Document:
    return cast(Document, workload["spec"]["template"]["spec"])


def pod_labels(workload: Document) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels") or {})


def all_containers(pod: Document) -> list[Document]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def label(doc: Document) -> str:
    return f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"


@dataclass
class Run:
    """One container of a workload that runs one of puller's programs."""

    workload: Document
    container: Document
    program: Program

    @property
    def pod(self) -> Document:
        return pod_spec(self.workload)

    @property
    def where(self) -> str:
        return f"{label(self.workload)}, container {self.container['name']}"


def runs(m: Manifests) -> Iterator[Run]:
    for kind in WORKLOAD_KINDS:
        for workload in m.of_kind(kind):
            for container in all_containers(pod_spec(workload)):
                program = PROGRAMS.get(image_name(container.get("image", "")))
                # a command of its own: another program of the image (the blob cache)
                if program is not None and not container.get("command"):
                    yield Run(workload, container, program)


def the_run(m: Manifests, program: Program) -> Run:
    found = [run for run in runs(m) if run.program is program]
    assert len(found) == 1, f"expected one container running {program.image}, found {len(found)}"
    return found[0]


@dataclass
class Environment:
    """A container's environment as the kubelet builds it: ConfigMaps and Secrets from
    ``envFrom`` first, then ``env`` (which wins)."""

    values: dict[str, str]
    """Variables with a value written in the manifests."""
    derived: dict[str, Document]
    """Variables set from ``valueFrom`` (the downward API, a key of a ConfigMap or Secret)."""
    problems: list[str]

    @property
    def names(self) -> set[str]:
        return set(self.values) | set(self.derived)


def environment(m: Manifests, container: Document) -> Environment:
    values: dict[str, str] = {}
    derived: dict[str, Document] = {}
    problems: list[str] = []
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            data = m.config_map(name)
        else:
            name = source["secretRef"]["name"]
            secret = m.find("Secret", name)
            data = None if secret is None else secret_data(secret)
        if data is None:
            problems.append(f"envFrom names {name!r}, which the manifests do not make")
            continue
        values.update({prefix + key: value for key, value in data.items()})
    for variable in container.get("env", []):
        values.pop(variable["name"], None)
        derived.pop(variable["name"], None)
        if "valueFrom" in variable:
            derived[variable["name"]] = variable["valueFrom"]
        else:
            values[variable["name"]] = str(variable.get("value", ""))
    return Environment(values, derived, problems)


def secret_data(secret: Document) -> dict[str, str]:
    return {**(secret.get("data") or {}), **(secret.get("stringData") or {})}


def settings_of(m: Manifests, run: Run) -> Any:
    """The program's settings as it will read them from the values written in the
    manifests (the ``_FILE`` variables of secrets, which it would open, left out). Raises
    :class:`InvalidSetting` as the program would at start."""
    env = environment(m, run.container)
    file_variables = {s.file_env for s in run.program.table if s.secret}
    given = {k: v for k, v in env.values.items() if k not in file_variables}
    return read(run.program.settings_class, run.program.table, given)


def port_number(container: Document, port: int | str) -> int | None:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return named[0] if named else None


def mounted(m: Manifests, config_map: str) -> bool:
    """Whether a pod mounts the ConfigMap as a volume."""
    return any(
        volume.get("configMap", {}).get("name") == config_map
        for kind in WORKLOAD_KINDS
        for workload in m.of_kind(kind)
        for volume in pod_spec(workload).get("volumes", [])
    )


def volume_for(pod: Document, mount: Document) -> Document | None:
    return next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), None)


def mount_at(pod: Document, container: Document, path: str) -> tuple[Document, Document] | None:
    """The mount holding ``path`` (the deepest one) and its volume."""
    target = PurePosixPath(path)
    holding = [
        mount
        for mount in container.get("volumeMounts", [])
        if target == PurePosixPath(mount["mountPath"])
        or PurePosixPath(mount["mountPath"]) in target.parents
    ]
    if not holding:
        return None
    mount = max(holding, key=lambda mount: len(PurePosixPath(mount["mountPath"]).parts))
    volume = volume_for(pod, mount)
    return None if volume is None else (mount, volume)


UNITS: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
}


def quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity (``10m``, ``64Mi``, ``1``) as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    if match is None or match.group(2) not in UNITS:
        raise ValueError(f"not a quantity: {text!r}")
    try:
        return Decimal(match.group(1)) * UNITS[match.group(2)]
    except InvalidOperation:
        raise ValueError(f"not a quantity: {text!r}") from None


# -- the checks: each yields the problems it finds ---------------------------------------------


def check_schemas(m: Manifests) -> Iterator[str]:
    """Every object rendered, generated ConfigMaps included, is valid for
    KUBERNETES_VERSION."""
    for doc in m.resources:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            yield f"{label(doc)}: {where}: {error.message}"
        except kubernetes_validate.SchemaNotFoundError as error:
            yield f"{label(doc)}: not a core resource ({error.message}); put it in optional/"


def check_kustomization(m: Manifests) -> Iterator[str]:
    """The namespace, every file listed, and the two images by their names and tags."""
    if m.source is not None:
        yield from _kustomization_file(m.source)
    for doc in m.resources:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] not in CLUSTER_KINDS and namespace != NAMESPACE:
            yield f"{label(doc)}: in the namespace {namespace!r}, not {NAMESPACE!r}"
    for kind in WORKLOAD_KINDS:
        for workload in m.of_kind(kind):
            for container in all_containers(pod_spec(workload)):
                image = container.get("image", "")
                if image_name(image) not in PROGRAMS:
                    yield (
                        f"{label(workload)}: image {image!r} is neither "
                        f"{WORKER_IMAGE} nor {HTTP_IMAGE}"
                    )
                elif not re.search(r"(:[\w.-]+|@sha256:[0-9a-f]{64})$", image.rpartition("/")[2]):
                    yield f"{label(workload)}: image {image!r} has neither a tag nor a digest"
    used = {run.program.image for run in runs(m)}
    for missing in sorted(set(PROGRAMS) - used):
        yield f"no workload runs {missing}"
    if m.of_kind("Namespace") and not m.find("Namespace", NAMESPACE):
        yield f"the Namespace made is not {NAMESPACE!r}"


def _kustomization_file(source: Source) -> Iterator[str]:
    k = source.kustomization
    if k.get("namespace") != NAMESPACE:
        yield f"kustomization.yaml: namespace is {k.get('namespace')!r}, not {NAMESPACE!r}"
    unlisted = sorted(set(source.files) - set(k.get("resources", [])))
    if unlisted:
        yield f"kustomization.yaml does not list {', '.join(unlisted)}"
    images = {entry["name"]: entry for entry in k.get("images", [])}
    if set(images) != set(PROGRAMS):
        yield f"kustomization.yaml images are {sorted(images)}, not {sorted(PROGRAMS)}"
    for name, entry in images.items():
        if not (entry.get("newTag") or entry.get("digest")):
            yield f"kustomization.yaml: image {name} has neither newTag nor digest"


def check_containers(m: Manifests) -> Iterator[str]:
    """Every container: readiness and liveness probes, requests and limits, a locked-down
    securityContext."""
    for kind in WORKLOAD_KINDS:
        for workload in m.of_kind(kind):
            for container in all_containers(pod_spec(workload)):
                where = f"{label(workload)}, container {container['name']}"
                for probe in ("readinessProbe", "livenessProbe"):
                    if "httpGet" not in container.get(probe, {}):
                        yield f"{where}: no {probe} (an HTTP GET)"
                yield from _resources(where, container.get("resources", {}))
                yield from _locked_down(where, container.get("securityContext", {}))


def _resources(where: str, resources: Document) -> Iterator[str]:
    for resource in ("cpu", "memory"):
        request = resources.get("requests", {}).get(resource)
        limit = resources.get("limits", {}).get(resource)
        if request is None or limit is None:
            yield f"{where}: {resource} needs a request and a limit"
        elif quantity(request) > quantity(limit):
            yield f"{where}: {resource} request {request} is above its limit {limit}"


def _locked_down(where: str, context: Document) -> Iterator[str]:
    if context.get("allowPrivilegeEscalation") is not False:
        yield f"{where}: securityContext.allowPrivilegeEscalation must be false"
    if context.get("readOnlyRootFilesystem") is not True:
        yield f"{where}: securityContext.readOnlyRootFilesystem must be true"
    if context.get("privileged"):
        yield f"{where}: privileged"
    capabilities = context.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []):
        yield f"{where}: securityContext.capabilities.drop must include ALL"
    if capabilities.get("add"):
        yield f"{where}: adds capabilities {capabilities['add']}"


def check_environment(m: Manifests) -> Iterator[str]:
    """Every variable a program's container gets (``env`` and the keys of the ConfigMaps it
    reads with ``envFrom``) is one of that program's settings, with a value it accepts."""
    read_by: dict[str, set[str]] = {}
    for run in runs(m):
        env = environment(m, run.container)
        yield from (f"{run.where}: {problem}" for problem in env.problems)
        for source in run.container.get("envFrom", []):
            if "configMapRef" in source:
                read_by.setdefault(source["configMapRef"]["name"], set()).add(run.program.image)
        unknown = sorted(env.names - run.program.variables)
        if unknown:
            yield (
                f"{run.where}: {', '.join(unknown)} not in the settings of "
                f"{run.program.image} ({run.program.settings_class.__name__})"
            )
        for row in run.program.table:
            if row.secret and {row.env, row.file_env} <= env.names:
                yield f"{run.where}: sets both {row.env} and {row.file_env}"
        try:
            settings_of(m, run)
        except InvalidSetting as error:
            yield f"{run.where}: the program would refuse to start: {error}"
        if run.pod.get("enableServiceLinks") is not False:
            yield (
                f"{run.where}: enableServiceLinks must be false: the Service {SERVICE_NAME!r} "
                f"would add PULLER_SERVICE_HOST, PULLER_PORT... to the environment"
            )
    for doc in m.of_kind("ConfigMap"):
        name = doc["metadata"]["name"]
        if name not in read_by and not mounted(m, name):
            yield f"the ConfigMap {name} is read by no container"
    for name, images in sorted(read_by.items()):
        if len(images) > 1:
            yield f"the ConfigMap {name} is read by {sorted(images)}: give each its own"


def check_secret_mounts(m: Manifests) -> Iterator[str]:
    """Each program reads its RabbitMQ URL from a file of its own mounted Secret."""
    for run in runs(m):
        env = environment(m, run.container)
        for row in run.program.table:
            if not row.secret:
                continue
            if row.env in env.names:
                yield (
                    f"{run.where}: {row.env} in the environment; mount a Secret and set "
                    f"{row.file_env}"
                )
            path = env.values.get(row.file_env)
            if path is None:
                yield f"{run.where}: {row.file_env} is not set"
                continue
            found = mount_at(run.pod, run.container, path)
            if found is None:
                yield f"{run.where}: {row.file_env}={path} is inside no mounted volume"
                continue
            mount, volume = found
            if "secret" not in volume:
                yield f"{run.where}: {row.file_env}={path} is not in a mounted Secret"
                continue
            name = volume["secret"].get("secretName")
            if name != run.program.secret:
                yield f"{run.where}: mounts the Secret {name}, not {run.program.secret}"
            secret = m.find("Secret", name)
            if secret is None:
                yield f"{run.where}: the Secret {name} is not in the manifests"
                continue
            relative = str(PurePosixPath(path).relative_to(mount["mountPath"]))
            items = volume["secret"].get("items")
            key = (
                next((i["key"] for i in items if i["path"] == relative), None)
                if items
                else relative
            )
            if key not in secret_data(secret):
                yield f"{run.where}: {row.file_env}={path} is no key of the Secret {name}"


def check_ports_and_probes(m: Manifests) -> Iterator[str]:
    """The container port is the one the program listens on (the code's default unless the
    manifests set it); the probes and the scrape annotations use it."""
    for run in runs(m):
        try:
            settings = settings_of(m, run)
        except InvalidSetting:
            continue  # check_environment says why
        port = getattr(settings, run.program.port_attribute)
        declared = {p.get("name"): p["containerPort"] for p in run.container.get("ports", [])}
        if declared.get(run.program.port_name) != port:
            yield (
                f"{run.where}: needs the port {run.program.port_name!r} = {port} "
                f"(the program's {run.program.port_attribute}); has {declared}"
            )
        for probe, path in (("readinessProbe", READINESS_PATH), ("livenessProbe", LIVENESS_PATH)):
            get = run.container.get(probe, {}).get("httpGet", {})
            if get.get("path") != path:
                yield f"{run.where}: {probe} asks {get.get('path')!r}, not {path}"
            asked = port_number(run.container, get.get("port", ""))
            if asked != port:
                yield f"{run.where}: {probe} asks port {get.get('port')!r} ({asked}), not {port}"
        annotations = run.workload["spec"]["template"]["metadata"].get("annotations", {})
        wanted = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": METRICS_PATH,
        }
        for key, value in wanted.items():
            if annotations.get(key) != value:
                yield f"{run.where}: annotation {key} is {annotations.get(key)!r}, not {value!r}"


def check_paths_are_answered(m: Manifests) -> Iterator[str]:
    """The programs themselves answer the probes' paths (GET, JSON, 200 or 503) and the
    scrape path (200): asked of a real worker's health server and of the gateway."""
    for run in runs(m):
        annotations = run.workload["spec"]["template"]["metadata"].get("annotations", {})
        probes = {
            run.container.get(probe, {}).get("httpGet", {}).get("path", "")
            for probe in ("readinessProbe", "livenessProbe")
        }
        scrape = annotations.get("prometheus.io/path", METRICS_PATH)
        answers = answers_of(run.program.image, frozenset({*probes, scrape}))
        for path in sorted(probes):
            status, content_type = answers[path]
            if status not in (200, 503) or content_type != "application/json":
                yield f"{run.where}: {run.program.image} answers GET {path} with {status}"
        if answers[scrape][0] != 200:
            yield f"{run.where}: {run.program.image} answers GET {scrape} with {answers[scrape][0]}"


def check_worker(m: Manifests) -> Iterator[str]:
    """One worker on every node: tolerations, node name, socket, state, rollout, priority,
    shutdown grace."""
    run = the_run(m, WORKER)
    if run.workload["kind"] != "DaemonSet":
        yield f"the worker runs in a {run.workload['kind']}, not a DaemonSet"
    pod, where = run.pod, run.where
    if not any(
        t.get("operator") == "Exists" and not t.get("key") and not t.get("effect")
        for t in pod.get("tolerations", [])
    ):
        yield f"{where}: does not tolerate every taint (a toleration `operator: Exists` alone)"
    env = environment(m, run.container)
    node = env.derived.get("PULLER_NODE_NAME", {}).get("fieldRef", {}).get("fieldPath")
    if node != "spec.nodeName":
        yield f"{where}: PULLER_NODE_NAME must come from the pod's spec.nodeName"
    try:
        settings = settings_of(m, run)
    except InvalidSetting:
        return  # check_environment says why
    yield from _store_socket(run, settings)
    yield from _host_path(run, str(settings.state_dir), "DirectoryOrCreate", "PULLER_STATE_DIR")
    strategy = run.workload["spec"].get("updateStrategy", {})
    rolling = strategy.get("rollingUpdate", {})
    unavailable = rolling.get("maxUnavailable")
    if strategy.get("type") != "RollingUpdate" or unavailable is None:
        yield f"{where}: needs a RollingUpdate with maxUnavailable"
    elif isinstance(unavailable, str) and not 0 < int(unavailable.rstrip("%")) <= 25:
        yield f"{where}: maxUnavailable {unavailable} is not a few nodes at a time"
    if rolling.get("maxSurge", 0) not in (0, "0%"):
        yield f"{where}: maxSurge must be 0 (two workers on a node would share its name)"
    priority = m.find("PriorityClass", pod.get("priorityClassName", ""))
    if priority is None:
        yield f"{where}: needs a priorityClassName of a PriorityClass shipped with it"
    elif not 0 < priority["value"] < 1_000_000_000 or priority.get("globalDefault"):
        yield f"{label(priority)}: value must be above 0 (the default), below the system's"
    grace = pod.get("terminationGracePeriodSeconds", 30)
    needed = settings.shutdown_grace + CANCEL_GRACE
    if not grace > needed:
        yield (
            f"{where}: terminationGracePeriodSeconds {grace} must exceed PULLER_SHUTDOWN_GRACE "
            f"{settings.shutdown_grace:g} + {CANCEL_GRACE:g}"
        )
    yield from _network_policy(m, "puller-worker", pod_labels(run.workload), settings.health_port)


def _store_socket(run: Run, settings: WorkerSettings) -> Iterator[str]:
    """The socket of the image store the settings name, and only that one."""
    if settings.image_store == "containerd":
        yield from _host_path(run, settings.containerd_address, "Socket", "containerd's socket")
        if mount_at(run.pod, run.container, DEFAULT_DOCKER_SOCKET) is not None:
            yield f"{run.where}: mounts the Docker socket, which the containerd store does not use"
        return
    socket_path = (settings.docker_host or f"unix://{DEFAULT_DOCKER_SOCKET}").removeprefix(
        "unix://"
    )
    yield from _host_path(run, socket_path, "Socket", "the Docker socket")


def _host_path(run: Run, path: str, kind: str, what: str) -> Iterator[str]:
    found = mount_at(run.pod, run.container, path)
    if found is None or found[0]["mountPath"] != path:
        yield f"{run.where}: {what} ({path}) is not mounted"
        return
    host = found[1].get("hostPath")
    if host is None or host.get("type") != kind:
        yield f"{run.where}: {what} must be a hostPath of type {kind}"


def check_http(m: Manifests) -> Iterator[str]:
    """puller-http: two replicas, non-root, /tmp in memory, the Service `puller` on 5017,
    reachable only by labelled clients."""
    run = the_run(m, HTTP)
    pod, where = run.pod, run.where
    if run.workload["kind"] != "Deployment" or run.workload["spec"].get("replicas", 1) < 2:
        yield f"{where}: needs a Deployment of at least 2 replicas"
    context = {**pod.get("securityContext", {}), **run.container.get("securityContext", {})}
    for key, value in (("runAsNonRoot", True), ("runAsUser", 65534), ("runAsGroup", 65534)):
        if context.get(key) != value:
            yield f"{where}: securityContext.{key} must be {value}"
    found = mount_at(pod, run.container, "/tmp")  # noqa: S108 - the path checked, not used
    tmp = {} if found is None else found[1].get("emptyDir")
    if not tmp or tmp.get("medium") != "Memory" or not tmp.get("sizeLimit"):
        yield f"{where}: /tmp must be an emptyDir in memory with a sizeLimit"
    try:
        port = settings_of(m, run).http_port
    except InvalidSetting:
        return  # check_environment says why
    service = m.find("Service", SERVICE_NAME)
    labels = pod_labels(run.workload)
    if service is None:
        yield f"no Service {SERVICE_NAME!r} (cyber-dojo calls http://{SERVICE_NAME}:5017)"
    else:
        selector = service["spec"].get("selector", {})
        if not selector or selector.items() - labels.items():
            yield f"{label(service)}: selects {selector}, not puller-http's pods {labels}"
        worker_labels = pod_labels(the_run(m, WORKER).workload)
        if selector and not selector.items() - worker_labels.items():
            yield f"{label(service)}: selects the workers too"
        ports = service["spec"].get("ports", [])
        callers_port = GatewaySettings().http_port
        if not any(
            p["port"] == callers_port
            and port_number(run.container, p.get("targetPort", p["port"])) == port
            for p in ports
        ):
            yield f"{label(service)}: needs port {callers_port} to puller-http's port {port}"
    yield from _network_policy(m, "puller-http", labels, port)


def ingress_policies(m: Manifests, labels: Mapping[str, str]) -> list[Document]:
    """The NetworkPolicies limiting who reaches pods with ``labels``."""
    return [
        p
        for p in m.of_kind("NetworkPolicy")
        if not p["spec"]["podSelector"].get("matchLabels", {}).items() - labels.items()
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]


def _network_policy(m: Manifests, what: str, labels: Mapping[str, str], port: int) -> Iterator[str]:
    """Only pods labelled CLIENT_LABEL reach ``what``'s pods, and only on ``port``."""
    policies = ingress_policies(m, labels)
    if not policies:
        yield f"no NetworkPolicy limits who reaches {what}"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if not peers:
                yield f"{label(policy)}: a rule admits every source"
            for peer in peers or []:
                if peer.get("podSelector", {}).get("matchLabels") != CLIENT_LABEL or (
                    "ipBlock" in peer
                ):
                    yield f"{label(policy)}: admits {peer}, not only pods labelled {CLIENT_LABEL}"
            numbers = [p.get("port") for p in rule.get("ports", [])]
            if numbers != [port]:
                yield f"{label(policy)}: admits ports {numbers}, not only {port}"


def missing_plugins(cluster: Document) -> Iterator[str]:
    plugins = cluster.get("spec", {}).get("rabbitmq", {}).get("additionalPlugins", [])
    for plugin, why in (
        ("rabbitmq_management", "puller broker-setup uses it"),
        ("rabbitmq_stream", "workers read the history's end over it"),
    ):
        if plugin not in plugins:
            yield f"{label(cluster)}: needs {plugin} ({why})"


def check_broker(m: Manifests) -> Iterator[str]:
    """The Secrets hold placeholders for URLs of the example RabbitmqCluster, whose shape is
    checked by hand (it is the operator's custom resource, outside the core schemas)."""
    clusters = [d for d in m.optional if d.get("kind") == "RabbitmqCluster"]
    if len(clusters) != 1:
        yield "optional/ needs one RabbitmqCluster example"
        return
    cluster = clusters[0]
    if cluster.get("apiVersion") != "rabbitmq.com/v1beta1":
        yield f"{label(cluster)}: apiVersion must be rabbitmq.com/v1beta1"
    if cluster["metadata"].get("namespace") != NAMESPACE:
        yield f"{label(cluster)}: must be in the namespace {NAMESPACE!r}"
    spec = cluster.get("spec", {})
    yield from missing_plugins(cluster)
    replicas = spec.get("replicas", 1)
    if replicas % 2 == 0:
        yield f"{label(cluster)}: an odd number of replicas keeps a majority"
    if "image" in spec:
        version = re.search(r":(\d+)\.(\d+)", spec["image"])
        if version is None or (int(version.group(1)), int(version.group(2))) < (3, 9):
            yield f"{label(cluster)}: image {spec['image']} is older than 3.9 (no streams)"
    for program in PROGRAMS.values():
        secret = m.find("Secret", program.secret)
        url = None if secret is None else secret_data(secret).get("url")
        if url is None:
            yield f"no Secret {program.secret} with the key url"
            continue
        try:
            check_url(url)
        except Misconfigured as error:
            yield f"Secret {program.secret}: {error}"
            continue
        if "FILL-IN" not in url:
            yield f"Secret {program.secret}: ships no placeholder (FILL-IN) but a password?"
        host = urlsplit(url).hostname or ""
        if host.split(".")[0] != cluster["metadata"]["name"]:
            yield f"Secret {program.secret}: names the host {host}, not the RabbitmqCluster's"


BLOB_CACHE_COMMAND = ["puller-blob-cache"]
BLOB_CACHE_PATH = "/alive"
BLOB_CACHE_MAX_CONNECTIONS = 128
"""``--max-connections``'s default."""
BLOB_CACHE_BASE = 64 * 2**20
BLOB_CACHE_PER_CONNECTION = 640 * 2**10
"""The memory the cache's limit must leave: for itself, and per connection at worst (a
client that stops reading a blob being fetched: about 0.6 MiB, bench/blob_cache_clients.py)."""


@dataclass
class CacheRun:
    """The blob cache's container, and its arguments (``puller-blob-cache --upstream URL
    --listen HOST:PORT --dir DIR --max-bytes N [--max-connections N]``)."""

    workload: Document
    container: Document
    upstream: str
    listen: tuple[str, int]
    directory: str
    max_bytes: int
    max_connections: int

    @property
    def pod(self) -> Document:
        return pod_spec(self.workload)

    @property
    def where(self) -> str:
        return f"{label(self.workload)}, container {self.container['name']}"


def cache_arguments(arguments: list[str]) -> argparse.Namespace:
    """The blob cache's command line as it reads it; raises ``ValueError`` saying what is
    wrong."""
    parser = argparse.ArgumentParser(exit_on_error=False, add_help=False)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--max-connections", type=int, default=BLOB_CACHE_MAX_CONNECTIONS)
    try:
        parsed, unknown = parser.parse_known_args(arguments)
    except argparse.ArgumentError as error:
        raise ValueError(str(error)) from None
    if unknown:
        raise ValueError(f"flags it does not take: {unknown}")
    return parsed


def blob_caches(m: Manifests) -> Iterator[CacheRun | str]:
    """Each blob cache container, or what is wrong with its arguments."""
    for kind in WORKLOAD_KINDS:
        for workload in m.of_kind(kind):
            for container in all_containers(pod_spec(workload)):
                if container.get("command") != BLOB_CACHE_COMMAND:
                    continue
                where = f"{label(workload)}, container {container['name']}"
                try:
                    parsed = cache_arguments([str(a) for a in container.get("args", [])])
                    host, _, port = parsed.listen.rpartition(":")
                    listen = (host, int(port))
                except ValueError as error:
                    yield f"{where}: puller-blob-cache would refuse its arguments: {error}"
                    continue
                yield CacheRun(
                    workload,
                    container,
                    parsed.upstream,
                    listen,
                    parsed.dir,
                    parsed.max_bytes,
                    parsed.max_connections,
                )


def check_blob_cache(m: Manifests) -> Iterator[str]:
    """The blob cache, where one is deployed: its arguments, port and probes, non-root, a
    volume above --max-bytes, a Service, only the workers reaching it, and the workers
    pulling through it."""
    for cache in blob_caches(m):
        if isinstance(cache, str):
            yield cache
            continue
        where, port = cache.where, cache.listen[1]
        if cache.listen[0] != "0.0.0.0":
            yield f"{where}: --listen {cache.listen[0]} is not reached from other pods (0.0.0.0)"
        declared = [p["containerPort"] for p in cache.container.get("ports", [])]
        if declared != [port]:
            yield f"{where}: declares the ports {declared}, not --listen's {port}"
        for probe in ("readinessProbe", "livenessProbe"):
            get = cache.container.get(probe, {}).get("httpGet", {})
            asked = port_number(cache.container, get.get("port", ""))
            if (get.get("path"), asked) != (BLOB_CACHE_PATH, port):
                yield f"{where}: {probe} must ask {BLOB_CACHE_PATH} on {port}"
        context = {**cache.pod.get("securityContext", {}), **cache.container["securityContext"]}
        if context.get("runAsNonRoot") is not True or not context.get("runAsUser"):
            yield f"{where}: must run as a non-root user (runAsNonRoot, runAsUser)"
        yield from _cache_volume(cache)
        yield from _cache_memory(cache)
        service = yield from _cache_service(m, cache)
        yield from _cache_policy(m, cache)
        if service is not None:
            yield from _pulls_through(m, cache, service)


def _cache_volume(cache: CacheRun) -> Iterator[str]:
    found = mount_at(cache.pod, cache.container, cache.directory)
    empty_dir = None if found is None else found[1].get("emptyDir")
    if empty_dir is None or "sizeLimit" not in empty_dir:
        yield f"{cache.where}: --dir {cache.directory} must be an emptyDir with a sizeLimit"
    elif not cache.max_bytes < quantity(empty_dir["sizeLimit"]):
        yield (
            f"{cache.where}: --max-bytes {cache.max_bytes} must be below the volume's "
            f"sizeLimit {empty_dir['sizeLimit']} (the kubelet evicts a pod past it)"
        )


def _cache_memory(cache: CacheRun) -> Iterator[str]:
    limit = cache.container.get("resources", {}).get("limits", {}).get("memory")
    needed = BLOB_CACHE_BASE + BLOB_CACHE_PER_CONNECTION * cache.max_connections
    if limit is None or quantity(limit) < needed:
        yield (
            f"{cache.where}: a memory limit of {limit} is below {needed // 2**20} MiB, what "
            f"--max-connections {cache.max_connections} may take (64 MiB and 640 KiB each)"
        )


def _cache_service(m: Manifests, cache: CacheRun) -> Generator[str, None, Document | None]:
    labels = pod_labels(cache.workload)
    for service in m.of_kind("Service"):
        selector = service["spec"].get("selector", {})
        if selector and not selector.items() - labels.items():
            ports = service["spec"].get("ports", [])
            if [port_number(cache.container, p.get("targetPort", p["port"])) for p in ports] != [
                cache.listen[1]
            ]:
                yield f"{label(service)}: must lead to the cache's port {cache.listen[1]} alone"
            return service
    yield f"{cache.where}: no Service selects the cache"
    return None


def _cache_policy(m: Manifests, cache: CacheRun) -> Iterator[str]:
    """Only the workers: their pods, and addresses (the nodes', whose engines pull)."""
    policies = ingress_policies(m, pod_labels(cache.workload))
    if not policies:
        yield "no NetworkPolicy limits who reaches the blob cache"
    worker_labels = pod_labels(the_run(m, WORKER).workload)
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if not peers:
                yield f"{label(policy)}: a rule admits every source"
            for peer in peers or []:
                pods = peer.get("podSelector", {}).get("matchLabels")
                workers = bool(pods) and not pods.items() - worker_labels.items()
                if not (set(peer) == {"ipBlock"} or (set(peer) == {"podSelector"} and workers)):
                    yield f"{label(policy)}: admits {peer}, not only the workers"
            numbers = [p.get("port") for p in rule.get("ports", [])]
            if numbers != [cache.listen[1]]:
                yield f"{label(policy)}: admits ports {numbers}, not only {cache.listen[1]}"


def _pulls_through(m: Manifests, cache: CacheRun, service: Document) -> Iterator[str]:
    """The workers pull cache.upstream's images through the Service: on Docker nodes with
    PULLER_PULL_THROUGH_CACHES naming its ClusterIP (each node's engine pulls, and nodes
    do not resolve the cluster's names); on containerd nodes with a hosts.toml mirror in
    PULLER_CONTAINERD_HOSTS_DIR (ctr pulls from the worker's pod)."""
    run = the_run(m, WORKER)
    try:
        settings = settings_of(m, run)
    except InvalidSetting:
        return  # check_environment says why
    upstream = urlsplit(cache.upstream).netloc
    upstream = {"registry-1.docker.io": "docker.io", "index.docker.io": "docker.io"}.get(
        upstream, upstream
    )
    port = service["spec"]["ports"][0]["port"]
    if settings.image_store == "docker":
        address = f"{service['spec'].get('clusterIP')}:{port}"
        routes = dict(settings.pull_through_caches)
        if routes.get(upstream) != address:
            yield (
                f"{run.where}: PULLER_PULL_THROUGH_CACHES must route {upstream} to the "
                f"cache's ClusterIP {address}, not {routes.get(upstream)!r}"
            )
        return
    mirrors = _hosts_toml(m, run, settings.containerd_hosts_dir, upstream)
    name, namespace = service["metadata"]["name"], service["metadata"].get("namespace")
    wanted = {f"http://{name}.{namespace}.svc:{port}", f"http://{name}:{port}"}
    if not wanted & set(mirrors):
        yield f"{run.where}: no hosts.toml mirror for {upstream} names {sorted(wanted)}"


def _hosts_toml(m: Manifests, run: Run, hosts_dir: str | None, registry: str) -> list[str]:
    """The mirrors ``hosts_dir/registry/hosts.toml`` names, from the ConfigMap mounted."""
    if hosts_dir is None:
        return []
    path = f"{hosts_dir}/{registry}/hosts.toml"
    found = mount_at(run.pod, run.container, path)
    config_map = None if found is None else found[1].get("configMap")
    if config_map is None:
        return []
    relative = str(PurePosixPath(path).relative_to(found[0]["mountPath"]))  # type: ignore[index]
    items = config_map.get("items")
    key = next((i["key"] for i in items if i["path"] == relative), None) if items else relative
    text = (m.config_map(config_map["name"]) or {}).get(key or "")
    return list(tomllib.loads(text or "").get("host", {}))


CHECKS: tuple[Callable[[Manifests], Iterator[str]], ...] = (
    check_schemas,
    check_kustomization,
    check_containers,
    check_environment,
    check_secret_mounts,
    check_ports_and_probes,
    check_paths_are_answered,
    check_worker,
    check_http,
    check_broker,
    check_blob_cache,
)


# -- asking the programs -----------------------------------------------------------------------


class Disconnected:
    """What the gateway asks of its publisher for ``/ready`` and ``/metrics``, never
    connected."""

    connected = False
    connection_problem = "not connected (a test)"

    def connect(self, timeout: float) -> bool:
        return False

    def nodes(self) -> list[object]:
        raise BrokerUnavailable(self.connection_problem)

    def answer_memory(self) -> AnswerMemory:
        return AnswerMemory(64 * 2**20, 0, 0, 0, 0, 0)


NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"
_answers: dict[tuple[str, frozenset[str]], dict[str, tuple[int, str]]] = {}


def answers_of(image: str, paths: frozenset[str]) -> dict[str, tuple[int, str]]:
    """Status and content type of GET ``path`` for each path, from the program ``image`` runs."""
    key = (image, paths)
    if key not in _answers:
        _answers[key] = _ask_worker(paths) if image == WORKER_IMAGE else _ask_gateway(paths)
    return _answers[key]


def _ask_worker(paths: frozenset[str]) -> dict[str, tuple[int, str]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = WorkerSettings(
        amqp_url=NO_BROKER, node_name="manifest-test", health_port=port, shutdown_grace=0
    )
    answers: dict[str, tuple[int, str]] = {}
    with tempfile.TemporaryDirectory() as state:
        worker = Worker(settings, OffsetStore(Path(state)), store=MemoryStore())
        worker.start()
        try:
            for path in paths:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                try:
                    connection.request("GET", path)
                    response = connection.getresponse()
                    response.read()
                    answers[path] = (response.status, response.getheader("Content-Type", ""))
                finally:
                    connection.close()
        finally:
            worker.drain()
    return answers


def _ask_gateway(paths: frozenset[str]) -> dict[str, tuple[int, str]]:
    gateway = Gateway(cast(Publisher, Disconnected()), GatewaySettings(), GatewayMetrics())
    answers: dict[str, tuple[int, str]] = {}
    for path in paths:
        response = gateway.handle(Request("GET", path, "", {}, b""))
        if response.content_type == "application/json":
            json.loads(response.body)
        answers[path] = (response.status, response.content_type.partition(";")[0])
    return answers


# -- the tests ---------------------------------------------------------------------------------


WITH_BLOB_CACHE = (rendering.BLOB_CACHE_COMPONENT,)
BLOB_CACHE_OBJECTS = [
    "ServiceAccount puller-blob-cache",
    "Deployment puller-blob-cache",
    "Service puller-blob-cache",
    "NetworkPolicy puller-blob-cache",
]


@pytest.fixture(
    scope="module",
    params=[(DEPLOY, ()), (CONTAINERD_DEPLOY, ()), (DEPLOY, WITH_BLOB_CACHE)],
    ids=["docker", "containerd", "docker-blob-cache"],
)
def manifests(request: pytest.FixtureRequest) -> Manifests:
    return load(*request.param)


def test_the_blob_cache_component_adds_the_cache_and_routes_the_workers_through_it() -> None:
    base, cached = load(), load(DEPLOY, WITH_BLOB_CACHE)
    added = sorted({label(d) for d in cached.resources} - {label(d) for d in base.resources})
    assert [name for name in added if not name.startswith("ConfigMap")] == sorted(
        BLOB_CACHE_OBJECTS
    )
    worker_config = cached.config_maps["puller-worker-config"]
    assert worker_config.pop("PULLER_PULL_THROUGH_CACHES") == "docker.io=10.96.0.50:5001"
    assert worker_config == base.config_maps["puller-worker-config"]


def test_the_containerd_overlay_changes_only_the_workers_socket_and_store() -> None:
    """Everything else is the base's: the overlay lists the base and one patch."""
    (overlay,) = documents(CONTAINERD_DEPLOY / "kustomization.yaml")
    assert overlay["resources"] == ["../kubernetes"]
    assert [p["target"]["name"] for p in overlay["patches"]] == ["puller-worker"]
    base, patched = load(), load(CONTAINERD_DEPLOY)
    assert [label(doc) for doc in base.resources] == [label(doc) for doc in patched.resources]
    for before, after in zip(base.resources, patched.resources, strict=True):
        assert (before == after) == (label(before) != "DaemonSet puller-worker"), label(before)
    env = environment(patched, the_run(patched, WORKER).container)
    settings = settings_of(patched, the_run(patched, WORKER))
    assert settings.image_store == "containerd", env
    assert settings.docker_host is None


def test_the_containerd_patch_refuses_a_base_that_moved(tmp_path: Path) -> None:
    """Its ``test`` steps: kustomize stops rather than replace the wrong volume or setting."""
    shutil.copytree(DEPLOY, tmp_path / "kubernetes")
    shutil.copytree(CONTAINERD_DEPLOY, tmp_path / "kubernetes-containerd")
    daemonset = tmp_path / "kubernetes" / "worker-daemonset.yaml"
    daemonset.write_text(daemonset.read_text().replace("docker-socket", "engine-socket"))
    with pytest.raises(rendering.RenderFailed, match="testing value /spec/template/spec/volumes/0"):
        rendering.kustomize(tmp_path / "kubernetes-containerd")


def test_the_kubernetes_version_is_one_kubernetes_validate_has_schemas_for() -> None:
    versions = {version.rpartition(".")[0] for version in kubernetes_validate.utils.all_versions()}
    assert KUBERNETES_VERSION in versions
    assert f"Kubernetes {KUBERNETES_VERSION}" in (DEPLOY / "README.md").read_text()


@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__ for check in CHECKS])
def test_the_manifests_pass(manifests: Manifests, check: Callable[[Manifests], Any]) -> None:
    assert list(check(manifests)) == []


def test_the_core_manifests_are_what_the_kustomization_lists(manifests: Manifests) -> None:
    kinds = sorted(
        f"{doc['kind']} {generated_name(doc['metadata']['name'])}"
        for doc in manifests.resources
        if label(doc) not in BLOB_CACHE_OBJECTS
    )
    assert kinds == sorted(
        [
            "Namespace puller",
            "PriorityClass puller-worker",
            "ServiceAccount puller-worker",
            "ServiceAccount puller-http",
            "Secret puller-worker-amqp",
            "Secret puller-http-amqp",
            "DaemonSet puller-worker",
            "Deployment puller-http",
            "Service puller",
            "PodDisruptionBudget puller-http",
            "NetworkPolicy puller-http",
            "NetworkPolicy puller-worker",
            "ConfigMap puller-worker-config",
            "ConfigMap puller-http-config",
        ]
    )
    assert set(manifests.config_maps) == {"puller-worker-config", "puller-http-config"}


def test_quantities() -> None:
    assert quantity("10m") == Decimal("0.01")
    assert quantity("64Mi") == 64 * 2**20
    assert quantity(1) == 1
    with pytest.raises(ValueError, match="not a quantity"):
        quantity("12 parsecs")


# Each way of breaking a copy of the manifests, and the check that must catch it.


def _worker(m: Manifests) -> Run:
    return the_run(m, WORKER)


def _http(m: Manifests) -> Run:
    return the_run(m, HTTP)


def _set_env(run: Run, name: str, value: str) -> None:
    run.container.setdefault("env", []).append({"name": name, "value": value})


def _break_field(m: Manifests) -> None:
    _worker(m).container["imagePullPolicyy"] = "Always"


def _break_type(m: Manifests) -> None:
    _http(m).workload["spec"]["replicas"] = "two"


def _break_unlisted(m: Manifests) -> None:
    cast(Source, m.source).kustomization["resources"].remove("http-network-policy.yaml")


def _break_image(m: Manifests) -> None:
    _worker(m).container["image"] = "cyberdojo/puller:1"


def _break_namespace(m: Manifests) -> None:
    cast(Document, m.find("Service", SERVICE_NAME))["metadata"]["namespace"] = "default"


def _break_tag(m: Manifests) -> None:
    _http(m).container["image"] = HTTP_IMAGE


def _break_readiness(m: Manifests) -> None:
    del _http(m).container["readinessProbe"]


def _break_limits(m: Manifests) -> None:
    del _worker(m).container["resources"]["limits"]


def _break_escalation(m: Manifests) -> None:
    _http(m).container["securityContext"]["allowPrivilegeEscalation"] = True


def _break_renamed_setting(m: Manifests) -> None:
    _set_env(_worker(m), "PULLER_HEALTHPORT", "8080")


def _break_config_map_key(m: Manifests) -> None:
    m.config_maps["puller-http-config"]["PULLER_SHUTDOWN_GRACE"] = "20"  # a worker setting


def _break_value(m: Manifests) -> None:
    m.config_maps["puller-worker-config"]["PULLER_MAX_CONCURRENT_PULLS"] = "lots"


def _break_service_links(m: Manifests) -> None:
    del _http(m).pod["enableServiceLinks"]


def _break_secret_path(m: Manifests) -> None:
    for variable in _worker(m).container["env"]:
        if variable["name"] == "PULLER_AMQP_URL_FILE":
            variable["value"] = "/etc/puller/amqp-url"


def _break_secret_in_env(m: Manifests) -> None:
    _set_env(_http(m), "PULLER_AMQP_URL", "amqp://u:p@rabbitmq:5672/puller")


def _break_port(m: Manifests) -> None:
    _worker(m).container["ports"][0]["containerPort"] = 9090


def _break_annotation(m: Manifests) -> None:
    _http(m).workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "80"


def _break_probe_path(m: Manifests) -> None:
    _worker(m).container["readinessProbe"]["httpGet"]["path"] = "/healthz"


def _break_scrape_path(m: Manifests) -> None:
    annotations = _http(m).workload["spec"]["template"]["metadata"]["annotations"]
    annotations["prometheus.io/path"] = "/prometheus"


def _break_tolerations(m: Manifests) -> None:
    _worker(m).pod["tolerations"] = [{"key": "node-role.kubernetes.io/control-plane"}]


def _break_node_name(m: Manifests) -> None:
    for variable in _worker(m).container["env"]:
        if variable["name"] == "PULLER_NODE_NAME":
            variable["valueFrom"] = {"fieldRef": {"fieldPath": "metadata.name"}}


def _break_grace(m: Manifests) -> None:
    m.config_maps["puller-worker-config"]["PULLER_SHUTDOWN_GRACE"] = "60"


def _break_socket(m: Manifests) -> None:
    for volume in _worker(m).pod["volumes"]:
        if volume.get("hostPath", {}).get("type") == "Socket":
            volume["hostPath"]["type"] = "File"


def _break_state(m: Manifests) -> None:
    _set_env(_worker(m), "PULLER_STATE_DIR", "/state")


def _break_rollout(m: Manifests) -> None:
    _worker(m).workload["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = "100%"


def _break_priority(m: Manifests) -> None:
    m.resources.remove(cast(Document, m.find("PriorityClass", "puller-worker")))


def _break_root(m: Manifests) -> None:
    _http(m).container["securityContext"]["runAsUser"] = 0


def _break_tmp(m: Manifests) -> None:
    for volume in _http(m).pod["volumes"]:
        if "emptyDir" in volume:
            del volume["emptyDir"]["medium"]


def _break_replicas(m: Manifests) -> None:
    _http(m).workload["spec"]["replicas"] = 1


def _break_service(m: Manifests) -> None:
    cast(Document, m.find("Service", SERVICE_NAME))["spec"]["ports"][0]["port"] = 80


def _break_worker_policy(m: Manifests) -> None:
    m.resources.remove(cast(Document, m.find("NetworkPolicy", "puller-worker")))


def _break_worker_policy_port(m: Manifests) -> None:
    policy = cast(Document, m.find("NetworkPolicy", "puller-worker"))
    policy["spec"]["ingress"][0]["ports"].append({"protocol": "TCP", "port": 22})


def _break_network_policy(m: Manifests) -> None:
    policy = cast(Document, m.find("NetworkPolicy", "puller-http"))
    policy["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]


def _break_plugins(m: Manifests) -> None:
    m.optional[0]["spec"]["rabbitmq"]["additionalPlugins"] = []


def _drop_stream_plugin(m: Manifests) -> None:
    m.optional[0]["spec"]["rabbitmq"]["additionalPlugins"].remove("rabbitmq_stream")


def _break_placeholder(m: Manifests) -> None:
    secret = cast(Document, m.find("Secret", "puller-http-amqp"))
    secret["stringData"]["url"] = "amqp://puller-http:hunter2@rabbitmq:5672/puller"


BREAKAGES = [
    (check_schemas, _break_field),
    (check_schemas, _break_type),
    (check_kustomization, _break_unlisted),
    (check_kustomization, _break_image),
    (check_kustomization, _break_namespace),
    (check_kustomization, _break_tag),
    (check_containers, _break_readiness),
    (check_containers, _break_limits),
    (check_containers, _break_escalation),
    (check_environment, _break_renamed_setting),
    (check_environment, _break_config_map_key),
    (check_environment, _break_value),
    (check_environment, _break_service_links),
    (check_secret_mounts, _break_secret_path),
    (check_secret_mounts, _break_secret_in_env),
    (check_ports_and_probes, _break_port),
    (check_ports_and_probes, _break_annotation),
    (check_paths_are_answered, _break_probe_path),
    (check_paths_are_answered, _break_scrape_path),
    (check_worker, _break_tolerations),
    (check_worker, _break_node_name),
    (check_worker, _break_grace),
    (check_worker, _break_socket),
    (check_worker, _break_state),
    (check_worker, _break_rollout),
    (check_worker, _break_priority),
    (check_worker, _break_worker_policy),
    (check_worker, _break_worker_policy_port),
    (check_http, _break_root),
    (check_http, _break_tmp),
    (check_http, _break_replicas),
    (check_http, _break_service),
    (check_http, _break_network_policy),
    (check_broker, _break_plugins),
    (check_broker, _drop_stream_plugin),
    (check_broker, _break_placeholder),
]


@pytest.mark.parametrize(
    ("check", "breakage"),
    BREAKAGES,
    ids=[breakage.__name__.removeprefix("_break_") for _, breakage in BREAKAGES],
)
def test_each_check_fails_on_a_broken_copy(
    manifests: Manifests,
    check: Callable[[Manifests], Iterator[str]],
    breakage: Callable[[Manifests], None],
) -> None:
    broken = copy.deepcopy(manifests)
    breakage(broken)
    assert list(check(broken)), f"{check.__name__} did not see {breakage.__name__}"


def _cache(m: Manifests) -> CacheRun:
    (cache,) = blob_caches(m)
    assert isinstance(cache, CacheRun), cache
    return cache


def _set_cache_argument(m: Manifests, flag: str, value: str) -> None:
    arguments = _cache(m).container["args"]
    arguments[arguments.index(flag) + 1] = value


def _break_cache_flag(m: Manifests) -> None:
    _cache(m).container["args"].append("--max-age")


def _break_cache_listen(m: Manifests) -> None:
    _set_cache_argument(m, "--listen", "127.0.0.1:5001")


def _break_cache_probe(m: Manifests) -> None:
    _cache(m).container["livenessProbe"]["httpGet"]["path"] = "/metrics"


def _break_cache_root(m: Manifests) -> None:
    _cache(m).pod["securityContext"]["runAsUser"] = 0


def _break_cache_volume(m: Manifests) -> None:
    _set_cache_argument(m, "--max-bytes", str(11 * 2**30))


def _break_cache_memory(m: Manifests) -> None:
    """More connections than its memory limit allows for."""
    _set_cache_argument(m, "--max-connections", "2048")


def _break_cache_service(m: Manifests) -> None:
    service = cast(Document, m.find("Service", "puller-blob-cache"))
    service["spec"]["ports"][0]["targetPort"] = 5002


def _break_cache_policy(m: Manifests) -> None:
    policy = cast(Document, m.find("NetworkPolicy", "puller-blob-cache"))
    policy["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})


def _break_cache_route(m: Manifests) -> None:
    """A name the nodes' engines cannot resolve."""
    config = m.config_maps["puller-worker-config"]
    config["PULLER_PULL_THROUGH_CACHES"] = "docker.io=puller-blob-cache.puller.svc:5001"


CACHE_BREAKAGES = [
    _break_cache_flag,
    _break_cache_listen,
    _break_cache_probe,
    _break_cache_root,
    _break_cache_volume,
    _break_cache_memory,
    _break_cache_service,
    _break_cache_policy,
    _break_cache_route,
]


@pytest.mark.parametrize(
    "breakage", CACHE_BREAKAGES, ids=[b.__name__.removeprefix("_break_") for b in CACHE_BREAKAGES]
)
def test_the_blob_cache_check_fails_on_a_broken_copy(
    breakage: Callable[[Manifests], None],
) -> None:
    broken = load(DEPLOY, WITH_BLOB_CACHE)
    breakage(broken)
    assert list(check_blob_cache(broken)), f"check_blob_cache did not see {breakage.__name__}"


def test_every_check_is_shown_failing_at_least_once() -> None:
    assert {check for check, _ in BREAKAGES} | {check_blob_cache} == set(CHECKS)
