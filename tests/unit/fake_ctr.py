"""A stand-in for ``ctr``, for the unit tests of ``ctr events`` as the image index's feed
(:class:`worker.stores.containerd.events.CtrImageEvents`):
``python fake_ctr.py STATE_DIR COMMAND...``.

- ``namespaces create|remove NAME``: logged to ``STATE_DIR/log``;
- ``namespaces ls -q``: prints ``STATE_DIR/namespaces``;
- ``events``: waits ``STATE_DIR/subscribe_delay`` seconds (the time a real ``ctr`` takes
  to open its subscription; namespaces created meanwhile are not shown), then prints an
  event for each namespace created after that, and every line appended to
  ``STATE_DIR/lines``, as they come.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> int:
    state, command = Path(sys.argv[1]), sys.argv[2:]
    log = state / "log"
    if command[:2] == ["namespaces", "ls"]:
        listed = state / "namespaces"
        print(listed.read_text() if listed.exists() else "", end="")
        return 0
    if command[0] == "namespaces":
        with log.open("a") as out:
            out.write(f"{time.time()} {command[1]} {command[2]}\n")
        return 0
    if command[0] != "events":
        print(f"ctr: fake ctr cannot {command}", file=sys.stderr)
        return 1
    delay = state / "subscribe_delay"
    time.sleep(float(delay.read_text()) if delay.exists() else 0.0)
    subscribed = time.time()
    read = {"log": 0, "lines": 0}
    while True:
        for name, offset in list(read.items()):
            path = state / name
            if not path.exists():
                continue
            with path.open() as source:
                source.seek(offset)
                for line in source:
                    if name == "lines":
                        print(line, end="", flush=True)
                        continue
                    when, action, namespace = line.split()
                    if action == "create" and float(when) > subscribed:
                        payload = json.dumps({"name": namespace})
                        print(
                            f"2026-12-02 14:00:00.1 +0000 UTC default /namespaces/create {payload}"
                        )
                        sys.stdout.flush()
                read[name] = source.tell()
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
