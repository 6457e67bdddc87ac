"""Docker Engines: one per simulated node, and the machine's own for building images; and
containerd, for nodes without Docker."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import docker

from localcluster.processes import start_daemon, stop, wait_until

HOST_DOCKER_SOCKET = Path("/var/run/docker.sock")


@dataclass
class NodeDaemon:
    """A node's engine daemon, with its own socket and directories under ``root``."""

    name: str
    root: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    DAEMON = "daemon"

    @property
    def socket(self) -> Path:
        return self.root / f"{self.DAEMON}.sock"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.DAEMON}.log"

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=20)
            self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class NodeEngine(NodeDaemon):
    """A ``dockerd`` with its own socket, data root and exec root, as one node would have.

    iptables and masquerading are off: a node engine only pulls images, and never
    runs a container. Bridge networking stays on, on the machine's ``docker0``:
    with ``--bridge=none`` dockerd deletes any ``docker0`` interface it finds at
    start, which would cut off the machine's own engine and its containers.
    """

    DAEMON = "docker"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    def client(self, timeout: int = 60) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.process = start_daemon(
            [
                "dockerd",
                f"--host={self.docker_host}",
                f"--data-root={self.root / 'data'}",
                f"--exec-root={self.root / 'exec'}",
                f"--pidfile={self.root / 'docker.pid'}",
                "--iptables=false",
                "--ip-masq=false",
            ],
            self.log_path,
        )
        wait_until(self._pings, f"dockerd for {self.name}", timeout, self.process, self.log_path)

    def _pings(self) -> bool:
        if not listening(self.socket):
            return False
        client = self.client(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()


@dataclass
class NodeContainerd(NodeDaemon):
    """A ``containerd`` with its own socket, root and state, as a node without Docker has.

    Its CRI plugin stays on, as on a Kubernetes node: it is what marks the images of the
    ``k8s.io`` namespace as the kubelet's."""

    DAEMON = "containerd"

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        config = self.root / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root / "root"}"\n'
            f'state = "{self.root / "state"}"\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            "[ttrpc]\n"
            f'  address = "{self.root / "ttrpc.sock"}"\n'
        )
        self.process = start_daemon(["containerd", "--config", str(config)], self.log_path)
        wait_until(
            lambda: listening(self.socket),
            f"containerd for {self.name}",
            timeout,
            self.process,
            self.log_path,
        )

    def ctr(self, *arguments: str, namespace: str = "k8s.io") -> str:
        """``ctr``'s output for ``arguments`` against this containerd."""
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", namespace, *arguments],
            capture_output=True,
            check=True,
            text=True,
            timeout=60,
        ).stdout


def listening(socket_path: Path, timeout: float = 3.0) -> bool:
    """Whether something accepts connections on unix socket ``socket_path``: asked before
    the docker SDK is, because the SDK leaks its socket when a connect fails (a
    ResourceWarning, which fails a test run), a socket file outlives a dockerd that was
    killed, and an engine being restarted refuses connections for a second."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True


def host_engine_running() -> bool:
    if not listening(Path(HOST_DOCKER_SOCKET)):
        return False
    try:
        client = docker.DockerClient(base_url=f"unix://{HOST_DOCKER_SOCKET}", timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except docker.errors.DockerException:
        return False


_outliving: list[subprocess.Popen[bytes]] = []


def ensure_host_engine(log_path: Path = Path("/var/log/puller-host-dockerd.log")) -> None:
    """Starts the machine's own dockerd (default socket, bridge networking) unless it runs.

    It builds the test images and runs the containers testcontainers starts.
    """
    if host_engine_running():
        return
    process = start_daemon(["dockerd"], log_path)
    # It outlives this process (the next run uses it), so its handle is kept, not collected:
    # a handle collected while the daemon runs is a ResourceWarning, which fails a test run.
    _outliving.append(process)
    wait_until(host_engine_running, "the machine's dockerd", 60.0, process, log_path)
