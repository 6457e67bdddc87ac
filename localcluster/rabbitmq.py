"""RabbitMQ on this machine (Debian's rabbitmq-server), for the demo cluster."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from pathlib import Path

from localcluster.processes import ServiceFailed, wait_until

AMQP_PORT = 5672
STREAM_PORT = 5552


def broker_listening(port: int = AMQP_PORT) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def ensure_rabbitmq(timeout: float = 90.0) -> bool:
    """Starts rabbitmq-server unless a broker already listens; returns whether it started one.
    It runs the stream plugin too (port 5552), named in the environment, which RabbitMQ
    writes into its enabled_plugins file."""
    if broker_listening():
        _enable_streams(timeout)
        return False
    plugins = {**os.environ, "RABBITMQ_ENABLED_PLUGINS": "rabbitmq_stream"}
    _plugins_file_writable()
    subprocess.run(["rabbitmq-server", "-detached"], check=True, env=plugins)
    # await_startup fails at once while the node is not yet reachable, so ask until it says yes.
    wait_until(_booted, "rabbitmq-server (see /var/log/rabbitmq/)", timeout)
    if not broker_listening():
        raise ServiceFailed("rabbitmq-server booted but does not listen on 127.0.0.1:5672")
    return True


def _enable_streams(timeout: float) -> None:
    """The stream plugin on a broker that runs already (Debian's package starts one without
    it), so that the workers read where the history ends as they would in a deployment; a
    broker this machine cannot manage keeps the workers on their fallback, a marker."""
    if broker_listening(STREAM_PORT):
        return
    enabled = subprocess.run(
        ["rabbitmq-plugins", "enable", "--online", "rabbitmq_stream"],
        check=False,
        capture_output=True,
        timeout=120,
    )
    _plugins_file_writable()
    if enabled.returncode == 0:
        wait_until(lambda: broker_listening(STREAM_PORT), "RabbitMQ's stream port", timeout)


def _plugins_file_writable() -> None:
    """``rabbitmq-plugins`` run as root leaves the enabled-plugins file root's; the server,
    which runs as ``rabbitmq`` and rewrites the file as it boots, then fails to start
    (``failed_to_update_enabled_plugins_file``). Gives the file back to that user."""
    path = Path(os.environ.get("RABBITMQ_ENABLED_PLUGINS_FILE", "/etc/rabbitmq/enabled_plugins"))
    if os.geteuid() != 0 or not path.exists():
        return
    try:
        user = pwd.getpwnam("rabbitmq")
    except KeyError:
        return
    os.chown(path, user.pw_uid, user.pw_gid)


def _booted() -> bool:
    answer = subprocess.run(
        ["rabbitmqctl", "--timeout", "10", "await_startup"],
        check=False,
        capture_output=True,
        timeout=30,
    )
    return answer.returncode == 0


def stop_rabbitmq() -> None:
    subprocess.run(["rabbitmqctl", "stop"], check=False, capture_output=True, timeout=60)


def add_vhost(vhost: str, user: str = "guest") -> None:
    """A separate vhost keeps one cluster's exchanges and queues apart from another's."""
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=False, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
