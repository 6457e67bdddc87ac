"""``puller-http``: puller over HTTP and JSON, a drop-in for cyber-dojo's original puller.

- ``api``: the routes: the original's (``/sha``, ``/alive``, ``/ready``, ``/pull_images``)
  and puller's own (``/pulls``, ``/nodes``, ``/openapi.json``, ``/metrics``)
- ``openapi``: the OpenAPI document that describes them
- ``metrics``: the gateway's Prometheus metrics
- ``settings``, ``main``: configuration and the command

A ``publisher.Publisher`` inside does the AMQP work; the HTTP server is the same small
threaded server as the worker's health port (``serving.http``).
"""
