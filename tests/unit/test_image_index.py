"""The image index over a scripted event feed: what it knows, and when it forgets."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator

import pytest

from tests.waiting import eventually
from worker.stores import image_index
from worker.stores.contract import ImageInfo
from worker.stores.image_index import ImageIndex

IMAGE = ImageInfo("sha256:" + "1" * 64, "sha256:" + "2" * 64)


class ScriptedFeed:
    """A feed whose items the test sends: ``"subscribed"``, an event, or an exception."""

    def __init__(self) -> None:
        self.items: queue.Queue[object] = queue.Queue()
        self.follows = 0
        self.closed = threading.Event()
        self.interrupted = False

    def follow(self) -> Generator[object, None, None]:
        self.follows += 1
        self.closed.clear()
        try:
            while True:
                item = self.items.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed.set()

    def interrupt(self) -> None:
        self.interrupted = True
        self.items.put(None)


@pytest.fixture
def feed() -> ScriptedFeed:
    return ScriptedFeed()


@pytest.fixture
def index(feed: ScriptedFeed) -> Iterator[ImageIndex]:
    followed = ImageIndex(feed)
    followed.start()
    try:
        yield followed
    finally:
        followed.stop(wait=5)
    assert feed.interrupted and feed.closed.is_set()


def subscribe(feed: ScriptedFeed, index: ImageIndex) -> None:
    feed.items.put("subscribed")
    eventually(lambda: index.watching, "not watching after subscribing")


def test_nothing_is_known_before_the_feed_has_subscribed(
    feed: ScriptedFeed, index: ImageIndex
) -> None:
    index.remember("a:1", IMAGE, index.generation())
    assert index.get("a:1") is None
    subscribe(feed, index)
    index.remember("a:1", IMAGE, index.generation())
    assert index.get("a:1") == IMAGE


def test_an_event_forgets_everything_and_refuses_an_answer_taken_before_it(
    feed: ScriptedFeed, index: ImageIndex
) -> None:
    subscribe(feed, index)
    index.remember("a:1", IMAGE, index.generation())
    asked_at = index.generation()  # a question to the store starts here...
    feed.items.put("/images/delete")
    eventually(lambda: index.get("a:1") is None, "an image event did not empty the index")
    index.remember("b:1", IMAGE, asked_at)  # ...and its answer comes after the event
    assert index.get("b:1") is None
    index.remember("b:1", IMAGE, index.generation())
    assert index.get("b:1") == IMAGE


def test_a_lost_feed_forgets_and_is_followed_again(
    feed: ScriptedFeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_index, "RETRY_INTERVAL", 0.01)
    index = ImageIndex(feed)
    index.start()
    try:
        subscribe(feed, index)
        index.remember("a:1", IMAGE, index.generation())
        feed.items.put(RuntimeError("ctr events ended: failed to dial"))
        eventually(lambda: not index.watching, "still watching a lost feed")
        assert index.get("a:1") is None
        index.remember("a:1", IMAGE, index.generation())
        assert index.get("a:1") is None
        eventually(lambda: feed.follows == 2, "the feed was not followed again")
        subscribe(feed, index)
        assert index.get("a:1") is None  # nothing from before the loss comes back
    finally:
        index.stop(wait=5)


def test_a_look_is_remembered_only_if_it_found_the_image_and_no_event_came_meanwhile(
    feed: ScriptedFeed, index: ImageIndex
) -> None:
    subscribe(feed, index)
    assert index.looked_up("a:1", lambda: None) is None
    assert index.get("a:1") is None

    def look_while_an_event_comes() -> ImageInfo:
        feed.items.put("/images/delete")
        eventually(lambda: index.generation() > 1, "the event did not come")
        return IMAGE

    assert index.looked_up("a:1", look_while_an_event_comes) == IMAGE
    assert index.get("a:1") is None
    assert index.looked_up("a:1", lambda: IMAGE) == IMAGE
    assert index.get("a:1") == IMAGE
