"""puller's pull-through blob cache (``puller-blob-cache``): each blob of one upstream
registry crosses the uplink once, however many nodes ask for it (docs/blob-cache.md).

- ``main``: the command line
- ``server``: the HTTP side (a WSGI application under waitress)
- ``routes``: the strict reading of request targets
- ``upstream``: the upstream registry, and the memory of what it recently allowed
- ``fetch``: one fetch per blob, followed by every client; pass-through when no room
- ``store``: the kept blobs under ``--dir``, pins and eviction
- ``metrics``: Prometheus counters (``GET /metrics``)
"""
