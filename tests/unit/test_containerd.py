"""The containerd store's reading of what ``ctr`` prints, and its failures' kinds.

The pull frames are lines ``ctr images pull`` 1.6 printed here (a 2-layer image through a
throttled proxy), colours included; the store itself runs against a real containerd in
``tests/integration/test_containerd.py``."""

from __future__ import annotations

import base64
import io
import json
import platform
import time
from pathlib import Path

import pytest

from contract import ErrorKind, PullFailed
from contract.reference import parse_reference
from worker.stores.containerd import ContainerdStore
from worker.stores.containerd.ctr import ADVICE, ctr_failure, plain_http
from worker.stores.containerd.output import (
    CRI_CONTAINER_METADATA,
    FIRST_FRAME_WAIT,
    ListedRef,
    PullOutput,
    container_image,
    event_of,
    listed_refs,
    listed_target,
    size,
)
from worker.stores.containerd.platforms import Platform, node_platform, platform_manifest
from worker.stores.contract import PullProgress, store_name
from worker.stores.failures import classified

G, E = "\x1b[32m", "\x1b[0m"
REF = "127.0.0.1:36853/demo/big:1"
MANIFEST = "manifest-sha256:cfd13e49eba0d5c53ac3136e1dbb687b1118e4c1f7d9077504401b7327503552"
CONFIG = "config-sha256:195861639e115f5efe94051f217998b3d59e4a5b78de0156a90d1e32a7c1f5d3"
LAYER_1 = "layer-sha256:d53bbe8d5e25b0d4125d71e98380a5109109422ee8da46b97a7b4dc204107f46"
LAYER_2 = "layer-sha256:17e10879fb43bdf03fd28ebbe600668cc7181a5aafc3f7e5a917e9a1310b92fb"
FULL = f"|{G}++++++++++++++++++++++++++++++++++++++{E}| "


def line(reference: str, status: str, rest: str = FULL) -> str:
    return f"{reference + ':':<82}{status:<15}{rest}\n"


def frame(layer_1: str, layer_2: str, elapsed: str) -> str:
    return (
        line(REF, "resolved")
        + line(MANIFEST, "done")
        + layer_1
        + line(CONFIG, "done")
        + layer_2
        + f"elapsed: {elapsed:<74}total:  2.0 Mi (2.2 MiB/s)\n"
    )


FIRST = frame(
    line(
        LAYER_1, "downloading", f"|{G}{E}--------------------------------------|    0.0 B/1.9 MiB "
    ),
    line(
        LAYER_2, "downloading", f"|{G}{E}--------------------------------------|    0.0 B/2.9 MiB "
    ),
    "0.1 s",
)
MIDDLE = frame(
    line(
        LAYER_1, "downloading", f"|{G}+++++++++++++++++++{E}-------------------|  1.0 MiB/1.9 MiB "
    ),
    line(
        LAYER_2, "downloading", f"|{G}+++++++++++++{E}-------------------------|  1.0 MiB/2.9 MiB "
    ),
    "0.9 s",
)
LAST = frame(line(LAYER_1, "done"), line(LAYER_2, "done"), "1.6 s")
UNPACK = f"unpacking linux/amd64 sha256:{MANIFEST[16:]}...\ndone: 44.443267ms\t\n"

MIB = 1024 * 1024


def test_progress_follows_the_frames_to_the_whole_size() -> None:
    seen: list[PullProgress] = []
    output = PullOutput()
    output.follow(io.BytesIO((FIRST + MIDDLE + MIDDLE + LAST + UNPACK).encode()), seen.append)
    whole = int(1.9 * MIB) + int(2.9 * MIB)
    assert seen == [
        PullProgress(0, whole),
        PullProgress(2 * MIB, whole),
        PullProgress(whole, whole),  # "done" lines carry no figures: the totals stand
    ]
    assert output.unpacking


def test_a_repeated_frame_is_not_movement_and_a_stall_counts_from_the_last_move() -> None:
    output = PullOutput()
    for text in (FIRST + MIDDLE).splitlines():
        output.read_line(text)
    moved_at = output.moved_at
    time.sleep(0.01)
    assert not any(output.read_line(text) for text in MIDDLE.splitlines())
    assert output.moved_at == moved_at
    assert output.stalled(moved_at + 6, limit=5)
    assert not output.stalled(moved_at + 4, limit=5)
    assert output.phase == "downloading"


