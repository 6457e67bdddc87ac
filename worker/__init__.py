"""puller's node daemon: one per node, bound to its own queue on the pull fanout exchange.

- ``broker``: the AMQP connection (the only pika user on this side)
- ``engine``: the node's Docker Engine (the only docker SDK user)
- ``service``: what to do with a request, on threads that are not the connection's
- ``settings``, ``logs``, ``main``: configuration, logging, the ``puller-worker`` command
"""
