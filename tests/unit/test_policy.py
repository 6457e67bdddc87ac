"""The image policy, the worker's admission rules, the request cap, and secret settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract import ErrorKind, Misconfigured, parse_reference
from contract.connection import BrokerTls, check_url, split_urls
from contract.policy import ImagePolicy, allowed_prefixes
from publisher import Publisher
from serving.settings import InvalidSetting
from worker.admission import Admission, RequestLimiter, publisher_names
from worker.settings import WorkerSettings

CYBER_DOJO = allowed_prefixes("docker.io/cyberdojofoundation/")


@pytest.mark.parametrize(
    "image",
    [
        "cyberdojofoundation/gcc_assert:93eefc6",
        "docker.io/cyberdojofoundation/gcc_assert",
        "index.docker.io/cyberdojofoundation/gcc_assert@sha256:" + "a" * 64,
    ],
)
def test_an_allowed_prefix_admits_every_spelling_of_its_images(image: str) -> None:
    assert ImagePolicy(CYBER_DOJO).refusal(parse_reference(image)) is None


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "cyberdojofoundationevil/gcc_assert",  # a prefix is whole path components
        "ghcr.io/cyberdojofoundation/gcc_assert",  # another registry
        "localhost:5000/cyberdojofoundation/x",
    ],
)
def test_an_image_outside_the_prefixes_is_refused_naming_the_rule(image: str) -> None:
    reason = ImagePolicy(CYBER_DOJO).refusal(parse_reference(image))
    assert reason is not None
    assert "PULLER_ALLOWED_IMAGES" in reason
    assert "docker.io/cyberdojofoundation" in reason


def test_a_whole_registry_or_one_repository_can_be_allowed() -> None:
    policy = ImagePolicy(allowed_prefixes("localhost:5000, docker.io/library/busybox"))
    assert policy.refusal(parse_reference("localhost:5000/a/b:1")) is None
    assert policy.refusal(parse_reference("busybox:1.36")) is None
    assert policy.refusal(parse_reference("busyboxes")) is not None
    assert policy.refusal(parse_reference("localhost:5001/a")) is not None


@pytest.mark.parametrize(
    "entry",
    [
        "cyberdojofoundation/",
        "busybox",
        "index.docker.io/library/",
        "docker.io/Upper/",
        "a b/",
        "Docker.io/cyberdojofoundation/",
    ],
)
def test_a_prefix_not_in_normalised_form_is_refused_at_start_saying_how_to_write_it(
    entry: str,
) -> None:
    with pytest.raises(ValueError, match="normalised repository prefix"):
        allowed_prefixes(entry)


def test_a_prefix_with_a_tag_is_refused() -> None:
    with pytest.raises(ValueError, match="no tag or digest"):
        allowed_prefixes("docker.io/library/busybox:1")


def test_require_digest_refuses_tags_and_admits_digests() -> None:
    policy = ImagePolicy(require_digest=True)
    refused = policy.refusal(parse_reference("busybox:1.36"))
    assert refused is not None and "PULLER_REQUIRE_DIGEST" in refused
    assert policy.refusal(parse_reference("busybox@sha256:" + "b" * 64)) is None


def test_allowed_publishers_refuse_others_and_requests_with_no_user() -> None:
    admission = Admission(publishers=publisher_names("sessions, ops"))
    image = parse_reference("busybox")
    assert admission.refusal(image, "sessions") is None
    for who in ("mallory", None):
        refusal = admission.refusal(image, who)
        assert refusal is not None
        assert refusal.kind is ErrorKind.FORBIDDEN
        assert "PULLER_ALLOWED_PUBLISHERS" in refusal.message


def test_the_cap_counts_a_sliding_minute_and_says_when_to_ask_again() -> None:
    now = [1000.0]
    limiter = RequestLimiter(2, clock=lambda: now[0])
    image = parse_reference("busybox")
    assert limiter.refusal(image) is None
    now[0] += 30
    assert limiter.refusal(image) is None
    refusal = limiter.refusal(image)
    assert refusal is not None and refusal.kind is ErrorKind.RATE_LIMITED
    assert "ask again in 30 s" in refusal.message
    now[0] += 30  # the first one has left the window
    assert limiter.refusal(image) is None
    assert limiter.refusal(image) is not None


def test_the_amqp_url_can_come_from_a_file_and_is_never_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text("amqp://worker:s3cret-pw@rabbit:5672/%2F\n")
    settings = WorkerSettings.from_env({"PULLER_AMQP_URL_FILE": str(secret)})
    assert settings.amqp_url == "amqp://worker:s3cret-pw@rabbit:5672/%2F"
    with pytest.raises(InvalidSetting, match="not both"):
        WorkerSettings.from_env(
            {"PULLER_AMQP_URL_FILE": str(secret), "PULLER_AMQP_URL": "amqp://x"}
        )
    with pytest.raises(InvalidSetting, match="cannot be read") as missing:
        WorkerSettings.from_env({"PULLER_AMQP_URL_FILE": str(tmp_path / "nothing")})
    assert "s3cret" not in str(missing.value)
    with pytest.raises(InvalidSetting) as bad:
        WorkerSettings.from_env({"PULLER_AMQP_URL": "http://worker:s3cret-pw@rabbit/"})
    assert "amqps://" in str(bad.value) and "s3cret" not in str(bad.value)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(InvalidSetting, match="is empty"):  # never the default, as guest
        WorkerSettings.from_env({"PULLER_AMQP_URL_FILE": str(empty)})


@pytest.mark.parametrize(
    "url",
    [
        "amqp://puller:s3cr#tpass@rabbit:5672/%2F",  # '#' starts a fragment: port 's3cr'
        "amqp:/puller:s3cretpass@rabbit/",  # one slash: no host, the password in the path
        "amqp://puller:s3cr/tpass@rabbit/",
    ],
)
def test_a_url_with_an_unencoded_password_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(InvalidSetting, match="percent-encoded") as bad:
        WorkerSettings.from_env({"PULLER_AMQP_URL": url})
    assert "s3cr" not in str(bad.value)
    with pytest.raises(Misconfigured) as raised:
        Publisher(url, tls=BrokerTls(), policy=ImagePolicy())
    assert "s3cr" not in str(raised.value)


def test_unusable_tls_files_are_refused_at_start(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    with pytest.raises(InvalidSetting, match="TLS files cannot be used"):
        WorkerSettings.from_env(
            {"PULLER_AMQP_URL": "amqps://rabbit/", "PULLER_TLS_CA_FILE": str(ca)}
        )


def test_tls_files_with_a_plain_url_are_refused_never_used_in_clear(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used")
    with pytest.raises(InvalidSetting, match="amqps://"):
        WorkerSettings.from_env(
            {"PULLER_AMQP_URL": "amqp://rabbit/", "PULLER_TLS_CA_FILE": str(ca)}
        )
    with pytest.raises(InvalidSetting, match="does not exist"):
        WorkerSettings.from_env(
            {"PULLER_AMQP_URL": "amqps://rabbit/", "PULLER_TLS_CA_FILE": str(tmp_path / "no")}
        )
    assert BrokerTls(cert_file=ca).problem("amqps://rabbit/") is not None  # key missing


def test_worker_policy_settings_are_read_and_checked() -> None:
    settings = WorkerSettings.from_env(
        {
            "PULLER_ALLOWED_IMAGES": "docker.io/cyberdojofoundation/, localhost:5000",
            "PULLER_REQUIRE_DIGEST": "true",
            "PULLER_ALLOWED_PUBLISHERS": "sessions",
            "PULLER_MAX_REQUESTS_PER_MINUTE": "60",
        }
    )
    assert settings.allowed_images == ("docker.io/cyberdojofoundation", "localhost:5000")
    assert settings.require_digest is True
    assert settings.allowed_publishers == frozenset({"sessions"})
    assert settings.max_requests_per_minute == 60
    with pytest.raises(InvalidSetting, match="PULLER_REQUIRE_DIGEST"):
        WorkerSettings.from_env({"PULLER_REQUIRE_DIGEST": "maybe"})
    with pytest.raises(InvalidSetting, match="PULLER_ALLOWED_IMAGES"):
        WorkerSettings.from_env({"PULLER_ALLOWED_IMAGES": "cyberdojofoundation/"})


def test_several_brokers_are_each_checked() -> None:
    assert split_urls(" amqp://a/ , amqps://b:5671/v ,") == ["amqp://a/", "amqps://b:5671/v"]
    check_url("amqp://a/,amqps://b:5671/v")
    with pytest.raises(Misconfigured, match="amqp:// or amqps://"):
        check_url("amqp://a/,http://b/")
    with pytest.raises(Misconfigured, match="port is not a number"):
        check_url("amqp://a/,amqp://u:p#w@b/")
    assert BrokerTls(cert_file=None).problem("amqps://a/,amqp://b/") is None
    ca = BrokerTls(ca_file=Path(__file__))
    assert "amqps://" in (ca.problem("amqps://a/,amqp://b/") or "")
