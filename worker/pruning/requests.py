"""A ``prune`` request from the wire: who may ask, one pass at a time, and the answer.

The pass itself (which images go, and removing them) is :mod:`worker.pruning.pruner`'s. Passes run
on a thread of their own, never the connection's: listing and removing images can take
seconds. Nothing a request holds can raise out of here: every request gets one
:class:`PruneResult`, with ``error`` set when the node did not prune.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from contract import ErrorKind, NodeError, PruneRequest, PruneResult, PullFailed, Removed
from contract.json_body import MAX_MESSAGE_BYTES
from contract.messages import MAX_REMOVALS_LISTED
from worker.admission import Admission
from worker.pruning.pruner import Pruner, PruneRule

log = structlog.get_logger("worker.prune_requests")


class PruneRequests:
    def __init__(
        self, node: str, pruner: Callable[[], Pruner | None], admission: Admission
    ) -> None:
        self.node = node
        self._pruner = pruner
        self._admission = admission
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="prune")

    def serve(
        self,
        request: PruneRequest,
        answer: Callable[[PruneResult], None],
        asked_by: str | None,
    ) -> None:
        """Connection thread: refuses at once, or queues the pass. Never raises."""
        since = time.monotonic()
        refusal = self._admission.publisher_refusal(asked_by, "nothing was pruned")
        if refusal is not None:
            log.warning("refused a prune", reason=refusal.message, request_id=request.request_id)
            answer(self._failed(request, refusal, since))
            return
        try:
            self._thread.submit(self._run, request, answer, since)
        except RuntimeError:  # shut down: the worker is stopping
            stopping = PullFailed(ErrorKind.CANCELLED, "the worker is stopping; nothing pruned")
            answer(self._failed(request, stopping, since))

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _run(
        self, request: PruneRequest, answer: Callable[[PruneResult], None], since: float
    ) -> None:
        try:
            result = self._prune(request, since)
        except Exception as error:  # a bug must not lose the answer
            log.exception("pruning failed unexpectedly", request_id=request.request_id)
            failure = PullFailed(ErrorKind.INTERNAL, f"pruning failed unexpectedly: {error}")
            result = self._failed(request, failure, since)
        try:
            answer(result)
        except Exception:
            log.exception("handing over a prune's answer failed", request_id=request.request_id)

    def _prune(self, request: PruneRequest, since: float) -> PruneResult:
        pruner = self._pruner()
        if pruner is None:
            failure = PullFailed(ErrorKind.INVALID_REQUEST, "this node's image store cannot prune")
            return self._failed(request, failure, since)
        rule = PruneRule(
            unused_for=request.unused_for,
            keep=tuple(str(image) for image in request.keep),
            dry_run=request.dry_run,
        )
        try:
            outcome = pruner.prune(rule)
        except PullFailed as failure:
            return self._failed(request, failure, since)
        for error in outcome.errors:
            log.warning("an image was not removed", error=error, request_id=request.request_id)
        listed = [
            Removed(r.image_id, r.names[:3], r.size_bytes, r.last_used)
            for r in outcome.removed[:MAX_REMOVALS_LISTED]
        ]
        while True:
            result = PruneResult(
                request_id=request.request_id,
                node=self.node,
                seconds=round(time.monotonic() - since, 6),
                dry_run=request.dry_run,
                removed=tuple(listed),
                removed_count=len(outcome.removed),
                bytes_freed=outcome.bytes_freed,
                # Asked for while the pass ran is in use too, as the wire counts it.
                kept_in_use=outcome.kept_in_use + outcome.kept_asked,
                kept_listed=outcome.kept_listed,
            )
            if not listed or len(result.encode()) <= MAX_MESSAGE_BYTES:
                return result
            listed.pop()  # long names: list fewer (removed_count still counts them all)

    def _failed(self, request: PruneRequest, failure: PullFailed, since: float) -> PruneResult:
        return PruneResult(
            request_id=request.request_id,
            node=self.node,
            seconds=round(time.monotonic() - since, 6),
            dry_run=request.dry_run,
            error=NodeError(failure.kind, failure.message),
        )
