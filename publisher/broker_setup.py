"""RabbitMQ users that can do what their role needs and nothing more (``puller broker-setup``).

Three roles, each a set of RabbitMQ permissions (configure, write, read regular expressions on
resource names) derived from :mod:`contract.topology`:

``admin``
    declares the shared topology (exchanges, streams, bindings): everything named ``puller.*``.
``worker``
    declares, binds and consumes its own node's queue; answers on ``puller.replies``; announces
    itself on ``puller.presence``; reads the history stream and puts markers into it through the
    ``puller.history`` exchange; reads and (as keeper) writes the desired state
    (``puller.desired``, ``puller.desired.stream``) and the keeper's token (``puller.keeper``,
    ``puller.keeper.token``). It may not publish pull requests.
``publisher``
    declares, binds and consumes its reply queues; publishes pull requests (live and history);
    reads the presence stream, and puts the roster's markers into it through the
    ``puller.presence`` exchange. It may not read any node's queue nor send answers.

What each AMQP operation needs (RabbitMQ's access-control table): declaring or deleting an
exchange or queue needs *configure* on it (a passive declaration needs nothing); ``queue.bind``
needs *write* on the queue and *read* on the exchange; ``basic.publish`` needs *write* on the
exchange (the default exchange is ``amq.default``, which no role gets: it would reach every
queue by name); ``basic.consume`` and ``basic.get`` need *read* on the queue.

RabbitMQ matches a permission against the resource's name whatever its kind, which is why the
streams are not named like the exchanges that feed them: the write a worker needs on the
``puller.history`` exchange gives it no write on the history stream, which would let it unbind
the stream and break catch-up for every node. What no pattern can stop: exchange-to-exchange
bindings need only write on the destination and read on the source, so a worker could bind
``puller.pulls`` to ``puller.presence`` (noise in the roster's stream), and a publisher
``puller.replies`` to ``puller.pulls`` (answers reach workers as malformed requests, which they
refuse). Those users are trusted not to; see docs/security.md.

What no permission can say either: "this queue only exclusive". A worker's user may declare its
node's queue durable and shared, and a publisher's user any number of durable reply queues.
:func:`bound_vhost` bounds what such a queue can cost (:class:`Bounds`): an operator policy on
the node and reply queues (``expires``: a queue nobody consumes goes away by itself;
``max-length``: it never holds more than that), one on the presence stream (``max-length-bytes``)
and the vhost's limits (``max-queues``, ``max-connections``). Operator policies win over a
queue's own arguments (the lower value applies), so a user cannot declare its way out of them.
A worker that finds its queue held by such a queue deletes it and declares its own.

:func:`setup` creates the vhost, the users (no tags: no management UI) and their permissions
through the management HTTP API; :func:`bound_vhost` puts the bounds on the vhost;
:func:`declare_topology` declares the shared topology as the admin user over AMQP.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions

from contract import topology as topo
from contract.connection import (
    PRECONDITION_FAILED,
    BrokerTls,
    broker_errors,
    connection_parameters,
    declare,
    where,
)
from contract.errors import PullerError

__all__ = [
    "Bounds",
    "BrokerSetupError",
    "BrokerUser",
    "Permissions",
    "Role",
    "UserSpec",
    "bound_vhost",
    "check_users",
    "declare_topology",
    "definitions",
    "operator_policies",
    "permissions",
    "setup",
    "vhost_limits",
]


class Role(StrEnum):
    ADMIN = "admin"
    WORKER = "worker"
    PUBLISHER = "publisher"


class Permissions(NamedTuple):
    """RabbitMQ's three regular expressions for one user on one vhost."""

    configure: str
    write: str
    read: str


class BrokerUser(NamedTuple):
    role: Role
    name: str
    password: str
    node: str | None = None
    """A worker's node (it may use that node's queue only); ``None``: any node."""

    def __repr__(self) -> str:  # never the password, wherever a user gets printed
        return f"BrokerUser(role={str(self.role)!r}, name={self.name!r}, node={self.node!r})"


UserSpec = tuple[Role | str, str, str, str | None]
"""A user as :func:`setup` takes it: role, name, password, node (a :class:`BrokerUser` is one)."""


class BrokerSetupError(PullerError):
    """The broker could not be set up; the message is one line and names no password."""


# -- the permissions ---------------------------------------------------------------------------


def _name(name: str) -> str:
    """One resource name, matched literally."""
    return re.escape(name)


def _prefixed(prefix: str) -> str:
    """Every name that starts with ``prefix`` and has something after it."""
    return f"{re.escape(prefix)}.+"


def _only(*alternatives: str) -> str:
    """A whole-name match of any of ``alternatives`` (RabbitMQ searches, it does not anchor)."""
    if len(alternatives) == 1:
        return f"^{alternatives[0]}$"
    return f"^(?:{'|'.join(alternatives)})$"


