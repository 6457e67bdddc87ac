"""puller's node daemon: one per node, bound to its own queue on the pull fanout exchange.

- ``main``: the ``puller-worker`` command; ``daemon``: :class:`Worker` (start, serve, drain)
- ``broker``: the AMQP connection (the only pika user on this side; owns the thread hop)
- ``engine``, ``image_index``: the node's Docker Engine (the only docker SDK users)
- ``model``: the worker's own types and protocols (no pika, no docker)
- ``service``: what to do with a request, and on which thread; ``slots``,
  ``registry_health``: which pull runs next, and what a bad registry costs
- ``catch_up``, ``history_ledger``: replaying what the node missed, and where it got to
- ``presence``, ``health``, ``metrics``: the roster, the probes, Prometheus
- ``settings``, ``logs``: configuration and logging
"""
