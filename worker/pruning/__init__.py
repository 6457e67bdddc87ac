"""Removing images a node no longer needs: the rules, last use, prune requests."""
