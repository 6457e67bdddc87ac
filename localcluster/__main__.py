"""``python -m localcluster``: bring a puller cluster up on this machine, demo it, take it down."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import docker

from localcluster.broker_cluster import BrokerCluster, kill_leftovers
from localcluster.cluster import LocalCluster, read_state, stop_recorded, worker_command
from localcluster.engines import ensure_host_engine
from localcluster.images import (
    build_engine_image,
    build_puller_images,
    ensure_base_image,
    ensure_rabbitmq_image,
    ensure_registry_image,
    host_client,
)
from localcluster.processes import free_port
from localcluster.rabbitmq import ensure_rabbitmq, stop_rabbitmq

DEFAULT_ROOT = Path("/tmp/puller-cluster")  # noqa: S108 - a fixed, documented place
DEMO_REGISTRY_PORT = 5000
DEMO_HTTP_PORT = 5017
DEMO_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BROKER_MARKER = "started-rabbitmq"
BROKER_CLUSTER_MARKER = "started-broker-cluster"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="state directory")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start RabbitMQ, a registry, N engines and N workers")
    up.add_argument("--nodes", type=int, default=3)
    demo = commands.add_parser("demo", help="up, then pull a demo image onto every node")
    demo.add_argument("--nodes", type=int, default=3)
    for command in (up, demo):
        command.add_argument(
            "--brokers",
            type=int,
            default=1,
            help="1: this machine's RabbitMQ; more: a RabbitMQ cluster of fresh nodes",
        )
    commands.add_parser("down", help="stop what up started (and RabbitMQ, if up started it)")
    commands.add_parser(
        "test-images",
        help="start the machine's dockerd, build the images the tests and docker-compose.yml use",
    )
    args = parser.parse_args(argv)

    if args.command == "down":
        stopped = stop_recorded(args.root)
        marker = args.root / BROKER_CLUSTER_MARKER
        if marker.exists():
            kill_leftovers(marker.read_text())
            shutil.rmtree(args.root / "brokers", ignore_errors=True)
            marker.unlink()
        if (args.root / BROKER_MARKER).exists():
            stop_rabbitmq()
            (args.root / BROKER_MARKER).unlink()
        print(f"stopped {stopped} process(es) of the cluster under {args.root}")
        return 0
    if args.command == "test-images":
        ensure_host_engine()
        client = host_client()
        print("base image:", ensure_base_image(client))
        print("rabbitmq image:", ensure_rabbitmq_image(client))
        print("registry image:", ensure_registry_image(client))
        print("engine image:", build_engine_image(client))
        images = build_puller_images(client)
        print("worker image:", images.worker)
        print("http image:", images.http)
        return 0
    cluster = _up(args.root, args.nodes, args.brokers)
    if args.command == "demo":
        return _demo(cluster)
    return 0


def _up(root: Path, nodes: int, brokers: int = 1) -> LocalCluster:
    if read_state(root) is not None:
        print(f"stopping the cluster left running under {root}")
        stop_recorded(root)
    root.mkdir(parents=True, exist_ok=True)
    amqp_url = DEMO_AMQP_URL
    if brokers > 1:
        broker_cluster = BrokerCluster(root / "brokers", size=brokers)
        broker_cluster.start()
        # what `down` needs to find the nodes from another process
        (root / BROKER_CLUSTER_MARKER).write_text(broker_cluster.marker)
        amqp_url = ",".join(broker_cluster.urls())
    elif ensure_rabbitmq():
        (root / BROKER_MARKER).touch()
    port = DEMO_REGISTRY_PORT if _port_free(DEMO_REGISTRY_PORT) else free_port()
    cluster = LocalCluster(root=root, amqp_url=amqp_url, nodes=nodes, registry_port=port)
    cluster.start()
    gateway = cluster.start_gateway(
        port=DEMO_HTTP_PORT if _port_free(DEMO_HTTP_PORT) else free_port()
    )
    for url in amqp_url.split(","):
        print(f"RabbitMQ   {url}")
    print(f"registry   {cluster.registry.address}")
    print(f"HTTP API   {gateway.url}  (puller-http, log {gateway.log_path})")
    print(f"fleet page {gateway.url}/  (open it in a browser: every node by every image, live)")
    for engine, worker in zip(cluster.engines, cluster.workers, strict=True):
        print(
            f"{engine.name:<10} DOCKER_HOST={engine.docker_host}  "
            f"health http://127.0.0.1:{worker.health_port}/ready  log {worker.log_path}"
        )
    return cluster


def _demo(cluster: LocalCluster) -> int:
    image = cluster.registry.push_files("demo/hello", "1", {"hello.txt": b"hello from puller\n"})
    for engine in cluster.engines:  # so that the demo shows a real pull, not "present"
        client = engine.client()
        try:
            client.images.remove(image, force=True)
        except docker.errors.ImageNotFound:
            pass
        finally:
            client.close()
    print(f"\n$ puller pull {image} --expect {cluster.nodes}")
    puller = str(Path(worker_command()[0]).parent / "puller")
    status = subprocess.run(
        [
            puller,
            "--amqp-url",
            cluster.amqp_url,
            "pull",
            image,
            "--expect",
            str(cluster.nodes),
            "--timeout",
            "120",
        ],
        check=False,
    ).returncode
    everywhere = _check_engines(cluster, image)
    http_ok = _drop_in_call(cluster, image)
    print("\nthe cluster stays up; stop it with: .venv/bin/python -m localcluster down")
    return 0 if status == 0 and everywhere and http_ok else 1


def _check_engines(cluster: LocalCluster, image: str) -> bool:
    print("\nchecked through each node's own Docker Engine API:")
    everywhere = True
    for engine in cluster.engines:
        client = engine.client()
        try:
            found = client.images.get(image).short_id
        except docker.errors.ImageNotFound:
            found, everywhere = "MISSING", False
        finally:
            client.close()
        print(f"  {engine.name}: {found}")
    return everywhere


def _drop_in_call(cluster: LocalCluster, image: str) -> bool:
    """The call cyber-dojo's services make to the original puller, to puller-http."""
    if cluster.gateway is None:
        return True
    body = json.dumps({"id": "demo01", "image_name": image})
    command = [
        "curl",
        "--silent",
        "--show-error",
        "--header",
        "Content-Type: application/json",
        "--data",
        body,
        f"{cluster.gateway.url}/pull_images",
    ]
    print("\nthe same through the HTTP API (a drop-in for cyber-dojo's puller):")
    print(f"$ {shlex.join(command)}")
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
    print(done.stdout.strip() or done.stderr.strip())
    if done.returncode != 0:
        return False
    request_id = json.loads(done.stdout)["pull_images"]["request_id"]
    url = f"{cluster.gateway.url}/pulls/{request_id}"
    print(f"$ curl --silent {url}")
    deadline = time.monotonic() + 30
    while True:  # the nodes answer "present" in milliseconds
        answers = subprocess.run(
            ["curl", "--silent", url], capture_output=True, text=True, check=False, timeout=30
        )
        answered = answers.returncode == 0 and json.loads(answers.stdout)["answered"]
        if answered == cluster.nodes or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    print(answers.stdout.strip())
    return answers.returncode == 0


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
