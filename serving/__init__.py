"""What puller's long-running programs (``puller-worker``, ``puller-http``) share.

- ``logs``: structlog to stdout, configured once per program
- ``http``: a small threaded HTTP server (the standard library's), for the worker's
  health port and the HTTP gateway alike
- ``settings``: settings read from the environment, each declared once on its field
"""
