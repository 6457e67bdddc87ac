"""The node's Docker Engine as its image store: :class:`DockerEngine` (:mod:`.store`), which
speaks the Engine API through :mod:`.engine_api` and reads its answers with :mod:`.records`."""

from worker.stores.docker.store import DockerEngine

__all__ = ["DockerEngine"]
