"""Benchmarks: puller against its floor (bare pika or bare docker) and its peer (Celery).

Run from the repository root after scripts/demo or scripts/test has set the machine up,
e.g. ``.venv/bin/python -m bench.round_trip``. Each script prints a table of figures and
ratios measured in the same run. See bench/README.md.
"""
