"""Removing images a node no longer needs: the rules and a pass (``pruner``), the disk
watch and housekeeping (``disk_watch``), last use (``usage``), prune requests (``requests``)."""