def _common_prefix() -> str:
    """What every name puller declares starts with, up to a dot: ``puller.``."""
    names = [
        topo.PULLS.name,
        topo.REPLIES.name,
        topo.PRESENCE.name,
        topo.HISTORY.name,
        topo.PRESENCE_STREAM.name,
        topo.HISTORY_STREAM_NAME,
        topo.DESIRED.name,
        topo.KEEPER.name,
        topo.DESIRED_STREAM.name,
        topo.KEEPER_TOKEN.name,
        topo.NODE_QUEUE_PREFIX,
        topo.REPLY_QUEUE_PREFIX,
    ]
    firsts = {name.split(".", 1)[0] for name in names}
    if len(firsts) != 1:
        raise AssertionError("puller's names no longer share a prefix: the admin role needs one")
    return f"{firsts.pop()}."


def permissions(role: Role | str, node: str | None = None) -> Permissions:
    """The permissions of ``role``; for a worker, on ``node``'s queue only (``None``: any
    node's)."""
    role = Role(role)
    if node is not None and role is not Role.WORKER:
        raise ValueError(f"only a worker has a node, not the {role.value} role")
    if node == "":
        raise ValueError("a node name is not empty")
    if role is Role.ADMIN:
        everything = f"^{re.escape(_common_prefix())}.*$"
        return Permissions(everything, everything, everything)
    if role is Role.WORKER:
        own_queue = (
            _prefixed(topo.NODE_QUEUE_PREFIX) if node is None else _name(topo.node_queue_name(node))
        )
        history = _name(topo.HISTORY_STREAM_NAME)
        return Permissions(
            configure=_only(own_queue),
            # queue.bind writes to the queue; answers, presence, history markers, the keeper's
            # snapshots of the desired state and its token are published
            write=_only(
                own_queue,
                _name(topo.REPLIES.name),
                _name(topo.PRESENCE.name),
                _name(topo.HISTORY.name),
                _name(topo.DESIRED.name),
                _name(topo.KEEPER.name),
            ),
            # consuming its queue, the history and desired state streams and the keeper's
            # token; queue.bind reads the pulls exchange
            read=_only(
                own_queue,
                _name(topo.PULLS.name),
                history,
                _name(topo.DESIRED_STREAM.name),
                _name(topo.KEEPER_TOKEN.name),
            ),
        )
    reply_queues = _prefixed(topo.REPLY_QUEUE_PREFIX)
    return Permissions(
        configure=_only(reply_queues),
        # requests (live and history), roster markers, and queue.bind on its reply queues
        write=_only(
            _name(topo.PULLS.name),
            _name(topo.HISTORY.name),
            _name(topo.PRESENCE.name),
            reply_queues,
        ),
        # consuming replies and the presence stream; queue.bind reads the replies exchange
        read=_only(reply_queues, _name(topo.REPLIES.name), _name(topo.PRESENCE_STREAM.name)),
    )


# -- the bounds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """What a vhost's queues, streams and connections may cost, whoever declares them."""

    queue_expires: float = 60.0
    """Seconds a node or reply queue lives with no consumer (puller's own always have one)."""
    queue_max_length: int = 10_000
    """Messages a node or reply queue holds at most; past that the oldest are dropped."""
    presence_max_bytes: int = 10 * 1000 * 1000
    """The presence stream's size bound (it is read from a few seconds back, for the roster)."""
    max_queues: int = 1000
    """Queues on the vhost: one per node and per publisher, three streams and the keeper's
    token queue. -1: none."""
    max_connections: int = 1000
    """Connections to the vhost: one per worker, two per publisher. -1: none."""

    def __post_init__(self) -> None:
        if self.queue_expires < 1:
            raise ValueError("the queues' expiry is at least 1 second")
        for name in ("queue_max_length", "presence_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} is at least 1")
        for name in ("max_queues", "max_connections"):
            if getattr(self, name) < -1:
                raise ValueError(f"{name.replace('_', ' ')} is -1 (no limit) or more")


OWN_QUEUES_POLICY = "puller-own-queues"
PRESENCE_POLICY = "puller-presence-stream"


def operator_policies(bounds: Bounds) -> dict[str, dict[str, object]]:
    """The operator policies :func:`bound_vhost` puts, by name, as the management API takes them."""
    own_queues = _prefixes(topo.NODE_QUEUE_PREFIX, topo.REPLY_QUEUE_PREFIX)
    return {
        OWN_QUEUES_POLICY: {
            "pattern": own_queues,
            "apply-to": "queues",
            "priority": 0,
            "definition": {
                "expires": max(1000, round(bounds.queue_expires * 1000)),
                "max-length": bounds.queue_max_length,
            },
        },
        PRESENCE_POLICY: {
            "pattern": _only(_name(topo.PRESENCE_STREAM.name)),
            "apply-to": "queues",
            "priority": 0,
            "definition": {"max-length-bytes": bounds.presence_max_bytes},
        },
    }


