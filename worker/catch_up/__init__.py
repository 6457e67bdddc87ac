"""Catch-up: replaying the requests a node missed from the history stream, and where it got to."""
