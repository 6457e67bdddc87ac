"""Each benchmark runs once, in a tiny configuration, to prove it works. No timing is
asserted: these machines are shared and noisy; the figures live in bench/README.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from bench.common import AMQP_URL_ENV
from localcluster.images import PROJECT_ROOT
from tests.integration.conftest import new_vhost

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("script", "args", "title", "figures"),
    [
        ("round_trip", ["--nodes", "2", "--rounds", "3"], "summary: p50 ms", "round_trip.json"),
        (
            "pull_onto_nodes",
            ["--nodes", "2", "--size-mb", "2", "--repeats", "1"],
            "onto K nodes",
            "pull_onto_nodes.json",
        ),
        (
            "session_path",
            ["--requests", "50", "--workers", "2", "--rate", "1000"],
            "request():",
            "session_path.json",
        ),
        ("footprint", ["--idle-seconds", "1", "--size-mb", "2"], "footprint", "footprint.json"),
        (
            "http_gateway",
            ["--clients", "1,2", "--requests", "20", "--workers", "1"],
            "/pull_images against Publisher.request()",
            "http_gateway.json",
        ),
        (
            "slow_clients",
            ["--gateway", "50", "--worker", "50", "--trickle-seconds", "1"],
            "slow clients:",
            "slow_clients.json",
        ),
        (
            "head_of_line",
            ["--nodes", "2", "--flood", "40", "--repeats", "1"],
            "a healthy image onto 2 nodes",
            "head_of_line.json",
        ),
        (
            "blob_cache",
            ["--clients", "3", "--slow", "1", "--size-mb", "1", "--rate-mb", "20"],
            "one 1 MB blob to 3 clients",
            "blob_cache.json",
        ),
        (
            "blob_cache_clients",
            [
                "--max-connections",
                "8",
                "--clients",
                "6",
                "--size-mb",
                "1",
                "--limit-mib",
                "256",
                "--settle-seconds",
                "0.5",
            ],
            "6 clients that stop reading a 1 MB blob",
            "blob_cache_clients.json",
        ),
        (
            "priority",
            ["--nodes", "2", "--images", "4", "--size-mb", "1", "--repeats", "1"],
            "behind a warm-up of 4 such images",
            "priority.json",
        ),
        (
            "prune_race",
            ["--rounds", "1", "--nodes", "1", "--images", "2", "--baseline", ""],
            "racing pulls of 2 images on 1 nodes",
            "prune_race.json",
        ),
        (
            "missing_flood",
            ["--images", "50", "--baseline", "", "--no-replay"],
            "50 distinct missing images",
            "missing_flood.json",
        ),
        (
            "answer_memory",
            ["--nodes", "50", "--requests", "2", "--baseline", ""],
            "a publisher taking every answer of N nodes",
            "answer_memory.json",
        ),
    ],
)
def test_benchmark_runs_and_prints_its_table(
    script: str,
    args: list[str],
    title: str,
    figures: str,
    tmp_path: Path,
    rabbitmq: RabbitMqContainer,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", *args],
        cwd=PROJECT_ROOT,
        env={
            **os.environ,
            "PULLER_BENCH_RESULTS": str(tmp_path),
            AMQP_URL_ENV: new_vhost(rabbitmq),  # the test broker's: no rabbitmqctl calls
        },
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert title in done.stdout
    assert json.loads((tmp_path / figures).read_text())
    if script == "round_trip":
        assert (tmp_path / "round_trip.png").stat().st_size > 10_000


def test_the_scale_bench_counts_a_storm_in_which_each_node_reads_what_it_missed_and_no_more(
    tmp_path: Path,
) -> None:
    """bench/scale.py with its own broker, 6 simulated nodes in 2 processes, a storm of
    dropped connections: each node's history deliveries are what it missed plus a constant
    (it reads its saved place again, and its sweep reads the last entry), and nothing is
    written into the history but the requests."""
    nodes, missed = 6, 4
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scale",
            *("--nodes", str(nodes), "--per-process", "3", "--missed", str(missed)),
            *("--idle-seconds", "1", "--broadcasts", "1", "--checkpoint-seconds", "0.2"),
            *("--sweep-seconds", "0.2", "--storm", "drop", "--down-seconds", "0"),
            *("--release", "together", "--timeout", "60"),
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PULLER_BENCH_RESULTS": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scale: counts per N" in done.stdout
    (run,) = json.loads((tmp_path / "scale.json").read_text())["designs"]["tail"]["runs"]
    storm, broadcast, idle = run["storm"], run["broadcast"], run["idle"]
    assert storm["nodes_that_replayed_every_missed_request"] == nodes
    assert storm["tail_reads"] == {"tail": nodes}, "every connection read the end, no marker"
    assert missed <= storm["deliveries_per_node"]["max"] <= missed + 4
    assert storm["history_entries_written"] == 0
    assert broadcast["answers_per_round"] == nodes
    assert broadcast["history_entries_per_request"] == 1, "checkpoints write nothing"
    assert idle["history_entries_per_hour"] == 0
