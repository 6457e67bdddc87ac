"""The fleet page's matrix: nodes by images, one cell each, computed from a survey (a check
per image, see :meth:`publisher.Publisher.survey`) and what the page's own pulls reported.

Pure: no I/O, no clock of its own, so the rules below are unit-tested with fakes.

A cell is ``"p"`` present, ``"a"`` absent, ``"n"`` no answer, ``["d", version]`` drift (present,
but another digest than most nodes that have the image), ``["u", percent or null]`` pulling
(a pull the page started, or one the node says in its answer it runs for someone else,
with its progress), ``["w", seconds]`` asked that long ago and not
there yet (pulling or queued: the node's progress and answer go to whoever asked),
``["f", kind, message]`` failed. Short codes: 100 nodes x 100 images is 10,000 cells.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from contract import ErrorKind, NodeError, NodeResult, NodeState, Pulling, Status
from publisher.client import Survey
from publisher.report import StatusReport
from publisher.roster import NodeInfo

MAX_NODES_SHOWN = 1000
"""Rows at most (the rest are counted in ``hidden_nodes``): the answer stays bounded."""
MAX_MESSAGE = 200
"""Characters of a failure's message kept for the cell's hover text."""


def node_state(info: NodeInfo) -> str:
    """``up``, ``catching up`` (replaying the history it missed), or ``leaving``."""
    if info.state is NodeState.LEAVING:
        return "leaving"
    if info.caught_up is False or info.replay_pending > 0:
        return "catching up"
    return "up"


def majority_version(report: StatusReport) -> str | None:
    """The version (digest, or image id) most of the nodes that have the image have; ``None``
    when no node has it or the largest groups tie (then every present cell is drift)."""
    counts = Counter({version: len(nodes) for version, nodes in report.versions.items()})
    ranked = counts.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def cell(
    result: NodeResult | None,
    majority: str | None,
    drifting: bool,
    pulling: Pulling | None,
    failure: tuple[str, str] | None,
    asked: float | None = None,
) -> object:
    """One node's cell for one image (see the module's doc for the codes); ``pulling``: the
    page's own pull of it, as its node last reported it."""
    if result is not None and result.status in (Status.PRESENT, Status.PULLED):
        version = result.digest or result.image_id or "unknown"
        if drifting and version != majority:
            return ["d", version]
        return "p"
    if pulling is None and result is not None and result.status is Status.ABSENT:
        pulling = result.pulling  # the node's own word: it pulls the image for someone else
    if pulling is not None:
        percent = round(100 * pulling.done / pulling.total) if pulling.total > 0 else None
        return ["u", percent]
    if result is not None and result.status is Status.FAILED:
        error = result.error or NodeError(ErrorKind.UNKNOWN, "")
        failure = (error.kind.value, error.message)
    if failure is not None:
        return ["f", failure[0], failure[1][:MAX_MESSAGE]]
    if result is not None and result.status is Status.ABSENT:
        return "a" if asked is None else ["w", round(asked)]
    return "n"


def fleet_matrix(
    survey: Survey,
    pulling: Mapping[tuple[str, str], Pulling],
    failures: Mapping[tuple[str, str], tuple[str, str]],
    max_nodes: int = MAX_NODES_SHOWN,
    asked: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The page's document: ``nodes`` (the roster, by name: state, last seen, version),
    ``images``, ``cells`` (a row per node, a column per image) and ``notes``.

    ``pulling`` and ``failures`` are keyed by (image, node): the page's own pulls in flight,
    and their failures (kind, message), shown where the survey has nothing better. ``asked``:
    seconds since each image was last asked, for those asked lately (a node without it is
    then waiting for it, not just without it)."""
    rows = {info.node: info for info in survey.roster.nodes}
    answered = {r.node for report in survey.reports for r in report.nodes}
    names = sorted(rows.keys() | answered)
    shown = names[:max_nodes]
    images = [report.image for report in survey.reports]
    by_image = []
    for report in survey.reports:
        results = {r.node: r for r in report.nodes}
        by_image.append((report.image, results, majority_version(report), report.drift))
    cells = [
        [
            cell(
                results.get(node),
                majority,
                drifting,
                pulling.get((image, node)),
                failures.get((image, node)),
                (asked or {}).get(image),
            )
            for image, results, majority, drifting in by_image
        ]
        for node in shown
    ]
    nodes: list[dict[str, object]] = []
    for node in shown:
        info = rows.get(node)
        if info is None:  # answered, but not in the roster (its announcements are late)
            nodes.append({"name": node, "state": "unknown", "last_seen": None, "version": None})
            continue
        nodes.append(
            {
                "name": node,
                "state": node_state(info),
                "last_seen": info.last_seen,
                "version": info.version,
            }
        )
    notes = [survey.roster.note] if survey.roster.note else []
    return {
        "nodes": nodes,
        "images": images,
        "cells": cells,
        "hidden_nodes": len(names) - len(shown),
        "notes": notes,
    }