def vhost_limits(bounds: Bounds) -> dict[str, int]:
    return {"max-queues": bounds.max_queues, "max-connections": bounds.max_connections}


def _prefixes(*prefixes: str) -> str:
    """Every name that starts with one of ``prefixes``."""
    return f"^(?:{'|'.join(re.escape(prefix) for prefix in prefixes)})"


def definitions(
    vhost: str, users: Iterable[BrokerUser], bounds: Bounds | None = None
) -> dict[str, object]:
    """The vhost, the users' permissions and the bounds as RabbitMQ definitions
    (``rabbitmqctl import_definitions``). The users themselves are not in it: a definitions
    file carries password hashes, and this one is meant to be shown and kept."""
    bounds = bounds or Bounds()
    return {
        "vhosts": [{"name": vhost}],
        "permissions": [
            {"user": user.name, "vhost": vhost, **permissions(user.role, user.node)._asdict()}
            for user in check_users(users)
        ],
        "parameters": [
            *(
                {"vhost": vhost, "component": "operator_policy", "name": name, "value": value}
                for name, value in operator_policies(bounds).items()
            ),
            {
                "vhost": vhost,
                "component": "vhost-limits",
                "name": "limits",
                "value": vhost_limits(bounds),
            },
        ],
    }


def check_users(users: Iterable[UserSpec]) -> list[BrokerUser]:
    """``users`` as :class:`BrokerUser`, each name once, each node with a worker only."""
    checked: list[BrokerUser] = []
    for role, name, password, node in users:
        if not name:
            raise ValueError("a user name is not empty")
        if any(user.name == name for user in checked):
            raise ValueError(f"user {name!r} is named twice")
        user = BrokerUser(Role(role), name, password, node)
        permissions(user.role, user.node)  # a node with another role is refused here
        checked.append(user)
    return checked


# -- the management API ------------------------------------------------------------------------


def setup(
    management_url: str,
    vhost: str,
    users: Iterable[UserSpec],
    *,
    credentials: tuple[str, str],
    timeout: float = 10.0,
) -> None:
    """Creates ``vhost`` and ``users`` (role, name, password, node) with exactly their role's
    permissions on it, through RabbitMQ's management HTTP API at ``management_url`` (e.g.
    ``http://rabbitmq:15672``) as ``credentials`` (user, password; an administrator). Running
    it again is harmless: it puts the same state again (and the passwords it is given).
    Raises :class:`BrokerSetupError` (a user mistake: :class:`ValueError`)."""
    checked = check_users(users)
    if any(user.name == credentials[0] for user in checked):
        raise ValueError(
            f"{credentials[0]!r} is the management user: broker-setup would take its tags "
            "and change its password; give the puller users names of their own"
        )
    api = _ManagementApi(management_url, credentials, [user.password for user in checked], timeout)
    for user in checked:  # before changing anything
        existing = api.get(f"users/{_segment(user.name)}", f"look up user {user.name!r}")
        tags = existing.get("tags") if isinstance(existing, dict) else None
        if tags:
            raise BrokerSetupError(
                f"user {user.name!r} exists with tags {tags!r}: broker-setup does not change "
                "a user with tags (it would lose them and its password); pick another name"
            )
    api.put(f"vhosts/{_segment(vhost)}", {}, f"create vhost {vhost!r}")
    for user in checked:
        api.put(
            f"users/{_segment(user.name)}",
            {"password": user.password, "tags": ""},
            f"create user {user.name!r}",
        )
        api.put(
            f"permissions/{_segment(vhost)}/{_segment(user.name)}",
            permissions(user.role, user.node)._asdict(),
            f"set the permissions of {user.name!r} on vhost {vhost!r}",
        )


def bound_vhost(
    management_url: str,
    vhost: str,
    bounds: Bounds,
    *,
    credentials: tuple[str, str],
    timeout: float = 10.0,
) -> None:
    """Puts ``bounds`` on ``vhost`` (which exists): the operator policies
    (:func:`operator_policies`) and the vhost's limits (:func:`vhost_limits`), through the
    management API as ``credentials`` (an administrator: operator policies need that tag).
    Running it again puts the same state. Raises :class:`BrokerSetupError`."""
    api = _ManagementApi(management_url, credentials, [], timeout)
    where = _segment(vhost)
    for name, policy in operator_policies(bounds).items():
        api.put(
            f"operator-policies/{where}/{_segment(name)}",
            policy,
            f"set operator policy {name!r} on vhost {vhost!r}",
        )
    for name, value in vhost_limits(bounds).items():
        api.put(f"vhost-limits/{where}/{name}", {"value": value}, f"set {name} on vhost {vhost!r}")


