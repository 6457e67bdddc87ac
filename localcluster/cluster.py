"""A whole local cluster: registry, node engines and workers, against one RabbitMQ vhost."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from localcluster.engines import NodeEngine
from localcluster.processes import free_port, start_daemon, stop, stop_process_group, wait_until
from localcluster.registry import Registry

STATE_FILE = "cluster.json"
_T = TypeVar("_T")


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` (e.g. ``puller_worker_pulls_total``) whose
    labels include ``labels``, in a Prometheus text exposition."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def worker_command() -> list[str]:
    """The installed ``puller-worker`` beside this interpreter, else ``python -m worker.main``."""
    return installed_command("puller-worker", "worker.main")


@dataclass
class WorkerProcess:
    """``puller-worker`` for one node, with that node's ``DOCKER_HOST``."""

    node: str
    docker_host: str
    amqp_url: str
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    health_port: int = 0
    """Picked at each launch: a free port on this machine."""
    command: list[str] | None = None
    """What to run; the ``puller-worker`` beside this interpreter by default."""

    @property
    def state_dir(self) -> Path:
        """The node's ``PULLER_STATE_DIR``: kept across restarts of its worker."""
        return self.log_path.parent / f"{self.node}-state"

    def health(self, path: str) -> tuple[int, dict[str, object]]:
        """``GET`` one of the worker's health endpoints: status code and JSON body.

        Raises ``OSError`` when the worker does not answer, also when it exits mid-answer."""
        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            try:
                return error.code, json.loads(error.read())
            except http.client.HTTPException as cut:
                raise ConnectionError(f"{url}: the answer was cut off ({cut!r})") from cut
        except http.client.HTTPException as cut:
            raise ConnectionError(f"{url}: the answer was cut off ({cut!r})") from cut

    def metric(self, name: str, **labels: str) -> float:
        """A metric from the worker's ``/metrics`` (see :func:`metric_value`)."""
        url = f"http://127.0.0.1:{self.health_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return metric_value(response.read().decode(), name, **labels)

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 30.0) -> None:
        wait_until(self.serving, f"puller-worker {self.node}", timeout, self.process, self.log_path)

    def launch(self) -> None:
        """Starts the process without waiting for it to serve."""
        self.health_port = free_port()
        env = {
            **os.environ,
            "PULLER_AMQP_URL": self.amqp_url,
            "PULLER_NODE_NAME": self.node,
            "DOCKER_HOST": self.docker_host,
            "PULLER_LOG_FORMAT": "json",
            "PULLER_STATE_DIR": str(self.state_dir),
            "PULLER_HEALTH_PORT": str(self.health_port),
            **self.extra_env,
        }
        _url_from_file_wins(env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        self.process = start_daemon(self.command or worker_command(), self.log_path, env)

    def serving(self) -> bool:
        """The worker is connected to RabbitMQ and consumes its queue (its ``/ready`` says
        so, caught up or not)."""
        try:
            _, body = self.health("/ready")
        except OSError:
            return False
        return body.get("connected") is True

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def signal(self, signum: signal.Signals) -> None:
        if self.process is not None:
            self.process.send_signal(signum)


def installed_command(name: str, module: str) -> list[str]:
    """The installed console script beside this interpreter, else ``python -m module``."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


@dataclass
class GatewayProcess:
    """``puller-http`` on a free port (or ``port``), against ``amqp_url``."""

    amqp_url: str
    log_path: Path
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    command: list[str] | None = None
    """What to run; the ``puller-http`` beside this interpreter by default."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> None:
        self.port = self.port or free_port()
        env = {
            **os.environ,
            "PULLER_AMQP_URL": self.amqp_url,
            "PULLER_HTTP_PORT": str(self.port),
            "PULLER_LOG_FORMAT": "json",
            **self.extra_env,
        }
        _url_from_file_wins(env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        self.process = start_daemon(
            self.command or installed_command("puller-http", "gateway.main"), self.log_path, env
        )
        check = self._ready if wait_ready else self._answers
        wait_until(check, "puller-http", timeout, self.process, self.log_path)

    def _answers(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/alive", timeout=2) as response:
            return bool(response.status == 200)

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=5) as response:
            return bool(response.status == 200)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


def _url_from_file_wins(env: dict[str, str]) -> None:
    """A process told to read its URL from a file (``PULLER_AMQP_URL_FILE``) gets no
    ``PULLER_AMQP_URL`` besides: the programs refuse both at once."""
    if env.get("PULLER_AMQP_URL_FILE"):
        env.pop("PULLER_AMQP_URL", None)


@dataclass
class LocalCluster:
    """``nodes`` Docker Engines with a worker each, and a registry, under ``root``."""

    root: Path
    amqp_url: str
    nodes: int = 3
    registry_port: int = 0
    worker_env: dict[str, str] = field(default_factory=dict)
    registry: Registry = field(init=False)
    engines: list[NodeEngine] = field(default_factory=list, init=False)
    workers: list[WorkerProcess] = field(default_factory=list, init=False)
    gateway: GatewayProcess | None = field(default=None, init=False)

    def start_gateway(self, port: int = 0, **env: str) -> GatewayProcess:
        """``puller-http`` for this cluster, ready (connected to RabbitMQ) when it returns."""
        self.gateway = GatewayProcess(
            self.amqp_url, self.root / "gateway.log", port=port, extra_env=env
        )
        self.gateway.start()
        self._write_state()
        return self.gateway

    def __post_init__(self) -> None:
        self.registry = Registry(self.root / "registry", port=self.registry_port)

    def start(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.registry.start()
            self._add_nodes([f"node-{index}" for index in range(1, self.nodes + 1)])
        except BaseException:
            self.stop()
            raise
        self._write_state()

    def add_node(
        self, name: str, amqp_url: str | None = None, command: list[str] | None = None
    ) -> WorkerProcess:
        """A node's engine and worker, both serving when it returns; ``amqp_url``: the
        worker's own ``PULLER_AMQP_URL`` (the cluster's by default), say to put another
        broker node of a cluster first; ``command``: what runs the worker (say, inside a
        memory limit: :mod:`localcluster.memory_limit`)."""
        [worker] = self._add_nodes([name], amqp_url, command)
        return worker

    def _add_nodes(
        self, names: list[str], amqp_url: str | None = None, command: list[str] | None = None
    ) -> list[WorkerProcess]:
        """Nodes ``names``, started side by side (engines, then workers), all serving when it
        returns."""
        engines = [NodeEngine(name, self.root / name) for name in names]
        self.engines.extend(engines)
        _each(NodeEngine.start, engines)
        workers = [
            WorkerProcess(
                node=engine.name,
                docker_host=engine.docker_host,
                amqp_url=amqp_url or self.amqp_url,
                log_path=self.root / engine.name / "worker.log",
                extra_env=dict(self.worker_env),
                command=command,
            )
            for engine in engines
        ]
        self.workers.extend(workers)
        for worker in workers:
            worker.launch()
        for worker in workers:
            worker.wait_serving()
        self._write_state()
        return workers

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        _each(WorkerProcess.stop, self.workers)
        _each(NodeEngine.stop, self.engines)
        self.registry.stop()
        (self.root / STATE_FILE).unlink(missing_ok=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _write_state(self) -> None:
        pids = [p.pid for p in self._processes()]
        state = {
            "amqp_url": self.amqp_url,
            "registry": self.registry.address,
            "pids": pids,
            "nodes": [
                {"node": e.name, "docker_host": e.docker_host, "health_port": w.health_port}
                for e, w in zip(self.engines, self.workers, strict=False)
            ],
        }
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=2))

    def _processes(self) -> list[subprocess.Popen[bytes]]:
        found = [w.process for w in self.workers] + [e.process for e in self.engines]
        found.append(self.registry.process)
        if self.gateway is not None:
            found.append(self.gateway.process)
        return [p for p in found if p is not None]


def _each(action: Callable[[_T], object], items: list[_T]) -> None:
    """``action`` on every item at once, one thread each (a dockerd takes a second to start
    or stop, mostly waiting); raises the first error once all are done."""
    if items:
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            for _ in pool.map(action, items):
                pass


def read_state(root: Path) -> dict[str, object] | None:
    path = root / STATE_FILE
    if not path.exists():
        return None
    state: dict[str, object] = json.loads(path.read_text())
    return state


def stop_recorded(root: Path) -> int:
    """Stops the processes a ``localcluster up`` recorded under ``root``; returns how many."""
    state = read_state(root)
    if state is None:
        return 0
    pids = state.get("pids", [])
    if not isinstance(pids, list):
        raise TypeError(f"{root / STATE_FILE} is damaged: 'pids' is not a list")
    for pid in pids:
        stop_process_group(int(pid), timeout=20)
    (root / STATE_FILE).unlink(missing_ok=True)
    return len(pids)
