"""A puller cluster on one machine, from real parts.

RabbitMQ, a distribution registry, one Docker Engine per simulated node (each
with its own socket and data root) and one ``puller-worker`` per node. Used by
the demo command, by the integration tests, and by anyone who wants to try
puller without a Kubernetes cluster.
"""