def test_before_the_first_frame_the_stall_limit_leaves_containerd_time_to_answer() -> None:
    output = PullOutput()
    assert output.phase == "starting"
    assert not output.stalled(output.moved_at + FIRST_FRAME_WAIT - 1, limit=3)
    assert output.stalled(output.moved_at + FIRST_FRAME_WAIT + 1, limit=3)
    assert output.stalled(output.moved_at + 100, limit=60)


def test_no_stall_while_unpacking() -> None:
    output = PullOutput()
    for text in (LAST + UNPACK).splitlines():
        output.read_line(text)
    assert not output.stalled(time.monotonic() + 1000, limit=5)


def test_frames_after_the_first_start_with_ctrs_clearing_sequences() -> None:
    clear = "\x1b[1A\x1b[2K\r" * 6  # up a line, erase it: once per line of the last frame
    seen: list[PullProgress] = []
    PullOutput().follow(io.BytesIO((FIRST + clear + MIDDLE).encode()), seen.append)
    assert [p.done for p in seen] == [0, 2 * MIB]


def test_a_line_it_cannot_read_does_not_stop_the_reading() -> None:
    odd = line(LAYER_1 + "@x.y", "downloading", f"|{G}{E}---|  ./. ")
    seen: list[PullProgress] = []
    PullOutput().follow(io.BytesIO((FIRST + odd + MIDDLE).encode()), seen.append)
    assert seen[-1].done == 2 * MIB


def test_a_line_whose_reading_fails_or_a_failing_listener_does_not_stop_the_reading() -> None:
    class Fragile(PullOutput):
        def read_line(self, line: str) -> bool:
            if "boom" in line:
                raise ValueError("a reader bug")
            return super().read_line(line)

    seen: list[PullProgress] = []

    def listener(progress: PullProgress) -> None:
        seen.append(progress)
        if len(seen) == 1:
            raise RuntimeError("a listener bug")

    reader = Fragile()
    reader.follow(io.BytesIO((FIRST + "boom\n" + MIDDLE).encode()), listener)
    assert len(seen) >= 2 and seen[-1].done == 2 * MIB


def test_resolving_without_an_answer_stalls() -> None:
    output = PullOutput()
    output.read_line(line(REF, "resolving", f"|{G}{E}--------------------------------------| "))
    output.read_line(f"elapsed: 0.2 s{' ' * 60}total:   0.0 B (0.0 B/s)")
    assert output.stalled(output.moved_at + 6, limit=5)
    assert output.phase == "resolving"


@pytest.mark.parametrize(
    ("number", "unit", "expected"),
    [
        ("1023.9", "M", int(1023.9 * MIB)),  # ctr cuts DONE to 8 characters
        ("1000.0", "K", 1_024_000),
        ("0.0", "B", 0),
        ("973.0", "", 973),
        ("1.5", "KiB", 1536),
        ("2.0", "Mi", 2 * MIB),
        ("1", "GB", 10**9),
        ("3", "parsecs", 3),
    ],
)
def test_sizes(number: str, unit: str, expected: int) -> None:
    assert size(number, unit) == expected


LISTING = (
    "REF    TYPE    DIGEST    SIZE    PLATFORMS    LABELS\n"
    "127.0.0.1:29112/demo/one:1 application/vnd.docker.distribution.manifest.v2+json "
    "sha256:c92cadec9e8c1668a340b21b05f46ef0c6636b208e62fdd1b4558c9aea502369 831.0 B "
    "linux/amd64 io.cri-containerd.image=managed\n"
    "sha256:f8c18740e1534f65170369bcea8d5f869bfc6cb32f98eb818fd38341cc69f7ac "
    "application/vnd.docker.distribution.manifest.v2+json "
    "sha256:c92cadec9e8c1668a340b21b05f46ef0c6636b208e62fdd1b4558c9aea502369 831.0 B "
    "linux/amd64 io.cri-containerd.image=managed\n"
)


def test_the_listing_gives_the_named_images_target() -> None:
    assert listed_target(LISTING, "127.0.0.1:29112/demo/one:1") == (
        "application/vnd.docker.distribution.manifest.v2+json",
        "sha256:c92cadec9e8c1668a340b21b05f46ef0c6636b208e62fdd1b4558c9aea502369",
    )
    assert listed_target(LISTING, "127.0.0.1:29112/demo/one:2") is None
    assert listed_target("REF TYPE DIGEST SIZE PLATFORMS LABELS\n", "x") is None