def _segment(text: str) -> str:
    return quote(text, safe="")


class _ManagementApi:
    def __init__(
        self, url: str, credentials: tuple[str, str], secrets: list[str], timeout: float
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"the management URL is http(s)://HOST:PORT, not {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("give the management API's credentials apart, not in its URL")
        self._base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        user, password = credentials
        self._user = user
        self._authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._secrets = [secret for secret in (password, *secrets) if secret]
        self._timeout = timeout

    def put(self, path: str, body: Mapping[str, object], what: str) -> None:
        self._call("PUT", path, body, what)

    def get(self, path: str, what: str) -> object:
        """The resource as JSON; ``None`` when it does not exist."""
        return self._call("GET", path, None, what)

    def _call(self, method: str, path: str, body: Mapping[str, object] | None, what: str) -> object:
        request = urllib.request.Request(  # noqa: S310 - http(s) only, checked in __init__
            f"{self._base}/api/{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": self._authorization, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                data = response.read()
        except urllib.error.HTTPError as error:
            with error:  # its connection
                if method == "GET" and error.code == 404:
                    return None
                raise BrokerSetupError(self._refusal(error, what)) from None
        except OSError as error:  # URLError (refused, unknown host), a timeout
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            detail = f"{type(reason).__name__}: {reason}" if isinstance(reason, OSError) else reason
            raise BrokerSetupError(
                _one_line(f"cannot reach RabbitMQ's management API at {self._base}: {detail}")
            ) from None
        try:
            return json.loads(data) if data else None
        except ValueError:
            return None

    def _refusal(self, error: urllib.error.HTTPError, what: str) -> str:
        at = f"RabbitMQ's management API at {self._base}"
        if error.code == 401:
            return f"{at} refused user {self._user!r}: wrong user name or password (401)"
        if error.code == 403:
            return (
                f"{at} does not let user {self._user!r} {what} (403): "
                "it takes a user with the administrator tag"
            )
        return _one_line(f"{at} could not {what}: {error.code} {error.reason}{self._reason(error)}")

    def _reason(self, error: urllib.error.HTTPError) -> str:
        """The broker's own words, if it said any; whatever it echoed, without a password."""
        try:
            body = json.loads(error.read() or b"{}")
        except (ValueError, OSError):
            return ""
        reason = body.get("reason") if isinstance(body, dict) else None
        if not reason:
            return ""
        text = str(reason)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f": {text}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- the topology ------------------------------------------------------------------------------


def declare_topology(
    amqp_url: str,
    *,
    history_max_age: float = topo.DEFAULT_HISTORY_MAX_AGE,
    history_max_bytes: int = topo.DEFAULT_HISTORY_MAX_BYTES,
    connect_timeout: float = 10.0,
    tls: BrokerTls | None = None,
) -> None:
    """Declares the shared topology (:func:`contract.topology.shared_declarations`, the history
    stream with this retention) on the broker at ``amqp_url``, as the admin user.
    Declaring again what is there already is harmless. Raises
    :class:`~contract.BrokerUnavailable` when the broker cannot be reached and
    :class:`BrokerSetupError` when it refuses a declaration."""
    problem = (tls or BrokerTls()).problem(amqp_url)
    if problem is not None:
        raise BrokerSetupError(problem)
    try:
        parameters = connection_parameters(
            amqp_url, heartbeat=60, connect_timeout=connect_timeout, blocked_timeout=60, tls=tls
        )
    except ValueError as error:
        raise BrokerSetupError(str(error)) from None
    with broker_errors("cannot connect to RabbitMQ", parameters):
        connection = pika.BlockingConnection(parameters)
        try:
            channel = connection.channel()
            history = topo.history_stream(history_max_age, history_max_bytes)
            for item in topo.shared_declarations(history):
                try:
                    declare(channel, item)
                except pika.exceptions.ChannelClosedByBroker as error:
                    hint = (
                        " (it exists with other settings: RabbitMQ does not change them; "
                        "delete it first to change them)"
                        if error.reply_code == PRECONDITION_FAILED
                        else ""
                    )
                    raise BrokerSetupError(
                        f"RabbitMQ at {where(parameters)} refused to declare {_what(item)}: "
                        f"{error.reply_code} {error.reply_text}{hint}"
                    ) from None
        finally:
            if connection.is_open:
                connection.close()


def _what(item: topo.Declaration) -> str:
    if isinstance(item, topo.Exchange):
        return f"exchange {item.name!r}"
    if isinstance(item, topo.Queue):
        return f"{'stream' if item.is_stream else 'queue'} {item.name!r}"
    return f"the binding of {item.queue!r} to {item.exchange!r}"
