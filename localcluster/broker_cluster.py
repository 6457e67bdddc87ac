"""A RabbitMQ cluster of fresh nodes on this machine (Debian's rabbitmq-server), for the tests
and the demo.

Every node is new: its own node name (``puller-<token>-<i>@<short host>``), AMQP port,
stream-protocol port (plugin ``rabbitmq_stream``), distribution port, and data, log, pid and
plugin files under ``root``. The machine's own broker
(``rabbit@<host>`` on 5672) is never touched. The nodes run as the ``rabbitmq`` user, as Debian's
server does, and share that user's Erlang cookie (``/var/lib/rabbitmq/.erlang.cookie``) with the
machine's broker. The CLI tools run as that user too (see :func:`rabbitmqctl`), so root needs
no cookie of its own.

Nodes are numbered from 1, as their names are. Needs root (or the ``rabbitmq`` user).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika

from localcluster.processes import ServiceFailed, free_port, stop_process_group, wait_until

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
"""The server script itself, not Debian's ``/usr/sbin`` wrapper: started as the ``rabbitmq``
user directly, it is this process's child and its output goes where we say."""
SERVICE_USER = "rabbitmq"
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CTL_TIMEOUT = 60.0
"""One ``rabbitmqctl`` call; they take about half a second each on an idle machine."""
CONFIG = """\
# Written by localcluster.broker_cluster; this node reads no file under /etc/rabbitmq.
loopback_users.guest = true
log.console = false
log.file.level = info
# For thousands of workers (docs/operations.md): connections that arrive at once (a broker
# restart) wait in a longer accept queue instead of being refused past 128, and idle
# connections cost less CPU in statistics events.
tcp_listen_options.backlog = 4096
tcp_listen_options.nodelay = true
# The same storm reads where the history ends over the stream port.
stream.tcp_listen_options.backlog = 4096
collect_statistics_interval = 30000
"""
PLUGINS = "[rabbitmq_stream].\n"
"""The stream protocol (where the history ends is read over it), on each node's own port."""


def stream_config(port: int, host: str = "127.0.0.1") -> str:
    """rabbitmq.conf lines for a stream listener on ``host:port``, advertised as that address
    (``Metadata`` answers it: clients connect there to reach a stream's leader)."""
    return (
        f"stream.listeners.tcp.1 = {host}:{port}\n"
        f"stream.advertised_host = {host}\n"
        f"stream.advertised_port = {port}\n"
    )


def short_host() -> str:
    """The host part of node names: the short host name, as ``rabbitmq-server`` uses it."""
    return socket.gethostname().split(".")[0]


def rabbitmqctl(
    node: str, *args: str, tool: str = "rabbitmqctl", timeout: float = CTL_TIMEOUT
) -> str:
    """Runs a RabbitMQ CLI tool (``rabbitmqctl``, ``rabbitmq-streams``, ...) against ``node``
    as the ``rabbitmq`` user, with its home (and so its cookie); returns the tool's standard
    output, raises :class:`ServiceFailed` if it fails.

    Run as root with root's home, the tools would make and use a cookie of root's own
    (``/root/.erlang.cookie``), which no node knows; Debian's ``/usr/sbin`` wrappers switch
    to the ``rabbitmq`` user for the same reason, but exist for only some of the tools."""
    argv = [str(Path(SERVER).with_name(tool)), "-n", node, *args]
    user = pwd.getpwnam(SERVICE_USER)
    switch = os.geteuid() != user.pw_uid
    try:
        answer = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=user.pw_dir,
            env={"PATH": SEARCH_PATH, "HOME": user.pw_dir, "LANG": "C.UTF-8"},
            user=user.pw_uid if switch else None,
            group=user.pw_gid if switch else None,
            extra_groups=[] if switch else None,
        )
    except subprocess.TimeoutExpired as error:
        raise ServiceFailed(f"{' '.join(argv)} did not answer in {timeout:.0f} s") from error
    if answer.returncode != 0:
        raise ServiceFailed(
            f"{' '.join(argv)} failed ({answer.returncode}): {answer.stderr.strip()}"
            f" {answer.stdout.strip()}"
        )
    return answer.stdout


def _json(output: str) -> Any:
    """The JSON document in a CLI tool's ``--formatter json`` output (it may print a banner
    line before it)."""
    start = min((i for i in (output.find("["), output.find("{")) if i >= 0), default=-1)
    if start < 0:
        raise ServiceFailed(f"no JSON in the CLI's answer: {output!r}")
    return json.loads(output[start:])


