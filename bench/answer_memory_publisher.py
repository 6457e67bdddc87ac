"""The publisher side of bench/answer_memory.py, run in a process of its own so that its
memory and CPU are its own: one line of JSON per request out, one per answered request.

Imports only ``publisher`` and the standard library, so that an older tree's publisher runs
it too (``python -P``, that tree first on ``PYTHONPATH``)."""

from __future__ import annotations

import json
import sys
import time
import uuid

from publisher import Publisher


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> int:
    amqp_url, requests, nodes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with Publisher(amqp_url) as publisher:
        publisher.connect(10)
        print(json.dumps({"rss": rss_bytes()}), flush=True)
        for n in range(requests):
            request_id = publisher.request(f"127.0.0.1:5000/bench/{uuid.uuid4().hex[:8]}:{n}")
            print(json.dumps({"request": request_id}), flush=True)
            cpu, wall = time.process_time(), time.monotonic()
            answered = publisher.results(request_id, expect=nodes, timeout=300)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            memory = getattr(publisher, "answer_memory", None)  # absent before the budget
            kept = memory().kept_bytes if memory is not None else None
            line = {"answered": len(answered), "cpu": cpu, "wall": wall, "rss": rss_bytes()}
            print(json.dumps(line | {"kept": kept}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
