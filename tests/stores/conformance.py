"""The image store contract as cases (:mod:`worker.stores.contract`): one suite every store
runs, as spegel's ``storetest`` does. The Docker Engine's and containerd's stores run it on
real daemons and a real registry (tests/integration/test_store_conformance.py), the unit
tests' in-memory store in memory (tests/unit/test_store_conformance.py).

A runner subclasses :class:`StoreConformance` and gives a ``harness`` fixture: a
:class:`Harness` over its store's daemon, a registry, and a client of the daemon's own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from contract import ErrorKind, ImageReference, PullFailed
from localcluster.registry import docker_config
from tests.waiting import eventually
from worker.stores.contract import (
    ImageInfo,
    ImageInUse,
    ImageStore,
    InterruptibleStore,
    PrunableStore,
    PullProgress,
)
from worker.stores.registry_logins import DockerConfig

WAIT = 20.0
"""Seconds a case waits for what it expects (a pull to start, memory to catch up)."""


class Store(ImageStore, InterruptibleStore, PrunableStore, Protocol):
    """What every store here is: the whole contract."""


@dataclass(frozen=True)
class Published:
    """An image in the harness's registry: its name, and what a pull of it must give."""

    image: ImageReference
    image_id: str
    digest: str
    size: int
    """Its layers' bytes, as the registry sends them."""


@dataclass(frozen=True)
class Private:
    """An image in a registry that wants a login, and that login."""

    published: Published
    user: str
    password: str


class Harness(Protocol):
    stall_timeout: float
    """The stall timeout of the stores :meth:`store` makes."""

    def store(self, docker_config: DockerConfig | None = None, pull_timeout: float = 60) -> Store:
        """A new store on the harness's daemon (closed by the harness); ``docker_config``:
        its logins (by default an empty directory's)."""
        ...

    def away_store(self) -> Store:
        """A store whose daemon is not there."""
        ...

    def publish(self, size: int = 0) -> Published:
        """A new image in the registry, on no node yet; ``size``: one layer of that many
        random bytes (a few bytes when 0)."""
        ...

    def missing(self) -> ImageReference:
        """A tag the registry does not have."""
        ...

    def private(self) -> Private:
        """A new image in a registry that wants a login."""
        ...

    def throttled(self, image: ImageReference) -> ImageReference:
        """``image`` by a way to its registry that carries about a megabyte a second."""
        ...

    def silent(self, image: ImageReference) -> ImageReference:
        """``image`` by a way to its registry that goes silent a third into its layer."""
        ...

    def unreachable(self) -> ImageReference:
        """An image on a registry address where nothing listens."""
        ...

    def failing(self) -> ImageReference:
        """An image on a registry that answers every request with 503."""
        ...

    def remove(self, name: str) -> None:
        """Another client of the daemon removes the image named ``name``."""
        ...

    def tag(self, name: str, other: str) -> None:
        """Another client gives the image named ``name`` the name ``other`` too."""
        ...

    def use(self, name: str) -> Callable[[], None]:
        """A container is made from the image named ``name`` (never started); returns what
        removes it."""
        ...

    def data_root(self) -> str:
        """Where the daemon keeps its data, as the store must say."""
        ...


@dataclass
class Pulling:
    """A pull running on a thread of its own."""

    progress: list[PullProgress] = field(default_factory=list)
    outcome: list[ImageInfo | PullFailed] = field(default_factory=list)
    thread: threading.Thread | None = None

    def moved(self) -> bool:
        return any(p.done for p in self.progress)

    def result(self) -> ImageInfo | PullFailed:
        assert self.thread is not None
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the pull did not end"
        return self.outcome[0]


def start_pull(store: Store, image: ImageReference) -> Pulling:
    pulling = Pulling()

    def pull() -> None:
        try:
            pulling.outcome.append(store.pull(image, pulling.progress.append))
        except PullFailed as failure:
            pulling.outcome.append(failure)

    pulling.thread = threading.Thread(target=pull, daemon=True)
    pulling.thread.start()
    return pulling


def failure_of(store: Store, image: ImageReference) -> PullFailed:
    with pytest.raises(PullFailed) as failed:
        store.pull(image)
    return failed.value


@contextmanager
def container_of(harness: Harness, name: str) -> Iterator[None]:
    remove = harness.use(name)
    try:
        yield
    finally:
        remove()


