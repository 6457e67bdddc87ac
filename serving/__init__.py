"""What puller's long-running programs (``puller-worker``, ``puller-http``,
``puller-blob-cache``) share.

- ``logs``: structlog to stdout, configured once per program
- ``http``, ``wsgi_server``: the HTTP server (on waitress), for the worker's health port,
  the HTTP gateway and the blob cache
- ``settings``: settings read from the environment, each declared once on its field
- ``program``: ``--help`` and ``--version``, signals, the open-file limit
"""
