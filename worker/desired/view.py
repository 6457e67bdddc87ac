"""The desired state as a pure view: merging requests into it and dropping what left the
window. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable

from contract import PullRequest


class DesiredView:
    """Per image, the newest request, and the newest asking for a refresh when that one is
    older: what a node must have done to have everything asked of the fleet."""

    def __init__(self, requests: Iterable[PullRequest] = ()) -> None:
        self._newest: dict[str, PullRequest] = {}
        self._refresh: dict[str, PullRequest] = {}
        for request in requests:
            self.add(request)

    def add(self, request: PullRequest) -> None:
        image = str(request.image)
        if _newer(request, self._newest.get(image)):
            self._newest[image] = request
        if request.refresh and _newer(request, self._refresh.get(image)):
            self._refresh[image] = request

    def prune(self, since: float) -> None:
        """Drops the requests made before ``since`` (they left the window)."""
        for kept in (self._newest, self._refresh):
            for image in [image for image, request in kept.items() if request.requested_at < since]:
                del kept[image]

    def requests(self) -> tuple[PullRequest, ...]:
        """The view's requests, oldest first (a refresh that is also the newest, once)."""
        chosen = {request.request_id: request for request in self._newest.values()}
        for request in self._refresh.values():
            chosen.setdefault(request.request_id, request)
        return tuple(sorted(chosen.values(), key=lambda r: (r.requested_at, r.request_id)))


def _newer(request: PullRequest, than: PullRequest | None) -> bool:
    return than is None or (request.requested_at, request.request_id) > (
        than.requested_at,
        than.request_id,
    )