@dataclass
class BrokerNode:
    """One ``rabbitmq-server`` of a :class:`BrokerCluster`, run by its user ``rabbitmq``."""

    index: int
    name: str
    amqp_port: int
    dist_port: int
    directory: Path
    stream_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        """The server's standard output and error; the broker's own log is under ``log/``."""
        return self.directory / "server.out"

    def environment(self) -> dict[str, str]:
        user = pwd.getpwnam(SERVICE_USER)
        return {
            "PATH": SEARCH_PATH,
            "HOME": user.pw_dir,  # where Erlang finds the shared cookie
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_PID_FILE": str(self.directory / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
        }

    def prepare(self) -> None:
        """The node's directory and files, owned by the ``rabbitmq`` user."""
        user = pwd.getpwnam(SERVICE_USER)
        for directory in (self.directory, self.directory / "mnesia", self.directory / "log"):
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, user.pw_uid, user.pw_gid)
        config = CONFIG + stream_config(self.stream_port)
        for name, text in (("rabbitmq.conf", config), ("enabled_plugins", PLUGINS)):
            path = self.directory / name
            path.write_text(text)
            os.chown(path, user.pw_uid, user.pw_gid)

    def launch(self) -> None:
        """Starts the server in its own process group, without waiting for it."""
        user = pwd.getpwnam(SERVICE_USER)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [SERVER],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.directory,
                user=user.pw_uid,
                group=user.pw_gid,
                extra_groups=[],
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def booted(self) -> bool:
        """The node has booted (``await_startup``) and its AMQP and stream ports answer."""
        rabbitmqctl(self.name, "--timeout", "10", "await_startup", timeout=30)
        for port in (self.amqp_port, self.stream_port):
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
        return True

    @property
    def broker_log(self) -> Path:
        return self.directory / "log" / f"{self.name}.log"

    def wait_booted(self, timeout: float) -> None:
        # await_startup fails at once while the node is not reachable yet: ask until it says yes.
        try:
            wait_until(
                self.booted, f"RabbitMQ node {self.name}", timeout, self.process, self.log_path
            )
        except ServiceFailed as error:
            error.add_note(_tail(self.broker_log))
            raise

    def halt(self, kill: bool = False, timeout: float = 60.0) -> None:
        """Stops the node's process: ``rabbitmqctl stop`` (a clean shutdown), or SIGKILL to its
        whole process group with ``kill``; whatever outlives ``timeout`` is killed."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            else:
                try:
                    rabbitmqctl(self.name, "stop", timeout=timeout)
                except ServiceFailed:  # not reachable (still booting, say): SIGTERM then
                    stop_process_group(process.pid, timeout=30)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_process_group(process.pid, timeout=10)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        self.process = None
        kill_leftovers(f"RABBITMQ_NODENAME={self.name}")


@dataclass
class BrokerCluster:
    """``size`` fresh RabbitMQ nodes clustered together, their files under ``root``.

    ``timings``, in seconds: from the beginning of :meth:`start` until every node booted
    (``boot``), until they formed the cluster (``clustered``) and until streams could be made
    across it (``start``); and how long the last :meth:`stop_node` and :meth:`start_node` took
    (``stop_node``, ``start_node``)."""

    root: Path
    size: int = 3
    boot_timeout: float = 240.0
    """For one node to boot, or the cluster to show all nodes running (a busy 2-core machine
    boots a node in 5-15 s)."""
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: list[BrokerNode] = field(default_factory=list, init=False)
    timings: dict[str, float] = field(default_factory=dict, init=False)
    _epmd_was_running: bool = field(default=True, init=False, repr=False)

    def __enter__(self) -> BrokerCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- starting and stopping -------------------------------------------------------------

    def start(self) -> None:
        """Boots every node (all at once), joins nodes 2.. to node 1 and waits until every node
        sees all of them running. Stops what it started if anything fails."""
        if self.nodes:
            raise RuntimeError("this BrokerCluster was started already")
        if self.size < 1:
            raise ValueError("a cluster needs at least one node")
        began = time.monotonic()
        try:
            self._prepare_root()
            self._epmd_was_running = _epmd_running()
            host = short_host()
            for index in range(1, self.size + 1):
                node = BrokerNode(
                    index=index,
                    name=f"puller-{self.token}-{index}@{host}",
                    amqp_port=free_port(),
                    dist_port=free_port(),
                    directory=self.root / f"node-{index}",
                )
                node.prepare()
                self.nodes.append(node)
            first, *others = self.nodes
            if not _cookie_path().exists():
                # The first node to boot writes the cookie the others must share.
                first.launch()
                first.wait_booted(self.boot_timeout)
            for node in self.nodes:
                if node.process is None:
                    node.launch()
            for node in self.nodes:
                node.wait_booted(self.boot_timeout)
            self.timings["boot"] = time.monotonic() - began
            for node in others:
                self._join(node, first)
            self.wait_clustered()
            self.timings["clustered"] = time.monotonic() - began
            self.wait_streams_ready()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - began

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _check_reachable(self.root)
        # mkdtemp makes 0700 directories: the rabbitmq user only needs to pass through.
        self.root.chmod(stat.S_IMODE(self.root.stat().st_mode) | stat.S_IXOTH)

    def _join(self, node: BrokerNode, to: BrokerNode) -> None:
        rabbitmqctl(node.name, "stop_app")
        rabbitmqctl(node.name, "join_cluster", to.name)
        rabbitmqctl(node.name, "start_app")

    def wait_streams_ready(self, timeout: float | None = None) -> None:
        """Declares a stream with a replica on every node (all must run) until that works and
        all its replicas are up, then deletes it: just after nodes join, declaring one can fail
        with ``coordinator_unavailable``."""
        probe = f"puller-cluster-probe-{self.token}"
        everyone = {node.index for node in self.nodes}

        def replicated() -> bool:
            with _connection(self.node_url(self.running()[0].index)) as connection:
                connection.channel().queue_declare(
                    probe,
                    durable=True,
                    arguments={"x-queue-type": "stream", "x-initial-cluster-size": self.size},
                )
            return self.stream_members(probe, online=True) == everyone

        wait_until(
            replicated,
            f"a stream on all {self.size} nodes",
            self.boot_timeout if timeout is None else timeout,
        )
        with _connection(self.node_url(self.running()[0].index)) as connection:
            connection.channel().queue_delete(probe)

    def stop_node(self, index: int, kill: bool = False) -> None:
        """Stops node ``index``'s process (cleanly, or SIGKILL with ``kill``); the others keep
        it as a member of their cluster, so :meth:`start_node` brings it back."""
        node = self.node(index)
        began = time.monotonic()
        node.halt(kill=kill, timeout=self.boot_timeout)
        self.timings["stop_node"] = time.monotonic() - began

    def start_node(self, index: int, *more: int) -> None:
        """Starts node ``index`` (and nodes ``more``, side by side) again from its own files;
        returns once the running nodes see each other (and, when all run, a stream can be
        made across them: see :meth:`wait_streams_ready`)."""
        nodes = [self.node(i) for i in (index, *more)]
        for node in nodes:
            if node.alive:
                raise RuntimeError(f"node {node.index} ({node.name}) is running")
        began = time.monotonic()
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_booted(self.boot_timeout)
        self.wait_clustered()
        self.timings["start_node"] = time.monotonic() - began
        if len(self.running()) == self.size:
            self.wait_streams_ready()

    def stop(self) -> None:
        """Stops every node, removes their directories (and ``root`` if that leaves it empty)
        and, if the cluster's first node started epmd, that too. Idempotent."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
            # Their files go next, so no need for a clean shutdown: SIGTERM to all at once.
            list(pool.map(_terminate, self.nodes))
        kill_leftovers(self.marker)
        for node in self.nodes:
            shutil.rmtree(node.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()
        if not self._epmd_was_running:
            # epmd refuses while any node (the machine's broker, say) is registered with it.
            subprocess.run(["epmd", "-kill"], capture_output=True, check=False, timeout=30)
            self._epmd_was_running = True

    @property
    def marker(self) -> str:
        """In the environment of every process of this cluster's nodes (see
        :func:`kill_leftovers`, which stops them from another process)."""
        return f"RABBITMQ_NODENAME=puller-{self.token}-"

    def processes(self) -> dict[int, str]:
        """This cluster's running processes, but epmd (see :meth:`stop`): process id ->
        command line."""
        return {
            pid: command
            for pid, command in processes_with(self.marker).items()
            if not _is_epmd(command)
        }

    # -- finding things out ----------------------------------------------------------------

    def node(self, index: int) -> BrokerNode:
        if not 1 <= index <= len(self.nodes):
            raise IndexError(f"no node {index}: nodes are numbered 1 to {len(self.nodes)}")
        return self.nodes[index - 1]

    def index_of(self, node_name: str) -> int:
        for node in self.nodes:
            if node.name == node_name:
                return node.index
        raise ServiceFailed(f"{node_name} is not a node of this cluster")

    def running(self) -> list[BrokerNode]:
        """The nodes whose process runs (booted or not)."""
        return [node for node in self.nodes if node.alive]

    def ctl(self, *args: str, tool: str = "rabbitmqctl") -> str:
        """A CLI tool's output, asked through the first running node."""
        running = self.running()
        if not running:
            raise ServiceFailed("no node of the cluster runs")
        return rabbitmqctl(running[0].name, *args, tool=tool)

    def running_nodes(self, index: int) -> set[int]:
        """The nodes that node ``index`` sees running in its cluster."""
        status = _json(rabbitmqctl(self.node(index).name, "cluster_status", "--formatter", "json"))
        return {self.index_of(name) for name in status["running_nodes"]}

    def clustered(self) -> bool:
        """Every running node sees all the running nodes, and no other, running (each node is
        asked at once: a ``rabbitmqctl`` call costs a second)."""
        running = {node.index for node in self.running()}
        if not running:
            return False
        with ThreadPoolExecutor(max_workers=len(running)) as pool:
            return all(seen == running for seen in pool.map(self.running_nodes, running))

    def wait_clustered(self, timeout: float | None = None) -> None:
        wait_until(
            self.clustered,
            f"the running nodes of {self.size} RabbitMQ nodes to see each other",
            self.boot_timeout if timeout is None else timeout,
        )

    def node_url(self, index: int, vhost: str = "/") -> str:
        """``amqp://guest:guest@127.0.0.1:PORT/VHOST`` for node ``index``."""
        port = self.node(index).amqp_port
        return f"amqp://guest:guest@127.0.0.1:{port}/{quote(vhost, safe='')}"

    def urls(self, vhost: str = "/") -> list[str]:
        """Every node's URL, in node order."""
        return [self.node_url(node.index, vhost) for node in self.nodes]

    def add_vhost(self, name: str, user: str = "guest") -> None:
        """A vhost with every permission for ``user``, made through a running node."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, user, ".*", ".*", ".*")

    def queue_info(self, queue: str, vhost: str = "/") -> dict[str, Any]:
        """``rabbitmqctl list_queues`` about one queue: name, type, leader, members, online."""
        rows = _json(
            self.ctl(
                "list_queues",
                "-p",
                vhost,
                "name",
                "type",
                "leader",
                "members",
                "online",
                "--formatter",
                "json",
            )
        )
        for row in rows:
            if row["name"] == queue:
                return dict(row)
        raise ServiceFailed(f"no queue {queue!r} in vhost {vhost!r}")

    def stream_leader(self, queue: str, vhost: str = "/") -> int:
        """Which node holds the leader (writer) of stream ``queue``."""
        return self.index_of(str(self.queue_info(queue, vhost)["leader"]))

    def stream_status(self, queue: str, vhost: str = "/") -> list[dict[str, Any]]:
        """``rabbitmq-streams stream_status``: one row per replica (role ``writer`` or
        ``replica``, node, offset, committed_offset, first_offset, readers, segments)."""
        rows = _json(
            self.ctl(
                "stream_status", "-p", vhost, queue, "--formatter", "json", tool="rabbitmq-streams"
            )
        )
        return [dict(row) for row in rows]

    def stream_members(self, queue: str, vhost: str = "/", online: bool = False) -> set[int]:
        """The nodes that hold a replica of stream ``queue`` (only those up, with ``online``)."""
        info = self.queue_info(queue, vhost)
        return {self.index_of(name) for name in info["online" if online else "members"]}


@contextlib.contextmanager
def _connection(url: str) -> Iterator[pika.BlockingConnection]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


def _terminate(node: BrokerNode) -> None:
    process = node.process
    if process is None:
        return
    stop_process_group(process.pid, timeout=30)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    node.process = None


def processes_with(marker: str) -> dict[int, str]:
    """Running processes whose environment holds ``marker`` (say ``RABBITMQ_NODENAME=n@h``:
    a node's name is not on its Erlang VM's command line, but every process of the node
    inherits the variable): process id -> command line."""
    needle = marker.encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes():
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                found[int(entry.name)] = command.decode(errors="replace").strip()
    return found


def kill_leftovers(marker: str, timeout: float = 10.0) -> None:
    """SIGKILL to the processes :func:`processes_with` ``marker`` finds, but epmd (shared by
    every node on the machine), then waits until they are gone."""
    leftovers = [pid for pid, command in processes_with(marker).items() if not _is_epmd(command)]
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: all(_gone(pid) for pid in leftovers),
        f"processes {leftovers} to go",
        timeout,
    )


def _is_epmd(command: str) -> bool:
    return Path(command.split(" ", maxsplit=1)[0]).name == "epmd"


def _gone(pid: int) -> bool:
    """No such process, or a zombie (whoever inherited it may not reap it at once)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return status.rpartition(")")[2].split()[0] in {"Z", "X"}


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"(no {path})"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"last lines of {path}:\n" + "\n".join(text)


def _cookie_path() -> Path:
    return Path(pwd.getpwnam(SERVICE_USER).pw_dir) / ".erlang.cookie"


def _epmd_running() -> bool:
    answer = subprocess.run(["epmd", "-names"], capture_output=True, check=False, timeout=30)
    return answer.returncode == 0


def _check_reachable(path: Path) -> None:
    """The ``rabbitmq`` user must be able to reach ``path``: every directory above it lets
    others through (pytest's ``/tmp/pytest-of-root`` does not)."""
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise ServiceFailed(
                f"the rabbitmq user cannot reach {path}: {parent} is closed to other users"
            )
