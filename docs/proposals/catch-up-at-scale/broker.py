"""A RabbitMQ 3.10 node of our own, with the stream protocol plugin, for the experiments.

    python broker.py start   # boots a node, writes run/broker.json (ports, node name)
    python broker.py stop    # stops that node (only the one this script started)
    python broker.py restart # rabbitmqctl stop, then boot again on the same ports and data

Reuses /work/main's localcluster.BrokerNode (fresh node name, free ports, runs as rabbitmq);
only the config and enabled plugins differ (rabbitmq_stream on a free port).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import sys
from pathlib import Path

sys.path.insert(0, "/work/main")

from localcluster.broker_cluster import BrokerNode, short_host  # noqa: E402
from localcluster.processes import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent
STATE = HERE / "run" / "broker.json"


def node_from_state() -> tuple[BrokerNode, dict[str, object]]:
    state = json.loads(STATE.read_text())
    node = BrokerNode(
        index=1,
        name=str(state["name"]),
        amqp_port=int(state["amqp_port"]),  # type: ignore[call-overload]
        dist_port=int(state["dist_port"]),  # type: ignore[call-overload]
        directory=Path(str(state["directory"])),
    )
    return node, state


def write_config(node: BrokerNode, stream_port: int) -> None:
    user = pwd.getpwnam("rabbitmq")
    conf = (
        "loopback_users.guest = true\n"
        "log.console = false\n"
        "log.file.level = info\n"
        f"stream.listeners.tcp.1 = 127.0.0.1:{stream_port}\n"
        "stream.advertised_host = 127.0.0.1\n"
        f"stream.advertised_port = {stream_port}\n"
    )
    for name, text in (("rabbitmq.conf", conf), ("enabled_plugins", "[rabbitmq_stream].\n")):
        path = node.directory / name
        path.write_text(text)
        os.chown(path, user.pw_uid, user.pw_gid)


def start() -> None:
    root = HERE / "run"
    root.mkdir(exist_ok=True)
    root.chmod(0o755)
    directory = root / f"node-{secrets.token_hex(3)}"
    node = BrokerNode(
        index=1,
        name=f"catchup-{secrets.token_hex(3)}@{short_host()}",
        amqp_port=free_port(),
        dist_port=free_port(),
        directory=directory,
    )
    stream_port = free_port()
    node.prepare()
    write_config(node, stream_port)
    node.launch()
    assert node.process is not None
    node.wait_booted(240)
    STATE.write_text(
        json.dumps(
            {
                "name": node.name,
                "amqp_port": node.amqp_port,
                "dist_port": node.dist_port,
                "stream_port": stream_port,
                "directory": str(directory),
                "pid": node.process.pid,
            }
        )
    )
    print(STATE.read_text())


def stop() -> None:
    node, state = node_from_state()
    # Not our child any more: stop it by name (rabbitmqctl stop), as BrokerNode.halt does.
    from localcluster.broker_cluster import kill_leftovers, rabbitmqctl

    rabbitmqctl(node.name, "stop")
    kill_leftovers(f"RABBITMQ_NODENAME={node.name}")
    print("stopped", node.name)


def restart() -> None:
    from localcluster.broker_cluster import rabbitmqctl

    node, state = node_from_state()
    rabbitmqctl(node.name, "stop")
    node.launch()
    assert node.process is not None
    node.wait_booted(240)
    state["pid"] = node.process.pid
    STATE.write_text(json.dumps(state))
    print("restarted", node.name)


if __name__ == "__main__":
    {"start": start, "stop": stop, "restart": restart}[sys.argv[1]]()
