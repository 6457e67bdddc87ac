"""The peer: a Celery app whose workers answer ``app.control.ping`` broadcasts.
Its broker is ``BENCH_AMQP_URL``."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("puller_bench", broker=os.environ.get("BENCH_AMQP_URL", "amqp://localhost//"))
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
