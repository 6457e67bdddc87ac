"""The ``tls_rabbitmq`` fixture, checked with pika alone: the right CA connects, a wrong CA or
name does not, and the plain listener still answers. It also pins down how pika reports each
TLS failure, for the product code that must tell them apart.

Note: pika raises a failed TLS handshake as the ``ssl`` module's own exception, not wrapped in
any ``pika.exceptions`` class.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pika
import pytest

from tests.integration.conftest import TlsRabbitMq, tls_context

# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code gives them.
SELF_SIGNED_CERT_IN_CHAIN = 19  # the broker sends its CA along with its certificate
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20  # ...or only its own certificate
HOSTNAME_MISMATCH = 62


def parameters(
    url: str, trust: Path | ssl.SSLContext | None = None, server_hostname: str = "localhost"
) -> pika.URLParameters:
    """Parameters for ``url``; with ``trust`` (a CA file or a context), TLS as it says."""
    params = pika.URLParameters(url)
    params.socket_timeout = 5
    params.stack_timeout = 10
    if trust is not None:
        context = trust if isinstance(trust, ssl.SSLContext) else tls_context(trust)
        params.ssl_options = pika.SSLOptions(context, server_hostname)
    return params


def test_the_right_ca_connects_and_can_declare_a_queue(tls_rabbitmq: TlsRabbitMq) -> None:
    params = parameters(tls_rabbitmq.url, tls_rabbitmq.certificates.ca_file)
    with pika.BlockingConnection(params) as connection:
        declared = connection.channel().queue_declare("", exclusive=True)
        assert declared.method.queue.startswith("amq.gen-")


def test_the_certificate_is_valid_for_the_address_too(tls_rabbitmq: TlsRabbitMq) -> None:
    params = parameters(tls_rabbitmq.url, tls_rabbitmq.certificates.ca_file, "127.0.0.1")
    with pika.BlockingConnection(params) as connection:
        assert connection.is_open


def test_a_client_certificate_from_the_ca_is_accepted(tls_rabbitmq: TlsRabbitMq) -> None:
    certificates = tls_rabbitmq.certificates
    assert certificates.client_cert is not None
    assert certificates.client_key is not None
    context = tls_context(certificates.ca_file)
    context.load_cert_chain(certificates.client_cert, certificates.client_key)
    with pika.BlockingConnection(parameters(tls_rabbitmq.url, context)) as connection:
        assert connection.is_open
        exit_code, output = tls_rabbitmq.container.exec(
            ["rabbitmqctl", "--quiet", "list_connections", "ssl", "peer_cert_subject"]
        )
        assert exit_code == 0, output
        assert b"CN=guest" in output


def test_another_ca_fails_certificate_verification(tls_rabbitmq: TlsRabbitMq) -> None:
    params = parameters(tls_rabbitmq.url, tls_rabbitmq.certificates.other_ca_file)
    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        pika.BlockingConnection(params)
    assert failure.value.verify_code in {
        SELF_SIGNED_CERT_IN_CHAIN,
        UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    }, failure.value.verify_message
    assert "certificate verify failed" in str(failure.value)


def test_a_name_the_certificate_lacks_fails_verification(tls_rabbitmq: TlsRabbitMq) -> None:
    params = parameters(tls_rabbitmq.url, tls_rabbitmq.certificates.ca_file, "wrong.example")
    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        pika.BlockingConnection(params)
    assert failure.value.verify_code == HOSTNAME_MISMATCH, failure.value.verify_message


def test_the_plain_listener_still_works(tls_rabbitmq: TlsRabbitMq) -> None:
    with pika.BlockingConnection(parameters(tls_rabbitmq.plain_url)) as connection:
        declared = connection.channel().queue_declare("", exclusive=True)
        assert declared.method.queue.startswith("amq.gen-")


def test_tls_to_the_plain_port_fails_in_the_handshake(tls_rabbitmq: TlsRabbitMq) -> None:
    url = tls_rabbitmq.plain_url.replace("amqp://", "amqps://", 1)
    params = parameters(url, tls_rabbitmq.certificates.ca_file)
    with pytest.raises(ssl.SSLError) as failure:
        pika.BlockingConnection(params)
    assert not isinstance(failure.value, ssl.SSLCertVerificationError)


def test_plain_amqp_to_the_tls_port_fails(tls_rabbitmq: TlsRabbitMq) -> None:
    url = tls_rabbitmq.url.replace("amqps://", "amqp://", 1)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(parameters(url))