def full_name(image: ImageReference) -> str:
    return str(image)


class StoreConformance:
    """The cases; a subclass gives the ``harness`` fixture."""

    def test_it_says_where_it_is_and_the_daemon_s_version(self, harness: Harness) -> None:
        store = harness.store()
        assert store.describe()
        assert store.version() not in ("", "unknown")

    def test_an_image_it_does_not_hold_is_found_nowhere(self, harness: Harness) -> None:
        store = harness.store()
        image = harness.publish().image
        assert store.find_image(image) is None
        assert store.known_image(image) is None

    def test_a_pull_gives_the_registry_s_image_and_find_answers_the_same(
        self, harness: Harness
    ) -> None:
        store = harness.store()
        published = harness.publish()
        info = store.pull(published.image)
        assert info == ImageInfo(published.image_id, published.digest)
        assert store.find_image(published.image) == info

    def test_a_pull_by_digest_gives_the_image_found_by_that_digest(self, harness: Harness) -> None:
        store = harness.store()
        published = harness.publish()
        pinned = ImageReference(
            published.image.domain, published.image.path, None, published.digest
        )
        info = store.pull(pinned)
        assert info == ImageInfo(published.image_id, published.digest)
        assert store.find_image(pinned) == info

    def test_a_pull_longer_than_its_timeout_fails_timeout(self, harness: Harness) -> None:
        store = harness.store(pull_timeout=0.5)
        failure = failure_of(store, harness.throttled(harness.publish(size=1_500_000).image))
        assert failure.kind is ErrorKind.TIMEOUT, failure
        assert "PULLER_PULL_TIMEOUT" in failure.message

    def test_a_pull_reports_its_bytes_as_they_come(self, harness: Harness) -> None:
        store = harness.store()
        published = harness.publish(size=1_500_000)
        pulling = start_pull(store, harness.throttled(published.image))
        result = pulling.result()
        assert isinstance(result, ImageInfo), result
        assert pulling.progress, "no progress was reported"
        dones = [p.done for p in pulling.progress]
        assert dones == sorted(dones)
        assert all(0 <= p.done <= p.total for p in pulling.progress)
        # ctr prints sizes to a tenth of a unit (1.4 MiB): a total may be off by that much
        assert abs(pulling.progress[-1].total - published.size) <= published.size / 20

    def test_once_started_an_image_looked_up_is_known_until_another_client_removes_it(
        self, harness: Harness
    ) -> None:
        store = harness.store()
        published = harness.publish()
        info = store.pull(published.image)
        store.start()

        def known_after_a_look() -> bool:
            assert store.find_image(published.image) == info
            return store.known_image(published.image) == info

        eventually(known_after_a_look, "never answered from memory", WAIT)
        harness.remove(full_name(published.image))
        eventually(lambda: store.known_image(published.image) is None, "still known", WAIT)
        assert store.find_image(published.image) is None

    def test_a_tag_the_registry_lacks_fails_not_found(self, harness: Harness) -> None:
        failure = failure_of(harness.store(), harness.missing())
        assert failure.kind is ErrorKind.NOT_FOUND, failure
        assert "check that the repository and tag exist" in failure.message

    def test_a_registry_that_wants_a_login_refuses_none_or_a_wrong_one(
        self, harness: Harness, tmp_path: Path
    ) -> None:
        private = harness.private()
        image = private.published.image
        config = DockerConfig(tmp_path)
        store = harness.store(docker_config=config)
        without = failure_of(store, image)
        assert without.kind is ErrorKind.UNAUTHORIZED, without
        assert f"registry {image.domain} needs a login" in without.message
        assert f"looked in {config.describe()}: no such file" in without.message

        docker_config(tmp_path, image.domain, private.user, f"wrong-{private.password}")
        wrong = failure_of(store, image)
        assert wrong.kind is ErrorKind.UNAUTHORIZED, wrong
        assert f"registry {image.domain} refused the worker's login" in wrong.message
        assert private.password not in wrong.message

        docker_config(tmp_path, image.domain, private.user, private.password)
        assert store.pull(image).image_id == private.published.image_id

    def test_a_registry_nothing_listens_for_fails_registry_unreachable(
        self, harness: Harness
    ) -> None:
        failure = failure_of(harness.store(), harness.unreachable())
        assert failure.kind is ErrorKind.REGISTRY_UNREACHABLE, failure

    def test_a_registry_answering_503_fails_registry_error(self, harness: Harness) -> None:
        failure = failure_of(harness.store(), harness.failing())
        assert failure.kind is ErrorKind.REGISTRY_ERROR, failure

    def test_a_registry_gone_silent_mid_layer_fails_stalled(self, harness: Harness) -> None:
        store = harness.store()
        published = harness.publish(size=1_500_000)
        started = time.monotonic()
        failure = failure_of(store, harness.silent(published.image))
        assert failure.kind is ErrorKind.STALLED, failure
        assert "PULLER_STALL_TIMEOUT" in failure.message
        assert time.monotonic() - started < harness.stall_timeout + 15

    def test_interrupt_cuts_the_running_pull_which_can_be_made_again(
        self, harness: Harness
    ) -> None:
        store = harness.store()
        published = harness.publish(size=1_500_000)
        slow = harness.throttled(published.image)
        store.interrupt(slow)  # none runs: nothing to cut
        pulling = start_pull(store, slow)
        eventually(pulling.moved, "the pull never moved", WAIT)
        store.interrupt(slow)
        failure = pulling.result()
        assert isinstance(failure, PullFailed) and failure.kind is ErrorKind.CANCELLED, failure
        assert "interrupted" in failure.message
        assert store.find_image(slow) is None
        assert store.pull(slow).image_id == published.image_id

    def test_cancel_pulls_cuts_running_pulls_and_every_later_one(self, harness: Harness) -> None:
        store = harness.store()
        pulling = start_pull(store, harness.throttled(harness.publish(size=1_500_000).image))
        eventually(pulling.moved, "the pull never moved", WAIT)
        store.cancel_pulls()
        failure = pulling.result()
        assert isinstance(failure, PullFailed) and failure.kind is ErrorKind.CANCELLED, failure
        assert "shutting down" in failure.message
        later = failure_of(store, harness.publish().image)
        assert later.kind is ErrorKind.CANCELLED, later

    def test_images_lists_each_image_once_with_all_its_names_and_digests(
        self, harness: Harness
    ) -> None:
        store = harness.store()
        published = harness.publish()
        name = full_name(published.image)
        store.pull(published.image)
        other = f"{published.image.repository}:other"
        harness.tag(name, other)
        [listed] = [i for i in store.images() if i.image_id == published.image_id]
        assert sorted(listed.names) == sorted((name, other))
        assert f"{published.image.repository}@{published.digest}" in listed.repo_digests
        assert listed.size_bytes > 0
        assert published.image_id not in store.images_in_use()

    def test_an_image_a_container_uses_is_in_use_and_is_not_removed(self, harness: Harness) -> None:
        store = harness.store()
        published = harness.publish()
        store.pull(published.image)
        with container_of(harness, full_name(published.image)):
            assert published.image_id in store.images_in_use()
            with pytest.raises(ImageInUse):
                store.remove_image(published.image_id)
            assert store.find_image(published.image) is not None
        assert published.image_id not in store.images_in_use()

    def test_remove_image_takes_every_name_and_says_whether_it_was_there(
        self, harness: Harness
    ) -> None:
        store = harness.store()
        published = harness.publish()
        name = full_name(published.image)
        store.pull(published.image)
        other = f"{harness.publish().image.repository}:same-image"
        harness.tag(name, other)
        assert store.remove_image(published.image_id) is True
        assert store.find_image(published.image) is None
        assert all(i.image_id != published.image_id for i in store.images())
        assert store.remove_image(published.image_id) is False

    def test_data_root_is_where_the_daemon_keeps_its_data(self, harness: Harness) -> None:
        assert harness.store().data_root() == harness.data_root()

    def test_a_store_whose_daemon_is_away_says_so_to_every_question(self, harness: Harness) -> None:
        store = harness.away_store()
        image = harness.publish().image
        questions: list[Callable[[], object]] = [
            store.version,
            lambda: store.find_image(image),
            lambda: store.pull(image),
            store.images,
            store.images_in_use,
        ]
        with ThreadPoolExecutor(len(questions)) as pool:  # each may wait for its timeout
            futures = [pool.submit(question) for question in questions]
        for future in futures:
            failure = future.exception()
            assert isinstance(failure, PullFailed), failure
            assert failure.kind is ErrorKind.ENGINE_UNAVAILABLE, failure
        assert store.known_image(image) is None
