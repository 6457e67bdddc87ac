"""A prune racing pulls on a real cluster, one round at a time: used by ``bench/prune_race.py``
(a hundred rounds, against a baseline) and ``tests/integration/test_fleet.py`` (a few).

A round: fresh images are pulled onto every node and left unused for ``unused_for``
seconds; then a prune of images unused that long and a pull of each of those images go out
together (the pulls at once, or once a node has begun removing). Afterwards each node's own
engine is asked which images it holds: an answer ``present`` or ``pulled`` for an image the
node no longer holds is a loss.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from contract import PruneResult, Status
from localcluster.engines import NodeEngine
from localcluster.registry import Registry
from publisher import Publisher


@dataclass(frozen=True)
class RoundResult:
    """One round: answers that said the node had the image, those lost, and what the
    prune did."""

    answered: int
    lost: tuple[tuple[str, str], ...]
    """(node, image) answered ``present``/``pulled`` and not on the node's engine after."""
    pulled_again: int
    removed: int
    kept_in_use: int


@contextmanager
def first_removal(engines: Sequence[NodeEngine]) -> Iterator[threading.Event]:
    """Set once any of ``engines`` deletes an image (its event stream says so)."""
    seen = threading.Event()
    clients = [engine.client() for engine in engines]
    streams = [
        client.events(filters={"type": "image", "event": "delete"}, decode=True)
        for client in clients
    ]

    def watch(stream: Iterator[object]) -> None:
        try:
            for _ in stream:
                seen.set()
                return
        except Exception:  # noqa: S110 - the stream closed at the end of the round
            pass

    threads = [threading.Thread(target=watch, args=(s,), daemon=True) for s in streams]
    for thread in threads:
        thread.start()
    try:
        yield seen
    finally:
        for stream in streams:
            stream.close()
        for client in clients:
            client.close()


def race_round(
    publisher: Publisher,
    registry: Registry,
    engines: dict[str, NodeEngine],
    images: int,
    unused_for: float,
    after_first_removal: bool,
    timeout: float = 120.0,
) -> RoundResult:
    """One round (see the module's docstring); ``engines``: each node's, by node name."""
    nodes = len(engines)
    names = [
        registry.push_files(f"race/{uuid.uuid4().hex[:10]}", "1", {"f": uuid.uuid4().bytes})
        for _ in range(images)
    ]
    for name in names:
        report = publisher.pull(name, expect=nodes, timeout=timeout)
        if not report.ok:
            raise RuntimeError(f"setting the round up: {report.to_json()}")
    time.sleep(unused_for + 0.1)  # the images are now unused for that long: prunable
    pruned: list[PruneResult] = []
    with first_removal(list(engines.values())) as removing:

        def prune() -> None:
            report = publisher.prune(unused_for, expect=nodes, timeout=timeout)
            pruned.extend(a for a in report.answers if isinstance(a, PruneResult))

        pruning = threading.Thread(target=prune)
        pruning.start()
        if after_first_removal:
            removing.wait(timeout)
        requests = [publisher.request(name) for name in names]
        answers = [publisher.results(r, expect=nodes, timeout=timeout) for r in requests]
        pruning.join()
    lost: list[tuple[str, str]] = []
    answered = pulled_again = 0
    held = {node: engine_images(engine) for node, engine in engines.items()}
    for results in answers:
        for result in results:
            if not result.has_image:
                continue
            answered += 1
            pulled_again += result.status is Status.PULLED
            if result.image_id not in held[result.node]:
                lost.append((result.node, result.image))
    return RoundResult(
        answered=answered,
        lost=tuple(lost),
        pulled_again=pulled_again,
        removed=sum(r.removed_count for r in pruned),
        kept_in_use=sum(r.kept_in_use for r in pruned),
    )


def engine_images(engine: NodeEngine) -> set[str]:
    """The ids of the images the engine holds, asked of the engine itself."""
    client = engine.client()
    try:
        return {str(image.id) for image in client.images.list()}
    finally:
        client.close()
