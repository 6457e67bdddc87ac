"""puller's node daemon: one per node, bound to its own queue on the pull fanout exchange.

- ``main``: the ``puller-worker`` command; ``daemon``: :class:`Worker` (start, serve, drain)
- ``broker``: the AMQP connection (the only pika user on this side; owns the thread hop),
  handing over :class:`~worker.broker.delivery.Delivery`; ``admission``: whether to take a request
- ``stores``: a node's image store (the contract, Docker, containerd; the only docker SDK users)
- ``pulls``: what to do with a pull request, and when; ``pruning``: removing images;
  ``catch_up``: replaying what the node missed
- ``presence``, ``health``, ``metrics``, ``settings``, ``state_files``: the roster, the probes,
  Prometheus, configuration, the files in ``PULLER_STATE_DIR``
"""
