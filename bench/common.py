"""What the benchmarks share: a broker vhost, engines and workers, and the tables they print."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from localcluster.cluster import WorkerProcess
from localcluster.engines import NodeEngine
from localcluster.processes import stop
from localcluster.rabbitmq import add_vhost, ensure_rabbitmq
from localcluster.registry import Registry

RESULTS = Path(
    os.environ.get("PULLER_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
"""Where figures (JSON) and the plot go; the test suite points it elsewhere."""
AMQP_URL_ENV = "PULLER_BENCH_AMQP_URL"
"""A fresh, empty vhost to run in, instead of one made (and deleted) on the machine's RabbitMQ:
the test suite gives one of its own broker's (a ``rabbitmqctl`` call costs a second or more)."""


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``samples`` (fraction in 0..1)."""
    ordered = sorted(samples)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def summary_ms(samples: Sequence[float]) -> dict[str, float]:
    return {
        "p50": 1000 * statistics.median(samples),
        "p90": 1000 * percentile(samples, 0.90),
        "p99": 1000 * percentile(samples, 0.99),
    }


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if index == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def save(name: str, figures: object) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return path


@dataclass
class BenchEnvironment:
    """A vhost of the machine's RabbitMQ, a registry, and Docker Engines, under ``root``."""

    root: Path
    amqp_url: str
    registry: Registry
    engines: list[NodeEngine] = field(default_factory=list)

    def add_engines(self, count: int) -> list[NodeEngine]:
        added = []
        for _ in range(count):
            engine = NodeEngine(
                f"e{len(self.engines) + 1}", self.root / f"e{len(self.engines) + 1}"
            )
            engine.start()
            self.engines.append(engine)
            added.append(engine)
        return added

    def start_workers(
        self,
        count: int,
        prefix: str = "node",
        command: list[str] | None = None,
        **worker_env: str,
    ) -> list[WorkerProcess]:
        """``count`` puller workers, spread over the engines, all ready when it returns:
        serving and caught up on the history (earlier benchmarks' requests), so that
        measurements see the steady state, not the catch-up."""
        workers = [
            WorkerProcess(
                node=f"{prefix}-{i + 1}",
                docker_host=self.engines[i % len(self.engines)].docker_host,
                amqp_url=self.amqp_url,
                log_path=self.root / "workers" / f"{prefix}-{i + 1}.log",
                extra_env=dict(worker_env),
                command=command,
            )
            for i in range(count)
        ]
        for worker in workers:  # start all, then wait: their startups overlap
            worker.launch()
        for worker in workers:
            worker.wait_serving(timeout=300)
        deadline = time.monotonic() + 300
        for worker in workers:
            while worker.health("/ready")[0] != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{worker.node} did not catch up within 300 s")
                time.sleep(0.2)
        return workers


def stop_all(processes: Sequence[subprocess.Popen[bytes] | None]) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            process.terminate()
    for process in processes:
        if process is not None:
            stop(process, timeout=20)


@contextmanager
def bench_environment() -> Iterator[BenchEnvironment]:
    """Gives a fresh vhost (on the machine's RabbitMQ, started if needed, unless
    :data:`AMQP_URL_ENV` names one), a registry, no engines."""
    amqp_url, vhost = os.environ.get(AMQP_URL_ENV), None
    if not amqp_url:
        ensure_rabbitmq()
        vhost = f"bench-{uuid.uuid4().hex[:8]}"
        add_vhost(vhost)
        amqp_url = f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"
    root = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    registry = Registry(root / "registry")
    registry.start()
    environment = BenchEnvironment(root=root, amqp_url=amqp_url, registry=registry)
    try:
        yield environment
    finally:
        with ThreadPoolExecutor() as pool:  # a dockerd takes a second to stop
            list(pool.map(NodeEngine.remove, environment.engines))
        registry.remove()
        if vhost is not None:
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)  # worker logs and state, engine roots


def runtime_worker_command() -> list[str]:
    """``puller-worker`` from a virtualenv holding only the runtime dependencies, as the
    worker image has them (see :func:`runtime_command`)."""
    return runtime_command("puller-worker")


def runtime_command(program: str) -> list[str]:
    """One of puller's programs from a virtualenv holding only the runtime dependencies, as
    the images have them (the development venv also holds test tools, some of which the
    programs' libraries pick up when present: structlog loads rich, for one). Made once per
    version of ``pyproject.toml`` and of the code under /tmp."""
    project = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256((project / "pyproject.toml").read_bytes())
    for package in ("contract", "worker", "publisher", "serving", "gateway", "blob_cache"):
        for path in sorted((project / package).rglob("*.py")):
            digest.update(path.read_bytes())
    venv = Path(tempfile.gettempdir()) / f"puller-runtime-{digest.hexdigest()[:12]}"
    script = venv / "bin" / program
    if not script.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", str(project)],
            check=True,
            capture_output=True,
        )
    return [str(script)]
