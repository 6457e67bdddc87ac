"""A node's image store: the contract every store keeps, Docker, containerd, their helpers."""
