"""What to do with a pull request, and when: the service, its lanes, owed pulls, bad registries,
the image guard (answers and prunes never cross)."""