FULL_LISTING = """\
REF                                TYPE                                                 DIGEST                                                                  SIZE    PLATFORMS   LABELS
127.0.0.1:25087/p/5fe95d:1         application/vnd.docker.distribution.manifest.v2+json sha256:ac3501c50c46ecef8f7154cc281bae4f0b57dc335249c61436913e0080521e1e 825.0 B linux/amd64 io.cri-containerd.image=managed
127.0.0.1:25087/p/d935ce:2         application/vnd.docker.distribution.manifest.v2+json sha256:21a6459e8c8a79231e7ed5dbbabf0a4cf8259b6c3d946960f5bf117390f0afc8 2.9 MiB linux/amd64 io.cri-containerd.image=managed
sha256:394d42d55238b6f5ba77c487ff2bb237ee1523f0d02c109cf33d88dc29ae5c9f application/vnd.docker.distribution.manifest.v2+json sha256:ac3501c50c46ecef8f7154cc281bae4f0b57dc335249c61436913e0080521e1e 825.0 B linux/amd64 io.cri-containerd.image=managed
half-a-row application/vnd.oci.image.index.v1+json
not-a-digest application/vnd.oci.image.index.v1+json sha256:zz 1.0 KiB linux/amd64 -
"""  # noqa: E501 - ctr's table, as it printed it
"""Two images, one with the name the CRI plugin gives it (its id), and two rows that are
not ctr's."""


def test_every_readable_row_of_the_listing_with_its_size() -> None:
    assert listed_refs(FULL_LISTING) == [
        ListedRef(
            "127.0.0.1:25087/p/5fe95d:1",
            "application/vnd.docker.distribution.manifest.v2+json",
            "sha256:ac3501c50c46ecef8f7154cc281bae4f0b57dc335249c61436913e0080521e1e",
            825,
        ),
        ListedRef(
            "127.0.0.1:25087/p/d935ce:2",
            "application/vnd.docker.distribution.manifest.v2+json",
            "sha256:21a6459e8c8a79231e7ed5dbbabf0a4cf8259b6c3d946960f5bf117390f0afc8",
            int(2.9 * 1024**2),
        ),
        ListedRef(
            "sha256:394d42d55238b6f5ba77c487ff2bb237ee1523f0d02c109cf33d88dc29ae5c9f",
            "application/vnd.docker.distribution.manifest.v2+json",
            "sha256:ac3501c50c46ecef8f7154cc281bae4f0b57dc335249c61436913e0080521e1e",
            825,
        ),
    ]
    assert listed_refs("") == []


def test_an_index_gives_this_platforms_manifest() -> None:
    index = {
        "manifests": [
            {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    }
    assert platform_manifest(index, Platform("linux", "amd64")) == "sha256:amd"
    with pytest.raises(Exception, match="no manifest for linux/s390x"):
        platform_manifest(index, Platform("linux", "s390x"))


ARM_INDEX = {
    "manifests": [
        {
            "digest": "sha256:v6",
            "platform": {"os": "linux", "architecture": "arm", "variant": "v6"},
        },
        {
            "digest": "sha256:v7",
            "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
        },
        {"digest": "sha256:a64", "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
    ]
}


@pytest.mark.parametrize(
    ("machine", "chosen"),
    [("armv7l", "sha256:v7"), ("armv6l", "sha256:v6"), ("aarch64", "sha256:a64"),
     ("armv8l", "sha256:v7"), ("x86_64", "sha256:amd")],
)  # fmt: skip
def test_an_index_gives_the_manifest_of_this_machines_arm_variant(
    monkeypatch: pytest.MonkeyPatch, machine: str, chosen: str
) -> None:
    """The first arm entry is arm/v6: an arm/v7 node must not take it."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert platform_manifest(ARM_INDEX) == chosen


@pytest.mark.parametrize(
    ("node", "listed", "chosen"),
    [
        # arm64 with or without v8 is one platform
        (Platform("linux", "arm64", "v8"), [("arm64", "v8"), ("arm", "v7")], "arm64/v8"),
        # a node takes an older variant it runs when its own is not offered, newest first
        (Platform("linux", "arm", "v7"), [("arm", "v5"), ("arm", "v6")], "arm/v6"),
        (Platform("linux", "arm64", "v8"), [("arm", "v6"), ("arm", "v7")], "arm/v7"),
        # arm with no variant is arm/v7
        (Platform("linux", "arm", "v7"), [("arm", "v6"), ("arm", "")], "arm/"),
        (Platform("linux", "amd64"), [("386", ""), ("amd64", "v1")], "amd64/v1"),
    ],
)
def test_an_index_without_the_nodes_own_variant_gives_the_best_it_runs(
    node: Platform, listed: list[tuple[str, str]], chosen: str
) -> None:
    index = {
        "manifests": [
            {"digest": f"{a}/{v}", "platform": {"os": "linux", "architecture": a, "variant": v}}
            for a, v in listed
        ]
    }
    assert platform_manifest(index, node) == chosen


def test_a_newer_variant_is_never_taken() -> None:
    index = {"manifests": [ARM_INDEX["manifests"][1]]}  # arm/v7 only
    with pytest.raises(Exception, match="no manifest for linux/arm/v6"):
        platform_manifest(index, Platform("linux", "arm", "v6"))


@pytest.mark.parametrize(
    ("machine", "expected"),
    [("armv7l", "linux/arm/v7"), ("armv6l", "linux/arm/v6"), ("armv8l", "linux/arm/v7"),
     ("aarch64", "linux/arm64/v8"), ("x86_64", "linux/amd64"), ("i686", "linux/386"),
     ("s390x", "linux/s390x")],
)  # fmt: skip
def test_the_machines_platform(machine: str, expected: str) -> None:
    assert str(node_platform(machine)) == expected


def test_ctr_is_told_the_nodes_platform(tmp_path: Path) -> None:
    """ctr 1.6 fetches only the named platform's manifest from an index; without
    --platform it names its own reading of the processor."""
    arguments = tmp_path / "arguments"
    ctr = tmp_path / "ctr"
    ctr.write_text(f'#!/bin/sh\necho "$@" >> {arguments}\nexit 1\n')
    ctr.chmod(0o755)
    store = ContainerdStore(
        str(tmp_path / "containerd.sock"), stall_timeout=5, pull_timeout=5, ctr=str(ctr),
        node=Platform("linux", "arm", "v7"),
    )  # fmt: skip
    with pytest.raises(PullFailed):
        store.pull(parse_reference("registry.example/x:1"))
    pulls = [line for line in arguments.read_text().splitlines() if " images pull " in line]
    assert pulls and all("--platform linux/arm/v7 " in line for line in pulls)


def test_names_are_fully_qualified_as_containerd_keeps_them() -> None:
    assert store_name(parse_reference("busybox")) == "docker.io/library/busybox:latest"
    digest = "sha256:" + "a" * 64
    assert store_name(parse_reference(f"ghcr.io/x/y@{digest}")) == f"ghcr.io/x/y@{digest}"


@pytest.mark.parametrize(
    ("domain", "plain"),
    [
        ("127.0.0.1:5000", True),
        ("localhost:5000", True),
        ("localhost", True),
        ("[::1]:5000", True),
        ("docker.io", False),
        ("registry.local:5000", False),
        ("127.example.com", False),
        (None, False),
    ],
)
def test_plain_http_only_for_loopback_registries(domain: str | None, plain: bool) -> None:
    assert plain_http(domain) is plain


@pytest.mark.parametrize(
    ("said", "kind"),
    [
        (
            'failed to resolve reference "127.0.0.1:29112/demo/one:nope": '
            "127.0.0.1:29112/demo/one:nope: not found",
            ErrorKind.NOT_FOUND,
        ),
        (
            'failed to resolve reference "127.0.0.1:1/x/y:1": failed to do request: Head '
            '"http://127.0.0.1:1/v2/x/y/manifests/1": dial tcp 127.0.0.1:1: connect: '
            "connection refused",
            ErrorKind.REGISTRY_UNREACHABLE,
        ),
        (  # the registry's end accepted the connection and closed it without an answer
            'failed to resolve reference "127.0.0.1:39531/cd/x:1": failed to do request: Head '
            '"http://127.0.0.1:39531/v2/cd/x/manifests/1": http: server closed idle connection',
            ErrorKind.REGISTRY_UNREACHABLE,
        ),
        (
            'failed to resolve reference "r.local/x:1": pulling from host r.local failed '
            "with status code [manifests 1]: 401 Unauthorized",
            ErrorKind.UNAUTHORIZED,
        ),
    ],
)
def test_what_ctr_says_is_classified(said: str, kind: ErrorKind) -> None:
    failure = classified(said, parse_reference("r.local/x:1"), engine="containerd", advice=ADVICE)
    assert failure.kind is kind
    if kind is ErrorKind.UNAUTHORIZED:  # the same logins as the Docker Engine's
        assert "give the worker a docker config.json" in failure.message
    else:
        assert "DOCKER_CONFIG" not in failure.message


@pytest.mark.parametrize(
    ("said", "kind"),
    [
        (
            'failed to dial "/run/containerd/containerd.sock": context deadline exceeded',
            ErrorKind.ENGINE_UNAVAILABLE,
        ),
        (  # containerd went away mid-pull: gRPC, not the registry
            "rpc error: code = Unavailable desc = error reading from server: EOF",
            ErrorKind.ENGINE_UNAVAILABLE,
        ),
        (  # containerd's own "not found" is not the image's absence
            'failed to prepare extraction snapshot "extract-1": parent snapshot sha256:ab '
            "does not exist: not found",
            ErrorKind.ENGINE_ERROR,
        ),
        (
            'failed to resolve reference "r.local/x:1": r.local/x:1: not found',
            ErrorKind.NOT_FOUND,
        ),
        (
            'failed to resolve reference "r.local/x:1": failed to do request: Head '
            '"https://r.local/v2/x/manifests/1": dial tcp: lookup r.local: no such host',
            ErrorKind.REGISTRY_UNREACHABLE,
        ),
    ],
)
def test_ctrs_failures_tell_containerd_from_the_registry(said: str, kind: ErrorKind) -> None:
    failure = ctr_failure(said, parse_reference("r.local/x:1"), "/run/containerd/containerd.sock")
    assert failure.kind is kind, failure


def test_event_lines_give_the_topic_and_the_name() -> None:
    """Lines ``ctr events`` (containerd 1.6.20) printed here."""
    assert event_of(
        '2026-12-02 14:01:39.663426903 +0000 UTC default /namespaces/create {"name":"p-1"}\n'
    ) == ("/namespaces/create", "p-1")
    assert event_of(
        "2026-12-02 14:00:21.043666078 +0000 UTC k8s.io /images/update "
        '{"name":"localhost:5000/try:1","labels":{"io.cri-containerd.image":"managed"}}'
    ) == ("/images/update", "localhost:5000/try:1")
    assert event_of("2026-12-02 14:00:21.05 +0100 CET k8s.io /snapshot/prepare") == (
        "/snapshot/prepare",
        None,
    )
    assert event_of("2026-12-02 14:00:21.05 +0000 UTC k8s.io /images/create {broken") == (
        "/images/create",
        None,
    )
    assert event_of("ctr: failed to dial") == ("", None)
    assert event_of("") == ("", None)


def cri_record(image_ref: object) -> dict[str, object]:
    """A container's extension as the CRI plugin (containerd 1.6) writes it and
    ``ctr containers info`` prints it: the value is base64 of the JSON record."""
    record = {"Version": "v1", "Metadata": {"ID": "abc", "Name": "app", "ImageRef": image_ref}}
    value = base64.b64encode(json.dumps(record).encode()).decode()
    return {"type_url": "github.com/containerd/cri/pkg/store/container/Metadata", "value": value}


def test_a_cri_containers_image_is_the_id_it_recorded_not_its_name() -> None:
    info = {
        "ID": "abc",
        "Image": "docker.io/library/app:latest",  # the tag may have moved since
        "Extensions": {CRI_CONTAINER_METADATA: cri_record("sha256:" + "1" * 64)},
    }
    assert container_image(info) == "sha256:" + "1" * 64


@pytest.mark.parametrize(
    "extensions",
    [
        None,
        {},
        {CRI_CONTAINER_METADATA: {"type_url": "x", "value": "not base64!"}},
        {CRI_CONTAINER_METADATA: {"value": base64.b64encode(b"[1, 2]").decode()}},
        {CRI_CONTAINER_METADATA: cri_record("")},
        {CRI_CONTAINER_METADATA: cri_record(None)},
    ],
)
def test_otherwise_a_containers_image_is_its_name(extensions: object) -> None:
    info = {"ID": "c1", "Image": "127.0.0.1:5000/p/app:1", "Extensions": extensions}
    assert container_image(info) == "127.0.0.1:5000/p/app:1"


def test_a_container_with_no_image_has_none() -> None:
    assert container_image({"ID": "c1", "Image": ""}) is None
    assert container_image(["not", "a", "record"]) is None
